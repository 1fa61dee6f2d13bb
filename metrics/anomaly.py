"""Anomaly detection and localisation metrics for UniAD-style anomaly maps (reference/anomaly.md §1.3, §1.5, §3).

Conventions shared by every function here:
    maps   (N, H, W) or (N, 1, H, W) anomaly scores, higher = more anomalous, any float unit (UniAD: the L2 norm
           of the feature reconstruction error, never normalised); numpy arrays or torch tensors.
    masks  same spatial size as the maps; a pixel is anomalous where mask > 0 (0/1, 0/255 or bool).
    labels (N,) image labels, nonzero = anomalous. Kept explicit: UniAD derives the image label from the mask and
           fills a missing mask of a defective image with 255 (§8 bug 6); here a defective image without a mask
           keeps label 1 and is simply left out of the pixel metrics.
    Decision rule everywhere (AUPRO thresholds and both threshold helpers): a pixel or image is called anomalous
    when score >= threshold, so one threshold admits all tied scores at once.

AUROC is scikit-learn's ``roc_auc_score`` on the raw scores and is never flipped when below 0.5 (UniAD's
``if auc < 0.5: auc = 1 - auc`` hides sign bugs, §8 bug 1). It is NaN, not an exception, when only one class is
present, so one degenerate category does not end a training run's evaluation.

AUPRO (per-region overlap, Bergmann et al. MVTec AD; anomalib ``AUPRO(fpr_limit=0.3)``):
    regions   connected components of each ground-truth mask with 8-connectivity (a 3 x 3 structuring element,
              as the MVTec AD evaluation code's ``scipy.ndimage.label(gt, np.ones((3, 3)))`` and OpenCV's default
              ``connectedComponents`` used by anomalib); labelled per image, so regions never span images.
    PRO(t)    mean over all regions r of all images of |{p in r : score_p >= t}| / |r|.
    FPR(t)    |{normal p : score_p >= t}| / |{normal p}|, normal = mask == 0 in any image with a mask.
    curve     one point per distinct score (exact, no binning), from (0, 0) at t = +inf to (1, 1); consecutive
              points are joined linearly (trapezoidal rule). A threshold that admits normal and anomalous pixels
              of the same score moves diagonally, not as a staircase.
    AUPRO     integral of PRO over FPR in [0, fpr_limit], the curve cut at exactly fpr_limit by linear
              interpolation between the last point at or below the limit and the first above it, divided by
              fpr_limit, so a perfect map gives 1 and a map that ranks every normal pixel first gives 0.
PRO is linear in the pixels it admits: admitting pixel p of region r adds 1 / (R |r|) to PRO (R regions). So
after sorting the anomalous pixels by score, one cumulative sum of those weights gives PRO at every threshold,
and the FPR at the same thresholds is a count of normal scores (``searchsorted`` in the sorted normal scores); no
per-region or per-threshold loop. Only normal scores at or above the one where the FPR first passes the limit can
change the curve below the limit, so only those are sorted (a partition finds them). The full MVTec AD test set
(1725 maps of 224 x 224, 87 M pixels) in one call is timed in benchmarks/anomaly_aupro.py.

``anomaly_map`` is the one torch function here: it turns the model's two feature maps into the score map on the
evaluation device (so the maps, not the 272-channel features, are gathered across processes). It lives here and
not in losses/ because it is an evaluation score, not a training objective (UniAD trains on the MSE only, §1.4),
and not in models/ because it has no parameters and any feature-reconstruction model shares it.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connectivity: diagonal neighbours belong to the same region
FPR_LIMIT = 0.3                             # anomalib / MVTec AD default integration limit of AUPRO
POOL = 16                                   # UniAD's EvalImageMax avg-pool kernel (px) at 224 input
SCORE_METHODS = ("max", "mean", "std")


def anomaly_map(feature_rec: torch.Tensor, feature_align: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """UniAD anomaly map: per-position L2 norm of the reconstruction error, upsampled to the input size.

    feature_rec, feature_align: (B, C, h, w) (UniAD: C = 272, h = w = input / 16). size: the input (H, W) in px,
    or one int for a square input. Returns (B, 1, H, W) float32:
        sqrt(sum_c (feature_rec - feature_align)^2)   (not squared, not normalised; §1.3 step 9, §8 bug 12)
    resized with bilinear interpolation, align_corners=True (UniAD's ``UpsamplingBilinear2d``; with
    align_corners=True an explicit size gives the same grid as its scale factor 16 and also works for input
    sizes that are not multiples of 16). Computed in float32 so bf16 features under autocast give the same map.
    """
    if feature_rec.shape != feature_align.shape or feature_rec.ndim != 4:
        raise ValueError(f"feature_rec and feature_align must be the same (B, C, h, w), "
                         f"got {tuple(feature_rec.shape)} and {tuple(feature_align.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    diff = feature_rec.float() - feature_align.float()
    norm = diff.pow(2).sum(dim=1, keepdim=True).sqrt()                       # (B, 1, h, w)
    return F.interpolate(norm, size=size, mode="bilinear", align_corners=True)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_maps(maps, name: str = "maps") -> np.ndarray:
    """(N, H, W) float array (a view where possible); (N, 1, H, W) is squeezed, integers become float64."""
    maps = _numpy(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got shape {maps.shape}")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    return maps


def _as_masks(masks, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean (N, H, W), True = anomalous pixel (mask > 0), checked against the maps' shape."""
    masks = _numpy(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != shape:
        raise ValueError(f"masks must match the maps' shape {shape} (N, H, W), got {masks.shape}")
    return masks if masks.dtype == bool else masks > 0


def _check_finite(scores: np.ndarray, name: str) -> None:
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} holds NaN or infinite scores ({int((~np.isfinite(scores)).sum())} values): "
                         "no threshold can rank them")


def image_scores(maps, method: str = "max", pool: int = POOL) -> np.ndarray:
    """Per-image anomaly score, (N,) float64, from maps (N, H, W) or (N, 1, H, W) (§1.5).

    "max": maximum of the map average-pooled with a pool x pool kernel (px), stride 1, no padding (UniAD's
    EvalImageMax, the score the paper reports for MVTec AD; at 224 px a 209 x 209 pooled map). The kernel is
    clipped to the map, so a map smaller than the kernel scores its mean. pool = 1 is the plain maximum.
    "mean": mean of the map (UniAD uses it on CIFAR-10; it collapses on small defects, issue #6).
    "std": population standard deviation of the map (ddof = 0, numpy's default as in UniAD).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
    if pool < 1:
        raise ValueError(f"pool must be >= 1 px, got {pool}")
    maps = _as_maps(maps)
    n, h, w = maps.shape
    kh, kw = min(pool, h), min(pool, w)
    out = np.empty(n, dtype=np.float64)
    # Chunks of ~64 MiB of float64 keep the temporaries small for the 1725 x 224 x 224 MVTec test set.
    chunk = max(1, (8 << 20) // ((h + 1) * (w + 1)))
    for start in range(0, n, chunk):
        block = maps[start:start + chunk].astype(np.float64)
        if method == "mean":
            out[start:start + len(block)] = block.reshape(len(block), -1).mean(axis=1)
        elif method == "std":
            out[start:start + len(block)] = block.reshape(len(block), -1).std(axis=1)
        else:
            # Window sums from an integral image cost O(HW) per map whatever the kernel, avg_pool2d O(HW k^2):
            # ~3.5 s against ~14 s for the 1725 MVTec maps at k = 16 on one CPU core. float64 keeps them exact.
            integral = np.zeros((len(block), h + 1, w + 1), dtype=np.float64)
            np.cumsum(np.cumsum(block, axis=1), axis=2, out=integral[:, 1:, 1:])
            sums = (integral[:, kh:, kw:] - integral[:, :-kh, kw:]
                    - integral[:, kh:, :-kw] + integral[:, :-kh, :-kw])      # (n, H - kh + 1, W - kw + 1)
            out[start:start + len(block)] = sums.reshape(len(block), -1).max(axis=1) / (kh * kw)
    return out


def auroc(scores, labels) -> float:
    """Raw ROC AUC of scores (N,) against labels (N,) (nonzero = anomalous), in [0, 1]; NaN when one class is absent.

    Never flipped: 0.0 means the scores rank every normal sample above every anomalous one.
    """
    scores = _numpy(scores).reshape(-1)
    labels = _numpy(labels).reshape(-1) != 0
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels lengths differ: {scores.shape[0]} vs {labels.shape[0]}")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        return float("nan")
    _check_finite(scores, "scores")
    return float(roc_auc_score(labels, scores))


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """1 / |region| for every anomalous pixel, in the C order of masks (N, H, W) bool, and the number of regions."""
    weights = np.empty(int(np.count_nonzero(masks)), dtype=np.float64)
    start, n_regions = 0, 0
    # One label call per image so that regions cannot join across neighbouring images of the stack.
    for i in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):
        labels, n = ndimage.label(masks[i], structure=CONNECTIVITY)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        w = 1.0 / sizes[labels[masks[i]]]
        weights[start:start + w.size] = w
        start += w.size
        n_regions += n
    return weights, n_regions


def pro_curve(maps, masks, max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (definitions in the module docstring) as the corners of a polyline: (fpr, pro), float64 (K,).

    FPR only moves when a threshold passes a normal score and PRO only when it passes an anomalous one, so the
    curve runs horizontally between anomalous scores. For each distinct anomalous score a, in decreasing order, it
    has two corners: just before a is admitted (#normal > a, PRO over scores > a) and at a (#normal >= a,
    PRO over scores >= a); a normal score tied with a turns that step into a diagonal. The polyline starts at
    (0, 0) (threshold +inf) and, with max_fpr = 1, ends at (1, 1). With max_fpr < 1 it ends at the first
    threshold whose FPR exceeds max_fpr (the (floor(max_fpr * n_normal) + 1)-th largest normal score), which
    is all that integrating up to max_fpr needs. Raises ValueError when the masks hold no anomalous or no
    normal pixel.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps.shape)
    scores = maps.reshape(-1)
    anomalous = masks.reshape(-1)
    _check_finite(scores, "maps")
    region_weight, n_regions = _region_weights(masks)
    n_normal = anomalous.size - region_weight.size
    if n_regions == 0:
        raise ValueError("PRO is undefined: the masks hold no anomalous pixel")
    if n_normal == 0:
        raise ValueError("PRO is undefined: the masks hold no normal pixel")

    # Normal scores are only counted, never permuted with a payload, so a plain in-place sort (SIMD in numpy)
    # does; only the few anomalous pixels need an argsort to carry their region weights along.
    normal_scores = scores[~anomalous]
    anomalous_scores = scores[anomalous]
    fp_end = n_normal
    if max_fpr < 1.0:
        # t_cut = the n_need-th largest normal score: thresholds above it admit at most floor(max_fpr * n_normal)
        # normal pixels (FPR <= max_fpr), t_cut itself admits more. Lower thresholds never matter, so only the
        # normal scores >= t_cut (the top of a partition) are sorted and lower anomalous scores are dropped.
        n_need = min(n_normal, math.floor(max_fpr * n_normal) + 1)
        kth = n_normal - n_need
        normal_scores.partition(kth)
        t_cut = normal_scores[kth]
        fp_end = n_need + int(np.count_nonzero(normal_scores[:kth] == t_cut))  # ties below the partition point
        normal_scores = normal_scores[kth:]
        keep = anomalous_scores >= t_cut
        anomalous_scores, region_weight = anomalous_scores[keep], region_weight[keep]
    normal_scores.sort()

    order = np.argsort(anomalous_scores)[::-1]                                 # decreasing; ties in any order
    a_sorted = anomalous_scores[order]
    cum_pro = np.concatenate([[0.0], np.cumsum(region_weight[order])]) / n_regions
    del order
    # A threshold admits a whole run of equal scores at once: one corner pair per run.
    ends = np.flatnonzero(a_sorted[1:] != a_sorted[:-1])
    if a_sorted.size:
        ends = np.append(ends, a_sorted.size - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])[:ends.size]
    values = a_sorted[ends]
    # searchsorted is quickest with increasing keys: query in increasing order, then flip back.
    fp_gt = normal_scores.size - np.searchsorted(normal_scores, values[::-1], side="right")[::-1]
    fp_ge = normal_scores.size - np.searchsorted(normal_scores, values[::-1], side="left")[::-1]
    if max_fpr < 1.0:
        fp_ge[values == t_cut] = fp_end                      # the normal scores tied with t_cut below the partition
    k = values.size
    fpr = np.empty(2 * k + 2, dtype=np.float64)
    pro = np.empty(2 * k + 2, dtype=np.float64)
    fpr[0] = pro[0] = 0.0
    fpr[1:-1:2], fpr[2:-1:2], fpr[-1] = fp_gt, fp_ge, fp_end
    pro[1:-1:2], pro[2:-1:2], pro[-1] = cum_pro[starts], cum_pro[ends + 1], cum_pro[-1]
    fpr /= n_normal
    np.minimum(pro, 1.0, out=pro)                                              # rounding may reach 1 + 1e-15
    if max_fpr == 1.0:
        pro[-1] = 1.0                                                          # every region fully admitted
    return fpr, pro


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoidal area under a piecewise-linear curve (fpr non-decreasing, from fpr[0] = 0) on [0, fpr_limit],
    divided by fpr_limit; the point at exactly fpr_limit is interpolated linearly."""
    j = int(np.searchsorted(fpr, fpr_limit, side="right"))                    # first point beyond the limit
    if j < fpr.size:
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr, pro = np.append(fpr[:j], fpr_limit), np.append(pro[:j], y_limit)
    # Written out rather than np.trapezoid, which numpy 1.26 (our lower bound) lacks.
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0 / fpr_limit)


def aupro(maps, masks, fpr_limit: float = FPR_LIMIT) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit], in [0, 1] (module docstring).

    maps (N, H, W) or (N, 1, H, W) scores; masks the same shape, > 0 = anomalous. Include the normal images
    (all-zero masks): their pixels count in the FPR. NaN when the masks hold no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps.shape)
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous == 0 or n_anomalous == masks.size:
        return float("nan")
    fpr, pro = pro_curve(maps, masks, max_fpr=fpr_limit)
    return area_to_limit(fpr, pro, fpr_limit)


def threshold_at_fpr(normal_scores, fpr: float = 0.01) -> float:
    """Deployment threshold from normal validation scores (images or pixels; any shape, flattened).

    Rule: with n normal scores and k = floor(fpr * n), the threshold is the smallest value above the (k + 1)-th
    largest normal score v, i.e. the next float after v, so that "anomalous iff score >= threshold" (this module's
    rule) flags exactly the scores > v: at most k normal scores (a fraction <= fpr), fewer when scores tie at v.
    v is the empirical (1 - fpr) quantile, numpy's ``np.quantile(s, 1 - fpr, method="inverted_cdf")`` (the smallest
    score whose empirical CDF reaches 1 - fpr); the integer k avoids that call's rounding of (1 - fpr) n.
    fpr = 0 gives a threshold just above the largest normal score. Returns a float in the scores' dtype precision.
    """
    scores = _numpy(normal_scores).reshape(-1)
    if scores.size == 0:
        raise ValueError("threshold_at_fpr needs at least one normal score")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    _check_finite(scores, "normal_scores")
    k = math.floor(fpr * scores.size)
    v = np.partition(scores, scores.size - 1 - k)[scores.size - 1 - k]
    return float(np.nextafter(v, scores.dtype.type(np.inf)))


def max_f1_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of "anomalous iff score >= threshold" on labelled scores (N,), labels (N,).

    Uses scikit-learn's ``precision_recall_curve``; every distinct score is a candidate. Ties in F1 go to the
    lowest threshold. For images or pixels of a validation set with labelled defects; raises ValueError when the
    labels hold no anomalous or no normal sample (the F1 optimum would be meaningless).
    """
    scores = _numpy(scores).reshape(-1)
    labels = _numpy(labels).reshape(-1) != 0
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels lengths differ: {scores.shape[0]} vs {labels.shape[0]}")
    if labels.all() or not labels.any():
        raise ValueError("max_f1_threshold needs both normal and anomalous samples")
    _check_finite(scores, "scores")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision 1, recall 0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))                                                  # thresholds increase: first = lowest
    return float(thresholds[best]), float(f1[best])


def anomaly_metrics(maps, masks, labels, categories, category_names: Sequence[str], has_mask=None,
                    pool: int = POOL, fpr_limit: float = FPR_LIMIT) -> dict[str, float]:
    """Per-category and mean image AUROC, pixel AUROC and AUPRO, fractions in [0, 1].

    maps (N, H, W) or (N, 1, H, W); masks the same shape (> 0 = anomalous); labels (N,) nonzero = anomalous image;
    categories (N,) integer ids into category_names; has_mask (N,) bool, True where masks[i] is ground truth
    (normal test images: True with an all-zero mask; defective images without a mask file: False). Default: all
    True. Gather every array with ``gather_for_metrics`` first; per-rank values would be wrong.

    Keys, for each category c present in categories (in category_names order):
        image_auroc/c        image AUROC of the "max" score (avg-pool ``pool`` px, §1.5), all images of c
        image_auroc_mean/c   the same with the "mean" score; image_auroc_std/c with the "std" score
        pixel_auroc/c        AUROC over all pixels of c's images that have a mask
        aupro/c              AUPRO (fpr_limit) over the same pixels
    and image_auroc, image_auroc_mean, image_auroc_std, pixel_auroc, aupro: unweighted means over categories
    (UniAD's ``mean_*_auc``). An undefined value (a category with only normal or only anomalous images, or no
    mask with both anomalous and normal pixels) is NaN, left out of the mean and named with its reason in one
    RuntimeWarning; the mean is NaN only if no category defines the metric.
    """
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps.shape)
    n = len(maps)
    labels = _numpy(labels).reshape(-1) != 0
    categories = _numpy(categories).reshape(-1)
    has_mask = np.ones(n, dtype=bool) if has_mask is None else _numpy(has_mask).reshape(-1).astype(bool)
    for name, arr in (("labels", labels), ("categories", categories), ("has_mask", has_mask)):
        if arr.shape[0] != n:
            raise ValueError(f"{name} must have one entry per map ({n}), got {arr.shape[0]}")
    if not np.issubdtype(categories.dtype, np.integer) or (n and (categories.min() < 0
                                                                  or categories.max() >= len(category_names))):
        raise ValueError(f"categories must be integer ids in [0, {len(category_names)}) into category_names")
    bad = np.flatnonzero(~labels & has_mask & masks.reshape(n, -1).any(axis=1))
    if bad.size:
        raise ValueError(f"{bad.size} images labelled normal have anomalous mask pixels (first index {bad[0]}): "
                         "labels and masks disagree")
    _check_finite(maps, "maps")

    scores = {method: image_scores(maps, method, pool) for method in SCORE_METHODS}
    image_keys = {"max": "image_auroc", "mean": "image_auroc_mean", "std": "image_auroc_std"}
    out: dict[str, float] = {}
    reasons: list[str] = []
    for cid, cat in enumerate(category_names):
        idx = np.flatnonzero(categories == cid)
        if idx.size == 0:
            continue
        n_bad = int(labels[idx].sum())
        for method, key in image_keys.items():
            out[f"{key}/{cat}"] = auroc(scores[method][idx], labels[idx])
        if n_bad in (0, idx.size):
            reasons.append(f"image AUROC of {cat}: only {'normal' if n_bad == 0 else 'anomalous'} images "
                           f"({idx.size})")

        pix = idx[has_mask[idx]]
        n_anomalous_px = int(np.count_nonzero(masks[pix]))
        if pix.size == 0 or n_anomalous_px in (0, pix.size * maps.shape[1] * maps.shape[2]):
            out[f"pixel_auroc/{cat}"] = out[f"aupro/{cat}"] = float("nan")
            why = ("no image with a mask" if pix.size == 0 else
                   "no anomalous pixel in its masks" if n_anomalous_px == 0 else "no normal pixel in its masks")
            reasons.append(f"pixel AUROC and AUPRO of {cat}: {why}")
            continue
        cat_maps, cat_masks = maps[pix], masks[pix]
        out[f"pixel_auroc/{cat}"] = float(roc_auc_score(cat_masks.reshape(-1), cat_maps.reshape(-1)))
        out[f"aupro/{cat}"] = aupro(cat_maps, cat_masks, fpr_limit)

    for key in (*image_keys.values(), "pixel_auroc", "aupro"):
        values = [v for k, v in out.items() if k.startswith(key + "/")]
        defined = [v for v in values if not math.isnan(v)]
        out[key] = float(np.mean(defined)) if defined else float("nan")
    if reasons:
        warnings.warn("anomaly_metrics: NaN, left out of the category means: " + "; ".join(reasons),
                      RuntimeWarning, stacklevel=2)
    return out

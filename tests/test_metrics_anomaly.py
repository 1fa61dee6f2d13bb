"""Anomaly metrics on hand-made cases; AUPRO against a brute-force sweep of every threshold.

The brute-force reference labels regions with its own 8-neighbour flood fill (not scipy), computes PRO and FPR
at every distinct score straight from the definitions, and integrates segment by segment, cutting the segment
that crosses the FPR limit by linear interpolation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses.anomaly import feature_mse
from metrics.anomaly import (anomaly_map, anomaly_metrics, area_to_limit, aupro, auroc, image_scores, max_f1_threshold,
                             pro_curve, threshold_at_fpr)


def flood_fill_regions(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected regions of one (H, W) mask."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    h, w = mask.shape
    for i0, j0 in zip(*np.nonzero(mask)):
        if seen[i0, j0]:
            continue
        region = np.zeros_like(seen)
        stack = [(i0, j0)]
        seen[i0, j0] = True
        while stack:
            i, j = stack.pop()
            region[i, j] = True
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < h and 0 <= b < w and mask[a, b] and not seen[a, b]:
                        seen[a, b] = True
                        stack.append((a, b))
        regions.append(region)
    return regions


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    regions = [(i, r) for i, m in enumerate(masks) for r in flood_fill_regions(m)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        admitted = maps >= t
        fpr = (admitted & normal).sum() / normal.sum()
        pro = np.mean([admitted[i][r].mean() for i, r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y) / 2
            break
    return area / limit


def random_case(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 10, 12)) < 0.18      # scattered pixels: many small, touching and diagonal regions
    masks[1] = False                            # one normal image
    masks[2, 2:6, 3:9] = True                   # and one large region
    if ties:
        maps = rng.integers(0, 6, masks.shape) / 5.0 + 0.4 * masks   # few levels: ties inside and across classes
    else:
        maps = rng.normal(size=masks.shape) + 1.0 * masks
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.123, 1.0])
def test_aupro_matches_brute_force(seed, ties, limit):
    maps, masks = random_case(seed, ties)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_force_aupro(maps, masks, limit), abs=1e-12)


def test_aupro_float32_torch_and_channel_inputs():
    maps, masks = random_case(3, ties=False)
    maps = maps.astype(np.float32)
    expected = brute_force_aupro(maps.astype(np.float64), masks, 0.3)
    as_torch = aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks.astype(np.uint8) * 255)[:, None])
    assert as_torch == pytest.approx(expected, abs=1e-12)


def test_pro_curve_corners_and_truncation():
    maps, masks = random_case(4, ties=True)
    fpr, pro = pro_curve(maps, masks)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-15)
    assert len(fpr) == 2 * len(np.unique(maps[masks])) + 2                   # two corners per anomalous score
    truncated = pro_curve(maps, masks, max_fpr=0.3)
    past = truncated[0] > 0.3
    assert past[-1] and np.all(truncated[0][past] == truncated[0][-1])         # stops at the first FPR past the limit
    k = int((~past).sum())
    for part, whole in zip(truncated, (fpr, pro)):
        np.testing.assert_allclose(part[:k], whole[:k], rtol=0, atol=1e-12)
    for limit in (0.3, 0.2, 0.01):
        assert area_to_limit(*truncated, limit) == pytest.approx(area_to_limit(fpr, pro, limit), abs=1e-12)


def test_aupro_perfect_and_inverse_maps():
    _, masks = random_case(5, ties=False)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks * 3.0 + 1.0, masks, fpr_limit=0.01) == pytest.approx(1.0, abs=1e-12)
    assert aupro(-masks.astype(np.float64), masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # (0,0) and (1,1) touch diagonally: one 3-pixel region with (1,2) under 8-connectivity (PRO 1/3 once (0,0) is
    # found), two regions {(0,0)} and {(1,1),(1,2)} under 4-connectivity (PRO 1/2).
    mask = np.zeros((1, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = 1.0, 0.0, 0.0
    fpr, pro = pro_curve(maps, mask)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(pro, [0, 0, 1 / 3, 1 / 3, 1, 1])
    assert aupro(maps, mask) == pytest.approx(1 / 3)


def test_aupro_interpolates_at_the_limit_and_treats_ties_as_one_step():
    # One 2-pixel region scoring 0.95 and 0.7, ten normal pixels 0.9, 0.8, ..., 0.0. The threshold 0.7 admits a
    # normal and an anomalous pixel together: the curve goes from (0.2, 0.5) straight to (0.3, 1.0).
    normal = np.round(np.arange(9, -1, -1) / 10, 1)
    maps = np.concatenate([[0.95, 0.7], normal])[None, None, :]
    masks = np.zeros_like(maps, dtype=bool)
    masks[..., :2] = True
    # at 0.25 the interpolated PRO is 0.75: (0.2 * 0.5 + 0.05 * (0.5 + 0.75) / 2) / 0.25
    assert aupro(maps, masks, fpr_limit=0.25) == pytest.approx(0.525)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx((0.1 + 0.1 * 0.75) / 0.3)
    assert aupro(maps, masks, fpr_limit=0.2) == pytest.approx(0.5)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.1 + 0.075 + 0.7)


def test_aupro_counts_normal_ties_at_the_cut():
    # 10 normal pixels 0.9, 0.5 x 6, 0.1 x 3; a region scoring 0.95 and 0.5. At limit 0.3 the cut is the 4th
    # largest normal score (0.5), tied with 5 more normal pixels and one anomalous: the threshold 0.5 jumps from
    # (0.1, 0.5) to (0.7, 1.0), so PRO at 0.3 is 0.5 + 0.5 * 0.2 / 0.6.
    maps = np.array([0.95, 0.5, 0.9] + [0.5] * 6 + [0.1] * 3)[None, None, :]
    masks = np.zeros_like(maps, dtype=bool)
    masks[..., :2] = True
    assert aupro(maps, masks) == pytest.approx((0.1 * 0.5 + 0.2 * (0.5 + 2 / 3) / 2) / 0.3)
    assert aupro(maps, masks) == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-12)


def test_aupro_undefined_is_nan():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(aupro(maps, np.zeros((2, 4, 4))))
    assert math.isnan(aupro(maps, np.ones((2, 4, 4))))
    with pytest.raises(ValueError, match="no anomalous pixel"):
        pro_curve(maps, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, np.eye(4)[None].repeat(2, 0), fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.full((1, 4, 4), np.nan), np.eye(4)[None])


def test_auroc_raw_never_flipped():
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0               # UniAD would report 1.0
    assert auroc([0.5] * 5, labels) == 0.5
    rng = np.random.default_rng(0)
    assert abs(auroc(rng.random(4000), rng.integers(0, 2, 4000)) - 0.5) < 0.03
    assert math.isnan(auroc([0.1, 0.2], [0, 0])) and math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_image_scores_known_values():
    maps = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    # 2 x 2 window means [[2, 3], [5, 6]]
    assert image_scores(maps, "max", pool=2) == pytest.approx([6.0])
    assert image_scores(maps, "max", pool=1) == pytest.approx([8.0])
    assert image_scores(maps, "max", pool=16) == pytest.approx([4.0])     # kernel clipped to 3 x 3: the mean
    assert image_scores(maps, "mean") == pytest.approx([4.0])
    assert image_scores(maps, "std") == pytest.approx([np.arange(9).std()])  # population std (ddof 0)
    with pytest.raises(ValueError, match="method"):
        image_scores(maps, "median")


def test_image_scores_max_matches_avg_pool():
    maps = torch.rand(5, 1, 40, 33, generator=torch.Generator().manual_seed(0))
    for pool in (16, 7):
        expected = F.avg_pool2d(maps, pool, stride=1).flatten(1).max(1).values.double().numpy()
        np.testing.assert_allclose(image_scores(maps, "max", pool), expected, rtol=1e-6)
    # a map narrower than the kernel in one direction only: the kernel is clipped there
    thin = maps[:, :, :, :5]
    expected = F.avg_pool2d(thin, (16, 5), stride=1).flatten(1).max(1).values.double().numpy()
    np.testing.assert_allclose(image_scores(thin, "max", 16), expected, rtol=1e-6)


def test_anomaly_map_is_l2_norm_not_squared():
    align = torch.zeros(1, 2, 2, 2)
    rec = torch.zeros(1, 2, 2, 2)
    rec[0, :, 0, 0] = torch.tensor([3.0, 4.0])        # |d| = 5, squared would be 25
    rec[0, :, 1, 0] = torch.tensor([1.0, 0.0])
    rec[0, :, 1, 1] = torch.tensor([0.0, -2.0])
    same = anomaly_map(rec, align, size=2)
    assert same.shape == (1, 1, 2, 2)
    torch.testing.assert_close(same[0, 0], torch.tensor([[5.0, 0.0], [1.0, 2.0]]))
    big = anomaly_map(rec, align, size=(4, 7))
    assert big.shape == (1, 1, 4, 7) and big.dtype == torch.float32
    # align_corners=True keeps the corner values and interpolates linearly between them
    torch.testing.assert_close(big[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]], torch.tensor([5.0, 0.0, 1.0, 2.0]))
    torch.testing.assert_close(big[0, 0, 0, 3], torch.tensor(2.5))
    bf16 = anomaly_map(rec.bfloat16(), align.bfloat16(), size=4)
    assert bf16.dtype == torch.float32
    with pytest.raises(ValueError):
        anomaly_map(rec, align[:, :1], size=4)


def test_anomaly_map_matches_uniad_scale_factor_upsampling():
    g = torch.Generator().manual_seed(0)
    rec, align = torch.randn(2, 8, 14, 14, generator=g), torch.randn(2, 8, 14, 14, generator=g)
    norm = torch.sqrt(((rec - align) ** 2).sum(1, keepdim=True))
    expected = torch.nn.UpsamplingBilinear2d(scale_factor=16)(norm)
    torch.testing.assert_close(anomaly_map(rec, align, 224), expected)


def test_feature_mse_value_parts_and_backward():
    rec = torch.tensor([[[[1.0, 2.0]], [[3.0, 5.0]]]], requires_grad=True)   # (1, 2, 1, 2)
    align = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
    loss, parts = feature_mse(rec, align)
    assert loss.item() == pytest.approx((1 + 0 + 4 + 16) / 4)
    assert set(parts) == {"loss/feature_mse"} and not parts["loss/feature_mse"].requires_grad
    assert parts["loss/feature_mse"].item() == pytest.approx(loss.item())
    loss.backward()
    torch.testing.assert_close(rec.grad, 2 * (rec.detach() - align) / 4)
    with pytest.raises(ValueError):
        feature_mse(rec, align[:, :1])


def make_category(kind: str, rng, size: int = 16):
    """4 normal + 2 defective images with masks + 1 defective image without a mask. kind "good": defects score
    high; "inverse": normal images score 2 everywhere, defects 1, the rest of a defective image ~0.05."""
    maps = rng.random((7, size, size)) * 0.1
    masks = np.zeros((7, size, size), dtype=bool)
    masks[4, 2:6, 3:7] = masks[5, 9:13, 8:12] = True
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    has_mask = np.array([1, 1, 1, 1, 1, 1, 0], dtype=bool)
    if kind == "good":
        maps[masks] += 1.0
        maps[6, 5:9, 5:9] += 1.0                       # the unmasked defect: found, but only image-level counts
    else:
        maps[:4] += 2.0
        maps[masks] = 1.0
        maps[6] += 1.0
    return maps, masks, labels, has_mask


def test_anomaly_metrics_per_category_means_and_nan():
    rng = np.random.default_rng(0)
    good, inverse = make_category("good", rng), make_category("inverse", rng)
    only_normal = (rng.random((3, 16, 16)), np.zeros((3, 16, 16), dtype=bool), np.zeros(3, int), np.ones(3, bool))
    parts = [good, inverse, only_normal]
    maps, masks, labels, has_mask = (np.concatenate([p[i] for p in parts]) for i in range(4))
    categories = np.concatenate([np.full(len(p[0]), c) for c, p in zip([2, 0, 3], parts)])
    names = ["inverse", "unused", "good", "empty"]
    with pytest.warns(RuntimeWarning, match="empty: only normal images"):
        out = anomaly_metrics(torch.from_numpy(maps)[:, None], masks, labels, categories, names, has_mask, pool=4)

    assert not any(k.endswith("/unused") for k in out)                        # no images, no keys
    assert out["image_auroc/good"] == 1.0 and out["pixel_auroc/good"] == 1.0
    assert out["aupro/good"] == pytest.approx(1.0)
    assert out["image_auroc/inverse"] == 0.0                                  # raw, not flipped to 1
    n_normal_px = 4 * 256 + 2 * 240                                           # only images with a mask
    # anomalous pixels (1.0) beat the 480 normal pixels of defective images (~0.05), lose to the 1024 at ~2
    assert out["pixel_auroc/inverse"] == pytest.approx(480 / n_normal_px)
    assert out["aupro/inverse"] == 0.0                                        # FPR passes 0.3 before any region pixel
    for key in ("image_auroc", "image_auroc_mean", "image_auroc_std", "pixel_auroc", "aupro"):
        assert math.isnan(out[f"{key}/empty"])
        assert out[key] == pytest.approx(np.mean([out[f"{key}/good"], out[f"{key}/inverse"]]))
    assert out["image_auroc"] == 0.5 and out["aupro"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in out.values())


def test_anomaly_metrics_label_is_explicit_and_checked():
    maps, masks, labels, has_mask = make_category("good", np.random.default_rng(1))
    # the unmasked defective image (index 6) keeps label 1: image AUROC counts it, pixel metrics skip it
    out = anomaly_metrics(maps, masks, labels, np.zeros(7, int), ["c"], has_mask, pool=4)
    assert out["image_auroc/c"] == 1.0
    masks_bad = masks.copy()
    masks_bad[0, 0, 0] = True
    with pytest.raises(ValueError, match="labelled normal"):
        anomaly_metrics(maps, masks_bad, labels, np.zeros(7, int), ["c"], has_mask)
    with pytest.raises(ValueError, match="category_names"):
        anomaly_metrics(maps, masks, labels, np.full(7, 1), ["c"], has_mask)


def test_threshold_at_fpr():
    scores = np.arange(1, 101, dtype=np.float64)
    t = threshold_at_fpr(scores, fpr=0.05)
    assert (scores >= t).sum() == 5 and 95 < t < 96
    assert t == np.nextafter(np.quantile(scores, 0.95, method="inverted_cdf"), np.inf)
    assert (scores >= threshold_at_fpr(scores, fpr=0.0)).sum() == 0
    assert (scores >= threshold_at_fpr(scores, fpr=0.019)).sum() == 1
    tied = np.array([1.0, 2.0, 3.0, 3.0, 3.0])
    assert (tied >= threshold_at_fpr(tied, fpr=0.4)).sum() == 0                # the tie at 3 cannot be split
    f32 = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    t32 = threshold_at_fpr(f32, fpr=0.34)
    assert (f32 >= t32).sum() == 1 and np.float32(t32) == t32                 # next float32 above 0.2
    with pytest.raises(ValueError):
        threshold_at_fpr(scores, fpr=1.0)


def test_max_f1_threshold():
    t, f1 = max_f1_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert t == pytest.approx(0.35) and f1 == pytest.approx(0.8)              # P = 2/3, R = 1
    t, f1 = max_f1_threshold(np.array([0.2, 0.9, 0.9, 0.1]), np.array([0, 1, 1, 0]))
    assert t == pytest.approx(0.9) and f1 == 1.0
    with pytest.raises(ValueError):
        max_f1_threshold([0.1, 0.2], [0, 0])

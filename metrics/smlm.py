"""Single-molecule localisation: matching, detection and error metrics, efficiency.

Numpy in, dict of floats out. Positions are in nm: x, y, z columns of (N, 3) arrays (a (N, 2) array is read as
z = 0), frames are integer indices. Converting px to nm (x_nm = x_px * px_size) is the caller's job. The
Cramer-Rao bound that `rmse_over_crlb` divides by is in metrics/smlm_crlb.py; turning network maps into
detections is models/sigma_munet_post.py.

Matching (smlm.md §6.1, DECODE's `GreedyHungarianMatching` defaults): per frame, a prediction and a
ground-truth emitter may pair when |d_lat| = sqrt(dx^2 + dy^2) <= dist_lat (250 nm), |dz| <= dist_ax
(500 nm) and, if set, sqrt(dx^2 + dy^2 + dz^2) <= dist_vol. Among the allowed pairs of a frame the cheapest
one (3D distance for match_dims=3, lateral for 2) is taken, its prediction and emitter are removed, and
this repeats until no allowed pair is left. That is the same as scanning all allowed pairs in increasing
cost and keeping those whose two ends are still free; ties go to the lower prediction index, then the
lower ground-truth index (first occurrence in a row-major (pred, gt) cost matrix). Frames never interact.
Unmatched predictions are FP, unmatched ground truth FN.

Metrics (smlm.md §6.2), fractions in [0, 1] (DECODE's convention), NaN when undefined:
    precision = TP / (TP + FP),  recall = TP / (TP + FN),  jaccard = TP / (TP + FP + FN)
    f1 = 2 TP / (2 TP + FP + FN)   (= 2PR / (P + R); 0 rather than NaN when TP = 0 but FP + FN > 0)
    over the TP pairs, d = prediction - ground truth in nm:
    rmse_lat = sqrt(mean(dx^2 + dy^2)),  rmse_ax = sqrt(mean(dz^2)),  rmse_vol = sqrt(mean(dx^2 + dy^2 + dz^2))
    mad_lat = mean(|dx| + |dy|),         mad_ax = mean(|dz|),         mad_vol = mean(|dx| + |dy| + |dz|)
    efficiency (SMLM 2016 challenge, Sage et al. 2019), JI = jaccard as a fraction, RMSE in nm:
        E = (100 - sqrt((100 (1 - JI))^2 + alpha^2 RMSE^2)) / 100,  alpha_lat = 1 nm^-1, alpha_ax = 0.5 nm^-1
        effcy_lat uses rmse_lat, effcy_ax rmse_ax, effcy_vol = (effcy_lat + effcy_ax) / 2; E may be negative.
"""
from __future__ import annotations

import math

import numpy as np

# DECODE's GreedyHungarianMatching defaults (smlm.md §6.1): a pair farther apart is a FP plus a FN.
DIST_LAT_NM = 250.0
DIST_AX_NM = 500.0
# SMLM-challenge efficiency weights (Sage et al. 2019): 1 nm of lateral RMSE costs as much as 1 % of Jaccard,
# axial errors half as much.
ALPHA_LAT = 1.0   # nm^-1
ALPHA_AX = 0.5    # nm^-1


def _as_xyz(xyz, name: str) -> np.ndarray:
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim == 1 and xyz.size == 0:
        xyz = xyz.reshape(0, 3)
    if xyz.ndim != 2 or xyz.shape[1] not in (2, 3):
        raise ValueError(f"{name} must be (N, 3) or (N, 2) positions in nm, got shape {xyz.shape}")
    if xyz.shape[1] == 2:
        xyz = np.concatenate([xyz, np.zeros((len(xyz), 1))], axis=1)
    return xyz


def _as_frames(frame, n: int, name: str) -> np.ndarray:
    frame = np.asarray(frame).reshape(-1)
    if frame.shape[0] != n:
        raise ValueError(f"{name} must have one frame index per emitter ({n}), got {frame.shape[0]}")
    return frame.astype(np.int64)


def match_emitters(pred_xyz, pred_frame, gt_xyz, gt_frame, dist_lat: float | None = DIST_LAT_NM,
                   dist_ax: float | None = DIST_AX_NM, dist_vol: float | None = None,
                   match_dims: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame greedy matching; returns (pred_idx, gt_idx), int arrays of the TP pairs.

    pred_xyz (N, 3) nm, pred_frame (N,), gt_xyz (M, 3) nm, gt_frame (M,). A threshold of None is not
    applied. Pairs come in the order they were accepted: by frame, then by increasing cost.
    TP = len(pred_idx), FP = N - TP, FN = M - TP.
    """
    if match_dims not in (2, 3):
        raise ValueError(f"match_dims must be 2 or 3, got {match_dims}")
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    pred_frame = _as_frames(pred_frame, len(pred_xyz), "pred_frame")
    gt_frame = _as_frames(gt_frame, len(gt_xyz), "gt_frame")
    # Stable sorts keep the original index order inside a frame, which the tie-breaking relies on.
    pred_order = np.argsort(pred_frame, kind="stable")
    gt_order = np.argsort(gt_frame, kind="stable")
    pred_sorted, gt_sorted = pred_frame[pred_order], gt_frame[gt_order]
    matched_pred, matched_gt = [], []
    for frame in np.intersect1d(pred_sorted, gt_sorted):
        p_idx = pred_order[np.searchsorted(pred_sorted, frame, "left"):np.searchsorted(pred_sorted, frame, "right")]
        g_idx = gt_order[np.searchsorted(gt_sorted, frame, "left"):np.searchsorted(gt_sorted, frame, "right")]
        diff = pred_xyz[p_idx, None, :] - gt_xyz[None, g_idx, :]            # (n_pred, n_gt, 3)
        d_lat = np.hypot(diff[..., 0], diff[..., 1])
        d_vol = np.sqrt(d_lat**2 + diff[..., 2] ** 2)
        allowed = np.ones(d_lat.shape, dtype=bool)
        if dist_lat is not None:
            allowed &= d_lat <= dist_lat
        if dist_ax is not None:
            allowed &= np.abs(diff[..., 2]) <= dist_ax
        if dist_vol is not None:
            allowed &= d_vol <= dist_vol
        rows, cols = np.nonzero(allowed)                                     # row-major order
        cost = (d_vol if match_dims == 3 else d_lat)[rows, cols]
        order = np.argsort(cost, kind="stable")
        pred_free = np.ones(len(p_idx), dtype=bool)
        gt_free = np.ones(len(g_idx), dtype=bool)
        for r, c in zip(rows[order], cols[order]):
            if pred_free[r] and gt_free[c]:
                pred_free[r] = gt_free[c] = False
                matched_pred.append(p_idx[r])
                matched_gt.append(g_idx[c])
    return np.asarray(matched_pred, dtype=np.int64), np.asarray(matched_gt, dtype=np.int64)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def detection_metrics(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, Jaccard index and F1 as fractions (formulas in the module docstring)."""
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "jaccard": _ratio(tp, tp + fp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def localisation_errors(pred_xyz, gt_xyz) -> dict[str, float]:
    """RMSE and MAD (lateral, axial, volumetric) in nm over matched pairs (N, 3); NaN when N = 0."""
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    if pred_xyz.shape != gt_xyz.shape:
        raise ValueError(f"matched pred_xyz and gt_xyz must have the same shape, "
                         f"got {pred_xyz.shape} vs {gt_xyz.shape}")
    if len(pred_xyz) == 0:
        return {k: float("nan") for k in ("rmse_lat", "rmse_ax", "rmse_vol", "mad_lat", "mad_ax", "mad_vol")}
    d = pred_xyz - gt_xyz
    sq_lat, sq_ax = (d[:, :2] ** 2).sum(1), d[:, 2] ** 2
    abs_lat, abs_ax = np.abs(d[:, :2]).sum(1), np.abs(d[:, 2])
    return {"rmse_lat": float(np.sqrt(sq_lat.mean())), "rmse_ax": float(np.sqrt(sq_ax.mean())),
            "rmse_vol": float(np.sqrt((sq_lat + sq_ax).mean())), "mad_lat": float(abs_lat.mean()),
            "mad_ax": float(abs_ax.mean()), "mad_vol": float((abs_lat + abs_ax).mean())}


def efficiency(jaccard: float, rmse_nm: float, alpha: float) -> float:
    """SMLM-challenge efficiency as a fraction: (100 - sqrt((100 (1 - JI))^2 + alpha^2 RMSE^2)) / 100."""
    return (100.0 - math.sqrt((100.0 * (1.0 - jaccard)) ** 2 + (alpha * rmse_nm) ** 2)) / 100.0


def rmse_over_crlb(rmse_lat_nm: float, crlb_lat_nm) -> float:
    """rmse_lat divided by the matching bound sqrt(mean(CRLB_lat^2)).

    crlb_lat_nm: one lateral bound (nm) or one per matched emitter, so emitters of different brightness
    pool the same way their squared errors do in rmse_lat. 1.0 means the physical limit; below 1 is only
    possible through noise in the estimate, bias towards the truth, or a mismatched PSF/camera model.
    """
    crlb = np.asarray(crlb_lat_nm, dtype=np.float64)
    if crlb.size == 0:
        return float("nan")
    return float(rmse_lat_nm / np.sqrt(np.mean(crlb**2)))


def smlm_metrics(pred_xyz, pred_frame, gt_xyz, gt_frame, dist_lat: float | None = DIST_LAT_NM,
                 dist_ax: float | None = DIST_AX_NM, dist_vol: float | None = None, match_dims: int = 3,
                 gt_crlb_lat_nm=None, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Match, then every metric of the module docstring; positions in nm.

    gt_crlb_lat_nm: optional lateral CRLB (nm) per ground-truth emitter (M,) or one value; adds
    "crlb_lat" (the RMS bound over the matched emitters) and "rmse_over_crlb". pairs: the (pred_idx, gt_idx)
    of an earlier `match_emitters` call on the same inputs, so a caller that needs the pairs matches once.
    """
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    pred_idx, gt_idx = pairs if pairs is not None else match_emitters(
        pred_xyz, pred_frame, gt_xyz, gt_frame, dist_lat, dist_ax, dist_vol, match_dims)
    tp = len(pred_idx)
    fp, fn = len(pred_xyz) - tp, len(gt_xyz) - tp
    out = {"tp": float(tp), "fp": float(fp), "fn": float(fn), **detection_metrics(tp, fp, fn)}
    out.update(localisation_errors(pred_xyz[pred_idx], gt_xyz[gt_idx]))
    out["effcy_lat"] = efficiency(out["jaccard"], out["rmse_lat"], ALPHA_LAT)
    out["effcy_ax"] = efficiency(out["jaccard"], out["rmse_ax"], ALPHA_AX)
    out["effcy_vol"] = (out["effcy_lat"] + out["effcy_ax"]) / 2
    if gt_crlb_lat_nm is not None:
        crlb = np.broadcast_to(np.asarray(gt_crlb_lat_nm, dtype=np.float64), (len(gt_xyz),))[gt_idx]
        out["crlb_lat"] = float(np.sqrt(np.mean(crlb**2))) if tp else float("nan")
        out["rmse_over_crlb"] = rmse_over_crlb(out["rmse_lat"], crlb)
    return out


def binned_metrics(pred_xyz, gt_xyz, pred_idx, gt_idx, values, gt_crlb_lat_nm=None, n_bins: int = 4) -> list[dict]:
    """Recall and errors of the ground truth split into n_bins bins at the quantiles of `values` (e.g. photons).

    pred_xyz (N, 3) and gt_xyz (M, 3) nm, (pred_idx, gt_idx) the TP pairs of `match_emitters`, values (M,)
    one finite number per ground-truth emitter; the bin edges are its quantiles, so every method scored on the
    same ground truth gets the same bins, of equal counts unless values tie (tied values share one bin, and the
    bins they empty have n_gt 0 and NaN metrics). Per bin: lo, hi (its range of values), n_gt, recall,
    rmse_lat, rmse_ax, median_lat (the median lateral error sqrt(dx^2 + dy^2) of its matched pairs, nm) and,
    with gt_crlb_lat_nm (M,), crlb_lat (RMS bound of its matched emitters) and rmse_over_crlb. Bins without a
    match have NaN errors.
    """
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(gt_xyz):
        raise ValueError(f"values must have one entry per ground-truth emitter ({len(gt_xyz)}), got {len(values)}")
    if n_bins < 1 or not np.isfinite(values).all():
        raise ValueError(f"need n_bins >= 1 and finite values, got n_bins {n_bins}")
    pred_idx, gt_idx = np.asarray(pred_idx, dtype=np.int64), np.asarray(gt_idx, dtype=np.int64)
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)) if len(values) else np.zeros(n_bins + 1)
    # Bin of each emitter: the interior edges split it; the top edge belongs to the last bin.
    gt_bin = np.clip(np.searchsorted(edges[1:-1], values, side="right"), 0, n_bins - 1)
    pair_bin = gt_bin[gt_idx]
    crlb = None if gt_crlb_lat_nm is None else np.broadcast_to(
        np.asarray(gt_crlb_lat_nm, dtype=np.float64), (len(gt_xyz),))
    rows = []
    for b in range(n_bins):
        in_bin = pair_bin == b
        p, g = pred_idx[in_bin], gt_idx[in_bin]
        n_gt = int((gt_bin == b).sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n_gt": n_gt,
               "recall": _ratio(len(g), n_gt), **localisation_errors(pred_xyz[p], gt_xyz[g])}
        d = pred_xyz[p] - gt_xyz[g]
        row["median_lat"] = float(np.median(np.hypot(d[:, 0], d[:, 1]))) if len(g) else float("nan")
        if crlb is not None:
            row["crlb_lat"] = float(np.sqrt(np.mean(crlb[g] ** 2))) if len(g) else float("nan")
            row["rmse_over_crlb"] = rmse_over_crlb(row["rmse_lat"], crlb[g])
        rows.append(row)
    return rows

"""Two-colour ratiometric SMLM: dye assignment from the photon ratio, ratio errors and colour crosstalk.

Numpy in, dict of floats out (metrics/smlm.py's convention); NaN when a metric is undefined (no emitters).
The ratio of a localisation is r = ch1 photons / (ch1 + ch2) in [0, 1] (models/double_munet.py's RATIO_CH, or
models/double_munet_post.ratio_from_photons for a classical route). Pairing predictions with ground truth is
metrics/smlm.match_emitters; these functions take the matched arrays.

Dye assignment (`assign_colour`): dye k emits ratios ~ Normal(dye_means[k], dye_spreads[k]^2) (spectral spread
of the dye and of the set-up); a localisation measured with uncertainty ratio_sigma has the likelihood

    L_k(r) = Normal(r; dye_means[k], dye_spreads[k]^2 + ratio_sigma^2)

(the dye's distribution convolved with the measurement's), posterior P(k | r) = prior_k L_k / sum_j prior_j L_j.
The dye is the argmax and its posterior the confidence; a confidence below min_confidence leaves it unassigned
(-1). The Gaussian model ignores the [0, 1] bounds of r (dyes near 0 or 1 with large spreads are approximated).

Colour metrics (`colour_metrics`, `crosstalk_matrix`), dyes 0..K-1, pred -1 = unassigned:
    colour_accuracy = correct / assigned,  crosstalk = wrong / assigned,  rejected = unassigned / all
    crosstalk_matrix[i, j] = (true i, predicted j) / (true i, assigned)     rows sum to 1, or NaN without any
    crosstalk_i_j = crosstalk_matrix[i, j] for i != j;  rejected_i = (true i, unassigned) / (true i)
"""
from __future__ import annotations

import math

import numpy as np

from metrics.smlm import match_emitters, smlm_metrics


def _as_1d(values, name: str, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def assign_colour(ratio, ratio_sigma, dye_means, dye_spreads, dye_priors=None,
                  min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Dye of each localisation from its ratio: (dye (N,) int64, -1 = unassigned; confidence (N,) float64).

    ratio (N,) in [0, 1]; ratio_sigma (N,) or a scalar >= 0, the measurement's standard deviation (e.g. the
    network's exp(logvar / 2), or 0 for a point estimate); dye_means (K,) and dye_spreads (K,) >= 0, each dye's
    ratio distribution; dye_priors (K,) >= 0 with a positive sum (normalised here; default equal);
    min_confidence in [0, 1]: a posterior below it gives -1. Computed in log space, so a ratio far from every
    dye still gets the correct (near-certain) nearest-in-likelihood dye. Formulas in the module docstring.
    """
    ratio = _as_1d(ratio, "ratio")
    sigma = np.asarray(ratio_sigma, dtype=np.float64)
    if sigma.ndim == 0:
        sigma = np.full(ratio.shape, float(sigma))
    if sigma.shape != ratio.shape:
        raise ValueError(f"ratio_sigma must be a scalar or have the shape of ratio {ratio.shape}, got {sigma.shape}")
    means, spreads = _as_1d(dye_means, "dye_means"), _as_1d(dye_spreads, "dye_spreads")
    k = len(means)
    if k == 0 or spreads.shape != (k,):
        raise ValueError(f"dye_means and dye_spreads must be (K,) with K >= 1, got {means.shape} and {spreads.shape}")
    priors = np.full(k, 1.0 / k) if dye_priors is None else _as_1d(dye_priors, "dye_priors")
    if priors.shape != (k,) or not np.isfinite(priors).all() or (priors < 0).any() or priors.sum() <= 0:
        raise ValueError(f"dye_priors must be (K={k},) finite, >= 0 with a positive sum, got {priors}")
    if not (np.isfinite(ratio).all() and np.isfinite(sigma).all() and np.isfinite(means).all()
            and np.isfinite(spreads).all()):
        raise ValueError("ratio, ratio_sigma, dye_means and dye_spreads must be finite")
    if (sigma < 0).any() or (spreads < 0).any():
        raise ValueError("ratio_sigma and dye_spreads must be >= 0")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    var = spreads[None, :] ** 2 + sigma[:, None] ** 2                         # (N, K)
    if (var <= 0).any():
        raise ValueError("dye_spreads and ratio_sigma are both 0 for some localisation and dye: zero variance")
    with np.errstate(divide="ignore"):
        log_prior = np.log(priors / priors.sum())                               # a zero prior is -inf: never chosen
    log_post = log_prior - 0.5 * (np.log(2 * math.pi * var) + (ratio[:, None] - means[None, :]) ** 2 / var)
    dye = np.argmax(log_post, axis=1).astype(np.int64)
    top = np.take_along_axis(log_post, dye[:, None], axis=1)[:, 0]
    confidence = 1.0 / np.exp(log_post - top[:, None]).sum(axis=1) if len(ratio) else np.zeros(0)
    dye[confidence < min_confidence] = -1
    return dye, confidence


def ratio_metrics(pred_ratio, true_ratio, pred_sigma=None) -> dict[str, float]:
    """Errors of matched ratios (N,): ratio_rmse, ratio_bias = mean(pred - true), ratio_mae; with pred_sigma (N,)
    > 0 also ratio_z_std = std((pred - true) / sigma) (population std; 1 for calibrated uncertainties) and
    ratio_within_1sigma = fraction with |pred - true| <= sigma (0.683 when calibrated). NaN for N = 0."""
    pred, true = _as_1d(pred_ratio, "pred_ratio"), _as_1d(true_ratio, "true_ratio")
    if pred.shape != true.shape:
        raise ValueError(f"pred_ratio and true_ratio must have the same shape, got {pred.shape} and {true.shape}")
    keys = ["ratio_rmse", "ratio_bias", "ratio_mae"]
    sigma = None
    if pred_sigma is not None:
        sigma = _as_1d(pred_sigma, "pred_sigma")
        if sigma.shape != pred.shape or (sigma <= 0).any():
            raise ValueError(f"pred_sigma must be {pred.shape} and > 0, got shape {sigma.shape}")
        keys += ["ratio_z_std", "ratio_within_1sigma"]
    if len(pred) == 0:
        return {key: float("nan") for key in keys}
    d = pred - true
    out = {"ratio_rmse": float(np.sqrt(np.mean(d**2))), "ratio_bias": float(np.mean(d)),
           "ratio_mae": float(np.mean(np.abs(d)))}
    if sigma is not None:
        out["ratio_z_std"] = float(np.std(d / sigma))
        out["ratio_within_1sigma"] = float(np.mean(np.abs(d) <= sigma))
    return out


def _check_dyes(pred_dye, true_dye, n_dyes: int) -> tuple[np.ndarray, np.ndarray]:
    pred, true = _as_1d(pred_dye, "pred_dye", np.int64), _as_1d(true_dye, "true_dye", np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"pred_dye and true_dye must have the same shape, got {pred.shape} and {true.shape}")
    if n_dyes < 1:
        raise ValueError(f"n_dyes must be >= 1, got {n_dyes}")
    if ((pred < -1) | (pred >= n_dyes)).any() or ((true < 0) | (true >= n_dyes)).any():
        raise ValueError(f"pred_dye must be in -1..{n_dyes - 1} and true_dye in 0..{n_dyes - 1}")
    return pred, true


def crosstalk_matrix(pred_dye, true_dye, n_dyes: int) -> np.ndarray:
    """(K, K) float64: row i = true dye i, entry j = fraction of dye i's assigned emitters given dye j; NaN row
    when dye i has no assigned emitter. pred_dye (N,) in -1..K-1 (-1 unassigned), true_dye (N,) in 0..K-1."""
    pred, true = _check_dyes(pred_dye, true_dye, n_dyes)
    assigned = pred >= 0
    counts = np.zeros((n_dyes, n_dyes))
    np.add.at(counts, (true[assigned], pred[assigned]), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, counts / rows, np.nan)


def colour_metrics(pred_dye, true_dye, n_dyes: int) -> dict[str, float]:
    """colour_accuracy, crosstalk, rejected, crosstalk_i_j (i != j) and rejected_i as fractions (module
    docstring) for matched localisations: pred_dye (N,) in -1..K-1 (-1 unassigned), true_dye (N,) in 0..K-1."""
    pred, true = _check_dyes(pred_dye, true_dye, n_dyes)
    assigned = pred >= 0
    n_assigned = int(assigned.sum())
    n_correct = int((pred == true).sum())
    out = {"colour_accuracy": _ratio(n_correct, n_assigned),
           "crosstalk": _ratio(n_assigned - n_correct, n_assigned),
           "rejected": _ratio(len(pred) - n_assigned, len(pred))}
    matrix = crosstalk_matrix(pred, true, n_dyes)
    for i in range(n_dyes):
        for j in range(n_dyes):
            if i != j:
                out[f"crosstalk_{i}_{j}"] = float(matrix[i, j])
    for i in range(n_dyes):
        of_dye = true == i
        out[f"rejected_{i}"] = _ratio(int((of_dye & ~assigned).sum()), int(of_dye.sum()))
    return out


CHANNEL_KEYS = ("jaccard", "recall", "precision", "rmse_lat", "rmse_ax", "effcy_lat")


def colour_scores(det: dict, gt: dict, dye_means, dye_spreads, dye_priors=None, min_confidence: float = 0.0
                  ) -> dict[str, float]:
    """Every two-colour metric of one set of localisations against the ground truth.

    det: {"ch1", "ch2", "merged"} detection dicts (models/double_munet_post.py) with movie frame indices; each
    needs frame_ix and xyz_nm, and "merged" also ratio and ratio_sigma (a scalar 0 or an array). gt:
    data.smlm.colour.colour_ground_truth (frame_ix, xyz_nm, ratio, dye, channel_mask). Returns the merged
    localisations' `smlm_metrics` (jaccard, rmse_lat, effcy_lat, ...), per channel ch{c}/<CHANNEL_KEYS> against
    the emitters that are targets of that channel, `ratio_metrics` and `colour_metrics` over the matched pairs
    (the dye by `assign_colour` at min_confidence).
    """
    merged = det["merged"]
    pairs = match_emitters(merged["xyz_nm"], merged["frame_ix"], gt["xyz_nm"], gt["frame_ix"])
    metrics = smlm_metrics(merged["xyz_nm"], merged["frame_ix"], gt["xyz_nm"], gt["frame_ix"], pairs=pairs)
    for c in (0, 1):
        d, keep = det[f"ch{c + 1}"], gt["channel_mask"][:, c]
        ch = smlm_metrics(d["xyz_nm"], d["frame_ix"], gt["xyz_nm"][keep], gt["frame_ix"][keep])
        metrics.update({f"ch{c + 1}/{k}": ch[k] for k in CHANNEL_KEYS})
    pred_idx, gt_idx = pairs
    sigma = np.broadcast_to(np.asarray(merged["ratio_sigma"], dtype=np.float64), merged["ratio"].shape)
    # The z-score columns need a positive sigma for every matched localisation (a point estimate has none).
    matched_sigma = sigma[pred_idx] if np.all(sigma[pred_idx] > 0) else None
    metrics.update(ratio_metrics(merged["ratio"][pred_idx], gt["ratio"][gt_idx], matched_sigma))
    dye, _ = assign_colour(merged["ratio"], sigma, dye_means, dye_spreads, dye_priors, min_confidence)
    metrics.update(colour_metrics(dye[pred_idx], gt["dye"][gt_idx], len(np.atleast_1d(dye_means))))
    return metrics

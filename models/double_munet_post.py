"""Post-processing of DoubleMUNet maps (models/double_munet.py) into two-colour localisations.

`colour_detections`: each channel's 10 maps (CH1_SLICE, CH2_SLICE) go through the single-colour
models.sigma_munet_post.detections_from_output (SpatialIntegration + look-up, with that channel's bg_max; both
channels are on channel 1's pixel grid already), `merge_channel_detections` pairs them into emitters, and each
merged emitter's ratio mean (RATIO_CH) and sigma exp(logvar / 2) (LOGVAR_CH) are read at the pixel it was read
from: the pixel of its brighter channel's detection (by photons; channel 1 on a tie).

Merging (`merge_channel_detections`), per frame: a channel-1 and a channel-2 detection whose lateral distance is
<= merge_radius_px are one emitter; pairs are taken greedily by increasing distance, one-to-one (the matching of
metrics.smlm.match_emitters with dist_lat = merge_radius_px, no axial limit). A pair's position is the
inverse-variance weighted mean per axis, x = (x1 / s1^2 + x2 / s2^2) / (1 / s1^2 + 1 / s2^2), its sigma
(1 / s1^2 + 1 / s2^2)^(-1/2) (equal weights, a plain mean, when the detections carry no sigmas); its photons
are ph1 + ph2 and phot_ch = (ph1, ph2). An unpaired detection keeps its position and sigma, its channel's photons,
and 0 photons for the other channel. Merged rows are ordered by frame; within a frame the pairs come first (in
order of increasing distance), then the unpaired channel-1 and then the unpaired channel-2 detections.

Keys read from each detection dict (detections_from_output writes all of them; a classical route needs only the
first three):
    frame_ix (N,) int, xyz_px (N, 3) (x px, y px, z nm), phot (N,) photons             required
    xyz_sig_px (N, 3) sigmas of xyz_px, same units (detections_from_output's sigma_out)  optional, both or neither
    prob (N,), pixel (N, 2) int (row i, col j)                                           optional, both or neither
Merged dict (numpy), M rows:
    frame_ix (M,) int64; xyz_px (M, 3); phot (M,) total photons; phot_ch (M, 2) photons per channel;
    channels (M, 2) bool, which channels detected it; det_ix (M, 2) int64, its row in det1 / det2 or -1;
    xyz_sig_px (M, 3) fused sigmas (when given); prob (M,) the larger of the two (when given);
    pixel (M, 2) int64 of the brighter channel's detection (when given).
`colour_detections` adds xyz_nm (M, 3), xyz_sig_nm (M, 3) (x, y * px_size_nm, z already nm), ratio (M,) and
ratio_sigma (M,). `ratio_from_photons` gives the classical route's ratio ph1 / (ph1 + ph2).
"""
from __future__ import annotations

import numpy as np
import torch

from metrics.smlm import match_emitters
from models.double_munet import CH1_SLICE, CH2_SLICE, LOGVAR_CH, N_CHANNELS_2C, RATIO_CH
from models.sigma_munet_post import RAW_TH, SPLIT_TH, detections_from_output

REQUIRED_KEYS = ("frame_ix", "xyz_px", "phot")
OPTIONAL_KEYS = ("xyz_sig_px", "prob", "pixel")


def _check_detections(det: dict, name: str) -> int:
    missing = [k for k in REQUIRED_KEYS if k not in det]
    if missing:
        raise ValueError(f"{name} lacks {missing}; a detection dict needs {REQUIRED_KEYS}")
    n = len(det["frame_ix"])
    shapes = {"frame_ix": (n,), "xyz_px": (n, 3), "phot": (n,), "xyz_sig_px": (n, 3), "prob": (n,), "pixel": (n, 2)}
    for key, shape in shapes.items():
        if key in det and np.shape(det[key]) != shape:
            raise ValueError(f"{name}[{key!r}] must be {shape}, got {np.shape(det[key])}")
    return n


def merge_channel_detections(det1: dict, det2: dict, merge_radius_px: float = 1.0) -> dict[str, np.ndarray]:
    """Channel-1 and channel-2 detections (N1 and N2 rows, channel-1 pixel grid) -> merged emitters (M rows).

    Keys read and written, and the pairing and fusion rules, in the module docstring; no ratio fields. Optional
    keys (xyz_sig_px, prob, pixel) are used when both dicts have them; a key in only one raises ValueError.
    """
    n1, n2 = _check_detections(det1, "det1"), _check_detections(det2, "det2")
    if not merge_radius_px >= 0:
        raise ValueError(f"merge_radius_px must be >= 0, got {merge_radius_px}")
    for key in OPTIONAL_KEYS:
        if (key in det1) != (key in det2):
            raise ValueError(f"{key!r} is in only one of det1, det2; give it for both channels or for neither")
    f1, f2 = np.asarray(det1["frame_ix"], dtype=np.int64), np.asarray(det2["frame_ix"], dtype=np.int64)
    xyz1, xyz2 = np.asarray(det1["xyz_px"], dtype=np.float64), np.asarray(det2["xyz_px"], dtype=np.float64)
    ph1, ph2 = np.asarray(det1["phot"], dtype=np.float64), np.asarray(det2["phot"], dtype=np.float64)
    i1, i2 = match_emitters(xyz1[:, :2], f1, xyz2[:, :2], f2, dist_lat=merge_radius_px, dist_ax=None,
                            match_dims=2)
    only1, only2 = np.setdiff1d(np.arange(n1), i1), np.setdiff1d(np.arange(n2), i2)
    has_sigma = "xyz_sig_px" in det1
    s1 = np.asarray(det1["xyz_sig_px"], dtype=np.float64) if has_sigma else np.ones((n1, 3))
    s2 = np.asarray(det2["xyz_sig_px"], dtype=np.float64) if has_sigma else np.ones((n2, 3))
    w1, w2 = 1.0 / s1[i1] ** 2, 1.0 / s2[i2] ** 2                               # (P, 3) per-axis weights

    none1, none2 = np.full(len(only1), -1, dtype=np.int64), np.full(len(only2), -1, dtype=np.int64)

    def rows(paired, from1, from2):
        """Merged rows: the P pairs, then the channel-1-only, then the channel-2-only detections."""
        return np.concatenate([paired, from1, from2])

    merged = {
        "frame_ix": rows(f1[i1], f1[only1], f2[only2]),
        "xyz_px": rows((w1 * xyz1[i1] + w2 * xyz2[i2]) / (w1 + w2), xyz1[only1], xyz2[only2]),
        "phot_ch": rows(np.stack([ph1[i1], ph2[i2]], 1), np.stack([ph1[only1], np.zeros(len(only1))], 1),
                        np.stack([np.zeros(len(only2)), ph2[only2]], 1)),
        "det_ix": rows(np.stack([i1, i2], 1), np.stack([only1, none1], 1), np.stack([none2, only2], 1)),
    }
    merged["phot"] = merged["phot_ch"].sum(1)
    merged["channels"] = merged["det_ix"] >= 0
    if has_sigma:
        merged["xyz_sig_px"] = rows(1.0 / np.sqrt(w1 + w2), s1[only1], s2[only2])
    if "prob" in det1:
        pr1, pr2 = np.asarray(det1["prob"], dtype=np.float64), np.asarray(det2["prob"], dtype=np.float64)
        merged["prob"] = rows(np.maximum(pr1[i1], pr2[i2]), pr1[only1], pr2[only2])
    if "pixel" in det1:
        px1, px2 = np.asarray(det1["pixel"], dtype=np.int64), np.asarray(det2["pixel"], dtype=np.int64)
        brighter2 = (ph2[i2] > ph1[i1])[:, None]                                # channel 1 on a tie
        merged["pixel"] = rows(np.where(brighter2, px2[i2], px1[i1]), px1[only1], px2[only2])
    order = np.argsort(merged["frame_ix"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def ratio_from_photons(phot_ch) -> np.ndarray:
    """(N, 2) photons per channel -> (N,) ratio ph1 / (ph1 + ph2); NaN where ph1 + ph2 <= 0."""
    phot_ch = np.asarray(phot_ch, dtype=np.float64)
    if phot_ch.ndim != 2 or phot_ch.shape[1] != 2:
        raise ValueError(f"phot_ch must be (N, 2) photons per channel, got shape {phot_ch.shape}")
    total = phot_ch.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, phot_ch[:, 0] / total, np.nan)


def colour_detections(output, raw_th: float = RAW_TH, split_th: float = SPLIT_TH, *,
                      px_size_nm: tuple[float, float], z_max_nm: float, phot_max: float,
                      bg_max: tuple[float, float], merge_radius_px: float = 1.0,
                      frame_ix0: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """(B, 22, H, W) activated DoubleMUNet maps (torch or numpy) -> {"ch1": det, "ch2": det, "merged": merged}.

    "ch1" / "ch2" are detections_from_output's dicts of each channel (raw_th, split_th, px_size_nm, z_max_nm,
    phot_max, bg_max[c]: the simulation's scales; both channels share phot_max, as the loss targets do); "merged"
    is merge_channel_detections(ch1, ch2, merge_radius_px) plus xyz_nm, xyz_sig_nm, ratio and ratio_sigma read at
    the merged row's pixel (module docstring). Frame b of the batch gets frame index frame_ix0 + b.
    """
    out = torch.as_tensor(output).detach()
    if out.ndim != 4 or out.shape[1] != N_CHANNELS_2C:
        raise ValueError(f"model output must be (B, {N_CHANNELS_2C}, H, W), got {tuple(out.shape)}")
    if len(bg_max) != 2:
        raise ValueError(f"bg_max must be (channel 1, channel 2) backgrounds, got {bg_max}")
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    scales = dict(px_size_nm=px_size_nm, z_max_nm=z_max_nm, phot_max=phot_max, frame_ix0=frame_ix0)
    det1 = detections_from_output(out[:, CH1_SLICE], raw_th, split_th, bg_max=bg_max[0], **scales)
    det2 = detections_from_output(out[:, CH2_SLICE], raw_th, split_th, bg_max=bg_max[1], **scales)
    merged = merge_channel_detections(det1, det2, merge_radius_px)
    px = np.array([px_size_nm[0], px_size_nm[1], 1.0])
    merged["xyz_nm"] = merged["xyz_px"] * px
    merged["xyz_sig_nm"] = merged["xyz_sig_px"] * px
    ratio_maps = out[:, [RATIO_CH, LOGVAR_CH]].cpu().numpy().astype(np.float64)   # (B, 2, H, W)
    b, (i, j) = merged["frame_ix"] - frame_ix0, merged["pixel"].T
    merged["ratio"] = ratio_maps[b, 0, i, j]
    merged["ratio_sigma"] = np.exp(ratio_maps[b, 1, i, j] / 2)
    return {"ch1": det1, "ch2": det2, "merged": merged}

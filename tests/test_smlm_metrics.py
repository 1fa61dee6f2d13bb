"""SMLM matching and metrics on hand-made cases; the CRLB against analytic limits and Monte-Carlo checks.

CRLB reference formula: smlm.md gives none, so the tests use Mortensen et al. (Nat Methods 2010), whose
maximum-likelihood variance for a pixelated 2D Gaussian is
    var_x = F^2 (sigma_a^2 / N) / (1 + integral_0^1 ln t / (1 + t / tau) dt),
    sigma_a^2 = sigma^2 + a^2 / 12,  tau = 2 pi sigma_a^2 b / (N a^2),
with F^2 = 1 for Poisson counts and 2 for a high-gain EMCCD. Without background (tau -> 0) it is
F^2 sigma_a^2 / N. The 16/9 factor of the same paper belongs to least-squares fitting, not to the
bound, so it is not used. Thompson et al. (2002) have the same no-background term sigma_a^2 / N.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import ndtr

from data.smlm import EMCCD_EXCESS_NOISE, SimConfig, pixel_gaussian, simulate_movie
from metrics.smlm import (ALPHA_AX, ALPHA_LAT, binned_metrics, detection_metrics, efficiency, localisation_errors,
                          match_emitters, rmse_over_crlb, smlm_metrics)
from metrics.smlm_crlb import crlb_from_fisher, crlb_oracle, default_roi_px, emitter_crlb_nm, ground_truth


# Reference routes to the bound of one emitter, against which the batched emitter_crlb_nm is checked: the
# closed-form 2D Fisher information and a finite-difference one of any expected image.

def astigmatic_sigma(z_nm, sigma0_px: float, foc_shift_nm: float = 250.0, rl_nm: float = 280.0):
    """(sigma_x, sigma_y) in px of DECODE's astigmatic Gaussian (smlm.md §1.3) at depth z_nm."""
    z = np.asarray(z_nm, dtype=np.float64)
    return (sigma0_px * np.sqrt(1 + ((z + foc_shift_nm) / rl_nm) ** 2),
            sigma0_px * np.sqrt(1 + ((z - foc_shift_nm) / rl_nm) ** 2))


def gaussian_psf_image(x_px, y_px, n_photons, bg, sigma_px, roi_px: int) -> np.ndarray:
    """Expected photons per pixel (roi, roi) of the pixel-integrated Gaussian plus bg, through scipy's normal CDF
    (independent of data.smlm.pixel_gaussian). x_px, y_px in ROI coordinates (pixel centres 0 .. roi - 1, x along
    columns); sigma_px a scalar or an (sigma_x, sigma_y) pair; n_photons total photons; bg photons per pixel."""
    sx, sy = (sigma_px, sigma_px) if np.ndim(sigma_px) == 0 else sigma_px
    lo_edges = np.arange(roi_px, dtype=np.float64) - 0.5

    def mass(pos, sigma):
        lo, hi = (lo_edges - pos) / sigma, (lo_edges + 1.0 - pos) / sigma
        # Upper-tail difference right of the mean: no 1 - 1 cancellation in the tails.
        return np.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))

    return n_photons * mass(y_px, sy)[:, None] * mass(x_px, sx)[None, :] + bg


def gaussian_2d_fisher(n_photons, bg, sigma_px: float, offset_px=(0.0, 0.0), roi_px: int | None = None,
                       excess_noise: float = 1.0) -> np.ndarray:
    """Fisher information (..., 4, 4) over (x px, y px, N photons, b photons/px), analytic derivatives of
    data.smlm.pixel_gaussian. The emitter sits at the centre pixel of an odd roi_px ROI plus offset_px (x, y);
    n_photons and bg broadcast; excess_noise is 1 for a Poisson camera and 2 for an EMCCD at high gain."""
    roi = default_roi_px(sigma_px) if roi_px is None else int(roi_px)
    sigma = torch.tensor(float(sigma_px), dtype=torch.float64)

    def axis(offset):
        pos = torch.tensor((roi - 1) / 2 + offset, dtype=torch.float64)
        mass, d_pos, _ = pixel_gaussian(roi, pos, sigma, derivatives=True)
        return mass.numpy(), d_pos.numpy()

    (ex, dex), (ey, dey) = axis(offset_px[0]), axis(offset_px[1])
    n = np.asarray(n_photons, dtype=np.float64)[..., None, None]
    b = np.asarray(bg, dtype=np.float64)[..., None, None]
    n, b = np.broadcast_arrays(n, b)
    psf = ey[:, None] * ex[None, :]                                          # (roi, roi), sums to ~1
    mu = n * psf + b
    if np.any(mu <= 0):
        raise ValueError("the expected image has pixels with mu <= 0; use bg > 0 "
                         "(a tiny bg gives the no-background limit)")
    jac = np.stack(np.broadcast_arrays(n * ey[:, None] * dex[None, :], n * dey[:, None] * ex[None, :],
                                       psf, np.ones_like(mu)), axis=-1)   # (..., roi, roi, 4)
    return np.einsum("...hwi,...hwj,...hw->...ij", jac, jac, 1.0 / mu) / excess_noise


def gaussian_2d_crlb(n_photons, bg, sigma_px: float, px_size_nm: float = 100.0, offset_px=(0.0, 0.0),
                     roi_px: int | None = None, excess_noise: float = 1.0) -> dict:
    """CRLB of the 2D pixel-integrated Gaussian with (x, y, N, b) all estimated: "x_nm", "y_nm", "lat_nm" =
    sqrt(x_nm^2 + y_nm^2), "photons" and "bg" (photons/px); floats for scalar inputs, arrays otherwise."""
    crlb = crlb_from_fisher(gaussian_2d_fisher(n_photons, bg, sigma_px, offset_px, roi_px, excess_noise))
    x_nm, y_nm = crlb[..., 0] * px_size_nm, crlb[..., 1] * px_size_nm
    out = {"x_nm": x_nm, "y_nm": y_nm, "lat_nm": np.hypot(x_nm, y_nm), "photons": crlb[..., 2], "bg": crlb[..., 3]}
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


def fisher_information(image_fn, theta, steps=None, excess_noise: float = 1.0, read_var=0.0) -> np.ndarray:
    """Fisher information (P, P) of any expected-image model image_fn(theta) -> photons per pixel (all > 0) by
    central finite differences; steps (P,) default 1e-4 * max(|theta_i|, 1) (truncation ~ step^2, round-off
    ~ 1e-16 / step). read_var (scalar or per pixel of the image) adds to each pixel's count variance."""
    theta = np.asarray(theta, dtype=np.float64)
    steps = 1e-4 * np.maximum(np.abs(theta), 1.0) if steps is None else np.asarray(steps, dtype=np.float64)
    mu = np.asarray(image_fn(theta), dtype=np.float64)
    read_var = np.broadcast_to(np.asarray(read_var, dtype=np.float64), mu.shape).reshape(-1)
    mu = mu.reshape(-1)
    if np.any(mu <= 0):
        raise ValueError("image_fn(theta) must be positive in every pixel; add a background > 0")
    flat = lambda t: np.asarray(image_fn(t), dtype=np.float64).reshape(-1)  # noqa: E731
    jac = np.empty((mu.size, theta.size))
    for i, h in enumerate(steps):
        e = np.zeros_like(theta)
        e[i] = h
        jac[:, i] = (flat(theta + e) - flat(theta - e)) / (2 * h)
    var = excess_noise * mu + read_var
    return (jac / var[:, None]).T @ jac


# Two-plus frames, positions in nm. Frame 0: a duplicate prediction near A, one pair inside and one
# outside the lateral threshold; frame 1: one pair beyond the axial threshold and one TP; frame 2: two
# predictions without ground truth (one at D's position, but D is in frame 1); frame 3: a missed emitter.
GT = np.array([[0, 0, 0], [1000, 0, 0], [3000, 3000, 0],          # A, B, C (frame 0)
               [500, 500, 0], [2000, 2000, -200],                  # D, E (frame 1)
               [800, 800, 0]], dtype=float)                        # F (frame 3)
GT_FRAME = np.array([0, 0, 0, 1, 1, 3])
PRED = np.array([[30, 40, 0],          # p0: 50 nm from A, loses A to p1, > 250 nm from B -> FP
                 [10, 0, 0],           # p1: 10 nm from A -> TP
                 [1000, 200, 100],     # p2: B, lateral 200 <= 250, axial 100 -> TP
                 [3000, 3300, 0],      # p3: C, lateral 300 > 250 -> FP (C is FN)
                 [500, 600, 600],      # p4: D, lateral 100 but axial 600 > 500 -> FP (D is FN)
                 [2030, 1960, -80],    # p5: E, d = (30, -40, 120) -> TP
                 [100, 100, 0],        # p6: frame 2 has no ground truth -> FP
                 [500, 500, 0]], dtype=float)  # p7: at D's position but in frame 2 -> FP
PRED_FRAME = np.array([0, 0, 0, 0, 1, 1, 2, 2])


def test_matching_hand_made_case():
    pred_idx, gt_idx = match_emitters(PRED, PRED_FRAME, GT, GT_FRAME)
    assert sorted(zip(pred_idx.tolist(), gt_idx.tolist())) == [(1, 0), (2, 1), (5, 4)]


def test_every_metric_on_the_hand_made_case():
    m = smlm_metrics(PRED, PRED_FRAME, GT, GT_FRAME)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 5, 3)
    assert m["precision"] == pytest.approx(3 / 8)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["jaccard"] == pytest.approx(3 / 11)
    assert m["f1"] == pytest.approx(3 / 7)
    # TP errors d = pred - gt: (10, 0, 0), (0, 200, 100), (30, -40, 120)
    assert m["rmse_lat"] == pytest.approx(math.sqrt((100 + 40000 + 900 + 1600) / 3))
    assert m["rmse_ax"] == pytest.approx(math.sqrt((10000 + 14400) / 3))
    assert m["rmse_vol"] == pytest.approx(math.sqrt((42600 + 24400) / 3))
    assert m["mad_lat"] == pytest.approx((10 + 200 + 70) / 3)
    assert m["mad_ax"] == pytest.approx((100 + 120) / 3)
    assert m["mad_vol"] == pytest.approx(500 / 3)
    assert m["effcy_lat"] == pytest.approx((100 - math.sqrt((100 * 8 / 11) ** 2 + 14200)) / 100)
    assert m["effcy_vol"] == pytest.approx((m["effcy_lat"] + m["effcy_ax"]) / 2)
    assert all(isinstance(v, float) for v in m.values())


def test_efficiency_by_hand():
    # JI = 0.8 -> 100 (1 - JI) = 20; alpha * RMSE = 15 -> sqrt(20^2 + 15^2) = 25 -> E = 0.75.
    assert ALPHA_LAT == 1.0 and ALPHA_AX == 0.5
    assert efficiency(0.8, 15.0, ALPHA_LAT) == pytest.approx(0.75)
    assert efficiency(0.8, 30.0, ALPHA_AX) == pytest.approx(0.75)
    assert efficiency(1.0, 0.0, ALPHA_LAT) == pytest.approx(1.0)
    # 4 TP with d = (9, 12, 30) nm and 1 FP: JI = 0.8, rmse_lat = 15, rmse_ax = 30.
    gt = np.array([[0, 0, 0], [1000, 0, 0], [0, 1000, 0], [1000, 1000, 0]], dtype=float)
    pred = np.concatenate([gt + [9, 12, 30], [[5000, 5000, 0]]])
    m = smlm_metrics(pred, np.zeros(5), gt, np.zeros(4))
    assert (m["jaccard"], m["rmse_lat"], m["rmse_ax"]) == pytest.approx((0.8, 15.0, 30.0))
    assert (m["effcy_lat"], m["effcy_ax"], m["effcy_vol"]) == pytest.approx((0.75, 0.75, 0.75))
    assert (m["mad_lat"], m["mad_ax"], m["rmse_vol"]) == pytest.approx((21.0, 30.0, math.sqrt(1125)))


def test_greedy_takes_the_cheapest_pair_first_not_the_maximum_matching():
    gt = np.array([[0, 0, 0], [190, 0, 0]], dtype=float)
    pred = np.array([[100, 0, 0], [300, 0, 0]], dtype=float)
    # q0-g1 (90 nm) is taken first, so q1 (110 nm from g1, 300 from g0) is left; a maximum matching has 2.
    pred_idx, gt_idx = match_emitters(pred, [0, 0], gt, [0, 0])
    assert pred_idx.tolist() == [0] and gt_idx.tolist() == [1]


def test_ties_go_to_the_lower_prediction_index():
    gt = np.array([[0, 0, 0]], dtype=float)
    pred = np.array([[-50, 0, 0], [50, 0, 0], [0, 50, 0]], dtype=float)
    for order in ([0, 1, 2], [2, 1, 0]):
        pred_idx, _ = match_emitters(pred[order], [0, 0, 0], gt, [0])
        assert pred_idx.tolist() == [0]


def test_match_dims_and_volumetric_threshold():
    gt = np.array([[0, 0, 0]], dtype=float)
    pred = np.array([[100, 0, 0], [50, 0, 400]], dtype=float)    # lateral 100 / 50, 3D 100 / 403
    assert match_emitters(pred, [0, 0], gt, [0], match_dims=3)[0].tolist() == [0]
    assert match_emitters(pred, [0, 0], gt, [0], match_dims=2)[0].tolist() == [1]
    assert match_emitters(pred, [0, 0], gt, [0], dist_vol=90)[0].tolist() == []
    deep = np.array([[50, 0, 600]], dtype=float)                 # axial 600 > 500
    assert match_emitters(deep, [0], gt, [0])[0].tolist() == []
    assert match_emitters(deep, [0], gt, [0], dist_ax=None)[0].tolist() == [0]


def test_empty_and_2d_inputs():
    m = smlm_metrics(np.zeros((0, 3)), [], GT, GT_FRAME)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 6)
    assert math.isnan(m["precision"]) and m["recall"] == 0 and m["jaccard"] == 0 and m["f1"] == 0
    assert math.isnan(m["rmse_lat"]) and math.isnan(m["effcy_lat"])
    assert all(math.isnan(v) for v in detection_metrics(0, 0, 0).values())
    m2 = smlm_metrics(PRED[:, :2], PRED_FRAME, GT[:, :2], GT_FRAME)
    assert m2["rmse_ax"] == 0 and m2["tp"] == 4        # without z, p4 matches D
    with pytest.raises(ValueError, match="pred_xyz"):
        match_emitters(np.zeros((3, 4)), [0, 0, 0], GT, GT_FRAME)
    with pytest.raises(ValueError, match="pred_frame"):
        match_emitters(PRED, PRED_FRAME[:3], GT, GT_FRAME)
    with pytest.raises(ValueError, match="same shape"):
        localisation_errors(PRED[:2], GT[:3])


def test_rmse_over_crlb_pools_per_emitter_bounds_like_squared_errors():
    assert rmse_over_crlb(10.0, [3.0, 4.0]) == pytest.approx(10 / math.sqrt(12.5))
    crlb = np.arange(1.0, 7.0)                                   # one bound per ground-truth emitter
    m = smlm_metrics(PRED, PRED_FRAME, GT, GT_FRAME, gt_crlb_lat_nm=crlb)
    assert m["crlb_lat"] == pytest.approx(math.sqrt((1 + 4 + 25) / 3))    # matched GT 0, 1, 4
    assert m["rmse_over_crlb"] == pytest.approx(m["rmse_lat"] / m["crlb_lat"])


def mortensen_mle_var_px2(n: float, bg: float, sigma_px: float) -> float:
    sa2 = sigma_px**2 + 1 / 12
    tau = 2 * math.pi * sa2 * bg / n
    integral = quad(lambda t: math.log(t) / (1 + t / tau), 0, 1)[0] if bg > 0 else 0.0
    return sa2 / n / (1 + integral)


@pytest.mark.parametrize("sigma_px,offset", [(1.3, (0.0, 0.0)), (1.3, (0.3, -0.2)), (1.0, (0.5, 0.5))])
def test_crlb_no_background_limit_is_sigma_a_squared_over_n(sigma_px, offset):
    for n in (200.0, 1000.0, 10000.0):
        c = gaussian_2d_crlb(n, 1e-6, sigma_px, px_size_nm=100.0, offset_px=offset)
        expected_nm = 100.0 * math.sqrt((sigma_px**2 + 1 / 12) / n)
        assert c["x_nm"] == pytest.approx(expected_nm, rel=2e-5)
        assert c["y_nm"] == pytest.approx(expected_nm, rel=2e-5)
        assert c["lat_nm"] == pytest.approx(math.sqrt(2) * expected_nm, rel=2e-5)
        assert c["photons"] == pytest.approx(math.sqrt(n), rel=1e-3)      # Poisson total without background


def test_crlb_emccd_and_background():
    poisson = gaussian_2d_crlb(1000.0, 10.0, 1.3)
    emccd = gaussian_2d_crlb(1000.0, 10.0, 1.3, excess_noise=EMCCD_EXCESS_NOISE)
    for key in poisson:
        assert emccd[key] == pytest.approx(math.sqrt(2) * poisson[key], rel=1e-10)
    lat = gaussian_2d_crlb(1000.0, np.array([1e-3, 1.0, 10.0, 100.0, 1000.0]), 1.3)["lat_nm"]
    assert np.all(np.diff(lat) > 0), lat
    assert np.all(np.diff(gaussian_2d_crlb(np.array([300.0, 1000.0, 5000.0]), 10.0, 1.3)["lat_nm"]) < 0)
    # With background the bound follows Mortensen's MLE formula (itself an approximation: a continuous
    # background integral), to well under 0.1 % here.
    for n, bg in [(1000.0, 10.0), (1000.0, 100.0), (300.0, 20.0)]:
        expected = math.sqrt(mortensen_mle_var_px2(n, bg, 1.3))
        assert gaussian_2d_crlb(n, bg, 1.3, px_size_nm=1.0)["x_nm"] == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="bg > 0"):
        gaussian_2d_fisher(1000.0, 0.0, 0.3, roi_px=41)


def test_finite_difference_fisher_matches_analytic_and_handles_astigmatism():
    roi = default_roi_px(1.3)
    centre = (roi - 1) / 2
    theta = np.array([centre + 0.2, centre - 0.1, 2000.0, 15.0])
    image_2d = lambda t: gaussian_psf_image(t[0], t[1], t[2], t[3], 1.3, roi)  # noqa: E731
    numeric = fisher_information(image_2d, theta)
    analytic = gaussian_2d_fisher(2000.0, 15.0, 1.3, offset_px=(0.2, -0.1), roi_px=roi)
    scale = np.sqrt(np.outer(np.diag(analytic), np.diag(analytic)))
    assert np.abs((numeric - analytic) / scale).max() < 1e-6      # relative to sqrt(I_ii I_jj)

    # Astigmatic 3D PSF, theta = (x, y, z nm, N, b). In focus (sigma_x = sigma_y) with a centred emitter,
    # z is uncorrelated with x, so CRLB_x equals the 2D bound at that sigma.
    sigma0 = 1.0
    roi3 = default_roi_px(max(astigmatic_sigma(-750.0, sigma0)))
    c3 = (roi3 - 1) / 2

    def image_3d(t):
        return gaussian_psf_image(t[0], t[1], t[3], t[4], astigmatic_sigma(t[2], sigma0), roi3)

    crlb_focus = crlb_from_fisher(fisher_information(image_3d, [c3, c3, 0.0, 3000.0, 20.0]))
    sigma_focus = float(astigmatic_sigma(0.0, sigma0)[0])
    crlb_2d = gaussian_2d_crlb(3000.0, 20.0, sigma_focus, px_size_nm=1.0, roi_px=roi3)
    assert crlb_focus[0] == pytest.approx(crlb_2d["x_nm"], rel=1e-5)
    crlb_off = crlb_from_fisher(fisher_information(image_3d, [c3, c3, 400.0, 3000.0, 20.0]))
    assert np.all(np.isfinite(crlb_off)) and 0 < crlb_off[2] < 100            # z bound in nm
    assert crlb_off[0] != pytest.approx(crlb_off[1], rel=1e-2)              # x and y differ off focus


def test_emitter_crlb_matches_the_per_emitter_fisher_computation():
    """The batched bound of simulated emitters equals the one-emitter finite-difference Fisher route."""
    rng = np.random.default_rng(0)
    # Far from the edges of a large frame, so that every emitter's whole ROI (up to 53 px at z = -700 nm) is in it.
    xyz = np.column_stack([rng.uniform(40, 80, 5), rng.uniform(40, 80, 5), [-700.0, -250.0, 0.0, 300.0, 750.0]])
    phot, bg = rng.uniform(500, 20000, 5), rng.uniform(20, 150, 5)
    cfg = SimConfig(img_size=(120, 120), psf="astigmatic", sigma0_px=1.2, px_size_nm=(100.0, 110.0), camera="emccd",
                    qe=0.9)
    crlb = emitter_crlb_nm(xyz, phot, bg, cfg, chunk=2)          # chunks of 2: the last chunk holds one emitter
    for i in range(5):
        roi = default_roi_px(max(astigmatic_sigma(xyz[i, 2], 1.2)))
        c = (roi - 1) / 2
        frac = xyz[i, :2] - np.round(xyz[i, :2])
        theta = [c + frac[0], c + frac[1], xyz[i, 2], phot[i] * 0.9, bg[i] * 0.9]
        ref = crlb_from_fisher(fisher_information(
            lambda t: gaussian_psf_image(t[0], t[1], t[3], t[4], astigmatic_sigma(t[2], 1.2), roi), theta,
            excess_noise=EMCCD_EXCESS_NOISE))
        np.testing.assert_allclose(crlb[i], [ref[0] * 100, ref[1] * 110, ref[2]], rtol=1e-4)
    # 2D PSF with a Poisson camera: the analytic (x, y, N, b) bound, no z.
    cfg2 = SimConfig(img_size=(120, 120), psf="gaussian", sigma0_px=1.3, camera="perfect", em_gain=None)
    crlb2 = emitter_crlb_nm(xyz, phot, bg, cfg2)
    frac = xyz[:, :2] - np.round(xyz[:, :2])
    for i in range(5):
        ref = gaussian_2d_crlb(phot[i], bg[i], 1.3, px_size_nm=100.0, offset_px=tuple(frac[i]))
        assert crlb2[i, 0] == pytest.approx(ref["x_nm"], rel=1e-6)
        assert crlb2[i, 1] == pytest.approx(ref["y_nm"], rel=1e-6)
    assert np.isnan(crlb2[:, 2]).all()
    # Not knowing z costs lateral precision off focus.
    known_z = [gaussian_2d_crlb(phot[0] * 0.9, bg[0] * 0.9, float(s), px_size_nm=100.0,
                                excess_noise=EMCCD_EXCESS_NOISE)["x_nm"] for s in astigmatic_sigma(-700.0, 1.2)]
    assert emitter_crlb_nm(np.array([[60.0, 60.0, -700.0]]), phot[:1], bg[:1], cfg)[0, 0] > known_z[0]


def test_scmos_read_noise_enters_the_bound_pixel_by_pixel(tmp_path):
    """sCMOS: each pixel's read-noise variance adds to its count variance (Huang et al. 2013), scalar or from
    the map at the frames' place on the sensor; the finite-difference Fisher route with the same variances
    agrees, and ground_truth uses the window the movie was simulated on."""
    n, bg, qe = 2000.0, 15.0, 0.8
    roi = default_roi_px(1.3)
    c = (roi - 1) // 2
    sensor = np.full((64, 64), 1.5)
    sensor[24:27, 26] = 12.0                                   # three noisy pixels right of the emitter below
    np.save(tmp_path / "sensor.npy", sensor.astype(np.float32))
    cfg = SimConfig(img_size=(32, 32), psf="gaussian", sigma0_px=1.3, camera="scmos", em_gain=None, qe=qe,
                    e_per_adu=0.5, read_sigma=1.5, px_size_nm=(100.0, 100.0))
    x, y = 15.2, 14.9                                          # the whole ROI inside the frame
    image = lambda t: gaussian_psf_image(t[0], t[1], t[2], t[3], 1.3, roi)  # noqa: E731
    theta = [c + x - round(x), c + y - round(y), n * qe, bg * qe]
    rounding = 0.25 / 12
    scalar = emitter_crlb_nm([[x, y, 0.0]], n, bg, cfg)[0]
    ref = crlb_from_fisher(fisher_information(image, theta, read_var=1.5**2 + rounding))
    np.testing.assert_allclose(scalar[:2], ref[:2] * 100.0, rtol=1e-4)
    assert scalar[0] > emitter_crlb_nm([[x, y, 0.0]], n, bg, dataclasses.replace(cfg, read_sigma=0.0,
                                                                                   e_per_adu=1e-6))[0, 0]
    mapped = dataclasses.replace(cfg, read_sigma_map=str(tmp_path / "sensor.npy"), sensor_origin=(10, 10))
    window = sensor[10:42, 10:42]                              # emitter pixel (15, 15) -> sensor (25, 25)
    ref_var = window[round(y) - c:round(y) - c + roi, round(x) - c:round(x) - c + roi] ** 2 + rounding
    per_pixel = emitter_crlb_nm([[x, y, 0.0]], n, bg, mapped)[0]
    ref = crlb_from_fisher(fisher_information(image, theta, read_var=ref_var))
    np.testing.assert_allclose(per_pixel[:2], ref[:2] * 100.0, rtol=1e-4)
    assert per_pixel[0] > scalar[0] * 1.01                     # the noisy column beside the spot costs x precision
    # A movie on a random window of the sensor: its targets' bounds use that window.
    movie_cfg = dataclasses.replace(mapped, sensor_origin=None, emitter_av=4.0)
    movie = simulate_movie(movie_cfg, 6, torch.Generator().manual_seed(2))
    gt = ground_truth(movie, movie_cfg)
    r0, c0 = movie.sensor_origin
    expect = emitter_crlb_nm(gt["xyz_px"], gt["phot"], gt["bg"], movie_cfg,
                             read_var=sensor[r0:r0 + 32, c0:c0 + 32] ** 2 + rounding)
    np.testing.assert_allclose(gt["crlb_nm"], expect, rtol=1e-6)


def test_crlb_counts_only_the_pixels_inside_the_frame():
    """An emitter 0.3 px from the left edge: its bound is the Fisher information of the pixels the camera
    records (the ROI's columns left of the frame dropped), larger than the same emitter's in the middle."""
    cfg = SimConfig(img_size=(20, 24), psf="gaussian", sigma0_px=1.3, camera="perfect", em_gain=None)
    n, bg = 3000.0, 40.0
    roi = default_roi_px(1.3)
    c = (roi - 1) // 2                                   # ROI column k is frame column round(x) - c + k
    for x, y in [(0.3, 10.2), (23.4, 18.6), (-0.45, 0.4)]:
        col0, row0 = round(x) - c, round(y) - c
        cols = (col0 + np.arange(roi) >= 0) & (col0 + np.arange(roi) <= 23)
        rows = (row0 + np.arange(roi) >= 0) & (row0 + np.arange(roi) <= 19)
        image = lambda t: gaussian_psf_image(t[0], t[1], t[2], t[3], 1.3, roi)[np.ix_(rows, cols)]  # noqa: E731
        ref = crlb_from_fisher(fisher_information(image, [c + x - round(x), c + y - round(y), n, bg]))
        edge = emitter_crlb_nm([[x, y, 0.0]], n, bg, cfg)[0]
        np.testing.assert_allclose(edge[:2], ref[:2] * 100.0, rtol=1e-4)
        middle = emitter_crlb_nm([[12.0 + x - round(x), 10.0 + y - round(y), 0.0]], n, bg, cfg)[0]
        assert edge[0] > 1.05 * middle[0]


def test_fisher_equals_monte_carlo_covariance_of_the_poisson_score():
    n, bg, sigma = 1000.0, 10.0, 1.3
    roi = default_roi_px(sigma)
    c = (roi - 1) / 2
    theta = np.array([c + 0.25, c, n, bg])
    image = lambda t: gaussian_psf_image(t[0], t[1], t[2], t[3], sigma, roi).reshape(-1)  # noqa: E731
    mu = image(theta)
    steps = np.diag([1e-4, 1e-4, 1e-2, 1e-4])
    jac = np.stack([(image(theta + h) - image(theta - h)) / (2 * h.sum()) for h in steps], axis=1)   # (pixels, 4)
    counts = np.random.default_rng(0).poisson(mu, size=(20000, mu.size))
    score = (counts / mu - 1) @ jac                                  # d log-likelihood / d theta per image
    mc = np.cov(score, rowvar=False)
    fisher = gaussian_2d_fisher(n, bg, sigma, offset_px=(0.25, 0.0), roi_px=roi)
    d = np.sqrt(np.diag(fisher))
    assert np.abs((mc - fisher) / np.outer(d, d)).max() < 0.05     # MC standard error ~ 1 %


def centroid_rmse_lat_nm(n: float, bg: float, sigma: float, px_nm: float, frames: int, seed: int) -> float:
    roi = default_roi_px(sigma)
    c = (roi - 1) / 2
    counts = np.random.default_rng(seed).poisson(gaussian_psf_image(c, c, n, bg, sigma, roi), size=(frames, roi, roi))
    grid = np.arange(roi) - c
    total = counts.sum((1, 2))
    dx = (counts.sum(1) @ grid) / total
    dy = (counts.sum(2) @ grid) / total
    return float(np.sqrt(np.mean(dx**2 + dy**2))) * px_nm


def test_rmse_over_crlb_of_a_simulated_estimator():
    """The centroid is efficient for a centred emitter without background, and far from it with background."""
    crlb = gaussian_2d_crlb(2000.0, 1e-6, 1.3, px_size_nm=100.0)["lat_nm"]
    ratio = rmse_over_crlb(centroid_rmse_lat_nm(2000.0, 1e-6, 1.3, 100.0, frames=4000, seed=1), crlb)
    assert 0.97 < ratio < 1.03, ratio        # MC standard error of the ratio ~ 0.8 %
    crlb_bg = gaussian_2d_crlb(2000.0, 5.0, 1.3, px_size_nm=100.0)["lat_nm"]
    ratio_bg = rmse_over_crlb(centroid_rmse_lat_nm(2000.0, 5.0, 1.3, 100.0, frames=2000, seed=2), crlb_bg)
    assert ratio_bg > 1.5, ratio_bg


def test_binned_metrics_equal_a_per_bin_loop():
    rng = np.random.default_rng(7)
    n_gt = 203
    gt = np.column_stack([rng.uniform(0, 5000, n_gt), rng.uniform(0, 5000, n_gt), rng.uniform(-500, 500, n_gt)])
    photons = rng.gamma(4.0, 1500.0, n_gt)
    crlb = 3000.0 / np.sqrt(photons)
    found = rng.random(n_gt) < 0.8                                   # 80 % matched, in shuffled order
    gt_idx = rng.permutation(np.flatnonzero(found))
    pred = np.concatenate([gt[gt_idx] + rng.normal(0, 1, (len(gt_idx), 3)) * crlb[gt_idx, None] / math.sqrt(2),
                           rng.uniform(0, 5000, (9, 3))])            # plus 9 unmatched predictions
    pred_idx = np.arange(len(gt_idx))
    rows = binned_metrics(pred, gt, pred_idx, gt_idx, photons, crlb, n_bins=4)
    edges = np.quantile(photons, [0, 0.25, 0.5, 0.75, 1])
    assert [r["lo"] for r in rows] + [rows[-1]["hi"]] == pytest.approx(edges)
    assert sum(r["n_gt"] for r in rows) == n_gt
    for b, row in enumerate(rows):
        members = [g for g in range(n_gt) if edges[b] <= photons[g] and (photons[g] < edges[b + 1] or b == 3)]
        assert row["n_gt"] == len(members)
        pairs = [(p, g) for p, g in zip(pred_idx, gt_idx) if g in members]
        assert row["recall"] == pytest.approx(len(pairs) / len(members))
        sq = [float(np.sum((pred[p, :2] - gt[g, :2]) ** 2)) for p, g in pairs]
        assert row["rmse_lat"] == pytest.approx(math.sqrt(sum(sq) / len(sq)))
        assert row["rmse_ax"] == pytest.approx(math.sqrt(np.mean([(pred[p, 2] - gt[g, 2]) ** 2 for p, g in pairs])))
        assert row["median_lat"] == pytest.approx(float(np.median(np.sqrt(sq))))
        bound = math.sqrt(np.mean([crlb[g] ** 2 for _, g in pairs]))
        assert row["crlb_lat"] == pytest.approx(bound)
        assert row["rmse_over_crlb"] == pytest.approx(row["rmse_lat"] / bound)
    assert 0.8 < np.mean([r["rmse_over_crlb"] for r in rows]) < 1.25  # each axis has half its lateral bound^2
    empty = binned_metrics(pred, gt, pred_idx[:0], gt_idx[:0], photons, crlb)
    assert all(r["recall"] == 0 and math.isnan(r["rmse_lat"]) and math.isnan(r["rmse_over_crlb"]) for r in empty)
    with pytest.raises(ValueError, match="one entry per ground-truth emitter"):
        binned_metrics(pred, gt, pred_idx, gt_idx, photons[:-1])


def test_crlb_oracle_scatters_each_emitter_by_its_own_bound():
    cfg = SimConfig(img_size=(32, 32), psf="astigmatic")
    movie = simulate_movie(dataclasses.replace(cfg, emitter_av=6.0), 400, torch.Generator().manual_seed(3))
    gt = ground_truth(movie, cfg)
    assert gt["crlb_nm"].shape == (len(gt["phot"]), 3)
    np.testing.assert_allclose(gt["crlb_lat_nm"], np.hypot(gt["crlb_nm"][:, 0], gt["crlb_nm"][:, 1]))
    oracle = crlb_oracle(gt, seed=1)
    np.testing.assert_array_equal(oracle["frame_ix"], gt["frame_ix"])
    z_scores = (oracle["xyz_nm"] - gt["xyz_nm"]) / gt["crlb_nm"]      # standard Normal on every axis
    assert np.abs(z_scores.mean(0)).max() < 0.1 and z_scores.std(0) == pytest.approx([1, 1, 1], abs=0.05)
    np.testing.assert_array_equal(crlb_oracle(gt, seed=1)["xyz_nm"], oracle["xyz_nm"])
    m = smlm_metrics(oracle["xyz_nm"], oracle["frame_ix"], gt["xyz_nm"], gt["frame_ix"],
                     gt_crlb_lat_nm=gt["crlb_lat_nm"])
    assert m["precision"] > 0.97 and m["recall"] > 0.97
    # A 2D PSF has no z bound (NaN): the oracle leaves z untouched.
    flat = {**gt, "crlb_nm": np.column_stack([gt["crlb_nm"][:, :2], np.full(len(gt["phot"]), np.nan)])}
    np.testing.assert_array_equal(crlb_oracle(flat)["xyz_nm"][:, 2], gt["xyz_nm"][:, 2])


def test_precomputed_pairs_give_the_same_metrics():
    pairs = match_emitters(PRED, PRED_FRAME, GT, GT_FRAME)
    direct = smlm_metrics(PRED, PRED_FRAME, GT, GT_FRAME, gt_crlb_lat_nm=10.0)
    reused = smlm_metrics(PRED, PRED_FRAME, GT, GT_FRAME, gt_crlb_lat_nm=10.0, pairs=pairs)
    assert reused == direct and direct["tp"] == 3

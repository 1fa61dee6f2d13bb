"""models/smlm_mle.py: the maximum-likelihood refinement of network detections.

References: the simulator's own rendering (data.smlm.render) for the neighbours' light, the Poisson likelihood
written out in numpy and minimised by scipy's Nelder-Mead for the refitted values, and metrics.smlm_crlb for
the standard errors.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.smlm import Emitters, SimConfig, render
from metrics.smlm_crlb import emitter_crlb_nm
from models.smlm_mle import _clusters, _other_light, crop_rois, refine_detections
from test_smlm_classical import grid_emitters, make_movie

ASTIG_NOISELESS = SimConfig(img_size=(32, 48), psf="astigmatic", camera="noiseless")
# An sCMOS with qe 0.8: counts in photons are over-dispersed by 1 / qe, which the refit's units must undo.
SCMOS = SimConfig(img_size=(32, 48), psf="astigmatic", camera="scmos", qe=0.8, e_per_adu=0.5, baseline=100.0,
                  read_sigma=1.6, em_gain=None)


def network_like(frame_ix, xyz, phot, bg, sigma_px=1.0, shift_px=0.3, seed=0) -> dict[str, np.ndarray]:
    """Detections as fit_smlm.localise returns them: the truth moved by up to shift_px (x, y) and 100 nm (z),
    photons 20 % low, with a predicted lateral sigma of sigma_px."""
    rng = np.random.default_rng(seed)
    n = len(frame_ix)
    xyz_px = np.asarray(xyz, dtype=np.float64) + np.c_[rng.uniform(-shift_px, shift_px, (n, 2)),
                                                       rng.uniform(-100, 100, n)]
    sig = np.tile([sigma_px, sigma_px, 50.0], (n, 1))
    px = np.array([100.0, 100.0, 1.0])
    return {"frame_ix": np.asarray(frame_ix, dtype=np.int64), "prob": np.ones(n, np.float32),
            "prob_raw": np.ones(n, np.float32), "pixel": np.round(xyz_px[:, [1, 0]]).astype(np.int64),
            "param_out": np.zeros((n, 4), np.float32), "sigma_out": np.zeros((n, 4), np.float32),
            "xyz_px": xyz_px.astype(np.float32), "xyz_nm": (xyz_px * px).astype(np.float32),
            "xyz_sig_px": sig.astype(np.float32), "xyz_sig_nm": (sig * px).astype(np.float32),
            "phot": np.full(n, 0.8 * phot, np.float32), "phot_sig": np.ones(n, np.float32),
            "bg": np.full(n, bg, np.float32)}


def test_neighbour_light_equals_the_rendered_other_emitters():
    cfg = ASTIG_NOISELESS
    frame_ix = torch.tensor([0, 0, 0, 1, 1, 2])
    xyz = torch.tensor([[5.2, 6.7, -400.0], [9.9, 8.1, 250.0], [30.3, 20.6, 0.0], [12.0, 12.0, 600.0],
                        [14.6, 13.2, -100.0], [20.0, 15.0, 0.0]])
    phot = torch.tensor([3000.0, 5000.0, 4000.0, 8000.0, 2000.0, 6000.0])
    radius, size = 4, 9
    row, col = xyz[:, 1].round().long(), xyz[:, 0].round().long()
    blank = torch.zeros(3, *cfg.img_size)
    _, oy, ox = crop_rois(blank, frame_ix, row, col, radius)
    own = torch.arange(len(frame_ix))  # every detection its own cluster: all others of its frame count

    def light_of(reach, label=own):
        return _other_light(frame_ix, label, oy, ox, size, frame_ix, label, xyz, phot, cfg, reach)

    light = light_of(1e9)
    for r in range(len(frame_ix)):
        others = [j for j in range(len(frame_ix)) if j != r and frame_ix[j] == frame_ix[r]]
        em = Emitters(torch.zeros(len(others), dtype=torch.int64), xyz[others], phot[others],
                      torch.arange(len(others)))
        frame = render(em, 1, cfg)[0]
        expected = frame[int(oy[r]):int(oy[r]) + size, int(ox[r]):int(ox[r]) + size]
        torch.testing.assert_close(light[r], expected, rtol=1e-4, atol=1e-3)
    assert float(light[5].abs().max()) == 0.0  # alone in its frame
    # Within `reach` (each of x, y from the ROI centre) only: the far emitter of frame 0 drops out of the
    # first two ROIs, and those two out of its own.
    near = light_of(8.0)
    for r, other in ((0, 1), (1, 0)):
        em = Emitters(torch.zeros(1, dtype=torch.int64), xyz[[other]], phot[[other]], torch.arange(1))
        expected = render(em, 1, cfg)[0][int(oy[r]):int(oy[r]) + size, int(ox[r]):int(ox[r]) + size]
        torch.testing.assert_close(near[r], expected, rtol=1e-4, atol=1e-3)
    assert float(near[2].abs().max()) == 0.0
    # Members of the ROI's own cluster are fitted with it, not added as light: detections 0 and 1 together.
    paired = light_of(1e9, torch.tensor([0, 0, 2, 3, 4, 5]))
    assert float(paired[:2].abs().max()) > 0.0  # the far emitter of frame 0 is still light for them
    torch.testing.assert_close(paired[:2], light[:2] - near[:2])
    torch.testing.assert_close(paired[2:], light[2:])


def test_clusters_link_close_detections_of_one_frame():
    t = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    xy = torch.tensor([[5.0, 5.0], [8.0, 5.5], [11.5, 6.0], [30.0, 30.0],     # a chain of 3, one alone
                       [5.0, 5.0], [5.0, 9.5],                                  # 4.5 px apart: not linked
                       [0.0, 0.0], [3.0, 0.0], [6.0, 0.0], [9.0, 0.0], [12.0, 0.0], [40.0, 40.0]])
    label = _clusters(t, xy, link_px=4.0, max_joint=4)
    assert label[0] == label[1] == label[2] and len(set(label[[0, 3, 4, 5, 6, 11]])) == 6
    # A chain of 5 > max_joint: fitted one by one.
    assert len(set(label[6:11])) == 5
    assert len(set(label)) == 2 + 2 + 6


def brute_force_fit(roi_photons, roi_read_var, oy, ox, start, cfg):
    """(x, y, z, N, b) maximising the Poisson likelihood of one ROI in photoelectrons, written out in numpy and
    minimised by scipy's Nelder-Mead: mu = qe (N PSF + b) + r against d = qe photons + r (r the read variance)."""
    from scipy.optimize import minimize

    from data.smlm import pixel_gaussian, psf_sigmas

    size = roi_photons.shape[0]
    data = (cfg.qe * roi_photons + roi_read_var).clip(0)
    scale = np.array([1.0, 1.0, 100.0, 1000.0, 10.0])   # comparable steps for the simplex

    def nll(u):
        x, y, z, n, b = u * scale
        sx, sy = (float(v) for v in psf_sigmas(torch.tensor([z], dtype=torch.float64), cfg))
        ex = pixel_gaussian(size, torch.tensor(x - ox, dtype=torch.float64), torch.tensor(sx, dtype=torch.float64))
        ey = pixel_gaussian(size, torch.tensor(y - oy, dtype=torch.float64), torch.tensor(sy, dtype=torch.float64))
        mu = cfg.qe * (n * np.outer(ey.numpy(), ex.numpy()) + b) + roi_read_var
        return float(np.sum(mu - data * np.log(mu)))

    res = minimize(nll, np.asarray(start) / scale, method="Nelder-Mead",
                   options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 20000, "maxfev": 20000})
    return res.x * scale


def test_refit_is_the_likelihood_maximum_of_its_roi():
    cfg = SCMOS
    # 24 px apart: no neighbour's light reaches another's ROI (the brute force knows no neighbours).
    frame_ix, xyz = grid_emitters(cfg, 4, spacing=24)
    xyz[:, 2] = np.random.default_rng(3).uniform(-500, 500, len(xyz))
    frames = make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 4000.0), 40.0, 4, seed=1)
    det = network_like(frame_ix, xyz, 4000.0, 40.0)
    refined, replaced = refine_detections(det, frames, cfg, gof_alpha=None, roi_radius=4)
    assert replaced.all()
    read_var = cfg.read_sigma ** 2 + cfg.e_per_adu ** 2 / 12   # e-^2: read noise and ADU rounding
    for r in range(len(frame_ix)):
        # The refit's ROI: 9 x 9 px around the network's estimate, inside the frame.
        oy = int(np.clip(round(float(det["xyz_px"][r, 1])) - 4, 0, cfg.img_size[0] - 9))
        ox = int(np.clip(round(float(det["xyz_px"][r, 0])) - 4, 0, cfg.img_size[1] - 9))
        roi = frames[frame_ix[r], oy:oy + 9, ox:ox + 9].double().numpy()
        start = [*det["xyz_px"][r], det["phot"][r], det["bg"][r]]
        x, y, z, n, b = brute_force_fit(roi, read_var, oy, ox, start, cfg)
        np.testing.assert_allclose(refined["xyz_px"][r, :2], [x, y], atol=2e-3)
        np.testing.assert_allclose(refined["xyz_px"][r, 2], z, atol=1.0)
        np.testing.assert_allclose([refined["phot"][r], refined["bg"][r]], [n, b], rtol=2e-3)
    # The nm columns follow the px ones; the network's raw outputs are untouched.
    np.testing.assert_allclose(refined["xyz_nm"], refined["xyz_px"] * [100.0, 100.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(refined["param_out"], det["param_out"])
    np.testing.assert_array_equal(refined["prob"], det["prob"])


@pytest.mark.parametrize("cfg", [SCMOS, dataclasses.replace(SCMOS, camera="emccd", em_gain=300.0, e_per_adu=45.0,
                                                            read_sigma=74.4, qe=0.9),
                                 dataclasses.replace(SCMOS, camera="perfect")], ids=["scmos", "emccd", "perfect"])
def test_standard_errors_and_goodness_of_fit_are_calibrated(cfg):
    """Over 480 fits of isolated emitters: the reported lateral standard error equals the spread of the
    estimates and the Cramer-Rao bound, and the 5 % goodness-of-fit test rejects about 5 % of the fits
    (both need the counts in photoelectrons: in photons they are over-dispersed by 1 / qe; the perfect
    camera counts photons and ignores qe)."""
    n_frames = 60
    frame_ix, xyz = grid_emitters(cfg, n_frames, spacing=12, seed=2)
    frames = make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 2000.0), 30.0, n_frames, seed=4)
    det = network_like(frame_ix, xyz, 2000.0, 30.0, shift_px=0.2)
    refined, replaced = refine_detections(det, frames, cfg, gof_alpha=None)
    assert replaced.all()
    err = refined["xyz_px"][:, 0] - xyz[:, 0]
    sig = refined["xyz_sig_px"][:, 0]
    crlb = emitter_crlb_nm(xyz, np.full(len(xyz), 2000.0), np.full(len(xyz), 30.0), cfg)[:, 0] / 100.0
    assert len(err) >= 480
    assert np.sqrt(np.mean(err ** 2)) == pytest.approx(np.sqrt(np.mean(sig ** 2)), rel=0.12)
    assert np.sqrt(np.mean(sig ** 2)) == pytest.approx(np.sqrt(np.mean(crlb ** 2)), rel=0.05)
    _, tested = refine_detections(det, frames, cfg, gof_alpha=0.05)
    assert 0.015 <= 1 - tested.mean() <= 0.09


def test_overlapping_spots_are_fitted_with_their_neighbour():
    cfg = ASTIG_NOISELESS
    frame_ix = np.array([0, 0, 1, 1])
    xyz = np.array([[10.2, 12.4, 300.0], [12.6, 12.9, -200.0], [20.3, 15.5, 0.0], [21.1, 17.9, 500.0]])
    frames = make_movie(cfg, frame_ix, xyz, np.full(4, 5000.0), 50.0, 2)
    det = network_like(frame_ix, xyz, 5000.0, 50.0)
    refined, replaced = refine_detections(det, frames, cfg)
    assert replaced.all()
    np.testing.assert_allclose(refined["xyz_px"][:, :2], xyz[:, :2], atol=0.02)
    np.testing.assert_allclose(refined["xyz_px"][:, 2], xyz[:, 2], atol=5.0)
    np.testing.assert_allclose(refined["phot"], 5000.0, rtol=0.01)
    # Its neighbour missing from the detections, a spot's light is unexplained: the goodness-of-fit test
    # (or the shift limit) keeps the network's values.
    lone = {k: v[[0, 2]] for k, v in det.items()}
    kept, replaced = refine_detections(lone, frames, cfg)
    assert not replaced.any()
    for k in lone:
        np.testing.assert_array_equal(kept[k], lone[k])


def test_the_network_values_stay_where_the_fit_is_not_better():
    cfg = ASTIG_NOISELESS
    frame_ix, xyz = np.array([0, 0]), np.array([[10.0, 10.0, 0.0], [30.0, 20.0, 0.0]])
    frames = make_movie(cfg, frame_ix, xyz, np.full(2, 5000.0), 50.0, 1)
    # A predicted sigma below the fit's standard error: the network is trusted.
    det = network_like(frame_ix, xyz, 5000.0, 50.0, sigma_px=1e-4)
    _, replaced = refine_detections(det, frames, cfg)
    assert not replaced.any()
    # A fit that runs more than max_shift_px from the network's estimate is rejected.
    det = network_like(frame_ix, xyz, 5000.0, 50.0, shift_px=0.0)
    det["xyz_px"][:, 0] += 0.6
    _, replaced = refine_detections(det, frames, cfg)
    assert replaced.all()
    _, replaced = refine_detections(det, frames, cfg, max_shift_px=0.5)
    assert not replaced.any()


def test_bad_input_raises_and_no_detections_is_fine():
    with pytest.raises(ValueError, match="gof_alpha"):
        refine_detections({}, torch.zeros(1, 16, 16), ASTIG_NOISELESS, gof_alpha=1.5)
    with pytest.raises(ValueError, match="fewer pixels"):
        refine_detections({}, torch.zeros(1, 16, 16), ASTIG_NOISELESS, roi_radius=1, max_joint=4)
    frames = torch.zeros(2, 16, 16)
    det = network_like(np.array([1, 0]), np.array([[5.0, 5.0, 0.0], [9.0, 9.0, 0.0]]), 1000.0, 10.0)
    with pytest.raises(ValueError, match="sorted by frame"):
        refine_detections(det, frames, ASTIG_NOISELESS)
    with pytest.raises(ValueError, match="spline"):
        refine_detections(det, frames, SimpleNamespace(psf="spline"))  # a spline run's SimConfig needs a file
    with pytest.raises(ValueError, match="smaller than"):
        refine_detections(det, torch.zeros(2, 6, 6), ASTIG_NOISELESS)
    empty = {k: v[:0] for k, v in det.items()}
    out, replaced = refine_detections(empty, frames, ASTIG_NOISELESS)
    assert len(replaced) == 0 and all(len(v) == 0 for v in out.values())


def test_neighbours_held_fixed_are_moved_by_the_second_pass():
    """Fitted one by one (max_joint 1), each spot of a close pair sees its partner's light at the partner's
    estimate: the network's (0.3 px off, photons 20 % low) in the first pass, the refitted one in the second."""
    cfg = ASTIG_NOISELESS
    frame_ix = np.array([0, 0, 1, 1])
    xyz = np.array([[10.2, 12.4, 0.0], [14.6, 12.9, 100.0], [20.3, 15.5, 0.0], [23.8, 18.4, -100.0]])
    frames = make_movie(cfg, frame_ix, xyz, np.full(4, 5000.0), 50.0, 2)
    det = network_like(frame_ix, xyz, 5000.0, 50.0, seed=1)
    errors = []
    for passes in (1, 2, 6):
        refined, replaced = refine_detections(det, frames, cfg, max_joint=1, passes=passes, gof_alpha=None)
        assert replaced.all()
        errors.append(np.abs(refined["xyz_px"][:, :2] - xyz[:, :2]).max())
    assert errors[0] > 0.05 and errors[1] < 0.8 * errors[0] and errors[2] < 0.25 * errors[0], errors
    joint, _ = refine_detections(det, frames, cfg, link_px=6.0, gof_alpha=None)  # one model for both: exact
    np.testing.assert_allclose(joint["xyz_px"][:, :2], xyz[:, :2], atol=1e-3)


def test_z_pinned_on_the_range_end_keeps_the_networks_z():
    """Emitters 20 nm inside the end of the calibrated range: fits that end on the bound replace x, y but not
    z, and no row reports the pinned parameter's placeholder as its sigma."""
    cfg = SCMOS
    z_end = cfg.z_range_nm[1]
    frame_ix, xyz = grid_emitters(cfg, 10, spacing=12, z_nm=z_end - 20.0, seed=5)
    frames = make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 3000.0), 30.0, 10, seed=6)
    det = network_like(frame_ix, xyz, 3000.0, 30.0, shift_px=0.2)
    det["xyz_px"][:, 2] = det["xyz_nm"][:, 2] = z_end - 50.0
    det["xyz_sig_px"][:, 2] = det["xyz_sig_nm"][:, 2] = 500.0   # nm: only the pin keeps the network's z
    refined, replaced = refine_detections(det, frames, cfg, gof_alpha=None)
    assert replaced.mean() > 0.9
    z_kept = replaced & (refined["xyz_px"][:, 2] == det["xyz_px"][:, 2])
    z_fitted = replaced & ~z_kept
    assert z_kept.sum() >= 5 and z_fitted.sum() >= 5  # both cases happen near the end
    np.testing.assert_array_equal(refined["xyz_sig_px"][z_kept, 2], det["xyz_sig_px"][z_kept, 2])
    assert np.all(refined["xyz_px"][z_fitted, 2] < z_end - 1e-3)
    assert np.all(refined["xyz_sig_px"][z_fitted, 2] > 5.0)   # nm: a real standard error, not a placeholder
    np.testing.assert_array_equal(refined["xyz_nm"][:, 2], refined["xyz_px"][:, 2])

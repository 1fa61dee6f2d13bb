"""The classical SMLM fitter (benchmarks/smlm_classical.py) on hand-placed isolated emitters.

Reference values: positions and photons are the simulation's own; the lateral bound is
metrics.smlm_crlb.emitter_crlb_nm (Mortensen et al. 2010 limit, tested in test_smlm_metrics.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.smlm_classical import _drop_duplicates, fit_movie
from data.smlm import Emitters, SimConfig, camera_forward, render, to_photons
from metrics.smlm import match_emitters
from metrics.smlm_crlb import emitter_crlb_nm


def make_movie(cfg: SimConfig, frame_ix, xyz, phot, bg: float, n_frames: int, seed: int = 0) -> torch.Tensor:
    """(T, H, W) photons: the given emitters rendered on a flat background, through cfg's camera."""
    em = Emitters(torch.as_tensor(frame_ix, dtype=torch.int64), torch.as_tensor(xyz, dtype=torch.float32),
                  torch.as_tensor(phot, dtype=torch.float32), torch.arange(len(frame_ix)))
    expected = render(em, n_frames, cfg) + bg
    gen = torch.Generator().manual_seed(seed)
    return to_photons(camera_forward(expected, cfg, gen), cfg)


def grid_emitters(cfg: SimConfig, n_frames: int, spacing: int = 10, z_nm=0.0, seed: int = 0):
    """Emitters on a grid spacing px apart with random sub-pixel offsets, every frame its own offsets."""
    h, w = cfg.img_size
    rng = np.random.default_rng(seed)
    cy, cx = np.meshgrid(np.arange(spacing // 2, h - 3, spacing), np.arange(spacing // 2, w - 3, spacing),
                         indexing="ij")
    n = cx.size
    xyz, frames = [], []
    for t in range(n_frames):
        off = rng.uniform(-0.5, 0.5, size=(n, 2))
        z = np.broadcast_to(np.asarray(z_nm, dtype=float), (n,)) if np.ndim(z_nm) == 0 else np.asarray(z_nm)
        xyz.append(np.stack([cx.ravel() + off[:, 0], cy.ravel() + off[:, 1], z], axis=1))
        frames.append(np.full(n, t))
    return np.concatenate(frames), np.concatenate(xyz)


def matched(det: dict, frame_ix, xyz, px_size=(100.0, 100.0)):
    """Matched (pred, gt) index pairs in nm space and the (pred - gt) residuals in (px, px, nm)."""
    scale = np.array([*px_size, 1.0])
    pi, gi = match_emitters(det["xyz_px"] * scale, det["frame_ix"], xyz * scale, frame_ix)
    return pi, gi, det["xyz_px"][pi] - xyz[gi]


CFG_2D = SimConfig(img_size=(48, 64), psf="gaussian", sigma0_px=1.0, camera="noiseless")


def test_noiseless_2d_exact_positions_and_photons():
    frame_ix, xyz = grid_emitters(CFG_2D, 2)
    frames = make_movie(CFG_2D, frame_ix, xyz, np.full(len(xyz), 2000.0), 20.0, 2)
    det = fit_movie(frames, CFG_2D)
    pi, gi, res = matched(det, frame_ix, xyz)
    assert len(pi) == len(xyz) == len(det["frame_ix"])
    assert np.abs(res[:, :2]).max() < 0.02
    assert np.allclose(det["phot"][pi], 2000.0, rtol=0.01)
    assert np.allclose(det["bg"][pi], 20.0, rtol=0.02)
    assert np.all(det["xyz_px"][:, 2] == 0)


def test_output_format_and_nm_scaling():
    cfg = dataclasses.replace(CFG_2D, px_size_nm=(100.0, 110.0))
    frame_ix, xyz = grid_emitters(cfg, 1)
    det = fit_movie(make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 2000.0), 20.0, 1), cfg)
    assert det["frame_ix"].dtype == np.int64
    assert det["xyz_px"].shape == det["xyz_nm"].shape == (len(det["frame_ix"]), 3)
    assert det["phot"].shape == det["bg"].shape == (len(det["frame_ix"]),)
    assert np.allclose(det["xyz_nm"], det["xyz_px"] * np.array([100.0, 110.0, 1.0]))
    assert det["n_candidates"] >= len(det["frame_ix"])


def test_x_and_y_are_not_swapped():
    """An emitter far from the diagonal of a non-square frame: swapped axes would put it outside."""
    cfg = dataclasses.replace(CFG_2D, img_size=(32, 64))
    xyz = np.array([[50.3, 12.7, 0.0]])
    det = fit_movie(make_movie(cfg, [0], xyz, [3000.0], 10.0, 1), cfg)
    assert det["xyz_px"].shape == (1, 3)
    assert det["xyz_px"][0, :2] == pytest.approx([50.3, 12.7], abs=0.02)


def test_perfect_camera_rmse_close_to_crlb():
    cfg = dataclasses.replace(CFG_2D, camera="perfect")
    n_frames, phot, bg = 8, 2000.0, 20.0
    frame_ix, xyz = grid_emitters(cfg, n_frames, seed=1)
    det = fit_movie(make_movie(cfg, frame_ix, xyz, np.full(len(xyz), phot), bg, n_frames, seed=1), cfg)
    pi, gi, res = matched(det, frame_ix, xyz)
    assert len(pi) == len(xyz) == len(det["frame_ix"])                       # bright and isolated: all found, no FP
    crlb_px = emitter_crlb_nm(xyz[gi], phot, bg, cfg) / 100.0                 # per emitter, at its sub-pixel offset
    centred_px = emitter_crlb_nm([[10.0, 10.0, 0.0]], phot, bg, cfg)[0, 0] / 100.0   # on a pixel centre
    assert np.mean(crlb_px[:, 0]) == pytest.approx(centred_px, rel=0.1)
    for axis in (0, 1):
        rmse, bound = np.sqrt(np.mean(res[:, axis] ** 2)), np.sqrt(np.mean(crlb_px[:, axis] ** 2))
        assert 0.7 * bound < rmse < 1.5 * bound, (axis, rmse, bound)
        assert abs(res[:, axis].mean()) < 3 * bound / np.sqrt(len(res))          # unbiased
    assert np.mean(det["phot"][pi]) == pytest.approx(phot, rel=0.03)


def test_emccd_photons_rescaled_by_excess_noise():
    """Frames are fitted as photons / 2 on an EMCCD; the photons reported are back in photons."""
    cfg = dataclasses.replace(CFG_2D, camera="emccd")
    frame_ix, xyz = grid_emitters(cfg, 4, seed=2)
    det = fit_movie(make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 5000.0), 100.0, 4, seed=2), cfg)
    pi, gi, res = matched(det, frame_ix, xyz)
    assert len(pi) == len(xyz) == len(det["frame_ix"])
    assert np.mean(det["phot"][pi]) == pytest.approx(5000.0, rel=0.05)
    assert np.mean(det["bg"][pi]) == pytest.approx(100.0, rel=0.05)
    assert np.sqrt(np.mean(res[:, :2] ** 2)) < 0.1


def test_astigmatic_z_at_high_photons():
    cfg = SimConfig(img_size=(40, 64), psf="astigmatic", camera="perfect")
    z_levels = np.array([-600.0, -300.0, 0.0, 300.0, 600.0])
    n_frames = 4
    frame_ix, xyz = grid_emitters(cfg, n_frames, spacing=12, z_nm=0.0, seed=3)
    xyz[:, 2] = z_levels[np.arange(len(xyz)) % len(z_levels)]
    det = fit_movie(make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 20000.0), 20.0, n_frames, seed=3), cfg)
    pi, gi, res = matched(det, frame_ix, xyz)
    assert len(pi) == len(xyz) == len(det["frame_ix"])
    assert np.sqrt(np.mean(res[:, 2] ** 2)) < 30.0
    assert np.abs(res[:, 2]).max() < 90.0                                      # no fit on the wrong branch
    assert np.sqrt(np.mean(res[:, :2] ** 2)) < 0.05


@pytest.mark.parametrize("camera", ["perfect", "emccd"])
def test_background_only_movie_has_no_detections(camera):
    cfg = dataclasses.replace(CFG_2D, img_size=(64, 64), camera=camera)
    frames = make_movie(cfg, [], np.zeros((0, 3)), [], 100.0, 32, seed=4)
    det = fit_movie(frames, cfg)
    assert det["n_candidates"] == 0 and len(det["frame_ix"]) == 0


def test_two_emitters_5px_apart_both_found():
    cfg = dataclasses.replace(CFG_2D, camera="perfect")
    xyz = np.array([[20.3, 24.6, 0.0], [25.3, 24.6, 0.0]])
    det = fit_movie(make_movie(cfg, [0, 0], xyz, [3000.0, 3000.0], 20.0, 1, seed=5), cfg)
    pi, gi, res = matched(det, np.zeros(2, dtype=int), xyz)
    assert len(det["frame_ix"]) == 2 and sorted(gi.tolist()) == [0, 1]
    assert np.abs(res[:, :2]).max() < 0.1


def test_emitters_at_the_frame_edge_are_fitted():
    """Candidates near the edge keep a full ROI shifted inwards."""
    cfg = dataclasses.replace(CFG_2D, camera="noiseless")
    xyz = np.array([[0.3, 20.2, 0.0], [63.1, 10.6, 0.0], [30.4, 0.2, 0.0], [45.7, 46.9, 0.0]])
    det = fit_movie(make_movie(cfg, [0] * 4, xyz, [3000.0] * 4, 20.0, 1), cfg)
    pi, gi, res = matched(det, np.zeros(4, dtype=int), xyz)
    assert len(det["frame_ix"]) == 4 and sorted(gi.tolist()) == [0, 1, 2, 3]
    assert np.abs(res[:, :2]).max() < 0.02


def test_noiseless_astigmatic_recovers_z_exactly_over_the_range():
    """One emitter per frame, z from end to end of the calibrated range (the ends are the fit's bounds)."""
    cfg = SimConfig(img_size=(24, 24), psf="astigmatic", camera="noiseless")
    z = np.array([-750.0, -600.0, -300.0, -100.0, 0.0, 150.0, 450.0, 700.0, 750.0])
    rng = np.random.default_rng(6)
    xyz = np.stack([11.0 + rng.uniform(-0.5, 0.5, len(z)), 12.0 + rng.uniform(-0.5, 0.5, len(z)), z], axis=1)
    frame_ix = np.arange(len(z))
    det = fit_movie(make_movie(cfg, frame_ix, xyz, np.full(len(z), 5000.0), 50.0, len(z)), cfg)
    pi, gi, res = matched(det, frame_ix, xyz)
    assert len(pi) == len(z) == len(det["frame_ix"])
    assert np.abs(res[:, 2]).max() < 1.0
    assert np.abs(res[:, :2]).max() < 0.01


def test_scmos_read_noise_is_modelled():
    """sCMOS: read variance added to data and model; photons and background come back unbiased."""
    cfg = dataclasses.replace(CFG_2D, camera="scmos", em_gain=None, read_sigma=3.0, e_per_adu=1.0, baseline=100.0)
    frame_ix, xyz = grid_emitters(cfg, 4, seed=7)
    det = fit_movie(make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 3000.0), 30.0, 4, seed=7), cfg)
    pi, gi, res = matched(det, frame_ix, xyz)
    assert len(pi) == len(xyz) == len(det["frame_ix"])
    assert np.mean(det["phot"][pi]) == pytest.approx(3000.0, rel=0.03)
    assert np.mean(det["bg"][pi]) == pytest.approx(30.0, rel=0.05)
    assert np.sqrt(np.mean(res[:, :2] ** 2)) < 0.05


def test_quantum_efficiency_only_rescales_photons(tmp_path):
    """The fit in photons at QE 0.8 is the fit in photoelectrons: the same movie expressed as qe x photons and
    fitted as a QE-1 camera with the same read noise (in e-) gives the same candidates and positions, and
    photons and background x qe. A read-noise offset in the wrong units weights the pixels differently."""
    cfg = dataclasses.replace(CFG_2D, camera="scmos", em_gain=None, read_sigma=6.0, e_per_adu=1.0, qe=0.8)
    frame_ix, xyz = grid_emitters(cfg, 3, seed=5)
    photons = make_movie(cfg, frame_ix, xyz, np.full(len(xyz), 1500.0), 12.0, 3, seed=5)
    a = fit_movie(photons, cfg, threshold=4.0)
    b = fit_movie(photons * 0.8, dataclasses.replace(cfg, qe=1.0), threshold=4.0)
    assert a["n_candidates"] == b["n_candidates"] and len(a["frame_ix"]) == len(b["frame_ix"]) >= len(xyz)
    np.testing.assert_array_equal(a["frame_ix"], b["frame_ix"])
    np.testing.assert_allclose(a["xyz_px"], b["xyz_px"], atol=2e-3)
    np.testing.assert_allclose(a["phot"] * 0.8, b["phot"], rtol=2e-3)
    np.testing.assert_allclose(a["bg"] * 0.8, b["bg"], rtol=2e-3)
    # Frames of another size than the read-noise map's window: one line, not a broadcasting error.
    np.save(tmp_path / "map.npy", np.full(cfg.img_size, 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="do not match the 48x64 px read-noise window"):
        fit_movie(photons[:, :32, :32], dataclasses.replace(cfg, read_sigma_map=str(tmp_path / "map.npy")))


def test_benchmark_movies_on_a_sensor_map_fit_with_their_own_window(tmp_path, capsys):
    """A read-noise map of a whole chip: the quality benchmark's movie records where on the chip it was
    simulated, hands that place to the classical fitter (which weights pixels by their read noise), and is
    read back from its file rather than simulated again; without the place the fitter refuses in one line."""
    from benchmarks.smlm_quality import test_movie as benchmark_movie
    np.save(tmp_path / "chip.npy", np.random.default_rng(0).uniform(1.0, 3.0, (48, 64)).astype(np.float32))
    cfg = dataclasses.replace(CFG_2D, img_size=(24, 24), camera="scmos", em_gain=None, e_per_adu=1.0,
                              baseline=100.0, read_sigma_map=str(tmp_path / "chip.npy"), emitter_av=None,
                              emitter_density=1.0, intensity_mu=3000.0, intensity_sig=300.0, bg_uniform=20.0)
    movie, path, placed = benchmark_movie(cfg, 4, 0, tmp_path / "movies")
    assert placed.sensor_origin == movie.sensor_origin is not None
    capsys.readouterr()
    again, again_path, placed_again = benchmark_movie(cfg, 4, 0, tmp_path / "movies")
    assert "simulating again" not in capsys.readouterr().out
    assert again_path == path and placed_again == placed and torch.equal(again.frames, movie.frames)
    det = fit_movie(movie.frames, placed)
    assert len(det["frame_ix"]) > 0
    with pytest.raises(ValueError, match="sensor_origin"):
        fit_movie(movie.frames, cfg)


def test_duplicate_fits_keep_the_brightest_per_frame():
    frame_ix = torch.tensor([0, 0, 0, 1, 1])
    xy = torch.tensor([[10.0, 10.0], [10.5, 10.2], [20.0, 10.0], [10.2, 10.0], [30.0, 30.0]])
    phot = torch.tensor([100.0, 300.0, 50.0, 10.0, 20.0])
    keep = _drop_duplicates(frame_ix, xy, phot, 1.0)
    assert keep.tolist() == [False, True, True, True, True]                     # frames never interact


def test_degenerate_frames_do_not_break_the_fit():
    """No background at all (every pixel 0 but the spots) and an all-zero frame."""
    cfg = CFG_2D
    xyz = np.array([[20.3, 24.6, 0.0]])
    frames = make_movie(cfg, [0], xyz, [2000.0], 0.0, 2)
    det = fit_movie(frames, cfg)
    assert len(det["frame_ix"]) == 1 and det["frame_ix"][0] == 0
    assert det["xyz_px"][0, :2] == pytest.approx([20.3, 24.6], abs=0.02)

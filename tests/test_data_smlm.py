"""SMLM simulator (data/smlm/): PSF integrals and widths, camera noise moments, blinking, windows and targets,
dataset determinism, config validation and the HDF5 round trip."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from data.smlm import (Emitters, MovieWindowDataset, SimConfig, SMLMSimDataset, background_std_photons, bin_emitters,
                       camera_forward, collate_smlm, frame_read_sigma, frame_targets, load_read_sigma_map,
                       load_sim_config, psf_sigmas, read_movie_h5, read_noise_variance, read_noise_window, render,
                       sample_loose_emitters, scale_frames, simulate_movie, synthetic_read_sigma_map, to_photons,
                       window_indices, write_movie_h5)
from data.smlm.__main__ import main as smlm_cli
from losses.smlm import gmm_loss


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _emitters(xyz, phot, frame_ix=None):
    xyz = torch.as_tensor(xyz, dtype=torch.float64).reshape(-1, 3)
    n = xyz.shape[0]
    frame_ix = torch.zeros(n, dtype=torch.int64) if frame_ix is None else torch.as_tensor(frame_ix)
    return Emitters(frame_ix, xyz, torch.as_tensor(phot, dtype=torch.float64).reshape(n), torch.arange(n))


@pytest.mark.parametrize("psf,z", [("gaussian", 0.0), ("astigmatic", -600.0), ("astigmatic", 400.0)])
def test_psf_integrates_to_photons_and_matches_supersampling(psf, z):
    # 48 px keeps the widest astigmatic sigma (4.2 px at z = -600 nm) > 5 sigma from every border.
    size, x0, y0 = 48, 23.3, 24.8
    cfg = SimConfig(img_size=(size, size), psf=psf, sigma0_px=1.3)
    img = render(_emitters([[x0, y0, z]], [5000.0]), 1, cfg)[0]
    assert img.dtype == torch.float64 and img.shape == (size, size)
    assert img.sum().item() == pytest.approx(5000.0, rel=1e-5)
    # Midpoint rule on a 25 x 25 sub-grid per pixel; its error is ~ (1/25)^2 / 24 of the curvature.
    sx, sy = (float(s) for s in psf_sigmas(torch.tensor([z], dtype=torch.float64), cfg))
    sub = (torch.arange(25, dtype=torch.float64) + 0.5) / 25 - 0.5
    grid = (torch.arange(size, dtype=torch.float64)[:, None] + sub).flatten()
    gx = torch.exp(-0.5 * ((grid - x0) / sx) ** 2) / (sx * (2 * np.pi) ** 0.5) / 25
    gy = torch.exp(-0.5 * ((grid - y0) / sy) ** 2) / (sy * (2 * np.pi) ** 0.5) / 25
    numeric = 5000.0 * gy.view(size, 25).sum(1)[:, None] * gx.view(size, 25).sum(1)[None, :]
    assert torch.allclose(img, numeric, atol=1e-3 * img.max().item(), rtol=0)
    # The closed form through scipy's normal CDF, independent of render's erf / erfc differences.
    edges = np.arange(size + 1) - 0.5
    mass_x, mass_y = np.diff(ndtr((edges - x0) / sx)), np.diff(ndtr((edges - y0) / sy))
    np.testing.assert_allclose(img.numpy(), 5000.0 * mass_y[:, None] * mass_x[None, :], rtol=1e-9, atol=1e-9)


def test_render_sums_emitters_per_frame_and_keeps_float32_tails_nonnegative():
    cfg = SimConfig(img_size=(16, 16), psf="gaussian")
    em = _emitters([[3.0, 4.0, 0.0], [10.0, 9.5, 0.0], [7.0, 7.0, 0.0]], [100.0, 200.0, 300.0], [0, 0, 2])
    frames = render(em, 3, cfg)
    one = [render(_emitters(em.xyz[i], em.phot[i]), 1, cfg)[0] for i in range(3)]
    assert torch.allclose(frames[0], one[0] + one[1]) and torch.allclose(frames[2], one[2])
    assert frames[1].abs().max() == 0
    em32 = Emitters(em.frame_ix, em.xyz.float(), em.phot.float(), em.id)
    assert render(em32, 3, cfg).min() >= 0


def test_astigmatic_widths_follow_sigma_of_z():
    cfg = SimConfig(img_size=(48, 48), psf="astigmatic", sigma0_px=1.2)
    z = torch.tensor([-500.0, 0.0, 500.0], dtype=torch.float64)
    sx, sy = psf_sigmas(z, cfg)
    ref_x = 1.2 * np.sqrt(1 + ((z.numpy() + cfg.foc_shift_nm) / cfg.rl_nm) ** 2)
    ref_y = 1.2 * np.sqrt(1 + ((z.numpy() - cfg.foc_shift_nm) / cfg.rl_nm) ** 2)
    np.testing.assert_allclose(sx.numpy(), ref_x)
    np.testing.assert_allclose(sy.numpy(), ref_y)
    assert sx[2] > sy[2] and sx[0] < sy[0] and sx[1] == pytest.approx(sy[1])
    em = _emitters([[23.0, 24.0, float(v)] for v in z], [1.0, 1.0, 1.0], [0, 1, 2])
    imgs = render(em, 3, cfg)
    grid = torch.arange(48, dtype=torch.float64)
    for k in range(3):
        var_x = (imgs[k].sum(0) * (grid - 23.0) ** 2).sum()
        var_y = (imgs[k].sum(1) * (grid - 24.0) ** 2).sum()
        # Pixel integration adds the box variance 1/12 px^2 (Sheppard's correction).
        assert var_x.item() == pytest.approx(sx[k].item() ** 2 + 1 / 12, rel=0.01)
        assert var_y.item() == pytest.approx(sy[k].item() ** 2 + 1 / 12, rel=0.01)


def test_perfect_camera_is_poisson_and_noiseless_is_identity():
    x = torch.full((200_000,), 37.0)
    counts = camera_forward(x, SimConfig(camera="perfect", em_gain=None), _gen(1))
    assert counts.mean().item() == pytest.approx(37.0, rel=0.01)
    assert counts.var().item() == pytest.approx(37.0, rel=0.03)
    assert torch.equal(camera_forward(x, SimConfig(camera="noiseless", em_gain=None)), x)


def test_emccd_moments_and_excess_noise_factor_two():
    cfg = SimConfig(camera="emccd", qe=0.9, spur_noise=0.002, em_gain=100.0, e_per_adu=1.0, baseline=0.0,
                    read_sigma=0.0)
    lam = 20.0
    adu = camera_forward(torch.full((200_000,), lam), cfg, _gen(2)).double()
    signal = 0.9 * lam + 0.002
    # floor() to whole ADU shifts the mean by -1/2 and adds 1/12 ADU^2 of variance.
    assert adu.mean().item() + 0.5 == pytest.approx(100.0 * signal, rel=0.01)
    excess = (adu.var().item() - 1 / 12) / (100.0**2 * signal)
    assert excess == pytest.approx(2.0, rel=0.03)


def test_scmos_read_noise_map_and_moments():
    cfg = SimConfig(camera="scmos", em_gain=None, qe=1.0, spur_noise=0.0, e_per_adu=1.0, baseline=100.0,
                    read_sigma=0.0)
    sigma_map = torch.tensor([[1.0, 1.0], [6.0, 6.0]])
    adu = camera_forward(torch.full((50_000, 2, 2), 10.0), cfg, _gen(3), read_sigma_map=sigma_map).double()
    var = adu.var(0)
    assert var[0].mean().item() == pytest.approx(10.0 + 1.0 + 1 / 12, rel=0.03)
    assert var[1].mean().item() == pytest.approx(10.0 + 36.0 + 1 / 12, rel=0.03)
    assert adu.mean().item() + 0.5 == pytest.approx(110.0, rel=0.002)


@pytest.mark.parametrize("camera,gain,e_per_adu,read_sigma", [("emccd", 300.0, 45.0, 74.4), ("scmos", None, 1.0, 1.6)])
def test_to_photons_inverts_the_expected_value(camera, gain, e_per_adu, read_sigma):
    # Read noise far below the baseline: the clamp of ADU at 0 would otherwise bias the mean upwards.
    cfg = SimConfig(camera=camera, em_gain=gain, qe=0.9, e_per_adu=e_per_adu, read_sigma=read_sigma)
    x = torch.full((100_000,), 50.0)
    photons = to_photons(camera_forward(x, cfg, _gen(4)), cfg)
    floor_bias = 0.5 * e_per_adu / ((gain or 1.0) * 0.9)
    assert photons.mean().item() == pytest.approx(50.0 - floor_bias, abs=0.3)
    exact = (50.0 * 0.9 + cfg.spur_noise) * (gain or 1.0) / cfg.e_per_adu + cfg.baseline
    assert to_photons(torch.tensor(exact), cfg).item() == pytest.approx(50.0, rel=1e-5)


@pytest.mark.parametrize("camera,gain,e_per_adu,read_sigma,qe", [
    ("emccd", 100.0, 20.0, 50.0, 0.9), ("emccd", 300.0, 45.0, 74.4, 1.0), ("scmos", None, 0.5, 1.6, 0.8),
    ("scmos", None, 2.0, 8.0, 0.7), ("perfect", None, 1.0, 0.0, 1.0)])
def test_background_std_in_photons_matches_the_simulated_camera(tmp_path, camera, gain, e_per_adu, read_sigma, qe):
    cfg = SimConfig(camera=camera, em_gain=gain, qe=qe, e_per_adu=e_per_adu, read_sigma=read_sigma, baseline=400.0)
    for bg in (5.0, 60.0):
        photons = to_photons(camera_forward(torch.full((200_000,), bg), cfg, _gen(5)), cfg).double()
        assert photons.std().item() == pytest.approx(float(background_std_photons(bg, cfg)), rel=0.02)
    # A read-noise map: its root mean square is the camera's read noise; read_sigma= overrides either.
    if camera == "scmos":
        np.save(tmp_path / "map.npy", np.full(cfg.img_size, read_sigma * 2.0))
        mapped = dataclasses.replace(cfg, read_sigma_map=str(tmp_path / "map.npy"))
        assert background_std_photons(60.0, mapped) == pytest.approx(background_std_photons(60.0, cfg, 2 * read_sigma))
        assert background_std_photons(60.0, mapped) > background_std_photons(60.0, cfg)
    # Shot noise alone for an ideal sCMOS: sqrt(bg / qe) photons, the Poisson spread of qe bg photoelectrons.
    ideal = SimConfig(camera="scmos", em_gain=None, qe=0.8, e_per_adu=1e-6, read_sigma=0.0, spur_noise=0.0)
    assert background_std_photons(np.array([50.0]), ideal) == pytest.approx(np.sqrt(50.0 / 0.8), rel=1e-6)


def test_photons_are_photons_reaching_the_camera_as_thunderstorm_counts_them():
    # A user's EMCCD (QE 0.9): the frames the network sees, and so the photons it is trained to predict, are
    # photons reaching the camera. ThunderSTORM with the same camera setup converts a spot's summed ADU above
    # the base level the same way: (ADU - offset) x photoelectrons per count / (EM gain x QE).
    cfg = SimConfig(img_size=(16, 16), psf="gaussian", sigma0_px=1.2, camera="emccd", qe=0.9, spur_noise=0.0,
                    em_gain=100.0, e_per_adu=20.0, baseline=100.0, read_sigma=50.0)
    expected = render(_emitters([[7.3, 8.1, 0.0]], [5000.0]), 1, cfg).float().expand(4000, 16, 16)
    adu = camera_forward(expected, cfg, _gen(6)).double()
    ours = to_photons(adu, cfg).double().sum((1, 2))
    thunderstorm = (adu - cfg.baseline).sum((1, 2)) * cfg.e_per_adu / (cfg.em_gain * cfg.qe)
    torch.testing.assert_close(ours, thunderstorm, rtol=1e-5, atol=1e-2)
    floor_bias = 256 * 0.5 * cfg.e_per_adu / (cfg.em_gain * cfg.qe)  # whole-ADU rounding, every pixel
    assert ours.mean().item() + floor_bias == pytest.approx(5000.0, rel=0.01)
    # Photoelectrons, what ThunderSTORM reports with its default QE of 1, are qe times fewer.
    photoelectrons = (adu - cfg.baseline).sum((1, 2)) * cfg.e_per_adu / cfg.em_gain
    assert (photoelectrons.mean() / ours.mean()).item() == pytest.approx(0.9, rel=1e-6)


def test_blinking_conserves_photons_and_ontime_is_exponential():
    cfg = SimConfig(emitter_av=20.0, lifetime_avg=2.0)
    n_frames = 1000
    loose = sample_loose_emitters(cfg, n_frames, _gen(5))
    em = bin_emitters(loose, n_frames)
    n = len(loose["id"])
    assert loose["ontime"].mean().item() == pytest.approx(2.0, rel=0.03)
    assert loose["ontime"].std().item() == pytest.approx(2.0, rel=0.05)   # exponential: std = mean
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, em.id, em.phot.double())
    t0, te = loose["t0"], loose["t0"] + loose["ontime"]
    inside = (t0 >= 0) & (te <= n_frames)
    expected = loose["flux"].double() * loose["ontime"]
    assert torch.allclose(total[inside], expected[inside], rtol=1e-5)
    assert bool((total <= expected * (1 + 1e-5)).all())
    assert em.frame_ix.min() >= 0 and em.frame_ix.max() < n_frames
    assert torch.bincount(em.frame_ix, minlength=n_frames).double().mean().item() == pytest.approx(20.0, rel=0.03)
    x, y, z = em.xyz.unbind(1)
    assert x.min() >= -0.5 and x.max() <= 39.5 and y.min() >= -0.5 and y.max() <= 39.5
    assert z.min() >= -750 and z.max() <= 750
    rows = em.subset(em.id == em.id[0])
    assert torch.equal(rows.frame_ix, torch.arange(rows.frame_ix[0], rows.frame_ix[0] + len(rows)))
    assert torch.equal(rows.xyz, rows.xyz[:1].expand_as(rows.xyz))


def test_emitter_density_sets_the_mean_count():
    cfg = SimConfig.from_dict({"emitter_density": 1.0, "img_size": [20, 30]})
    assert cfg.emitter_av is None and cfg.em_avg == pytest.approx(6.0)   # 2 um x 3 um


def test_windows_targets_and_scaling_of_a_fixed_movie():
    assert window_indices(5, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    cfg = SimConfig(img_size=(16, 24), emitter_av=4.0)
    assert (cfg.phot_max, cfg.z_max, cfg.bg_max) == (34000.0, 900.0, 180.0)
    assert (cfg.input_scale, cfg.input_offset) == (200.0, 120.0)
    movie = simulate_movie(cfg, 6, _gen(6))
    ds = MovieWindowDataset(movie, cfg)
    assert len(ds) == 6
    item = ds[0]
    assert item["frames"].shape == (3, 16, 24) and item["target_bg"].shape == (16, 24)
    torch.testing.assert_close(item["frames"] * 200.0 + 120.0, movie.frames[[0, 0, 1]])
    torch.testing.assert_close(item["target_bg"] * 180.0, movie.bg[0])
    e = movie.emitters
    rows = (e.frame_ix == 0) & (e.phot >= cfg.label_photon_min)
    expected = torch.cat([e.phot[rows, None], e.xyz[rows]], dim=1)
    unscaled = item["target_emitters"] * torch.tensor([cfg.phot_max, 1.0, 1.0, cfg.z_max])   # photons, px, px, nm
    torch.testing.assert_close(unscaled, expected)
    batch = collate_smlm([ds[t] for t in range(4)])
    n_max = max(int(((e.frame_ix == t) & (e.phot >= 100)).sum()) for t in range(4))
    assert batch["frames"].shape == (4, 3, 16, 24) and batch["target_emitters"].shape == (4, max(n_max, 1), 4)
    assert batch["target_mask"].sum().item() == sum(ds[t]["target_emitters"].shape[0] for t in range(4))
    out = torch.rand(4, 10, 16, 24)
    loss, _ = gmm_loss(out, batch["target_emitters"], batch["target_mask"], batch["target_bg"])
    assert torch.isfinite(loss)


def test_target_cap_raises_a_clear_error():
    cfg = SimConfig(img_size=(8, 8), max_targets=1)
    em = _emitters([[1.0, 1.0, 0.0], [5.0, 5.0, 0.0]], [500.0, 500.0])
    with pytest.raises(ValueError, match="max_targets"):
        frame_targets(em, 0, cfg)


def test_dataset_is_deterministic_per_seed_epoch_index():
    cfg = SimConfig(img_size=(16, 16), emitter_av=5.0)
    a, b = SMLMSimDataset(cfg, 4, seed=3), SMLMSimDataset(cfg, 4, seed=3)
    first = a[1]
    assert first["frames"].shape == (3, 16, 16) and first["frames"].dtype == torch.float32
    again = b[1]
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(a[2]["frames"], first["frames"])
    a.set_epoch(1)
    assert not torch.equal(a[1]["frames"], first["frames"])
    a.set_epoch(0)
    assert torch.equal(a[1]["frames"], first["frames"])
    assert not torch.equal(SMLMSimDataset(cfg, 4, seed=4)[1]["frames"], first["frames"])


def test_dataset_blocks_are_overlapping_windows_of_one_movie_whatever_the_access_order():
    cfg = SimConfig(img_size=(16, 16), emitter_av=5.0)
    ds = SMLMSimDataset(cfg, 10, seed=3, block=4)            # blocks [0-3], [4-7], [8-9]
    fresh = [SMLMSimDataset(cfg, 10, seed=3, block=4)[i] for i in range(10)]
    for i in (9, 2, 5, 1, 8, 0, 3, 7, 6, 4):                  # any order: the cached block is rebuilt as needed
        for key, value in ds[i].items():
            assert torch.equal(value, fresh[i][key]), (i, key)
    for i in (0, 1, 2, 4, 5, 6, 8):                          # next window in the same block: shifted by a frame
        assert torch.equal(fresh[i]["frames"][1:], fresh[i + 1]["frames"][:2])
    for i in (3, 7):                                         # a new block is a new movie
        assert not torch.equal(fresh[i]["frames"][1:], fresh[i + 1]["frames"][:2])
    # The centre frame's targets: a window's centre is the next window's first frame + 1.
    movie = simulate_movie(cfg, 4 + 2, torch.Generator().manual_seed(
        int(np.random.SeedSequence([3, 0, 0]).generate_state(1, np.uint64)[0])))
    assert torch.equal(fresh[2]["frames"], scale_frames(movie.frames[2:5], cfg).float())
    assert torch.equal(fresh[2]["target_emitters"], frame_targets(movie.emitters, 3, cfg).float())
    with pytest.raises(ValueError, match="block"):
        SMLMSimDataset(cfg, 10, block=0)


@pytest.mark.parametrize("values,key", [
    ({"em_gain": 0}, "em_gain"), ({"em_gain": -3.0}, "em_gain"), ({"camera": "scmos"}, "em_gain"),
    ({"bogus": 1}, "bogus"), ({"camera": "ccd"}, "camera"), ({"psf": "spline"}, "psf"),
    ({"qe": 1.5}, "qe"), ({"img_size": [40]}, "img_size"), ({"lifetime_avg": "2"}, "lifetime_avg"),
    ({"bg_uniform": [150, 90]}, "bg_uniform"), ({"emitter_density": 1.0, "emitter_av": 5.0}, "emitter_av"),
])
def test_config_validation_names_the_key(values, key):
    with pytest.raises(ValueError, match=key) as err:
        SimConfig.from_dict(values)
    if key == "bogus":
        assert "valid keys" in str(err.value) and "em_gain" in str(err.value)


def test_config_yaml_section_and_dict_round_trip(tmp_path):
    path = tmp_path / "smlm.yaml"
    path.write_text("simulation:\n  camera: scmos\n  em_gain: null\n  bg_uniform: 90\n  img_size: [24, 32]\n")
    cfg = load_sim_config(path)
    assert cfg.camera == "scmos" and cfg.em_gain is None and cfg.bg_uniform == (90.0, 90.0)
    assert cfg.img_size == (24, 32)
    assert SimConfig.from_dict(cfg.to_dict()) == cfg
    path.write_text("simulation:\n  em_gain: 0\n")
    with pytest.raises(ValueError, match=f"{path}.*em_gain"):
        load_sim_config(path)
    with pytest.raises(ValueError, match="simulation"):
        load_sim_config({"training": {}})


def test_hdf5_round_trip(tmp_path):
    cfg = SimConfig(img_size=(16, 16), emitter_av=5.0, psf="gaussian", camera="perfect", em_gain=None)
    movie = simulate_movie(cfg, 5, _gen(8))
    path = tmp_path / "val.h5"
    write_movie_h5(path, movie, cfg, seed=8)
    back, cfg_back, meta = read_movie_h5(path)
    assert cfg_back == cfg and meta["seed"] == 8 and meta["xy_unit"] == "px" and meta["n_frames"] == 5
    assert torch.equal(back.frames, movie.frames) and torch.equal(back.bg, movie.bg)
    for field in dataclasses.fields(Emitters):
        assert torch.equal(getattr(back.emitters, field.name), getattr(movie.emitters, field.name))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5"):
        read_movie_h5(tmp_path / "junk.h5")
    with pytest.raises(ValueError, match="not found"):
        read_movie_h5(tmp_path / "missing.h5")


def test_read_sigma_map_file_is_validated(tmp_path):
    good, bad = tmp_path / "sigma.npy", tmp_path / "bad.npy"
    np.save(good, np.full((8, 8), 1.5, dtype=np.float32))
    np.save(bad, np.ones((4, 4), dtype=np.float32))
    cfg = SimConfig(img_size=(8, 8), camera="scmos", em_gain=None, e_per_adu=1.0, read_sigma_map=str(good))
    assert SMLMSimDataset(cfg, 1)[0]["frames"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="read_sigma_map"):
        SMLMSimDataset(dataclasses.replace(cfg, read_sigma_map=str(bad)), 1)
    with pytest.raises(ValueError, match="read_sigma_map"):
        SimConfig(read_sigma_map=str(good))


def _scmos(tmp_path, sensor: np.ndarray, name: str = "sensor.npy", **changes) -> SimConfig:
    np.save(tmp_path / name, sensor.astype(np.float32))
    values = dict(img_size=(8, 8), camera="scmos", em_gain=None, qe=1.0, spur_noise=0.0, e_per_adu=1.0,
                  baseline=400.0, read_sigma_map=str(tmp_path / name))
    return SimConfig(**{**values, **changes})


def test_a_sensor_map_larger_than_the_frames_gives_each_movie_a_window(tmp_path):
    sensor = np.arange(20 * 30, dtype=np.float32).reshape(20, 30) / 100       # a distinct value per pixel
    cfg = _scmos(tmp_path, sensor)
    full = load_read_sigma_map(cfg)
    assert full.shape == (20, 30)
    fixed = dataclasses.replace(cfg, sensor_origin=(5, 7))
    window, origin = read_noise_window(full, fixed)
    assert origin == (5, 7) and torch.equal(window, full[5:13, 7:15])
    assert torch.equal(frame_read_sigma(fixed), full[5:13, 7:15])
    assert torch.equal(frame_read_sigma(cfg, sensor_origin=(0, 22)), full[0:8, 22:30])
    # Unset: a place drawn from the generator, the same for the same seed, anywhere the frames fit.
    origins = [read_noise_window(full, cfg, _gen(seed))[1] for seed in range(40)]
    assert origins[3] == read_noise_window(full, cfg, _gen(3))[1]
    assert len(set(origins)) > 20 and all(0 <= r <= 12 and 0 <= c <= 22 for r, c in origins)
    rows, cols = [r for r, _ in origins], [c for _, c in origins]
    assert max(rows) - min(rows) >= 8 and max(cols) - min(cols) >= 15
    # A map of the frame size is used whole, without drawing.
    small = _scmos(tmp_path, sensor[:8, :8], name="small.npy")
    assert read_noise_window(load_read_sigma_map(small), small, None)[1] == (0, 0)
    # Where the frames sit is unknown: whoever needs the frames' own pixels (fitters, bounds) refuses.
    with pytest.raises(ValueError, match="sensor_origin"):
        frame_read_sigma(cfg)
    with pytest.raises(ValueError, match="do not fit"):
        load_read_sigma_map(dataclasses.replace(cfg, sensor_origin=(13, 0)))
    with pytest.raises(ValueError, match="at least the frame size"):
        load_read_sigma_map(dataclasses.replace(cfg, img_size=(21, 8)))
    with pytest.raises(ValueError, match="sensor_origin"):
        SimConfig(sensor_origin=(0, 0))                                      # no map to place the frames on
    for bad in ((-1, 2), (1.5, 2), (1, 2, 3), "0,0"):
        with pytest.raises(ValueError, match="sensor_origin"):
            dataclasses.replace(cfg, sensor_origin=bad)


def test_simulated_frames_carry_the_read_noise_of_their_window(tmp_path):
    # A quiet sensor with one loud row: the frames are noisy exactly on the row their window puts it at.
    sensor = np.full((24, 10), 0.5)
    sensor[15] = 40.0
    cfg = _scmos(tmp_path, sensor, emitter_av=0.0, bg_uniform=10.0)
    for fixed in (None, (10, 1), (15, 2)):
        run = cfg if fixed is None else dataclasses.replace(cfg, sensor_origin=fixed)
        movie = simulate_movie(run, 300, _gen(11))
        r, c = movie.sensor_origin
        assert fixed is None or (r, c) == fixed
        var = movie.frames.var(0)                                            # (8, 8), photons^2
        assert 0 <= 15 - r < 8
        loud = var[15 - r]
        assert loud.mean().item() == pytest.approx(10.0 + 40.0**2 + 1 / 12, rel=0.15)
        quiet = torch.cat([var[:15 - r], var[15 - r + 1:]])
        assert quiet.mean().item() == pytest.approx(10.0 + 0.25 + 1 / 12, rel=0.15)
        # The stored movie says where it was recorded, and its config reproduces the same window.
        write_movie_h5(tmp_path / "m.h5", movie, run, seed=11)
        back, stored, _ = read_movie_h5(tmp_path / "m.h5")
        assert back.sensor_origin == stored.sensor_origin == (r, c)
        assert torch.equal(frame_read_sigma(stored), load_read_sigma_map(cfg)[r:r + 8, c:c + 8])
    # Training movies: the same place for the same (seed, epoch, block), new places across blocks.
    ds = SMLMSimDataset(cfg, 64, seed=3, block=16)
    first = ds._block_movie(0).sensor_origin
    assert ds._block_movie(1).sensor_origin is not None
    assert SMLMSimDataset(cfg, 64, seed=3, block=16)._block_movie(0).sensor_origin == first
    assert len({ds._block_movie(b).sensor_origin for b in range(4)}) > 1


def test_read_noise_variance_and_background_std_use_the_frames_window(tmp_path):
    sensor = np.ones((16, 16))
    sensor[8:, 8:] = 3.0
    cfg = _scmos(tmp_path, sensor, e_per_adu=0.5)
    var = read_noise_variance(cfg, sensor_origin=(8, 8))
    assert torch.allclose(var, torch.full((8, 8), 9.0 + 0.25 / 12, dtype=torch.float64))
    assert read_noise_variance(dataclasses.replace(cfg, read_sigma_map=None, read_sigma=2.0)) == 4.0 + 0.25 / 12
    assert read_noise_variance(SimConfig()) == 0.0                            # EMCCD: negligible after the gain
    corner = dataclasses.replace(cfg, sensor_origin=(8, 8))
    assert background_std_photons(30.0, corner) == pytest.approx(background_std_photons(30.0, cfg, read_sigma=3.0))
    whole = np.sqrt(np.mean(sensor**2))                                      # unknown place: the sensor's RMS
    assert background_std_photons(30.0, cfg) == pytest.approx(background_std_photons(30.0, cfg, read_sigma=whole))


def test_read_noise_map_cli_is_deterministic_and_keeps_existing_maps(tmp_path, capsys):
    out = tmp_path / "maps" / "sensor.npy"
    assert smlm_cli(["read-noise-map", "--out", str(out), "--size", "60,80", "--median_e", "1.4", "--seed", "2"]) == 0
    sigma = np.load(out)
    assert sigma.shape == (60, 80) and sigma.dtype == np.float32 and sigma.min() > 0
    assert np.median(sigma) == pytest.approx(1.4, rel=0.05)
    assert sigma.max() > 3 * 1.4                                             # the noisy-pixel tail
    assert np.array_equal(sigma, synthetic_read_sigma_map((60, 80), median_e=1.4, seed=2))
    assert not np.array_equal(sigma, synthetic_read_sigma_map((60, 80), median_e=1.4, seed=3))
    for argv, named in ((["--out", str(out)], "--overwrite"), (["--out", str(tmp_path / "m.txt")], ".npy"),
                        (["--out", str(tmp_path / "a.npy"), "--size", "60"], "--size"),
                        (["--out", str(tmp_path / "b.npy"), "--median_e", "0"], "--median_e")):
        with pytest.raises(SystemExit) as exit_info:
            smlm_cli(["read-noise-map", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and named in err, err
    assert np.array_equal(np.load(out), sigma) and not (tmp_path / "a.npy").exists()
    assert smlm_cli(["read-noise-map", "--out", str(out), "--size", "4,4", "--overwrite"]) == 0
    assert np.load(out).shape == (4, 4)

"""The two-colour simulator (data/smlm/colour.py): configuration, photon split, dyes, registration, targets,
training items, curriculum stages and the h5 / TIFF files with their error cases."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile
import torch

from data.smlm import SimConfig
from data.smlm.colour import (ColourConfig, ColourMovie, ColourMovieWindowDataset, ColourSimDataset, Dye,
                              Registration, collate_colour, colour_ground_truth, colour_targets, load_colour_config,
                              read_colour_h5, read_colour_tiff, register_channel2, simulate_colour_acquisition,
                              simulate_colour_movie, write_colour_h5, write_colour_tiff)
from data.smlm.simulate import Emitters

CH1 = {"img_size": [16, 16], "emitter_av": 3.0, "intensity_mu": 5000.0, "intensity_sig": 1000.0,
       "bg_uniform": [20.0, 40.0], "z_range_nm": [-400.0, 400.0]}
CH2 = {"sigma0_px": 1.2, "camera": "scmos", "em_gain": None, "qe": 0.8, "e_per_adu": 0.5, "read_sigma": 1.6}


def config(**extra) -> ColourConfig:
    return ColourConfig.from_dict({"channel1": CH1, "channel2": CH2, **extra})


def noiseless(cfg: ColourConfig, **values) -> ColourConfig:
    """Both cameras noiseless and without background, for exact photon bookkeeping."""
    ch1 = dataclasses.replace(cfg.channel1, camera="noiseless", bg_uniform=(0.0, 0.0), **values)
    ch2 = dataclasses.replace(cfg.channel2, camera="noiseless", em_gain=None, bg_uniform=(0.0, 0.0), **values)
    return dataclasses.replace(cfg, channel1=ch1, channel2=ch2)


def one_emitter_movie(cfg: ColourConfig, x: float, y: float, phot: float, ratio: float) -> ColourMovie:
    e = Emitters(torch.tensor([0]), torch.tensor([[x, y, 0.0]]), torch.tensor([phot]), torch.tensor([0]))
    return ColourMovie(torch.empty(0), torch.empty(0), e, torch.tensor([0]), torch.tensor([ratio]))


def reg_at(reg: Registration, xy: torch.Tensor) -> torch.Tensor:
    """The transform about (7.5, 7.5) written out."""
    import math
    a = math.radians(reg.rotation_deg)
    d = xy - 7.5
    return torch.stack([d[:, 0] * math.cos(a) - d[:, 1] * math.sin(a), d[:, 0] * math.sin(a) + d[:, 1] * math.cos(a)],
                       1) * reg.scale + 7.5 + torch.tensor(reg.shift_px)


def test_config_round_trip_channel2_inherits_and_errors(tmp_path):
    cfg = config(registration={"shift_px": [0.5, -0.25], "rotation_deg": 1.0, "scale": 1.01},
                 curriculum=[{"until_step": 10, "emitter_av": 1.0}])
    assert cfg.channel2.intensity_mu == 5000.0 and cfg.channel2.img_size == (16, 16)   # inherited
    assert cfg.channel2.camera == "scmos" and cfg.channel1.camera == "emccd"
    assert ColourConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text("simulation:\n  channel1: {img_size: [16, 16]}\n  dyes: [{ratio_mean: 0.2, ratio_spread: 0.1, "
                    "fraction: 3}, {ratio_mean: 0.8, ratio_spread: 0.1}]\n")
    loaded = load_colour_config(path)
    assert np.allclose(loaded.dye_priors, [0.75, 0.25]) and np.allclose(loaded.dye_means, [0.2, 0.8])
    bad = [({"channel1": CH1, "channel2": {"intensity_mu": 3.0}}, "channel2 must not set intensity_mu"),
           ({"channel1": CH1, "colour": 1}, "unknown two-colour simulation key(s) colour"),
           ({"channel1": {**CH1, "qe": 2.0}}, "channel1: qe must be in (0, 1]"),
           ({"channel1": CH1, "dyes": [{"ratio_mean": 1.5, "ratio_spread": 0.1}]}, "ratio_mean must be in [0, 1]"),
           ({"channel1": CH1, "registration": {"scale": 3.0}}, "scale must be a number within [0.5, 2]"),
           ({"channel1": CH1, "curriculum": [{"until_step": 5}, {"until_step": 5}]}, "until_step must increase"),
           ({"channel1": CH1, "curriculum": [{"until_step": True}]}, "an integer until_step"),
           ({"channel1": CH1, "registration": {"centre_px": [1.0]}}, "centre_px must be two finite numbers"),
           ({"channel1": CH1, "curriculum": [{"until_step": 5, "psf": "gaussian"}]}, "unknown key(s) psf"),
           ({"channel1": CH1, "curriculum": [{"until_step": 5, "intensity_mu": 20000.0}]}, "phot_max"),
           ({"channel1": CH1, "curriculum": [{"until_step": 5, "bg_uniform": [10.0, 500.0]}]}, "bg_max"),
           ({"channel1": {**CH1, "camera": "scmos", "em_gain": None, "read_sigma_map": "m.npy"}},
            "read_sigma_map is not supported")]
    for values, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            ColourConfig.from_dict(values)


def test_photons_split_by_the_ratio_and_dyes_follow_their_distributions():
    cfg = noiseless(config())
    # One emitter well inside the frame: each channel's frame holds its share of the photons.
    movie = one_emitter_movie(cfg, 7.3, 8.1, 4000.0, 0.3)
    for c, share in ((0, 0.3), (1, 0.7)):
        from data.smlm.psf import render
        img = render(movie.channel_emitters(c, cfg), 1, cfg.channels[c])
        assert float(img.sum()) == pytest.approx(4000.0 * share, rel=1e-3)
    # Many emitters: dye fractions and per-dye ratio means and spreads.
    big = dataclasses.replace(cfg, channel1=dataclasses.replace(cfg.channel1, emitter_av=1500.0),
                              channel2=dataclasses.replace(cfg.channel2, emitter_av=1500.0),
                              dyes=(Dye(0.3, 0.05, 1.0), Dye(0.7, 0.02, 3.0)))
    _, m = simulate_colour_acquisition(big, 3, torch.Generator().manual_seed(0))
    first = np.unique(m.emitters.id.numpy(), return_index=True)[1]   # one row per emitter
    dye, ratio = m.dye.numpy()[first], m.ratio.numpy()[first]
    assert len(dye) > 2000 and abs((dye == 1).mean() - 0.75) < 0.03
    for k, (mean, spread) in enumerate(((0.3, 0.05), (0.7, 0.02))):
        assert abs(ratio[dye == k].mean() - mean) < 0.006 and abs(ratio[dye == k].std() - spread) < 0.006
    # Every row of one emitter has that emitter's dye and ratio.
    for i in np.unique(m.emitters.id.numpy())[:50]:
        rows = m.emitters.id.numpy() == i
        assert len(set(m.dye.numpy()[rows])) == 1 and len(set(m.ratio.numpy()[rows])) == 1


def test_simulation_is_deterministic_by_seed_and_channels_differ():
    cfg = config()
    a_adu, a = simulate_colour_acquisition(cfg, 6, torch.Generator().manual_seed(3))
    b_adu, b = simulate_colour_acquisition(cfg, 6, torch.Generator().manual_seed(3))
    c_adu, _ = simulate_colour_acquisition(cfg, 6, torch.Generator().manual_seed(4))
    assert torch.equal(a_adu, b_adu) and torch.equal(a.ratio, b.ratio) and not torch.equal(a_adu, c_adu)
    assert a.frames.shape == a.bg.shape == (2, 6, 16, 16)
    # Each camera's own response: EMCCD gain 300 / 45 e-/ADU (QE 1) and sCMOS QE 0.8 / 0.5 e-/ADU per photon.
    for c, adu_per_photon in ((0, 300 / 45), (1, 0.8 / 0.5)):
        assert float((a_adu[c] - 100).mean() / a.frames[c].mean()) == pytest.approx(adu_per_photon, rel=0.02)
    assert 20 <= float(a.bg[0].min()) and float(a.bg[0].max()) <= 40


def test_registration_round_trip_and_resampling_puts_channel2_on_channel1s_grid():
    reg = Registration(shift_px=(1.3, -0.7), rotation_deg=2.0, scale=1.02)
    xy = torch.tensor([[3.0, 4.0], [12.5, 7.25], [0.0, 15.0]])
    assert torch.allclose(reg.to_channel1(reg.to_channel2(xy, (16, 16)), (16, 16)), xy, atol=1e-5)
    centre = reg.to_channel2(torch.tensor([[7.5, 7.5]]), (16, 16))
    assert torch.allclose(centre, torch.tensor([[8.8, 6.8]]), atol=1e-5)   # the centre only moves by the shift
    # By hand: 90 degrees turns +x into +y about the centre; scale 2 doubles the distance.
    quarter = Registration(rotation_deg=45.0, scale=1.0, centre_px=(0.0, 0.0))
    assert torch.allclose(quarter.to_channel2(torch.tensor([[2.0, 0.0]])), torch.tensor([[2 ** 0.5, 2 ** 0.5]]))
    twice = Registration(scale=2.0, centre_px=(1.0, 1.0))
    assert torch.allclose(twice.to_channel2(torch.tensor([[3.0, 1.0]])), torch.tensor([[5.0, 1.0]]))
    # A configuration fixes the centre at its frames' centre, so larger fitted frames get the same transform.
    cfg_reg = config(registration={"rotation_deg": 2.0}).registration
    assert cfg_reg.centre_px == (7.5, 7.5)
    assert torch.allclose(cfg_reg.to_channel2(xy, (256, 256)), reg_at(cfg_reg, xy))
    assert Registration().is_identity and not reg.is_identity
    frames = torch.rand(2, 16, 16)
    assert register_channel2(frames, Registration()) is frames
    # A spot rendered at the registered place on channel 2's camera comes back to channel 1's position.
    cfg = noiseless(config(registration={"shift_px": [1.3, -0.7], "rotation_deg": 2.0, "scale": 1.02}))
    cfg = dataclasses.replace(cfg, channel1=dataclasses.replace(cfg.channel1, img_size=(32, 32)),
                              channel2=dataclasses.replace(cfg.channel2, img_size=(32, 32)))
    from data.smlm.psf import render
    movie = one_emitter_movie(cfg, 13.4, 17.8, 5000.0, 0.5)
    img = register_channel2(render(movie.channel_emitters(1, cfg), 1, cfg.channel2), cfg.registration)[0]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx, cy = float((img * xx).sum() / img.sum()), float((img * yy).sum() / img.sum())
    assert abs(cx - 13.4) < 0.05 and abs(cy - 17.8) < 0.05
    unregistered = render(movie.channel_emitters(1, cfg), 1, cfg.channel2)[0]
    assert abs(float((unregistered * xx).sum() / unregistered.sum()) - 13.4) > 1.0


def test_targets_items_and_ground_truth_agree():
    cfg = config()
    movie = simulate_colour_movie(cfg, 8, torch.Generator().manual_seed(1))
    gt = colour_ground_truth(movie, cfg)
    ds = ColourMovieWindowDataset(movie, cfg)
    n_rows = 0
    for t in range(8):
        rows, channel_mask = colour_targets(movie, t, cfg)
        item = ds[t]
        assert torch.equal(item["target_emitters"], rows) and item["frames"].shape == (2, 3, 16, 16)
        g = gt["frame_ix"] == t
        assert rows.shape[0] == int(g.sum())
        np.testing.assert_allclose(rows[:, 5].numpy(), gt["ratio"][g], rtol=1e-6)
        np.testing.assert_allclose((rows[:, 0] + rows[:, 1]).numpy() * cfg.channel1.phot_max, gt["phot"][g],
                                   rtol=1e-4)
        np.testing.assert_allclose(rows[:, 2:4].numpy(), gt["xyz_px"][g, :2], rtol=1e-6)
        assert torch.equal(channel_mask.T, torch.from_numpy(gt["channel_mask"][g]))
        n_rows += rows.shape[0]
        assert torch.allclose(item["target_bg"][1], movie.bg[1, t] / cfg.channel2.bg_max)
    assert n_rows == len(gt["phot"]) > 0
    # A dim share is no target of its channel: ratio 0.99 leaves channel 2 with 1 % of 5,000 = 50 photons.
    dim = one_emitter_movie(cfg, 8.0, 8.0, 5000.0, 0.99)
    _, mask = colour_targets(dim, 0, cfg)
    assert mask[:, 0].tolist() == [True, False]
    # 150 photons split evenly: neither channel reaches the 100-photon floor, so the emitter is no target at all.
    faint = one_emitter_movie(cfg, 8.0, 8.0, 150.0, 0.5)
    assert colour_targets(faint, 0, cfg)[0].shape == (0, 6) and len(colour_ground_truth(faint, cfg)["phot"]) == 0
    batch = collate_colour([ds[0], ds[1], ds[2]])
    assert batch["frames"].shape == (3, 2, 3, 16, 16) and batch["channel_mask"].shape[:2] == (3, 2)
    assert batch["target_emitters"].shape[-1] == 6


def test_training_items_are_pure_functions_of_seed_epoch_index_and_stage():
    cfg = config(curriculum=[{"until_step": 8, "emitter_av": 0.5, "bg_uniform": [5.0, 10.0]}])
    assert [cfg.stage_at(s) for s in (0, 7, 8, 100)] == [0, 0, 1, 1]
    easy = cfg.stage_config(0)
    assert easy.channel1.emitter_av == 0.5 and easy.channel2.bg_uniform == (5.0, 10.0) and easy.curriculum == ()
    assert cfg.stage_config(1).channel1.emitter_av == 3.0
    a, b = ColourSimDataset(cfg, 32, seed=5, block=4), ColourSimDataset(cfg, 32, seed=5, block=4)
    a.set_stage(0)
    b.set_stage(0)
    assert torch.equal(a[9]["frames"], b[9]["frames"]) and torch.equal(a[9]["frames"], a[9]["frames"])
    b.set_stage(1)
    assert not torch.equal(a[9]["frames"], b[9]["frames"])
    a.set_epoch(1)
    b.set_stage(0)
    assert not torch.equal(a[9]["frames"], b[9]["frames"])
    # The easy stage's background (5-10 photons/px) shows in its targets, scaled by the configuration's bg_max.
    b.set_epoch(0)
    assert float(b[0]["target_bg"].max()) <= 10.0 / cfg.channel1.bg_max + 1e-6


def test_h5_round_trip_and_errors(tmp_path):
    cfg = config(registration={"shift_px": [0.5, 0.0]})
    movie = simulate_colour_movie(cfg, 5, torch.Generator().manual_seed(2))
    path = tmp_path / "m.h5"
    write_colour_h5(path, movie, cfg, mode="val", seed=2)
    write_colour_h5(path, movie, cfg, mode="test", seed=2)
    back, back_cfg, meta = read_colour_h5(path, mode="val")
    assert back_cfg == cfg and meta["seed"] == 2 and meta["n_frames"] == 5
    assert torch.equal(back.frames, movie.frames) and torch.equal(back.dye, movie.dye)
    import h5py
    with h5py.File(path) as f:
        assert set(f) == {"val", "test"} and set(f["val"]) == {"channel1", "channel2", "emitters", "metadata"}
        targets2 = f["val/channel2/targets"][()]
        # channel 2's targets are where it saw the emitters: shifted by the registration.
        np.testing.assert_allclose(targets2[:, 1], movie.emitters.xyz[:, 0].numpy() + 0.5, atol=1e-4)
        np.testing.assert_allclose(f["val/channel1/photons"][()] + f["val/channel2/photons"][()],
                                   movie.emitters.phot.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        read_colour_h5(tmp_path / "none.h5")
    with pytest.raises(ValueError, match="no train/metadata"):
        read_colour_h5(path, mode="train")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="no test/metadata"):
        read_colour_h5(tmp_path / "other.h5")


def test_tiff_writer_and_readers(tmp_path):
    cfg = config()
    tif, h5, clipped = write_colour_tiff(tmp_path / "stack.tif", cfg, 4, seed=1)
    assert clipped == 0 and not list(tmp_path.glob("*.tmp"))
    stack = tifffile.imread(tif)
    assert stack.shape == (4, 2, 16, 16) and stack.dtype == np.uint16
    both = read_colour_tiff(tif)
    assert both.shape == (2, 4, 16, 16)
    adu, _ = simulate_colour_acquisition(cfg, 4, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(both, np.clip(adu.numpy(), 0, 65535).astype(np.uint16))
    assert read_colour_h5(h5)[0].frames.shape == (2, 4, 16, 16)
    tifffile.imwrite(tmp_path / "a.tif", stack[:, 0], photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", stack[:, 1], photometric="minisblack")
    np.testing.assert_array_equal(read_colour_tiff(tmp_path / "a.tif", tmp_path / "b.tif"), both)
    tifffile.imwrite(tmp_path / "cfirst.tif", np.moveaxis(stack, 1, 0), photometric="minisblack")
    np.testing.assert_array_equal(read_colour_tiff(tmp_path / "cfirst.tif", channel_axis=0), both)
    tifffile.imwrite(tmp_path / "short.tif", stack[:3, 1], photometric="minisblack")
    tifffile.imwrite(tmp_path / "three.tif", np.zeros((4, 3, 16, 16), np.uint16), photometric="minisblack")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    for call, message in [(lambda: read_colour_tiff(tmp_path / "a.tif", tmp_path / "short.tif"), "same shape"),
                          (lambda: read_colour_tiff(tmp_path / "a.tif"), "channel axis of length 2"),
                          (lambda: read_colour_tiff(tmp_path / "three.tif"), "no channel axis of length 2"),
                          (lambda: read_colour_tiff(tmp_path / "missing.tif"), "not found"),
                          (lambda: read_colour_tiff(tmp_path / "broken.tif"), "not a readable TIFF"),
                          (lambda: write_colour_tiff(tmp_path / "x.png", cfg, 2), "expected a .tif")]:
        with pytest.raises(ValueError, match=message):
            call()
    assert SimConfig().img_size == (40, 40)  # the single-colour defaults are untouched


def test_colour_tiff_command(tmp_path, capsys):
    from data.smlm.__main__ import main
    preset = tmp_path / "p.yaml"
    import yaml
    preset.write_text(yaml.safe_dump({"simulation": {"channel1": CH1, "channel2": CH2,
                                                     "curriculum": [{"until_step": 5, "emitter_av": 1.0}]}}))
    assert main(["colour-tiff", "--sim_config", str(preset), "--out", str(tmp_path / "s.tif"), "--frames", "3",
                 "--emitter_density", "2.0"]) == 0
    assert tifffile.imread(tmp_path / "s.tif").shape == (3, 2, 16, 16)
    movie, cfg, meta = read_colour_h5(tmp_path / "s.h5")
    assert cfg.channel1.emitter_density == 2.0 and cfg.curriculum == () and meta["seed"] == 0
    with pytest.raises(SystemExit) as e:
        main(["colour-tiff", "--sim_config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x.tif")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err

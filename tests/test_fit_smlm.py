"""fit_smlm.py: TIFF stack -> localisation table with a (hand-made) train_smlm.py run.

The run directory is built by hand (args.yaml, simulation.yaml, final/model.safetensors of a freshly
initialised 4-feature SigmaMUNet whose p bias is set to 0, so p ~ 0.5 and there are many detections).
Positions are checked against the truth with a stand-in model whose output is built from known emitters.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
from safetensors.torch import save_file

import fit_smlm
from conftest import ROOT, call_main, read_csv, run_python
from data.smlm import (SimConfig, bin_emitters, camera_forward, psf_sigmas, read_movie_h5, render,
                       sample_background, sample_loose_emitters, to_photons)
from models.sigma_munet import SigmaMUNet
from train_smlm import Args, model_kwargs
from training.config import as_dict
from training.export import build_model, model_record

N_FRAMES = 10
SIM = {"img_size": [16, 16], "emitter_av": 3.0}
HEADER_3D = ('"id","frame","x [nm]","y [nm]","z [nm]","sigma [nm]","intensity [photon]","offset [photon]",'
             '"bkgstd [photon]","uncertainty [nm]"')


def adu_movie(cfg: SimConfig, n_frames: int, seed: int = 0) -> np.ndarray:
    """(T, H, W) uint16 camera frames of a simulated movie."""
    gen = torch.Generator().manual_seed(seed)
    emitters = bin_emitters(sample_loose_emitters(cfg, n_frames, gen), n_frames)
    expected = render(emitters, n_frames, cfg) + sample_background(cfg, n_frames, gen)
    return camera_forward(expected, cfg, gen).clamp(0, 65535).numpy().astype(np.uint16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    args = Args(initial_features=4, inter_features=4, depth_shared=1, depth_union=2, window=3)
    (run / "args.yaml").write_text(yaml.safe_dump(as_dict(args), sort_keys=False))
    (run / "simulation.yaml").write_text(yaml.safe_dump({"simulation": SimConfig.from_dict(SIM).to_dict()}))
    torch.manual_seed(0)
    record = model_record(SigmaMUNet, **model_kwargs(args))
    model = build_model(record)
    with torch.no_grad():
        model.heads["p"][-1].bias.zero_()
        # As after training, the outputs vary from pixel to pixel (the heads start at constant values), and
        # the predicted sigmas straddle the sigma filter's limits (0.4 px in x, y; 80 / 900 of z_max in z).
        for name in ("mu", "sigma", "bg"):
            model.heads[name][-1].weight.normal_(0.0, 0.3)
        model.heads["sigma"][-1].bias.copy_(torch.tensor([-2.0, -2.0, -2.0, -3.6]))
    (run / "final").mkdir()
    (run / "final" / "model.json").write_text(json.dumps(record))
    save_file(model.state_dict(), run / "final" / "model.safetensors")
    # args.yaml has raw_th null: the threshold the run chose on validation comes from the export's metrics.
    (run / "final" / "metrics.json").write_text(json.dumps({"global_step": 6, "val/raw_th": 0.5}))
    return run


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("frames") / "stack.tif"
    tifffile.imwrite(path, adu_movie(SimConfig.from_dict(SIM), N_FRAMES))
    return path


@pytest.fixture(scope="module")
def whole_movie_det(run_dir, stack):
    """localise on the whole in-memory movie (photons), batches of 3."""
    model, cfg, train_args = fit_smlm.load_fitter(run_dir)
    photons = to_photons(torch.from_numpy(tifffile.imread(stack).astype(np.float32)), cfg)
    return fit_smlm.localise(model, photons, cfg, window=train_args.window, raw_th=train_args.raw_th,
                             batch_size=3), cfg


def fit(capsys, *argv):
    """fit_smlm.main in this process -> (exit status, stdout, stderr)."""
    return call_main(capsys, fit_smlm.main, *argv)


def test_cli_writes_thunderstorm_csv(tmp_path, run_dir, stack):
    out = tmp_path / "locs.csv"
    proc = run_python("fit_smlm.py", "--checkpoint", str(run_dir), "--frames", str(stack), "--out", str(out),
                      "--batch_size", "3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"localisations from {N_FRAMES} frames" in proc.stdout and str(out) in proc.stdout
    assert out.read_text().splitlines()[0] == HEADER_3D
    rows = read_csv(out)
    assert len(rows) > 0
    assert [int(r["id"]) for r in rows] == list(range(1, len(rows) + 1))
    frames = np.array([int(r["frame"]) for r in rows])
    assert frames.min() >= 1 and frames.max() <= N_FRAMES and np.all(np.diff(frames) >= 0)
    for key, extent in (("x [nm]", 16 * 100.0), ("y [nm]", 16 * 100.0)):
        values = np.array([float(r[key]) for r in rows])
        # The field is [0, 1600] nm; a pixel's offset reaches 1 px (tanh), so an untrained model's edge
        # detections may stick out by up to half a pixel.
        assert values.min() > -50.0 and values.max() < extent + 50.0, key
        assert np.mean((values >= 0) & (values <= extent)) > 0.9, key
    for key in ("sigma [nm]", "intensity [photon]", "offset [photon]", "bkgstd [photon]", "uncertainty [nm]"):
        assert all(float(r[key]) > 0 for r in rows), key
    assert not (tmp_path / "locs.csv.tmp").exists()


def test_chunked_equals_whole_movie(tmp_path, capsys, run_dir, stack, whole_movie_det):
    det, cfg = whole_movie_det
    assert len(det["frame_ix"]) > 0 and set(det["frame_ix"]) > {0, N_FRAMES - 1}
    reference = tmp_path / "whole.csv"
    fit_smlm.write_localisations(det, reference, "thunderstorm", cfg)
    for chunk in ("3", "4", "512"):  # 4 is rounded up to 6, a multiple of --batch_size
        out = tmp_path / f"chunk{chunk}.csv"
        code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", out, "--batch_size", "3",
                           "--chunk_frames", chunk, "--device", "cpu")
        assert code == 0, err
        assert out.read_bytes() == reference.read_bytes(), chunk


def test_iter_tiff_chunks_layouts(tmp_path):
    movie = (np.arange(7 * 5 * 6) * 37 % 65535).reshape(7, 5, 6)
    layouts = {"pages": {}, "imagej": {"imagej": True}, "zlib": {"compression": "zlib"},
               "one_3d_page": {"planarconfig": "separate", "photometric": "minisblack"},
               "one_3d_page_zlib": {"planarconfig": "separate", "photometric": "minisblack", "compression": "zlib"},
               "big_endian": {"planarconfig": "separate", "photometric": "minisblack", "byteorder": ">"}}
    for name, kwargs in layouts.items():
        for dtype in (np.uint16, np.float32):
            path = tmp_path / f"{name}_{np.dtype(dtype).name}.tif"
            tifffile.imwrite(path, movie.astype(dtype), **kwargs)
            assert fit_smlm.tiff_stack_shape(path) == (7, 5, 6)
            chunks = list(fit_smlm.iter_tiff_chunks(path, chunk_frames=3, context=1))
            assert [(lo, hi, block_lo) for lo, hi, block_lo, _ in chunks] == [(0, 3, 0), (3, 6, 2), (6, 7, 5)]
            for lo, hi, block_lo, block in chunks:
                assert block.dtype == np.float32
                np.testing.assert_array_equal(block, movie[block_lo:min(7, hi + 1)], err_msg=name)


def test_decode_h5_and_csv_round_trip(tmp_path, capsys, run_dir, stack, whole_movie_det):
    det, _ = whole_movie_det
    h5_path, csv_path = tmp_path / "locs.h5", tmp_path / "locs_decode.csv"
    for out, extra in ((h5_path, []), (csv_path, ["--format", "decode"])):
        code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", out, "--batch_size", "3",
                           "--chunk_frames", "3", "--device", "cpu", *extra)
        assert code == 0, err
    n = len(det["frame_ix"])
    with h5py.File(h5_path, "r") as f:
        assert f["meta"].attrs["xy_unit"] == "nm"
        np.testing.assert_array_equal(f["meta"].attrs["px_size"], [100.0, 100.0])
        assert "version" in f["decode"].attrs
        data = {k: f["data"][k][()] for k in f["data"]}
    for name in ("xyz_cr", "phot_cr", "bg_cr", "bg_sig"):
        assert isinstance(data[name], h5py.Empty), name
    np.testing.assert_array_equal(data["xyz"], det["xyz_nm"])
    np.testing.assert_array_equal(data["xyz_sig"], det["xyz_sig_nm"])
    for name in ("phot", "phot_sig", "prob", "bg", "frame_ix"):
        np.testing.assert_array_equal(data[name], det[name], err_msg=name)
    np.testing.assert_array_equal(data["id"], np.arange(n))

    lines = csv_path.read_text().splitlines()
    assert lines[0] == "# DECODE EmitterSet"
    assert "version" in json.loads(lines[1][2:])
    assert json.loads(lines[2][2:]) == {"xy_unit": "nm", "px_size": [100.0, 100.0]}
    assert lines[3] == ("x,y,z,phot,frame_ix,id,prob,bg,phot_cr,bg_cr,phot_sig,bg_sig,x_cr,y_cr,z_cr,x_sig,y_sig,"
                        "z_sig")
    rows = list(csv.DictReader(lines[3:]))
    assert len(rows) == n
    col = lambda key: np.array([float(r[key]) for r in rows], dtype=np.float32)  # noqa: E731
    for k, key in enumerate("xyz"):
        np.testing.assert_array_equal(col(key), data["xyz"][:, k])
        np.testing.assert_array_equal(col(f"{key}_sig"), data["xyz_sig"][:, k])
        assert np.isnan(col(f"{key}_cr")).all()
    np.testing.assert_array_equal(col("frame_ix").astype(np.int64), data["frame_ix"])
    np.testing.assert_array_equal(col("phot"), data["phot"])
    assert np.isnan(col("phot_cr")).all() and np.isnan(col("bg_sig")).all()


def test_frame_size_not_a_multiple_of_the_depth(tmp_path, capsys, run_dir):
    cfg = SimConfig.from_dict({**SIM, "img_size": [18, 14]})
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, adu_movie(cfg, 5, seed=3))
    out = tmp_path / "odd.csv"
    code, stdout, err = fit(capsys, "--checkpoint", run_dir, "--frames", path, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert "(18x14 px)" in stdout
    rows = read_csv(out)
    assert len(rows) > 0
    x = np.array([float(r["x [nm]"]) for r in rows])
    y = np.array([float(r["y [nm]"]) for r in rows])
    assert -50.0 < x.min() and x.max() < 14 * 100.0 + 50.0 and -50.0 < y.min() and y.max() < 18 * 100.0 + 50.0
    # Detections come from the whole frame, the padded-and-cropped border included.
    assert x.max() > 12 * 100.0 and y.max() > 16 * 100.0


class TruthModel(torch.nn.Module):
    """Stand-in for SigmaMUNet: frame t of the movie is the constant t photons, and the output for a window
    is the prepared map of its centre frame."""

    def __init__(self, maps: torch.Tensor, cfg: SimConfig, window: int = 3):
        super().__init__()
        self.maps, self.cfg, self.window = maps, cfg, window
        self.depth = 0

    def forward(self, x):
        t = torch.round(x[:, self.window // 2, 0, 0] * self.cfg.input_scale + self.cfg.input_offset).long()
        return self.maps[t]


@pytest.mark.parametrize("psf", ["astigmatic", "gaussian"])
def test_positions_match_the_truth(tmp_path, psf):
    cfg = SimConfig(img_size=(12, 16), px_size_nm=(100.0, 120.0), psf=psf)
    height, width = cfg.img_size
    # frame, x px, y px, z nm, photons, sigma x/y px, sigma z nm
    truth = [(0, 3.3, 4.6, -300.0, 5000.0, 0.05, 0.08, 30.0), (2, 10.1, 2.9, 0.0, 8000.0, 0.1, 0.1, 20.0),
             (2, 5.0, 10.45, 450.0, 2000.0, 0.2, 0.15, 60.0), (4, 15.4, 0.0, 100.0, 12000.0, 0.03, 0.04, 10.0)]
    n_frames, bg = 6, np.array([100.0, 110.0, 120.0, 130.0, 140.0, 150.0])
    maps = torch.zeros(n_frames, 10, height, width)
    maps[:, 9] = torch.tensor(bg / cfg.bg_max, dtype=torch.float32)[:, None, None]
    for f, x, y, z, phot, sx, sy, sz in truth:
        i, j = round(y), round(x)
        maps[f, :, i, j] = torch.tensor([1.0, phot / cfg.phot_max, x - j, y - i, z / cfg.z_max,
                                         0.01, sx, sy, sz / cfg.z_max, bg[f] / cfg.bg_max])
    frames = torch.arange(n_frames, dtype=torch.float32)[:, None, None].expand(n_frames, height, width)
    det = fit_smlm.localise(TruthModel(maps, cfg), frames, cfg, raw_th=0.5, batch_size=4)
    out = tmp_path / "truth.csv"
    fit_smlm.write_localisations(det, out, "thunderstorm", cfg)
    header = out.read_text().splitlines()[0]
    assert header == (HEADER_3D if psf == "astigmatic" else HEADER_3D.replace('"z [nm]",', ""))
    rows = read_csv(out)
    assert len(rows) == len(truth)
    for row, (f, x, y, z, phot, sx, sy, sz) in zip(rows, truth):
        assert int(row["frame"]) == f + 1
        assert float(row["x [nm]"]) == pytest.approx((x + 0.5) * 100.0, abs=1e-2)
        assert float(row["y [nm]"]) == pytest.approx((y + 0.5) * 120.0, abs=1e-2)
        if psf == "astigmatic":
            assert float(row["z [nm]"]) == pytest.approx(z, abs=1e-2)
        assert float(row["intensity [photon]"]) == pytest.approx(phot, rel=1e-5)
        assert float(row["offset [photon]"]) == pytest.approx(bg[f], rel=1e-5)
        # The default EMCCD (gain 300, 45 e-/ADU, read noise 74.4 e-, spurious charge 0.002, qe 1): shot noise
        # doubled by the excess-noise factor, plus read noise and ADU rounding divided by the gain.
        bkgstd = math.sqrt(2 * (bg[f] + 0.002) + (74.4**2 + 45.0**2 / 12) / 300.0**2)
        assert float(row["bkgstd [photon]"]) == pytest.approx(bkgstd, rel=1e-4)
        lateral = math.sqrt(((sx * 100.0) ** 2 + (sy * 120.0) ** 2) / 2)
        assert float(row["uncertainty [nm]"]) == pytest.approx(lateral, abs=1e-2)
        psf_x, psf_y = (float(s) for s in psf_sigmas(torch.tensor([z], dtype=torch.float64), cfg))
        assert float(row["sigma [nm]"]) == pytest.approx(math.sqrt(psf_x * 100.0 * psf_y * 120.0), abs=1e-2)

    dec = tmp_path / "truth_decode.csv"
    fit_smlm.write_localisations(det, dec, "decode", cfg)
    rows = list(csv.DictReader(dec.read_text().splitlines()[3:]))
    for row, (f, x, y, z, phot, *_) in zip(rows, truth):  # DECODE: pixel centres at integer px, frames 0-based
        assert int(row["frame_ix"]) == f
        assert float(row["phot"]) == pytest.approx(phot, rel=1e-5)  # the same photons as the ThunderSTORM CSV
        assert float(row["bg"]) == pytest.approx(bg[f], rel=1e-5)
        assert float(row["x"]) == pytest.approx(x * 100.0, abs=1e-3)
        assert float(row["y"]) == pytest.approx(y * 120.0, abs=1e-3)
        assert float(row["z"]) == pytest.approx(z, abs=1e-3)


def test_camera_override(tmp_path, run_dir):
    _, cfg, _ = fit_smlm.load_fitter(run_dir, weights="final")
    section = tmp_path / "section.yaml"
    section.write_text(yaml.safe_dump({"simulation": {"camera": "scmos", "em_gain": None, "baseline": 50,
                                                      "px_size_nm": [110, 110]}}))
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({"e_per_adu": 2.0, "qe": 0.9}))
    new = fit_smlm.apply_camera(cfg, section)
    assert (new.camera, new.em_gain, new.baseline, new.px_size_nm) == ("scmos", None, 50.0, (110.0, 110.0))
    assert (new.intensity_mu, new.bg_uniform, new.z_range_nm) == (cfg.intensity_mu, cfg.bg_uniform, cfg.z_range_nm)
    new = fit_smlm.apply_camera(cfg, top)
    assert (new.e_per_adu, new.qe, new.camera) == (2.0, 0.9, "emccd")
    assert dataclasses.replace(new, e_per_adu=cfg.e_per_adu, qe=cfg.qe) == cfg


def test_missing_frames_file_as_a_user_sees_it(tmp_path, run_dir):
    out = tmp_path / "locs.csv"
    proc = run_python("fit_smlm.py", "--checkpoint", str(run_dir), "--frames", str(tmp_path / "nope.tif"),
                      "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "nope.tif" in proc.stderr and "--frames" in proc.stderr
    assert not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, run_dir, stack):
    not_tiff = tmp_path / "notes.tif"
    not_tiff.write_text("not an image\n")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((3, 16, 16, 3), np.uint8), photometric="rgb")
    no_record = tmp_path / "no_record_run"                 # weights but no model.json: the model cannot be rebuilt
    (no_record / "final").mkdir(parents=True)
    (no_record / "simulation.yaml").write_text((run_dir / "simulation.yaml").read_text())
    (no_record / "final" / "model.safetensors").write_bytes((run_dir / "final" / "model.safetensors").read_bytes())
    truncated = tmp_path / "truncated_run"
    (truncated / "final").mkdir(parents=True)
    for name in ("args.yaml", "simulation.yaml", "final/model.json"):
        (truncated / name).write_bytes((run_dir / name).read_bytes())
    (truncated / "final" / "model.safetensors").write_bytes((run_dir / "final" / "model.safetensors").read_bytes()[:100])
    bad_camera = tmp_path / "camera.yaml"
    bad_camera.write_text(yaml.safe_dump({"simulation": {"em_gain": -1}}))
    no_th = tmp_path / "no_threshold_run"                 # raw_th null and no metrics.json: nothing to fall back on
    (no_th / "final").mkdir(parents=True)
    for name in ("args.yaml", "simulation.yaml", "final/model.safetensors", "final/model.json"):
        (no_th / name).write_bytes((run_dir / name).read_bytes())
    foreign_camera = tmp_path / "foreign.yaml"
    foreign_camera.write_text(yaml.safe_dump({"img_size": [8, 8]}))
    np.save(tmp_path / "small_map.npy", np.ones((4, 4), np.float32))      # smaller than the stack's frames
    small_map = tmp_path / "small_map.yaml"
    small_map.write_text(yaml.safe_dump({"camera": "scmos", "em_gain": None, "read_sigma_map":
                                         str(tmp_path / "small_map.npy")}))
    out = tmp_path / "locs.csv"
    cases = [
        (["--checkpoint", run_dir, "--frames", not_tiff], "notes.tif"),
        (["--checkpoint", run_dir, "--frames", rgb], "rgb.tif"),
        (["--checkpoint", no_record, "--frames", stack], "model.json"),
        (["--checkpoint", truncated, "--frames", stack], "model.safetensors"),
        (["--checkpoint", tmp_path / "missing_run", "--frames", stack], "missing_run"),
        (["--checkpoint", run_dir, "--frames", stack, "--weights", "final", "--camera", bad_camera], "em_gain"),
        (["--checkpoint", run_dir, "--frames", stack, "--camera", foreign_camera], "img_size"),
        (["--checkpoint", run_dir, "--frames", stack, "--camera", small_map], "map of the whole chip"),
        (["--checkpoint", run_dir, "--frames", stack, "--raw_th", "1.5"], "--raw_th"),
        (["--checkpoint", no_th, "--frames", stack], "--raw_th"),
    ]
    for argv, named in cases:
        code, stdout, err = fit(capsys, *argv, "--out", out, "--device", "cpu")
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and named in err, err
        assert not out.exists() and not (tmp_path / "locs.csv.tmp").exists()
    for device in ("gpu", "cuda:0" if not torch.cuda.is_available() else "tpu"):
        code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", out, "--device", device)
        assert code == 2 and err.count("\n") == 1 and f"--device {device}" in err and not out.exists(), err
    code, _, err = fit(capsys, "--checkpoint", no_th, "--frames", stack, "--out", tmp_path / "explicit.csv",
                       "--raw_th", "0.5", "--device", "cpu")
    assert code == 0, err
    code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", tmp_path / "locs.h5",
                       "--format", "thunderstorm")
    assert code == 2 and err.count("\n") == 1 and "locs.h5" in err
    assert not (tmp_path / "locs.h5").exists()

    out.write_text("keep me\n")
    code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", out, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "locs.csv" in err and "--overwrite" in err
    assert out.read_text() == "keep me\n"
    code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", out, "--device", "cpu",
                       "--overwrite")
    assert code == 0, err
    assert out.read_text().startswith('"id","frame"')


def test_out_is_checked_before_the_work(tmp_path, capsys, run_dir, stack):
    """A directory, a folder that cannot be created: one line before the checkpoint is even looked at."""
    (tmp_path / "a_file").write_text("x\n")
    for out, named in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "locs.csv", "a_file is a file")):
        code, _, err = fit(capsys, "--checkpoint", tmp_path / "no_such_run", "--frames", stack, "--out", out)
        assert code == 2 and err.count("\n") == 1 and f"--out {out}" in err and named in err, err


def test_nonfinite_frames_error_by_default_and_skip_fits_them_as_missing(tmp_path, capsys, run_dir, stack):
    movie = tifffile.imread(stack).astype(np.float32)
    clean, bad = tmp_path / "clean.tif", tmp_path / "bad.tif"
    tifffile.imwrite(clean, movie)
    movie[4, 3:6, 2:9] = np.nan
    movie[7, 0, 0] = np.inf
    tifffile.imwrite(bad, movie)
    np.testing.assert_array_equal(fit_smlm.nonfinite_frames(bad, chunk_frames=3), [4, 7])
    assert len(fit_smlm.nonfinite_frames(stack)) == 0  # uint16: nothing to scan
    argv = ["--checkpoint", run_dir, "--batch_size", "3", "--chunk_frames", "3", "--device", "cpu"]
    out = tmp_path / "locs.csv"
    code, _, err = fit(capsys, *argv, "--frames", bad, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert "bad.tif: 2 frame(s) hold NaN or inf pixels (0-based frame indices 4, 7)" in err
    assert "--nonfinite_frames skip" in err
    assert not out.exists() and not (tmp_path / "locs.csv.tmp").exists()

    code, stdout, err = fit(capsys, *argv, "--frames", bad, "--out", out, "--nonfinite_frames", "skip")
    assert code == 0, err
    assert "2 frame(s) with NaN or inf pixels fitted as missing" in stdout and "4, 7" in stdout
    code, _, err = fit(capsys, *argv, "--frames", clean, "--out", tmp_path / "clean.csv")
    assert code == 0, err
    per_frame = lambda path: {f: [r for r in read_csv(path) if int(r["frame"]) - 1 == f]  # noqa: E731
                              for f in range(N_FRAMES)}
    got, ref = per_frame(out), per_frame(tmp_path / "clean.csv")
    assert got[4] == [] and got[7] == []                        # the missing frames yield nothing
    for f in (3, 5, 6, 8):                                      # their neighbours are not poisoned
        assert len(got[f]) > 0, f
    strip = lambda rows: [{k: v for k, v in r.items() if k != "id"} for r in rows]  # noqa: E731
    for f in (0, 1, 2, 9):                                      # windows without a missing frame: unchanged
        assert strip(got[f]) == strip(ref[f]), f


def test_quality_benchmark_scores_ours_and_classical(tmp_path, run_dir):
    """benchmarks/smlm_quality.py end to end on the hand-made run: both methods, every density, reused movies."""
    argv = ["--checkpoint", str(run_dir), "--weights", "final", "--frames", "6", "--img_size", "16",
            "--densities", "0.5,2", "--out", str(tmp_path)]
    proc = run_python("benchmarks/smlm_quality.py", *argv)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "smlm_quality.json").read_text())
    rows, quartiles = report["tables"][0]["rows"], report["tables"][1]["rows"]
    methods = ["ours", "ours, sigma filter", "ours, MLE refined", "classical", "crlb oracle"]
    assert [(r["method"], r["density"].split()[0]) for r in rows] == [(m, d) for d in ("0.5", "2") for m in methods]
    for r in rows:
        assert 0 <= r["jaccard"] <= 1 and (r["frames/s"] is None) == (r["method"] == "crlb oracle")
    # Four photon quartiles per method and density, holding every ground-truth emitter between them.
    assert [(r["method"], r["photons"][:2]) for r in quartiles[:8]] == [
        (m, f"Q{q}") for m in methods[:2] for q in range(1, 5)]
    per_density = report["per_density"]
    for d, entry in enumerate(per_density):
        assert sum(r["n_gt"] for r in quartiles[20 * d:20 * d + 4]) == entry["gt_emitters"]
        oracle = entry["metrics"]["crlb oracle"]
        assert oracle["detections"] == entry["gt_emitters"] and oracle["recall"] > 0.9
        filtered, ours = entry["metrics"]["ours, sigma filter"], entry["metrics"]["ours"]
        assert 0 < filtered["detections"] < ours["detections"] and filtered["seconds"] == ours["seconds"]
        refined = entry["metrics"]["ours, MLE refined"]  # the same detections, refitted
        assert refined["detections"] == ours["detections"] and 0 <= refined["jaccard"] <= 1
    movies = sorted(p.name for p in (tmp_path / "smlm_movies").iterdir())
    assert len(movies) == 2
    again = run_python("benchmarks/smlm_quality.py", *argv)
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "smlm_quality.json").read_text())["tables"][0]["rows"]
    speed = lambda r: {k: v for k, v in r.items() if k != "frames/s"}  # noqa: E731
    assert [speed(r) for r in rerun] == [speed(r) for r in rows]        # the same movies, the same results


def test_tails_factors_of_a_hand_made_movie():
    """smlm_tails.pair_factors on emitters placed by hand: each pair lands in the bin its geometry says."""
    from benchmarks.smlm_tails import pair_factors
    from data.smlm import Emitters, Movie
    from metrics.smlm import match_emitters
    from metrics.smlm_crlb import ground_truth

    cfg = SimConfig(img_size=(16, 16), psf="astigmatic")
    # id 0: on in frames 0-2, 0.4 px from the left edge; id 1: frame 1 only; id 2: a blinking neighbour of
    # id 1, on in frame 0 only; id 3: frame 1, z = -650 nm, detected from the pixel left of its own.
    rows = [(0, 0.4, 2.0, 0.0, 0), (1, 0.4, 2.0, 0.0, 0), (2, 0.4, 2.0, 0.0, 0), (1, 8.0, 8.0, 100.0, 1),
            (0, 10.5, 8.0, 0.0, 2), (1, 12.0, 12.0, -650.0, 3)]
    emitters = Emitters(torch.tensor([r[0] for r in rows]), torch.tensor([r[1:4] for r in rows]),
                        torch.full((len(rows),), 5000.0), torch.tensor([r[4] for r in rows]))
    movie = Movie(torch.zeros(3, 16, 16), torch.full((3, 16, 16), 100.0), emitters)
    gt = ground_truth(movie, cfg)
    # Frame 1 detections: id 0 and id 1 exactly (read from their own pixels), id 3 read from pixel (12, 11)
    # with a +1 px offset, and a second detection 0.6 px from id 1.
    xyz_px = np.array([[0.4, 2.0, 0.0], [8.0, 8.0, 100.0], [12.0, 12.0, -650.0], [8.6, 8.0, 100.0]])
    det = {"frame_ix": np.array([1, 1, 1, 1]), "xyz_px": xyz_px, "pixel": np.array([[2, 0], [8, 8], [12, 11], [8, 9]])}
    pred_idx, gt_idx = match_emitters(xyz_px * [100, 100, 1], det["frame_ix"], gt["xyz_nm"], gt["frame_ix"])
    order = np.argsort(pred_idx)
    pred_idx, gt_idx = pred_idx[order][:3], gt_idx[order][:3]
    assert pred_idx.tolist() == [0, 1, 2] and gt["row"][gt_idx].tolist() == [1, 3, 5]
    labels = {name: list(v[0]) for name, v in pair_factors(det, pred_idx, gt_idx, gt, movie, cfg).items()}
    assert labels["edge distance"] == ["< 1 px", ">= 4 px", "2-4 px"]
    assert labels["neighbour"] == [">= 8 px", "4-8 px", "4-8 px"]         # id 0 to id 1: 9.7 px; id 3 to id 1: 5.7
    assert labels["blinking nbr"] == ["none", "within 4 px", "none"]     # id 2 (frame 0 only) is 2.5 px from id 1
    assert labels["on in t-1/t+1"] == ["both (full frame)", "not both", "not both"]
    assert labels["offset"] == ["< 0.5 px", "< 0.5 px", ">= 0.9 px"]
    assert labels["partner"] == ["nearest", "nearest", "nearest"]
    assert labels["split"] == ["none", "2nd prediction < 1 px", "none"]
    assert labels["|z|"] == ["< 300 nm", "< 300 nm", ">= 600 nm"]
    # None is a single emitter: id 0 is at the edge, id 1 has id 3 at 5.7 px, id 3 is out of focus.
    assert labels["single emitter"] == ["not single", "not single", "not single"]


def test_tails_benchmark_bins_every_matched_pair(tmp_path, run_dir):
    """benchmarks/smlm_tails.py end to end: every factor's bins hold all matched pairs and all squared error."""
    argv = ["--checkpoint", str(run_dir), "--weights", "final", "--frames", "8", "--img_size", "16",
            "--density", "2", "--raw_th", "0.05", "--out", str(tmp_path)]
    proc = run_python("benchmarks/smlm_tails.py", *argv)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "smlm_tails.json").read_text())["tables"][0]["rows"]
    total = rows[0]
    assert total["factor"] == "all" and total["pairs"] > 0 and total["% sq err"] == pytest.approx(100.0)
    factors = {r["factor"] for r in rows[1:]}
    assert factors == {"photons", "edge distance", "neighbour", "blinking nbr", "on in t-1/t+1", "offset",
                       "partner", "split", "|z|", "single emitter"}
    for factor in factors:
        group = [r for r in rows if r["factor"] == factor]
        assert sum(r["pairs"] for r in group) == total["pairs"], factor
        assert sum(r["% sq err"] for r in group) == pytest.approx(100.0), factor
    refined = run_python("benchmarks/smlm_tails.py", *argv, "--refine")
    assert refined.returncode == 0, refined.stderr
    report = json.loads((tmp_path / "smlm_tails.json").read_text())
    assert report["refine"] and "MLE refinement on" in report["notes"][0]
    classical = run_python("benchmarks/smlm_tails.py", *argv, "--classical")
    assert classical.returncode == 0, classical.stderr
    report = json.loads((tmp_path / "smlm_tails.json").read_text())
    assert report["notes"][0].startswith("Classical fitter") and report["tables"][0]["rows"][0]["factor"] == "all"


def test_simulated_tiff_cli_feeds_fit_smlm(tmp_path, run_dir):
    """python -m data.smlm tiff: a uint16 ADU stack whose photons are the ground-truth movie's frames."""
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({"simulation": SIM}))
    out = tmp_path / "movie" / "stack.tif"
    proc = subprocess.run([sys.executable, "-m", "data.smlm", "tiff", "--sim_config", str(sim), "--frames", "5",
                           "--img_size", "20,24", "--emitter_density", "2", "--seed", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    adu = tifffile.imread(out)
    assert adu.dtype == np.uint16 and adu.shape == (5, 20, 24)
    movie, cfg, meta = read_movie_h5(out.with_suffix(".h5"))
    assert cfg.img_size == (20, 24) and cfg.emitter_density == 2 and cfg.emitter_av is None and meta["seed"] == 3
    torch.testing.assert_close(to_photons(torch.from_numpy(adu.astype(np.float32)), cfg), movie.frames)
    code = run_python("fit_smlm.py", "--checkpoint", str(run_dir), "--frames", str(out), "--out",
                      str(tmp_path / "locs.csv"), "--device", "cpu")
    assert code.returncode == 0, code.stderr
    bad = subprocess.run([sys.executable, "-m", "data.smlm", "tiff", "--sim_config", str(sim), "--out",
                          str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "x.png" in bad.stderr


def test_threshold_comes_from_the_loaded_export(tmp_path, run_dir):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for name in ("simulation.yaml", "final/model.safetensors", "final/model.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    values = yaml.safe_load((run_dir / "args.yaml").read_text())
    (run / "args.yaml").write_text(yaml.safe_dump({**values, "raw_th": 0.5}))
    (run / "final" / "metrics.json").write_text(json.dumps({"val/raw_th": 0.3}))
    assert fit_smlm.load_fitter(run, "final")[2].raw_th == 0.3      # the evaluation the weights come from
    (run / "final" / "metrics.json").unlink()
    assert fit_smlm.load_fitter(run, "final")[2].raw_th == 0.5      # else the run's fixed threshold


def test_sigma_filter_keeps_the_confident_detections(tmp_path, capsys, run_dir, stack, whole_movie_det):
    """--sigma_filter: DECODE's notebook limits on the predicted sigmas, applied after SpatialIntegration."""
    from models.sigma_munet_post import filter_by_sigma

    det, cfg = whole_movie_det
    model, _, settings = fit_smlm.load_fitter(run_dir)
    photons = to_photons(torch.from_numpy(tifffile.imread(stack).astype(np.float32)), cfg)
    kept = fit_smlm.localise(model, photons, cfg, window=settings.window, raw_th=settings.raw_th, batch_size=3,
                             sigma_filter=True)
    expected = filter_by_sigma(det)
    assert len(kept["prob"]) == len(expected["prob"]) and 0 < len(kept["prob"]) < len(det["prob"]), (len(kept["prob"]), len(det["prob"]))
    np.testing.assert_array_equal(kept["frame_ix"], expected["frame_ix"])
    code, _, err = fit(capsys, "--checkpoint", run_dir, "--frames", stack, "--out", tmp_path / "f.csv",
                       "--batch_size", "3", "--device", "cpu", "--sigma_filter")
    assert code == 0, err
    assert len(read_csv(tmp_path / "f.csv")) == len(expected["prob"])


def test_weights_final_never_falls_back_to_best(tmp_path, run_dir):
    run = tmp_path / "unfinished"
    (run / "best").mkdir(parents=True)
    for name in ("model.safetensors", "model.json", "metrics.json"):
        (run / "best" / name).write_bytes((run_dir / "final" / name).read_bytes())
    (run / "simulation.yaml").write_bytes((run_dir / "simulation.yaml").read_bytes())
    assert fit_smlm.load_fitter(run, "best")[2].weights == run / "best" / "model.safetensors"
    with pytest.raises(fit_smlm.UsageError, match="no final/ export"):
        fit_smlm.load_fitter(run, "final")


class LookupModel(torch.nn.Module):
    """Stand-in for SigmaMUNet that knows the movie: a window's output is the prepared map of its centre frame,
    found by the frame's pixel sum (unique for a noisy movie)."""

    def __init__(self, scaled_frames: torch.Tensor, maps: torch.Tensor, window: int = 3):
        super().__init__()
        self.keys, self.maps, self.window = scaled_frames.double().sum((1, 2)), maps, window
        self.depth = 0

    def forward(self, x):
        key = x[:, self.window // 2].double().sum((1, 2))
        return self.maps[(key[:, None] - self.keys[None, :]).abs().argmin(1)]


def test_refine_refits_detections_and_chunks_do_not_matter(tmp_path, capsys, monkeypatch):
    """--refine: the network's detections refitted where the fit is better (models.smlm_mle.refine_detections,
    tested on its own in test_smlm_refine.py), the same rows and the same file however the stack is cut."""
    from data.smlm import Emitters, scale_frames
    from models.smlm_mle import refine_detections

    cfg = SimConfig(img_size=(24, 24), psf="astigmatic")
    n_frames, rng = 8, np.random.default_rng(0)
    corners = np.array([[5.0, 5.0], [17.0, 6.0], [11.0, 17.0]])
    xy = np.concatenate([corners + rng.uniform(-0.5, 0.5, (3, 2)) for _ in range(n_frames)])
    z = rng.uniform(-400, 400, len(xy))
    frame_ix = np.repeat(np.arange(n_frames), 3)
    em = Emitters(torch.as_tensor(frame_ix), torch.as_tensor(np.c_[xy, z], dtype=torch.float32),
                  torch.full((len(xy),), 6000.0), torch.arange(len(xy)))
    adu = camera_forward(render(em, n_frames, cfg) + 100.0, cfg, torch.Generator().manual_seed(0))
    stack_path = tmp_path / "stack.tif"
    tifffile.imwrite(stack_path, adu.clamp(0, 65535).numpy().astype(np.uint16))
    photons = to_photons(torch.from_numpy(tifffile.imread(stack_path).astype(np.float32)), cfg)
    # The network's estimates: 0.3 px and 100 nm off, a predicted sigma of 0.5 px (the fit is better).
    maps = torch.zeros(n_frames, 10, 24, 24)
    maps[:, 0] = 0.01
    maps[:, 9] = 100.0 / cfg.bg_max
    est = np.c_[xy + rng.uniform(-0.3, 0.3, xy.shape), z + rng.uniform(-100, 100, len(z))]
    for f, (x, y, zz) in zip(frame_ix, est):
        i, j = round(y), round(x)
        maps[f, :, i, j] = torch.tensor([1.0, 5000.0 / cfg.phot_max, x - j, y - i, zz / cfg.z_max,
                                         0.01, 0.5, 0.5, 50.0 / cfg.z_max, 100.0 / cfg.bg_max])
    model = LookupModel(scale_frames(photons, cfg), maps)
    monkeypatch.setattr(fit_smlm, "load_fitter", lambda *a, **k: (model, cfg, fit_smlm.FitSettings(3, 0.5, None)))

    det = fit_smlm.localise(model, photons, cfg, raw_th=0.5, batch_size=3)
    assert len(det["frame_ix"]) == len(xy)
    expected, replaced = refine_detections(det, photons, cfg)
    assert replaced.mean() > 0.8
    err = lambda d: np.abs(d["xyz_px"][:, :2] - xy).max(1)  # noqa: E731  (rows are in the truth's order)
    assert np.all(err(expected)[replaced] < err(det)[replaced] + 0.05) and err(expected).mean() < 0.1
    reference = tmp_path / "refined.csv"
    fit_smlm.write_localisations(expected, reference, "thunderstorm", cfg)
    for chunk in ("3", "512"):
        out = tmp_path / f"chunk{chunk}.csv"
        code, _, err_text = fit(capsys, "--checkpoint", "stand-in", "--frames", stack_path, "--out", out,
                                "--batch_size", "3", "--chunk_frames", chunk, "--device", "cpu", "--refine")
        assert code == 0, err_text
        assert out.read_bytes() == reference.read_bytes(), chunk

    # A spline-PSF run cannot be refitted (the fit knows the Gaussian PSFs): one line, exit 2, nothing written.
    from types import SimpleNamespace
    monkeypatch.setattr(fit_smlm, "load_fitter",
                        lambda *a, **k: (model, SimpleNamespace(psf="spline"), fit_smlm.FitSettings(3, 0.5, None)))
    out = tmp_path / "spline.csv"
    code, _, err_text = fit(capsys, "--checkpoint", "stand-in", "--frames", stack_path, "--out", out, "--refine")
    assert code == 2 and "--refine" in err_text and "spline" in err_text and len(err_text.strip().splitlines()) == 1
    assert not out.exists()

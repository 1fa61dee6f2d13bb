"""Real runs of train_smlm_colour.py through ``accelerate launch`` (1 and 2 processes), exact kill-and-resume
(also into the right curriculum stage), distillation from a teacher run, the loss-weight schedules and bad input.

16x16 frames, two 8-feature SigmaMUNets of depth 1/1 and a few updates: each run takes seconds.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import kill_after_checkpoint, read_csv, run_python, run_script
from data.smlm.colour import read_colour_h5
from train_smlm_colour import Args, loss_weights

VAL_FRAMES = 10
TINY = ["--cpu", "--samples_per_epoch", "16", "--batch_size", "4", "--val_frames", str(VAL_FRAMES),
        "--initial_features", "8", "--inter_features", "8", "--depth_shared", "1", "--depth_union", "1",
        "--num_workers", "0", "--log_every_steps", "2", "--report_to", "none"]
SIM = {"channel1": {"img_size": [16, 16], "emitter_av": 4.0, "intensity_mu": 5000.0, "intensity_sig": 1000.0,
                    "bg_uniform": [20.0, 40.0]},
       "channel2": {"sigma0_px": 1.2, "camera": "scmos", "em_gain": None, "qe": 0.8, "e_per_adu": 0.5,
                    "read_sigma": 1.6},
       "registration": {"shift_px": [0.4, -0.3]}}


@pytest.fixture
def preset(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 6, "eval_every_steps": 3, "simulation": SIM}))
    return path


def test_one_process_run_writes_layout_metrics_and_weights(tmp_path, preset):
    proc = run_script("train_smlm_colour.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path / "runs"),
                                               "--run_name", "one", "--raw_th", "0.005",
                                               "--w_ratio", "linear:0:1:0:4"])
    run = tmp_path / "runs" / "one"
    for name in ("args.yaml", "summary.csv", "train.log", "simulation.yaml", "val_movie.h5",
                 "best/model.safetensors", "final/model.safetensors", "final/model.json"):
        assert (run / name).is_file(), name
    movie, cfg, meta = read_colour_h5(run / "val_movie.h5", mode="val")
    assert movie.frames.shape == (2, VAL_FRAMES, 16, 16) and cfg.registration.shift_px == (0.4, -0.3)
    rows = read_csv(run / "summary.csv")
    assert [r["step"] for r in rows] == ["3", "6"]
    for key in ("val/jaccard", "val/rmse_lat", "val/effcy_lat", "val/ch1/jaccard", "val/ch2/rmse_lat",
                "val/ratio_rmse", "val/ratio_bias", "val/colour_accuracy", "val/crosstalk", "val/rejected",
                "val/crosstalk_0_1", "val/crosstalk_1_0"):
        assert key in rows[-1], key
    assert float(rows[-1]["val/frames"]) == VAL_FRAMES and float(rows[-1]["val/tp"]) > 0
    log = (run / "train.log").read_text()
    assert "curriculum: none" in log and "update 2  loss" in log
    for term in ("ch1", "ch2", "ratio", "conservation", "consistency"):
        assert f"loss/{term}" in log, term
    assert "final model (update 6" in proc.stdout and "val/colour_accuracy" in proc.stdout
    assert any(p.name.startswith("vis_frames_step") for p in (run / "figures").iterdir())


def test_two_processes_gather_the_whole_validation_movie(tmp_path, preset):
    run_script("train_smlm_colour.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path / "runs"),
                                        "--run_name", "two", "--max_steps", "2", "--eval_every_steps", "2",
                                        "--num_figures", "0"], nproc=2)
    run = tmp_path / "runs" / "two"
    assert "2 process(es) (MULTI_CPU)" in (run / "train.log").read_text()
    rows = read_csv(run / "summary.csv")
    assert [r["step"] for r in rows] == ["2"] and float(rows[0]["val/frames"]) == VAL_FRAMES


def test_kill_and_resume_lands_in_the_right_curriculum_stage(tmp_path):
    """4 updates per epoch; stage 0 for updates 0-3, stage 1 for 4-7, then the configuration. Killed after the
    update-6 checkpoint (in stage 1, mid-epoch) and resumed, the run ends with the weights of an uninterrupted
    one, which needs the stage's simulation to be the same after the restart."""
    sim = {**SIM, "curriculum": [{"until_step": 4, "emitter_av": 1.0}, {"until_step": 8, "emitter_av": 2.0,
                                                                          "bg_uniform": [10.0, 20.0]}]}
    preset = tmp_path / "cur.yaml"
    preset.write_text(yaml.safe_dump({"simulation": sim}))
    common = [*TINY, "--config", str(preset), "--max_steps", "10", "--save_every_steps", "2",
              "--eval_every_steps", "10", "--raw_th", "0.005", "--num_figures", "0"]
    run_script("train_smlm_colour.py", [*common, "--output_dir", str(tmp_path / "a"), "--run_name", "a"])
    a = tmp_path / "a" / "a"
    log = (a / "train.log").read_text()
    assert "curriculum stage 0 of 2 from update 0" in log and "curriculum stage 1 of 2 from update 4" in log
    assert "curriculum stage 2 of 2 from update 8" in log
    b = tmp_path / "b" / "b"
    kill_after_checkpoint("train_smlm_colour.py", [*common, "--output_dir", str(tmp_path / "b"), "--run_name", "b"],
                          1, b / "checkpoints" / "step_00000006" / "COMPLETE")
    assert not (b / "final").exists(), "the run finished before it was killed"
    run_script("train_smlm_colour.py", [*common, "--output_dir", str(tmp_path / "b"), "--run_name", "b",
                                        "--resume", "auto"])
    log = (b / "train.log").read_text()
    assert "resuming from" in log and "curriculum stage 1 of 2 from update 6" in log
    a_w, b_w = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)


def test_distillation_from_a_teacher_run(tmp_path, preset):
    run_script("train_smlm_colour.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path / "runs"),
                                        "--run_name", "teacher", "--max_steps", "2", "--num_figures", "0"])
    proc = run_script("train_smlm_colour.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path / "runs"),
                                               "--run_name", "student", "--max_steps", "2", "--num_figures", "0",
                                               "--initial_features", "4", "--inter_features", "4",
                                               "--shared_weights", "--teacher", str(tmp_path / "runs" / "teacher"),
                                               "--w_distill", "cosine:2:0.5:0:2"])
    log = (tmp_path / "runs" / "student" / "train.log").read_text()
    assert "(teacher 0." in log and "loss/distill" in log
    # A single-colour run is no teacher: one line, exit status 2.
    smlm = tmp_path / "smlm.yaml"
    smlm.write_text(yaml.safe_dump({"simulation": {"img_size": [16, 16], "emitter_av": 2.0}}))
    run_script("train_smlm.py", [*TINY, "--config", str(smlm), "--output_dir", str(tmp_path / "runs"),
                                 "--run_name", "single", "--max_steps", "1", "--num_figures", "0"])
    proc = run_python("train_smlm_colour.py", *TINY, "--config", str(preset), "--output_dir", str(tmp_path / "x"),
                      "--teacher", str(tmp_path / "runs" / "single"))
    assert proc.returncode == 2 and "--teacher" in proc.stderr and "DoubleMUNet" in proc.stderr
    proc = run_python("fit_smlm_colour.py", "--checkpoint", str(tmp_path / "runs" / "single"), "--frames", "x.tif",
                      "--out", str(tmp_path / "l.csv"))
    assert proc.returncode == 2 and "expected a two-colour run" in proc.stderr and "fit_smlm.py" in proc.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("model.safetensors"))


def test_loss_weights_are_pure_functions_of_the_update():
    args = Args(w_ratio="linear:0:1:0:100", w_conservation="exponential:1:0.01:0:100", w_ch2="cosine:1:0:50:150")
    assert loss_weights(args, 0)["ratio"] == 0 and loss_weights(args, 50)["ratio"] == pytest.approx(0.5)
    assert loss_weights(args, 500)["ratio"] == 1 and loss_weights(args, 50)["conservation"] == pytest.approx(0.1)
    assert loss_weights(args, 100)["ch2"] == pytest.approx(0.5) and loss_weights(args, 7)["ch1"] == 1
    assert loss_weights(args, 37) == loss_weights(args, 37)


@pytest.mark.parametrize("argv, message", [
    (["--w_ratio", "ramp:0:1"], "--w_ratio"),
    (["--min_confidence", "1.5"], "--min_confidence"),
])
def test_bad_flags_fail_with_one_line(tmp_path, preset, argv, message):
    proc = run_python("train_smlm_colour.py", *TINY, "--config", str(preset), "--output_dir", str(tmp_path / "r"), *argv)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_bad_simulation_and_a_curriculum_off_the_epoch_grid_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"simulation": {**SIM, "channel2": {"emitter_av": 3.0}}}))
    proc = run_python("train_smlm_colour.py", *TINY, "--config", str(bad), "--output_dir", str(tmp_path / "r"))
    assert proc.returncode == 2 and "channel2 must not set emitter_av" in proc.stderr
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({"simulation": {**SIM, "curriculum": [{"until_step": 3, "emitter_av": 1.0}]}}))
    proc = run_python("train_smlm_colour.py", *TINY, "--config", str(off), "--output_dir", str(tmp_path / "r"))
    assert proc.returncode == 2 and "until_step 3 is not a whole number of epochs of 4 updates" in proc.stderr
    on_grid = tmp_path / "grid.yaml"
    on_grid.write_text(yaml.safe_dump({"simulation": {**SIM, "curriculum": [{"until_step": 4, "emitter_av": 1.0}]}}))
    proc = run_python("train_smlm_colour.py", *TINY, "--config", str(on_grid), "--grad_accum", "3",
                      "--output_dir", str(tmp_path / "r"))
    assert proc.returncode == 2 and "whole number of updates of --grad_accum 3" in proc.stderr
    no_section = tmp_path / "flat.yaml"
    no_section.write_text(yaml.safe_dump({"max_steps": 3}))
    for sim_config, message in ((no_section, "expected a top-level 'simulation:' section"),
                                (tmp_path / "missing.yaml", "not found")):
        proc = run_python("train_smlm_colour.py", *TINY, "--sim_config", str(sim_config),
                          "--output_dir", str(tmp_path / "r"))
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory) -> Path:
    """A tiny trained two-colour run shared by the fitter tests."""
    root = tmp_path_factory.mktemp("colour_run")
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"simulation": SIM}))
    run_script("train_smlm_colour.py", [*TINY, "--config", str(preset), "--output_dir", str(root / "runs"),
                                        "--run_name", "fit", "--max_steps", "4", "--eval_every_steps", "4",
                                        "--raw_th", "0.005", "--num_figures", "0"])
    return root / "runs" / "fit"


def test_fit_smlm_colour_writes_csv_and_h5_from_one_or_two_stacks(tmp_path, colour_run, capsys):
    import h5py
    import numpy as np
    import tifffile

    from conftest import call_main
    from data.smlm.colour import read_colour_tiff, write_colour_tiff
    from fit_smlm_colour import (CSV_COLUMNS, adu_to_registered_photons, load_colour_fitter, localise_colour,
                                 main)
    model, cfg, settings = load_colour_fitter(colour_run)
    assert settings.raw_th == 0.005 and settings.min_confidence == 0.9
    tif, _, _ = write_colour_tiff(tmp_path / "stack.tif", cfg, 6, seed=3)
    code, out, err = call_main(capsys, main, "--checkpoint", str(colour_run), "--frames", str(tif),
                               "--out", str(tmp_path / "locs.csv"), "--device", "cpu")
    assert code == 0, err
    header = (tmp_path / "locs.csv").read_text().splitlines()[0]
    assert header == ",".join(f'"{c}"' for c in CSV_COLUMNS)
    table = np.loadtxt(tmp_path / "locs.csv", delimiter=",", skiprows=1, ndmin=2)
    det = localise_colour(model, adu_to_registered_photons(read_colour_tiff(tif), cfg, cfg.registration), cfg,
                          settings.window, 0.005, min_confidence=0.9)["merged"]
    assert len(table) == len(det["frame_ix"]) > 0 and f"{len(table)} localisations from 6 frames" in out
    np.testing.assert_allclose(table[:, 9], det["ratio"], atol=1e-4)           # ratio
    assert set(table[:, 13].astype(int)) <= {1, 2, 3}                          # channels
    np.testing.assert_allclose(table[:, 5], table[:, 7] + table[:, 8], rtol=1e-3, atol=0.01)
    # Two single-channel stacks and the h5 format give the same localisations.
    stack = tifffile.imread(tif)
    tifffile.imwrite(tmp_path / "c1.tif", stack[:, 0], photometric="minisblack")
    tifffile.imwrite(tmp_path / "c2.tif", stack[:, 1], photometric="minisblack")
    code, _, err = call_main(capsys, main, "--checkpoint", str(colour_run), "--frames", str(tmp_path / "c1.tif"),
                             "--frames2", str(tmp_path / "c2.tif"), "--out", str(tmp_path / "locs.h5"),
                             "--device", "cpu")
    assert code == 0, err
    with h5py.File(tmp_path / "locs.h5") as f:
        np.testing.assert_allclose(f["colour/ratio"][()], det["ratio"], rtol=1e-5)
        np.testing.assert_array_equal(f["colour/dye"][()], det["dye"])
        assert f["data/xyz"].shape == (len(table), 3) and f["meta"].attrs["xy_unit"] == "nm"
    # Another registration calibration moves channel 2 onto other pixels: other localisations.
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"registration": {"shift_px": [-2.0, 1.5]}}))
    code, _, err = call_main(capsys, main, "--checkpoint", str(colour_run), "--frames", str(tif),
                             "--out", str(tmp_path / "shifted.csv"), "--device", "cpu", "--registration", str(reg))
    assert code == 0, err
    assert (tmp_path / "shifted.csv").read_text() != (tmp_path / "locs.csv").read_text()


def test_fit_smlm_colour_bad_input_one_line(tmp_path, colour_run, capsys):
    import numpy as np
    import tifffile

    from conftest import call_main
    from fit_smlm_colour import main
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((4, 16, 16), np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "odd.tif", np.zeros((4, 2, 15, 16), np.uint16), photometric="minisblack")
    (tmp_path / "bad_reg.yaml").write_text("registration: {scale: 9}\n")
    (tmp_path / "exists.csv").write_text("keep me")
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((4, 2, 16, 16), np.uint16), photometric="minisblack")
    cases = [
        (["--frames", str(tmp_path / "missing.tif")], "not found"),
        (["--frames", str(tmp_path / "one.tif")], "channel axis of length 2"),
        (["--frames", str(tmp_path / "odd.tif")], "multiple of 2 px"),
        (["--frames", str(tmp_path / "ok.tif"), "--registration", str(tmp_path / "bad_reg.yaml")], "scale"),
        (["--frames", str(tmp_path / "ok.tif"), "--min_confidence", "2"], "--min_confidence"),
        (["--frames", str(tmp_path / "ok.tif"), "--out", str(tmp_path / "exists.csv")], "exists"),
    ]
    for argv, message in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "locs.csv")]
        code, _, err = call_main(capsys, main, "--checkpoint", str(colour_run), "--device", "cpu", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
        assert not (tmp_path / "locs.csv").exists()
    assert (tmp_path / "exists.csv").read_text() == "keep me"


def test_colour_benchmark_scores_runs_and_the_classical_route(tmp_path, colour_run):
    import json

    proc = run_python(str(Path("benchmarks") / "smlm_colour.py"), "--checkpoints", str(colour_run), str(colour_run),
                      "--densities", "0.5,2", "--frames", "8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "smlm_colour.json").read_text())["tables"][0]["rows"]
    assert [(r["density"], r["method"]) for r in rows] == [(0.5, "fit"), (0.5, "fit"), (0.5, "classical"),
                                                          (2.0, "fit"), (2.0, "fit"), (2.0, "classical")]
    assert rows[0]["jaccard"] == rows[1]["jaccard"] and rows[0]["params"] > 0 and rows[2]["params"] == 0
    classical = rows[2]
    assert classical["jaccard"] > 0.5 and 0 <= classical["crosstalk"] <= 1   # the fitter finds emitters
    assert sorted(p.name for p in (tmp_path / "smlm_colour_movies").iterdir()) == [
        "smlm_colour_test_16x16_T8_d0.5_seed7.h5", "smlm_colour_test_16x16_T8_d2_seed7.h5"]


def test_no_curriculum_flag_trains_on_the_final_stage(tmp_path):
    from train_smlm_colour import parse_colour_args
    preset = tmp_path / "cur.yaml"
    preset.write_text(yaml.safe_dump({"simulation": {**SIM, "curriculum": [{"until_step": 4, "emitter_av": 1.0}]}}))
    epoch = ["--samples_per_epoch", "32", "--batch_size", "8"]   # 4 updates per epoch: the stage ends on an epoch
    _, with_stages = parse_colour_args(["--config", str(preset), *epoch])
    args, without = parse_colour_args(["--config", str(preset), *epoch, "--no-curriculum"])
    assert len(with_stages.curriculum) == 1 and without.curriculum == () and not args.curriculum
    assert without.stage_at(0) == 0 and without.stage_config(0) == without
    assert without.channel1.emitter_av == with_stages.channel1.emitter_av == 4.0


@pytest.mark.parametrize("name", ["smlm_colour_quick.yaml", "smlm_colour_cpu.yaml", "smlm_colour_full.yaml"])
def test_presets_parse_both_parts(name):
    # Both parts of the preset load; the deliberately impossible depth then fails on the preset's frame size.
    proc = run_python("train_smlm_colour.py", "--config", f"configs/{name}", "--depth_shared", "9")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "multiple" in proc.stderr, proc.stderr

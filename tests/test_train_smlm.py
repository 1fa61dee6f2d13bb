"""Real runs of train_smlm.py through ``accelerate launch`` (1 and 2 processes) and its input checks.

16x16 frames, an 8-feature SigmaMUNet of depth 1/1 and a few updates: each run takes seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import kill_after_checkpoint, read_csv, run_python, run_script
from data.smlm import SimConfig, read_movie_h5
from models.sigma_munet import MU_CH, P_CH
from train_smlm import RAW_TH_GRID, Args, evaluate

VAL_FRAMES = 10
TINY = ["--cpu", "--samples_per_epoch", "16", "--batch_size", "4", "--val_frames", str(VAL_FRAMES),
        "--initial_features", "8", "--inter_features", "8", "--depth_shared", "1", "--depth_union", "1",
        "--num_workers", "0", "--log_every_steps", "2", "--report_to", "none"]
SIM = {"img_size": [16, 16], "emitter_av": 4.0}




@pytest.fixture
def preset(tmp_path) -> Path:
    """One file with flat training flags and a simulation: section, as configs/smlm_*.yaml."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 6, "eval_every_steps": 3, "simulation": SIM}))
    return path


def test_one_process_run_writes_layout_metrics_and_figures(tmp_path, preset):
    # raw_th just above the initial p (sigmoid(-6) = 0.0025 per pixel, ~0.012 integrated) so there are detections.
    proc = run_script("train_smlm.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path / "runs"),
                                        "--run_name", "one", "--raw_th", "0.005"])
    run = tmp_path / "runs" / "one"
    for name in ("args.yaml", "summary.csv", "train.log", "simulation.yaml", "val_movie.h5",
                 "best/model.safetensors", "best/metrics.json", "final/model.safetensors", "final/args.yaml"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["config"] == str(preset) and args["max_steps"] == 6 and args["clip_grad"] == 0.03
    assert yaml.safe_load((run / "simulation.yaml").read_text())["simulation"]["img_size"] == [16, 16]
    movie, cfg, meta = read_movie_h5(run / "val_movie.h5")
    assert movie.frames.shape == (VAL_FRAMES, 16, 16) and cfg.img_size == (16, 16)
    rows = read_csv(run / "summary.csv")
    assert [r["step"] for r in rows] == ["3", "6"]  # 16 windows / 4 = 4 updates per epoch, eval every 3
    for key in ("val/jaccard", "val/recall", "val/precision", "val/rmse_lat", "val/rmse_ax", "val/effcy_lat",
                "val/effcy_ax", "val/rmse_over_crlb", "val/crlb_lat"):
        assert key in rows[-1], key
    assert float(rows[-1]["val/frames"]) == VAL_FRAMES
    if float(rows[-1]["val/tp"]) > 0:  # the bound of the matched emitters, nm
        assert 0 < float(rows[-1]["val/crlb_lat"]) < 500
        assert float(rows[-1]["val/rmse_over_crlb"]) == pytest.approx(
            float(rows[-1]["val/rmse_lat"]) / float(rows[-1]["val/crlb_lat"]), rel=1e-3)
    assert float(rows[-1]["val/tp"]) + float(rows[-1]["val/fn"]) > 0
    figures = sorted(p.name for p in (run / "figures").iterdir())
    assert "vis_frames_step00000006.png" in figures and "vis_residuals_step00000006.png" in figures
    assert "final model (update 6" in proc.stdout and "val/jaccard" in proc.stdout
    log = (run / "train.log").read_text()
    assert "update 2  loss" in log and "lr 6.00e-04" in log
    for name in ("model.json", "simulation.yaml", "args.yaml"):  # an export is self-contained
        assert (run / "best" / name).is_file(), name

    # --init_from: the new run's first evaluation (update 0) scores the export's weights exactly.
    proc = run_script("train_smlm.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path / "runs"),
                                        "--run_name", "ft", "--raw_th", "0.005", "--max_steps", "1",
                                        "--init_from", str(run / "best")])
    first = read_csv(tmp_path / "runs" / "ft" / "summary.csv")[0]
    export = json.loads((run / "best" / "metrics.json").read_text())
    assert first["step"] == "0"
    for key in ("val/jaccard", "val/tp", "val/fp", "val/rmse_lat", "val/effcy_lat"):
        assert float(first[key]) == pytest.approx(export[key], rel=1e-6, nan_ok=True), key


def test_two_process_run_gathers_the_whole_validation_movie(tmp_path, preset):
    """Also the --sim_config data option: its simulation: section replaces the preset's."""
    microscope = tmp_path / "microscope.yaml"
    microscope.write_text(yaml.safe_dump({"simulation": {**SIM, "emitter_av": 3.0}}))
    run_script("train_smlm.py", [*TINY, "--config", str(preset), "--sim_config", str(microscope),
                                 "--output_dir", str(tmp_path / "runs"), "--run_name", "two", "--max_steps", "2",
                                 "--eval_every_steps", "2"], nproc=2)
    run = tmp_path / "runs" / "two"
    assert yaml.safe_load((run / "simulation.yaml").read_text())["simulation"]["emitter_av"] == 3.0
    assert "2 process(es) (MULTI_CPU)" in (run / "train.log").read_text()
    rows = read_csv(run / "summary.csv")
    # 10 frames over 2 ranks in batches of 4: the padded duplicates must be dropped, every frame counted once.
    assert [r["step"] for r in rows] == ["2"] and float(rows[0]["val/frames"]) == VAL_FRAMES
    assert float(rows[0]["val/raw_th"]) in RAW_TH_GRID  # no --raw_th: chosen on the validation movie
    assert (run / "final" / "model.safetensors").is_file()


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, preset):
    """Killed right after its update-2 checkpoint (mid-epoch: 4 updates per epoch) and resumed, a run ends with
    the weights of an uninterrupted one: the simulated windows, sampler and RNG states are restored exactly."""
    common = [*TINY, "--config", str(preset), "--max_steps", "7", "--save_every_steps", "2", "--eval_every_steps", "7",
              "--raw_th", "0.005", "--num_figures", "0"]
    run_script("train_smlm.py", [*common, "--output_dir", str(tmp_path / "a"), "--run_name", "a"])
    b = tmp_path / "b" / "b"
    kill_after_checkpoint("train_smlm.py", [*common, "--output_dir", str(tmp_path / "b"), "--run_name", "b"], 1,
                          b / "checkpoints" / "step_00000002" / "COMPLETE")
    assert not (b / "final").exists(), "the run finished before it was killed"
    run_script("train_smlm.py", [*common, "--output_dir", str(tmp_path / "b"), "--run_name", "b", "--resume", "auto"])
    assert "resuming from" in (b / "train.log").read_text()
    a_w, b_w = load_file(tmp_path / "a" / "a" / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert a_w.keys() == b_w.keys()
    assert all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    a_row, b_row = read_csv(tmp_path / "a" / "a" / "summary.csv")[-1], read_csv(b / "summary.csv")[-1]
    assert a_row["step"] == b_row["step"] == "7"
    assert float(a_row["val/jaccard"]) == pytest.approx(float(b_row["val/jaccard"]), rel=1e-6)


@pytest.mark.parametrize("simulation, key", [({**SIM, "em_gain": -1}, "em_gain"),
                                             ({**SIM, "em_gian": 300.0}, "em_gian")])
def test_bad_simulation_config_exits_2_without_a_run(tmp_path, simulation, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"max_steps": 2, "simulation": simulation}))
    out = tmp_path / "runs"
    for flag in ("--config", "--sim_config"):
        proc = run_python("train_smlm.py", *TINY, flag, str(bad), "--output_dir", str(out))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and key in proc.stderr and "bad.yaml" in proc.stderr
    assert not out.exists()


def test_unknown_training_key_next_to_simulation_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"max_stepz": 2, "simulation": SIM}))
    proc = run_python("train_smlm.py", *TINY, "--config", str(bad), "--output_dir", str(tmp_path / "runs"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "max_stepz" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_non_finite_loss_stops_with_exit_1(tmp_path, preset):
    proc = run_script("train_smlm.py", [*TINY, "--config", str(preset), "--output_dir", str(tmp_path),
                                        "--max_steps", "4", "--lr", "1e30", "--clip_grad", "1e30",
                                        "--run_name", "nan"], check=False)
    assert proc.returncode != 0
    assert "non-finite loss at update" in (tmp_path / "nan" / "train.log").read_text()


@pytest.mark.parametrize("name", ["smlm_quick.yaml", "smlm_full.yaml"])
def test_presets_parse_both_parts(name):
    # Both parts of the preset load; the deliberately impossible depth then fails on the preset's frame size.
    proc = run_python("train_smlm.py", "--config", f"configs/{name}", "--depth_shared", "9")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "multiple" in proc.stderr, proc.stderr


def test_evaluate_picks_the_detection_threshold_with_the_best_selection_metric():
    """One true emitter at p 0.25 and a false one at p 0.12, far apart: thresholds up to 0.1 keep both
    (Jaccard 1/2), 0.15 and 0.2 only the true one (Jaccard 1), higher ones nothing; the lowest best wins."""
    cfg = SimConfig(img_size=(8, 8))
    output = torch.zeros(1, 10, 8, 8)
    output[0, P_CH, 3, 4], output[0, P_CH, 6, 0] = 0.25, 0.12
    output[0, MU_CH.start] = 0.3                                            # photons / phot_max
    gt = {"xyz_nm": np.array([[400.0, 300.0, 0.0]]), "frame_ix": np.array([0]), "crlb_lat_nm": np.array([5.0])}
    for select in ("jaccard", "effcy_lat"):
        metrics, det = evaluate(np.array([0]), output, gt, cfg, Args(select_metric=select))
        assert metrics["val/raw_th"] == 0.15 and metrics["val/jaccard"] == 1.0 and len(det["frame_ix"]) == 1
    metrics, _ = evaluate(np.array([0]), output, gt, cfg, Args(raw_th=0.1))
    assert metrics["val/raw_th"] == 0.1 and metrics["val/jaccard"] == 0.5
    metrics, _ = evaluate(np.array([0]), output, gt, cfg, Args(raw_th=0.5))
    assert metrics["val/tp"] == 0 and np.isnan(metrics["val/effcy_lat"])

"""Real runs of train_captcha.py / predict_captcha.py through ``accelerate launch`` on the CPU.

Tiny settings (small heads, batch 2, a handful of updates) keep each run to seconds; the
2-process runs use gloo (accelerate_configs/cpu_ddp2.yaml + ACCELERATE_USE_CPU=1).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, kill_after_checkpoint, read_csv, run_script
from training.checkpoint import read_registered

TINY = ["--cpu", "--batch_size", "2", "--train_size", "24", "--val_size", "5", "--num_workers", "0",
        "--fpn_channels", "16", "--head_channels", "16", "--log_every_steps", "1", "--warmup_steps", "2",
        "--restart_steps", "4", "--num_figures", "2", "--report_to", "none"]


def tiny(out: Path, *extra: str) -> list[str]:
    return [*TINY, "--output_dir", str(out), *extra]


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def backgrounds_folder(root: Path) -> Path:
    """A --backgrounds folder with one small solid-colour image."""
    root.mkdir(parents=True)
    cv2.imwrite(str(root / "wall.png"), np.full((48, 64, 3), (30, 90, 200), np.uint8))
    return root


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    backgrounds = backgrounds_folder(tmp_path_factory.mktemp("bg") / "photos")
    proc = run_script("train_captcha.py", tiny(out, "--max_steps", "4", "--eval_every_steps", "2",
                                               "--save_every_steps", "2", "--report_to", "wandb",
                                               "--render", "train", "--backgrounds", str(backgrounds)))
    return out, proc


def test_one_process_run_layout_and_wandb_offline(one_process_run):
    out, proc = one_process_run
    run = only_run(out)
    assert "1 process(es)" in (run / "train.log").read_text()
    for name in ("args.yaml", "env.yaml", "summary.csv", "train.log", "best/model.safetensors",
                 "best/model_ema.safetensors", "best/metrics.json", "best/args.yaml", "best/model.json",
                 "final/model.safetensors", "checkpoints/step_00000004/COMPLETE"):
        assert (run / name).exists(), name
    # The export rebuilds its own model, from a run, an export or a checkpoint, without train_captcha.py.
    from training.export import load_export
    for path, weights in ((run, "best/model_ema.safetensors"), (run / "final", "final/model_ema.safetensors"),
                          (run / "checkpoints" / "step_00000004", "checkpoints/step_00000004/model.safetensors")):
        export = load_export(path)
        assert export.weights == run / weights and export.args["fpn_channels"] == 16
        assert sum(p.numel() for p in export.model.parameters()) > 100_000
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4"] and "val_ema/hit_le_5px" in rows[0]
    # the held-out rendering set (--heldout_size defaults to --val_size) beside the validation set
    assert float(rows[0]["val_heldout/num_samples"]) == 5 and "val_heldout_ema/hit_le_5px" in rows[0]
    assert "val_heldout_ema/hit_le_5px" in json.loads((run / "best" / "metrics.json").read_text())
    assert "backgrounds: 1 images from" in (run / "train.log").read_text()
    assert len(list((run / "figures").glob("vis_overlay_step*.png"))) == 2
    assert "validation after 4 updates" in proc.stdout and str(run) in proc.stdout
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    blob = b"".join(p.read_bytes() for p in offline[0].glob("*.wandb"))
    assert b"val_ema/hit_le_5px" in blob and b"train/loss" in blob and b"fpn_channels" in blob


def test_two_process_run_gathers_metrics(tmp_path):
    proc = run_script("train_captcha.py", tiny(tmp_path, "--max_steps", "2", "--eval_every_steps", "2",
                                                "--save_every_steps", "2", "--report_to", "tensorboard"), nproc=2)
    run = only_run(tmp_path)
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "tensorboard tracker wrote nothing"
    assert len(list((run / "checkpoints" / "step_00000002").glob("random_states_*.pkl"))) == 2
    log = (run / "train.log").read_text()
    assert "2 process(es) (MULTI_CPU)" in log, log
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert metrics["val/num_samples"] == 5  # 5 samples over 2 ranks: padding removed by gather_for_metrics
    assert metrics["val_heldout/num_samples"] == 5
    assert proc.stdout.count("validation after 2 updates") == 1


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, nproc):
    # 24 samples / batch 2 = 12 batches per epoch on 1 process, 6 per rank on 2: the kill lands
    # mid-epoch and the run crosses an epoch boundary after resuming.
    # progressive resizing until update 6: the kill lands in the half-canvas phase, the resumed run leaves it
    common = ["--max_steps", "14", "--eval_every_steps", "5", "--save_every_steps", "4", "--keep_last", "1",
              "--small_canvas_steps", "6"]
    run_script("train_captcha.py", tiny(tmp_path / "a", *common, "--run_name", "a"), nproc=nproc)
    assert "progressive resizing: updates 1-6 on the canvas halved (256x128)" in (
        tmp_path / "a" / "a" / "train.log").read_text()
    b = tmp_path / "b" / "b"
    kill_after_checkpoint("train_captcha.py", tiny(tmp_path / "b", *common, "--run_name", "b"), nproc,
                           b / "checkpoints" / "step_00000004" / "COMPLETE")
    assert not (b / "final").exists(), "the run finished before it was killed"
    run_script("train_captcha.py", tiny(tmp_path / "b", *common, "--run_name", "b", "--resume", "auto"), nproc=nproc)
    assert "resuming from" in (b / "train.log").read_text()
    for name in ("model.safetensors", "model_ema.safetensors"):
        a_w, b_w = load_file(tmp_path / "a" / "a" / "final" / name), load_file(b / "final" / name)
        assert a_w.keys() == b_w.keys()
        for key in a_w:
            assert torch.equal(a_w[key], b_w[key]), f"{name}:{key} differs after resume"
    a_rows = list(csv.DictReader((tmp_path / "a" / "a" / "summary.csv").open()))
    b_rows = list(csv.DictReader((b / "summary.csv").open()))
    # Same weights; the evaluation itself may differ in the last float32 bits (oneDNN kernel choice). Only the
    # raw model's metrics are compared: the EMA's lerp runs vectorised or not depending on how its buffers are
    # aligned in memory, so mid-run EMA weights can differ by an ulp between two launches (they converge again,
    # as the equal final weights show), and in this barely trained model an ulp can flip a tie between two
    # cells of a flat heatmap (seen: val_ema/* differing in the 9th digit at update 5, before any kill, and by
    # 0.2 px of val_ema/mae_px at update 14).
    assert a_rows[-1].keys() == b_rows[-1].keys()
    for key, value in a_rows[-1].items():
        if not key.startswith(("val_ema/", "val_heldout_ema/")):
            assert float(b_rows[-1][key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("captcha_*.yaml")))
def test_presets_parse(preset):
    """Every key of each CAPTCHA preset is a known flag with a valid value, and the settings pass Args' checks."""
    from train_captcha import Args
    from training import parse_args

    args = parse_args(Args, ["--config", str(ROOT / "configs" / preset)])
    assert args.max_steps >= 1 and args.config.endswith(preset)


def test_model_json_names_input_scale_only_when_it_is_not_1():
    """Runs made before --input_scale existed have no such key in model.json; resuming compares model.json
    exactly, so the default must not add it."""
    import train_captcha

    assert "input_scale" not in train_captcha.model_kwargs(train_captcha.Args())
    assert train_captcha.model_kwargs(train_captcha.Args(input_scale=2))["input_scale"] == 2


def test_input_scale_trains_and_evaluates_at_stride_8(tmp_path):
    """--input_scale 2: the model records it in model.json, runs on the half canvas (heads at stride 8 of the
    full canvas) and is evaluated in full-canvas px."""
    run_script("train_captcha.py", tiny(tmp_path, "--max_steps", "2", "--eval_every_steps", "2", "--run_name", "h",
                                        "--input_scale", "2", "--num_figures", "1", "--heldout_size", "0"))
    from data.captcha import SyntheticCaptchaDataset
    from metrics.captcha import captcha_metrics, predict_points
    from training.export import build_model

    final = tmp_path / "h" / "final"
    record = json.loads((final / "model.json").read_text())
    assert record["kwargs"]["input_scale"] == 2
    model = build_model(record).eval()
    model.load_state_dict(load_file(final / "model.safetensors"))   # the raw weights that val/* scored
    val = [SyntheticCaptchaDataset(5, seed=1_000_003, fresh_each_epoch=False)[i] for i in range(5)]
    image = torch.stack([v["image"] for v in val])
    with torch.no_grad():
        assert model(image)["gap"].shape == (5, 1, 32, 64)
        points, _ = predict_points(model, image)
    true = torch.stack([torch.stack([v["gap"], v["slider"]]) for v in val])
    expected = captcha_metrics(points.numpy(), true.numpy())
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["val/num_samples"] == 5
    for key in ("mae_px", "hit_le_5px", "gap_mae"):
        assert metrics[f"val/{key}"] == pytest.approx(expected[key], rel=1e-4, abs=1e-3), key


def _first_moment(checkpoint: Path) -> list[torch.Tensor]:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True, map_location="cpu")
    return [s["exp_avg"] for _, s in sorted(state["state"].items())]


def test_grad_accum_equals_large_batch(tmp_path):
    # BatchNorm statistics depend on the micro-batch, so BN is frozen for this comparison.
    common = ["--max_steps", "1", "--save_every_steps", "1", "--eval_every_steps", "1", "--freeze_bn",
              "--ema_decay", "0", "--num_figures", "0"]
    run_script("train_captcha.py", tiny(tmp_path / "big", *common, "--batch_size", "4", "--run_name", "r"))
    run_script("train_captcha.py", tiny(tmp_path / "acc", *common, "--batch_size", "1", "--grad_accum", "4",
                                        "--run_name", "r"))
    # After one AdamW update exp_avg = (1 - beta1) * clipped gradient: compare the gradients themselves.
    big = _first_moment(tmp_path / "big" / "r" / "checkpoints" / "step_00000001")
    acc = _first_moment(tmp_path / "acc" / "r" / "checkpoints" / "step_00000001")
    assert len(big) == len(acc) > 100
    for g_big, g_acc in zip(big, acc):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-9)


def test_scheduler_steps_once_per_update_two_processes(tmp_path):
    run_script("train_captcha.py", tiny(tmp_path, "--max_steps", "3", "--grad_accum", "2", "--save_every_steps", "3",
                                        "--eval_every_steps", "3", "--run_name", "r"), nproc=2)
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000003"
    scheduler, state = (record["state"] for record in read_registered(ckpt)[:2])
    assert scheduler["last_epoch"] == 3
    assert state["global_step"] == 3 and state["step_in_epoch"] == 6  # 3 updates x 2 micro-batches per rank
    lrs = [float(r["train/lr"]) for r in csv.DictReader((tmp_path / "r" / "summary.csv").open())]
    # warm-up of 2 updates from lr * 1e-3, then the first cosine cycle of 4 updates, 1 update in
    expected = 3e-6 + (3e-4 - 3e-6) * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()) / 2
    assert lrs[-1] == pytest.approx(expected, rel=1e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    proc = run_script("train_captcha.py", tiny(tmp_path, "--lr", "1e30", "--warmup_steps", "0", "--max_steps", "20",
                                                "--save_every_steps", "1", "--eval_every_steps", "100",
                                                "--run_name", "r"), check=False)
    assert proc.returncode == 1
    assert "non-finite loss at update" in proc.stdout + proc.stderr
    run = tmp_path / "r"
    assert not (run / "final").exists()
    complete = [p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert complete, "the last good checkpoint must be kept"


@pytest.mark.parametrize("extra, message", [
    (["--config", "BADCONFIG"], "unknown key(s) learning_rate; valid keys: config, output_dir"),
    (["--batch_size", "two"], "--batch_size: expected int, got 'two'"),
    (["--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt: no such checkpoint or run directory"),
    (["--train_dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--init_from", "/nonexistent/run"], "--init_from /nonexistent/run: no such run"),
    (["--clip_grad", "0"], "--clip_grad must be > 0"),
    (["--small_canvas_steps", "-1"], "--small_canvas_steps must be >= 0"),
    (["--small_canvas_steps", "3", "--input_scale", "2"], "--small_canvas_steps halves the canvas of a full-size"),
    (["--input_scale", "3"], "--input_scale: expected one of 1, 2, 4"),
    (["--init_from", "RUN", "--fpn_channels", "32"], "weights do not fit the model: 42 tensors of another shape"),
    (["--backgrounds", "/nonexistent/photos"], "--backgrounds /nonexistent/photos: no such folder; expected a folder"),
    (["--backgrounds", "BADBG"], "broken.jpg: not a decodable image"),
    (["--heldout_seed", "1000003"], "--heldout_seed 1000003 must differ from --seed and --val_seed"),
    (["--render", "heldout"], "--render: expected one of default, train"),
    (["--render", "train", "--train_dir", "/any/folder"], "--render train renders the synthetic training data"),
])
def test_bad_input_one_line_exit_2_and_runs_untouched(one_process_run, tmp_path, extra, message):
    out, _ = one_process_run
    before = snapshot(out)
    if "BADCONFIG" in extra:
        bad = tmp_path / "bad.yaml"
        bad.write_text("learning_rate: 0.1\n")
        extra = ["--config", str(bad)]
    if "BADBG" in extra:
        folder = backgrounds_folder(tmp_path / "bg")
        (folder / "broken.jpg").write_bytes(b"not a jpeg")
        extra = ["--backgrounds", str(folder)]
    extra = [str(only_run(out)) if e == "RUN" else e for e in extra]
    # Plain python: `accelerate launch` adds its own traceback and exit status 1 around the script's.
    proc = subprocess.run([os.sys.executable, str(ROOT / "train_captcha.py"), *tiny(out, *extra)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_captcha.py: error: ") and message in lines[0], lines
    assert snapshot(out) == before


def test_predict_on_exported_folder(one_process_run, tmp_path):
    out, _ = one_process_run
    from data.captcha import export
    export(tmp_path / "imgs", n=3, seed=7)
    preds = tmp_path / "preds.csv"
    cmd = [os.sys.executable, str(ROOT / "predict_captcha.py"), "--checkpoint", str(only_run(out)),
           "--images", str(tmp_path / "imgs"), "--out", str(preds), "--batch_size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "latency per image" in proc.stdout
    assert f"weights: {only_run(out) / 'best' / 'model_ema.safetensors'}" in proc.stdout
    rows = list(csv.DictReader(preds.open()))
    labels = list(csv.DictReader((tmp_path / "imgs" / "labels.csv").open()))
    assert [r["filename"] for r in rows] == sorted(r["filename"] for r in labels)
    assert list(rows[0]) == ["filename", "gap_x", "gap_y", "slider_x", "slider_y", "gap_score", "slider_score",
                             "gap_piece"]
    for r in rows:
        assert 0 <= float(r["gap_score"]) <= 1 and r["gap_piece"] in ("ring", "box", "none")
    bad = subprocess.run([*cmd[:3], str(tmp_path / "missing"), *cmd[4:]], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "missing: no such run, export or checkpoint directory" in bad.stderr


def test_refuses_multi_process_launch_that_accelerate_sees_as_one(tmp_path):
    """WORLD_SIZE=2 without the CPU flag: every process would train alone as rank 0 (accelerate #2741)."""
    args = [a for a in tiny(tmp_path) if a != "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([os.sys.executable, str(ROOT / "train_captcha.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "WORLD_SIZE=2 but Accelerate sees 1 process" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_init_from_an_export_starts_at_its_metrics(one_process_run, tmp_path):
    """--init_from: the first evaluation (update 0) of the new run scores the export's weights exactly."""
    out, _ = one_process_run
    source = only_run(out)
    proc = run_script("train_captcha.py", tiny(tmp_path, "--max_steps", "1", "--run_name", "ft", "--num_figures", "0",
                                               "--init_from", str(source)))
    assert f"initial weights from {source / 'best' / 'model_ema.safetensors'}" in proc.stdout
    first = read_csv(tmp_path / "ft" / "summary.csv")[0]
    export = json.loads((source / "best" / "metrics.json").read_text())
    assert first["step"] == "0"
    for key in ("mae_px", "hit_le_5px", "gap_mae", "slider_mae"):  # best/ was selected on the EMA weights
        assert float(first[f"val/{key}"]) == pytest.approx(export[f"val_ema/{key}"], rel=1e-6), key
        assert float(first[f"val_ema/{key}"]) == pytest.approx(export[f"val_ema/{key}"], rel=1e-6), key
    assert (tmp_path / "ft" / "final" / "model.json").read_text() == (source / "model.json").read_text()


def test_train_and_validate_on_exported_folders(tmp_path):
    """--train_dir / --val_dir with folders made by `python -m data.captcha export` (labels.csv + PNGs)."""
    from data.captcha import export
    export(tmp_path / "train", n=6, seed=1)
    export(tmp_path / "val", n=3, seed=2)
    run_script("train_captcha.py", tiny(tmp_path / "runs", "--max_steps", "3", "--eval_every_steps", "3",
                                        "--run_name", "own", "--train_dir", str(tmp_path / "train"),
                                        "--val_dir", str(tmp_path / "val")))
    rows = read_csv(tmp_path / "runs" / "own" / "summary.csv")
    assert [r["step"] for r in rows] == ["3"] and float(rows[0]["val/num_samples"]) == 3
    # with your own validation folder the synthetic held-out set is off unless --heldout_size asks for it
    assert not any(key.startswith("val_heldout") for key in rows[0])
    assert (tmp_path / "runs" / "own" / "final" / "model.safetensors").is_file()

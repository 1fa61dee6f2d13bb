"""Real runs of train_captcha.py / predict_captcha.py through ``accelerate launch`` on the CPU.

Tiny settings (small heads, batch 2, a handful of updates) keep each run to seconds; the
2-process runs use gloo (accelerate_configs/cpu_ddp2.yaml + ACCELERATE_USE_CPU=1).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_cmd, run_script

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


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    proc = run_script("train_captcha.py", tiny(out, "--max_steps", "4", "--eval_every_steps", "2",
                                               "--save_every_steps", "2", "--report_to", "wandb"))
    return out, proc


def test_one_process_run_layout_and_wandb_offline(one_process_run):
    out, proc = one_process_run
    run = only_run(out)
    assert "1 process(es)" in (run / "train.log").read_text()
    for name in ("args.yaml", "env.yaml", "summary.csv", "train.log", "best/model.safetensors",
                 "best/model_ema.safetensors", "best/metrics.json", "best/args.yaml", "final/model.safetensors",
                 "checkpoints/step_00000004/COMPLETE"):
        assert (run / name).exists(), name
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4"] and "val_ema/hit_le_5px" in rows[0]
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
    assert proc.stdout.count("validation after 2 updates") == 1


def _kill_after_checkpoint(args: list[str], nproc: int, marker: Path, timeout: float = 300) -> None:
    cmd, env = launch_cmd("train_captcha.py", args, nproc)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    start = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {marker} appeared: {proc.stderr.read().decode()[-3000:]}")
        if time.time() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the checkpoint")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, nproc):
    # 24 samples / batch 2 = 12 batches per epoch on 1 process, 6 per rank on 2: the kill lands
    # mid-epoch and the run crosses an epoch boundary after resuming.
    common = ["--max_steps", "14", "--eval_every_steps", "5", "--save_every_steps", "4", "--keep_last", "1"]
    run_script("train_captcha.py", tiny(tmp_path / "a", *common, "--run_name", "a"), nproc=nproc)
    b = tmp_path / "b" / "b"
    _kill_after_checkpoint(tiny(tmp_path / "b", *common, "--run_name", "b"), nproc,
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
    # Same weights; the evaluation itself may differ in the last float32 bits (oneDNN kernel choice).
    assert a_rows[-1].keys() == b_rows[-1].keys()
    for key, value in a_rows[-1].items():
        assert float(b_rows[-1][key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), key


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
    scheduler = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)
    state = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=True)
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
])
def test_bad_input_one_line_exit_2_and_runs_untouched(one_process_run, tmp_path, extra, message):
    out, _ = one_process_run
    before = snapshot(out)
    if "BADCONFIG" in extra:
        bad = tmp_path / "bad.yaml"
        bad.write_text("learning_rate: 0.1\n")
        extra = ["--config", str(bad)]
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
    rows = list(csv.DictReader(preds.open()))
    labels = list(csv.DictReader((tmp_path / "imgs" / "labels.csv").open()))
    assert [r["filename"] for r in rows] == sorted(r["filename"] for r in labels)
    assert list(rows[0]) == ["filename", "gap_x", "gap_y", "slider_x", "slider_y", "gap_score", "slider_score"]
    for r in rows:
        assert 0 <= float(r["gap_score"]) <= 1
    bad = subprocess.run([*cmd[:3], str(tmp_path / "missing"), *cmd[4:]], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr


def test_refuses_multi_process_launch_that_accelerate_sees_as_one(tmp_path):
    """WORLD_SIZE=2 without the CPU flag: every process would train alone as rank 0 (accelerate #2741)."""
    args = [a for a in tiny(tmp_path) if a != "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([os.sys.executable, str(ROOT / "train_captcha.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "WORLD_SIZE=2 but Accelerate sees 1 process" in proc.stderr
    assert not any(tmp_path.iterdir())

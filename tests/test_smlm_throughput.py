"""benchmarks/smlm_throughput.py end to end on a tiny setting: every row is measured and compared."""
import json

from conftest import run_python


def test_throughput_benchmark_reports_every_source(tmp_path):
    proc = run_python("benchmarks/smlm_throughput.py", "--config", "configs/smlm_quick.yaml", "--batch_size", "16",
                      "--workers", "0", "--blocks", "1,16", "--batches", "1", "--steps", "1", "--movie_frames", "32",
                      "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "smlm_throughput.json").read_text())["tables"][0]["rows"]
    sources = [r["source"] for r in rows]
    assert sources == ["training step (cpu)", "inference (cpu)", "simulator, block 1, DataLoader 0 workers",
                       "simulator, block 16, DataLoader 0 workers", "simulator, one movie on cpu"]
    assert all(r["per_s"] > 0 for r in rows)
    assert rows[0]["vs_training"] == 1.0
    assert "| simulator, block 16, DataLoader 0 workers | windows |" in (tmp_path / "smlm_throughput.md").read_text()


def test_throughput_benchmark_rejects_bad_flags():
    proc = run_python("benchmarks/smlm_throughput.py", "--blocks", "0")
    assert proc.returncode == 2 and "--blocks" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

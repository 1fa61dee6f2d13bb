"""The runs tool (``python -m training.runs``): ``seeds`` on real train_pair.py launches and on bad input.

The two-seed run of the tool on real train_pair.py launches is conftest's session fixture
``pair_seeds`` (shared with test_train_pair.py); a tiny stand-in train script (written into
tmp_path) covers failing launches cheaply.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_tool
from training import runs

@pytest.fixture(scope="module")
def two_seeds(pair_seeds):
    """conftest.pair_seeds: seed 11 alone, then the tool for seeds 11,12 (11 skipped, 12 launched)."""
    return pair_seeds


def test_seeds_launch_each_seed_and_summarise(two_seeds):
    out, first, proc, _ = two_seeds
    assert sorted(p.name for p in out.iterdir()) == ["grp_s11", "grp_s12", "grp_seeds.json"]
    assert "seed 11: launching" in first.stdout and "seed 12: launching" in proc.stdout
    accs = []
    for seed in (11, 12):
        run = out / f"grp_s{seed}"
        assert (run / "final" / "metrics.json").is_file() and (run / "best" / "metrics.json").is_file()
        result = json.loads((run / "results.json").read_text())
        assert result["seed"] == seed  # the tool's --seed reached the script
        accs.append(result["val/accuracy"])
    summary = json.loads((out / "grp_seeds.json").read_text())
    assert set(summary) == {"runs", "seeds", "mean", "std"}
    assert summary["seeds"] == [11, 12]
    assert summary["runs"] == [str(out / "grp_s11"), str(out / "grp_s12")]
    assert summary["mean"]["val/accuracy"] == pytest.approx(np.mean(accs))
    assert summary["std"]["val/accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert "test/accuracy" in summary["mean"] and "global_step" in summary["mean"] and "seed" not in summary["mean"]
    assert "2 seed(s) (11, 12), mean +- std" in proc.stdout and "val/accuracy" in proc.stdout
    assert "1 seed(s) (11), mean +- std" in first.stdout  # one seed: std 0, the file was rewritten since
    assert not list(out.glob(".*.tmp"))


def test_seeds_rerun_skips_the_finished_seed(two_seeds):
    out, _, proc, (mtime, content) = two_seeds
    assert "seed 11: finished" in proc.stdout and "skipped" in proc.stdout
    assert proc.stdout.count("$ ") == 1 and "--seed 12 --run_name grp_s12" in proc.stdout  # one launch, seed 12
    finished = out / "grp_s11" / "final" / "metrics.json"
    assert finished.stat().st_mtime_ns == mtime and finished.read_bytes() == content


FAKE = """import json, sys
from pathlib import Path
import yaml
a = [x for arg in sys.argv[1:] for x in (arg.split("=", 1) if arg.startswith("--") else [arg])]
def get(flag, default=None):
    return a[a.index(flag) + 1] if flag in a else default
config = yaml.safe_load(Path(get("--config")).read_text()) if "--config" in a else {}
run = Path(get("--output_dir", config.get("output_dir", "runs/fake"))) / get("--run_name")
run.mkdir(parents=True, exist_ok=True)
with (run / "launches.txt").open("a") as f:
    f.write(" ".join(a) + "\\n")
if get("--seed") == get("--fail"):
    sys.exit(3)
(run / "final").mkdir(exist_ok=True)
(run / "final" / "metrics.json").write_text(json.dumps({"global_step": 4, "val/acc": int(get("--seed")) / 10}))
"""


@pytest.fixture
def fake(tmp_path) -> Path:
    """A folder holding train_fake.py: writes <output_dir>/<run_name>/final/metrics.json, or fails for --fail SEED."""
    (tmp_path / "train_fake.py").write_text(FAKE)
    return tmp_path


def test_output_dir_and_name_come_from_the_command(fake, monkeypatch, capsys):
    monkeypatch.chdir(fake)
    (fake / "fake.yaml").write_text("output_dir: from_yaml\n")
    # output_dir from the --config YAML; the name from the command's --run_name, which is taken out
    assert runs.main(["seeds", "--seeds", "1,2,3", "--", sys.executable, "train_fake.py", "--config", "fake.yaml",
                      "--run_name", "g"]) == 0
    launches = (fake / "from_yaml" / "g_s2" / "launches.txt").read_text().split()
    assert launches == ["--config", "fake.yaml", "--seed", "2", "--run_name", "g_s2"]
    summary = json.loads((fake / "from_yaml" / "g_seeds.json").read_text())
    assert summary["mean"] == pytest.approx({"global_step": 4, "val/acc": 0.2})
    assert summary["std"] == pytest.approx({"global_step": 0, "val/acc": 0.1})
    # no --output_dir and no output_dir in the YAML: runs/<task>; one seed has std 0
    assert runs.main(["seeds", "--seeds", "5", "--name", "one", "--", sys.executable, "train_fake.py"]) == 0
    assert json.loads((fake / "runs" / "fake" / "one_seeds.json").read_text())["std"]["val/acc"] == 0
    # --output_dir on the command line wins over the YAML
    assert runs.main(["seeds", "--seeds", "7", "--name", "g", "--", sys.executable, "train_fake.py", "--config",
                      "fake.yaml", "--output_dir=cli"]) == 0
    assert (fake / "cli" / "g_s7" / "final").is_dir() and (fake / "cli" / "g_seeds.json").is_file()
    capsys.readouterr()


def test_failed_launch_stops_and_a_rerun_resumes_it(fake, monkeypatch, capsys):
    monkeypatch.chdir(fake)
    command = ["seeds", "--seeds", "1,2,3", "--name", "g", "--", sys.executable, "train_fake.py", "--output_dir", "out"]
    with pytest.raises(SystemExit) as e:
        runs.main([*command, "--fail", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 3  # the launch's own exit status
    assert err.count("\n") == 1 and "seed 2" in err and str(Path("out") / "g_s2") in err, err
    assert sorted(p.name for p in (fake / "out").iterdir()) == ["g_s1", "g_s2"]  # seed 3 never launched, no summary
    assert runs.main(command) == 0
    out = capsys.readouterr().out
    assert "seed 1: finished" in out and "seed 2: unfinished run" in out and "seed 3: launching" in out
    launches = {s: (fake / "out" / f"g_s{s}" / "launches.txt").read_text().splitlines() for s in (1, 2, 3)}
    assert len(launches[1]) == 1 and len(launches[3]) == 1 and "--resume" not in launches[3][0]
    assert launches[2][1].endswith("--seed 2 --run_name g_s2 --resume auto")
    assert json.loads((fake / "out" / "g_seeds.json").read_text())["mean"]["val/acc"] == pytest.approx(0.2)


G = ["--seeds", "1,2", "--name", "g", "--"]  # a good tool part, followed by a command
FAKE_CMD = [*G, sys.executable, "train_fake.py"]


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "1,x", "--name", "g"], "comma-separated integers"),
    (["--seeds", "", "--name", "g"], "comma-separated integers"),
    (["--seeds", "1,,2", "--name", "g"], "comma-separated integers"),
    (["--seeds=-1,2", "--name", "g"], "non-negative"),
    (["--seeds", "1,2,1", "--name", "g"], "duplicates (1)"),
    (G, "no command after --"),
    (G[:-1], "no command after --"),
    ([*G, sys.executable, "-c", "pass"], "not a train script"),
    ([*G, sys.executable, "train_missing.py"], "train_missing.py in the command: file not found"),
    (["--seeds", "1,2", "--", sys.executable, "train_fake.py"], "give --name"),
    ([*FAKE_CMD, "--seed", "3"], "the tool appends --seed"),
    ([*FAKE_CMD, "--seeds=3,4"], "--seeds 3,4 in the command"),
    ([*FAKE_CMD, "--run_name", "h"], "disagree"),
    ([*FAKE_CMD, "--resume", "x"], "--resume x"),
    ([*FAKE_CMD, "--out", "x"], "write --output_dir in full"),
    ([*FAKE_CMD, "--config", "none.yaml"], "--config none.yaml"),
    (["--seeds", "1,2", "--name", "a/b", "--", sys.executable, "train_fake.py"], "plain folder name"),
    ([*G, "no-such-launcher", "train_fake.py"], "no-such-launcher: command not found"),
])
def test_bad_input_one_line_exit_2_nothing_written(fake, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(fake)
    before = sorted(p.name for p in fake.iterdir())
    with pytest.raises(SystemExit) as e:
        runs.main(["seeds", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in fake.iterdir()) == before


def test_cli_usage_and_errors_as_a_user_sees_them(tmp_path):
    proc = run_tool("seeds", "--seeds", "3,3", "--name", "g", "--", sys.executable, str(ROOT / "train_pair.py"),
                    cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "duplicates" in proc.stderr
    assert proc.stdout == "" and not any(tmp_path.iterdir())
    proc = run_tool("seeds", "--help")
    assert proc.returncode == 0 and "--seeds S1,S2,..." in proc.stdout and "-- COMMAND" in proc.stdout


def test_no_tool_command_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        runs.main([])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1

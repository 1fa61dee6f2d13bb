"""The runs tool (``python -m training.runs``): ``seeds`` on real train_pair.py launches and on bad input.

The two-seed run of the tool on real train_pair.py launches is conftest's session fixture
``pair_seeds`` (shared with test_train_pair.py); a tiny stand-in train script (written into
tmp_path) covers failing launches cheaply.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import PAIR_TINY, ROOT, launch_cmd, run_tool
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


# ----------------------------------------------------------------------------- compare

@pytest.fixture(scope="module")
def three_runs(pair_seeds, pair_data, tmp_path_factory):
    """pair_seeds' two runs (seeds 11, 12) and a third tiny run with another --lr and --seed, elsewhere."""
    out = tmp_path_factory.mktemp("pair_lr")
    from conftest import run_script
    run_script("train_pair.py", [*PAIR_TINY, "--data_dir", str(pair_data), "--output_dir", str(out), "--epochs", "2",
                                 "--report_to", "wandb", "--run_name", "lr3", "--seed", "13", "--lr", "0.003",
                                 "--max_steps", "4", "--eval_every_steps", "2"])
    seeds_out = pair_seeds[0]
    return [seeds_out / "grp_s11", seeds_out / "grp_s12", out / "lr3"]


def test_monitor_table_matches_every_train_script():
    """compare's per-task table gives each train_<task>.py the monitor and mode it passes to its Checkpointer,
    so that a run without a checkpoint (or a new task) is not shown without them."""
    tasks = {}
    for script in sorted(ROOT.glob("train_*.py")):
        source = script.read_text()
        task = re.search(r'start_run\(args, task="(\w+)"', source).group(1)
        tasks[task] = re.search(r"^    monitor = (.+)$", source, re.M).group(1)
        assert re.search(r"Checkpointer\(accelerator, run, monitor=monitor, mode=\"max\"", source), script.name
    assert set(runs.MONITOR) == set(tasks)
    for task, line in tasks.items():
        monitor, mode = runs.MONITOR[task]
        assert mode == "max", task
        if "select_metric" in line:  # f"val/{args.select_metric}"
            assert monitor({"select_metric": "jaccard"}) == "val/jaccard" and monitor({}) == "val/effcy_lat", task
        elif " if ema is not None else " in line:  # captcha: the EMA's metric when there is an EMA
            assert [monitor({"ema_decay": 0.998}), monitor({"ema_decay": 0})] == re.findall(r'"([^"]+)"', line)
        else:
            assert monitor({}) == re.fullmatch(r'"([^"]+)"', line).group(1), task


def test_compare_table_has_exactly_the_differing_flags(three_runs, capsys):
    assert runs.main(["compare", *map(str, three_runs), "--metrics", "val/f1,train/loss", "--csv"]) == 0
    table = list(csv.reader(capsys.readouterr().out.splitlines()))
    header, rows = table[0], table[1:]
    fixed = ["run", "task", "commit", "state", "updates", "wall", "monitor", "best", "final", "best step",
             "val/f1 best", "val/f1 final", "train/loss best", "train/loss final"]
    assert header[:len(fixed)] == fixed
    assert header[len(fixed):] == ["output_dir", "max_steps", "lr", "seed", "eval_every_steps"]  # args.yaml order
    assert [r[0] for r in rows] == ["grp_s11", "grp_s12", "lr3"]
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    lr3 = by_name["lr3"]
    assert (lr3["task"], lr3["state"], lr3["updates"], lr3["lr"], lr3["seed"], lr3["max_steps"]) == \
        ("pair", "finished", "4", "0.003", "13", "4")
    assert by_name["grp_s11"]["max_steps"] == "-" and by_name["grp_s12"]["seed"] == "12"
    best = json.loads((three_runs[0] / "best" / "metrics.json").read_text())
    final = json.loads((three_runs[0] / "final" / "metrics.json").read_text())
    s11 = by_name["grp_s11"]
    assert s11["monitor"] == "val/accuracy (max)" and s11["best step"] == str(best["global_step"])
    assert float(s11["best"]) == pytest.approx(best["val/accuracy"], rel=1e-3)
    assert float(s11["final"]) == pytest.approx(final["val/accuracy"], rel=1e-3)
    assert float(s11["val/f1 final"]) == pytest.approx(final["val/f1"], rel=1e-3)
    assert float(s11["train/loss final"]) > 0 and s11["wall"].endswith("s")
    env = yaml.safe_load((three_runs[0] / "env.yaml").read_text())
    assert s11["commit"].startswith(str(env["git_commit"])[:8])


def test_compare_markdown_sort_and_glob(three_runs, capsys):
    parent = three_runs[0].parent  # holds grp_s11, grp_s12 and grp_seeds.json (skipped: not a run)
    assert runs.main(["compare", str(parent / "grp_*"), str(three_runs[2]), "--sort", "val/roc_auc:asc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | task |") and lines[1].startswith("|---|") and len(lines) == 5
    names = [line.split("|")[1].strip() for line in lines[2:]]
    aucs = {r.name: r.best_value("val/roc_auc") for r in runs.expand_runs(map(str, three_runs))}
    assert names == sorted(aucs, key=aucs.get)


def test_compare_plot_one_line_per_run(three_runs, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert runs.main(["compare", *map(str, three_runs), "--plot", str(png), "--metrics", "val/f1,train/loss"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val/accuracy, val/f1, train/loss" in capsys.readouterr().err
    fig = runs.plot_curves(runs.expand_runs(map(str, three_runs)), ["val/accuracy", "train/loss"],
                           tmp_path / "again.png", smooth=0.6)
    for ax in fig.axes[:2]:
        labelled = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert labelled == ["grp_s11", "grp_s12", "lr3"]
    stars = [line for line in fig.axes[0].get_lines() if line.get_marker() == "*"]
    assert len(stars) == 3  # the best step of each run on the monitored metric


def test_ema_smoothing_is_the_debiased_tensorboard_formula():
    assert runs.ema_smooth([1.0, 0.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3, 1 / 7])
    assert runs.ema_smooth([2.0, 4.0], 0.0) == [2.0, 4.0]


def test_wall_time_sums_launches_across_midnight(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("23:59:50 INFO run x: 1 process(es) (NO)\n00:00:20 INFO update 2  loss 0.5000  lr 1.00e-03  "
                   "grad 1.000  10.0 samples/s  data 5%\n08:00:00 INFO run x: 1 process(es) (NO)\n08:00:05 INFO eval\n")
    assert runs.wall_time(log) == 35
    assert runs.read_train_log(log)["train/loss"] == [(2, 0.5)]


# ----------------------------------------------------------------------------- search

FAKE_SEARCH = """import json, os, signal, sys, time
from pathlib import Path
a = sys.argv[1:]
def get(flag, default=None):
    return a[a.index(flag) + 1] if flag in a else default
out = Path(get("--output_dir"))
run = out / get("--run_name")
out.mkdir(parents=True, exist_ok=True)
with (out / "launches.txt").open("a") as f:
    f.write(" ".join(a) + "\\n")
if os.environ.get("FAKE_FAIL") == "usage":  # a refused flag, as accelerate launch reports it: 1, no run directory
    sys.exit(1)
run.mkdir(parents=True, exist_ok=True)
if os.environ.get("FAKE_FAIL") == "crash":  # fails after it started
    sys.exit(1)
score = {1: 1.0, 2: 0.5}.get(len((out / "launches.txt").read_text().splitlines()), 0.2)  # each launch worse
(run / "args.yaml").write_text(json.dumps({"x": float(get("--x")), "run_name": run.name}))
(run / "env.yaml").write_text(json.dumps({"task": "fake"}))
def term(*_):
    (run / "terminated").write_text("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
(run / "summary.csv").write_text("step,val/score\\n")
for step in range(1, 5):
    time.sleep(0.3)
    with (run / "summary.csv").open("a") as f:
        f.write(f"{step},{score * step}\\n")
for d in ("best", "final"):
    (run / d).mkdir(exist_ok=True)
    (run / d / "metrics.json").write_text(json.dumps({"global_step": 4, "val/score": score * 4}))
"""


@pytest.fixture
def fake_search(tmp_path, monkeypatch) -> Path:
    """tmp_path holding train_fake.py: 4 evaluations 0.3 s apart, each launch scoring worse than the last."""
    (tmp_path / "train_fake.py").write_text(FAKE_SEARCH)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "POLL_S", 0.05)
    return tmp_path


def journal_trials(path: Path, study: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def test_search_prunes_and_stops_a_worse_trial(fake_search, capsys):
    assert runs.main(["search", "--trials", "3", "--space", "x=0:1", "--metric", "val/score", "--mode", "max",
                      "--study", "s", "--prune_after", "1", "--", sys.executable, "train_fake.py",
                      "--output_dir", "out"]) == 0
    out = capsys.readouterr().out
    trials = journal_trials(fake_search / "out" / "s.journal", "s")
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert trials[0].value == 4.0 and trials[0].intermediate_values == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    for t in trials[1:]:
        run = fake_search / "out" / f"s_t{t.number}"
        assert t.user_attrs["run_dir"] == str(Path("out") / run.name)
        assert "pruned" in (run / "PRUNED").read_text() and (run / "terminated").read_text() == "SIGTERM"
        assert not (run / "final").exists() and len(runs.read_summary(run / "summary.csv")["val/score"]) < 4
    assert "| 1 |" in out and "PRUNED" in out and "best: trial 0, val/score 4" in out
    assert "--run_name s_t0 --x " in out
    state = {r.name: r.state for r in runs.expand_runs(["out/s_t*"])}  # compare reads the study's runs
    assert state == {"s_t0": "finished", "s_t1": "pruned", "s_t2": "pruned"}


def test_search_metric_not_logged_exit_2_leaves_nothing(fake_search, capsys):
    with pytest.raises(SystemExit) as e:
        runs.main(["search", "--trials", "2", "--space", "x=0:1", "--metric", "val/acc", "--mode", "max", "--",
                   sys.executable, "train_fake.py", "--output_dir", "out"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--metric val/acc" in err and "val/score" in err
    assert sorted(p.name for p in (fake_search / "out").iterdir()) == ["launches.txt"]


def test_search_settings_must_match_to_continue(fake_search, capsys):
    cmd = ["--metric", "val/score", "--mode", "max", "--", sys.executable, "train_fake.py", "--output_dir", "out"]
    assert runs.main(["search", "--trials", "1", "--space", "x=0:1", *cmd]) == 0
    assert runs.main(["search", "--trials", "1", "--space", "x=0:1", *cmd]) == 0  # done: nothing launched
    assert len((fake_search / "out" / "launches.txt").read_text().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        runs.main(["search", "--trials", "2", "--space", "x=0:2", *cmd])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "other settings" in err


def test_search_stops_after_failed_trials_in_a_row(fake_search, monkeypatch, capsys):
    """accelerate launch reports every failure as status 1, so failures are counted, not waited out."""
    monkeypatch.setenv("FAKE_FAIL", "crash")
    with pytest.raises(SystemExit) as e:
        runs.main(["search", "--trials", "5", "--space", "x=0:1", "--metric", "val/score", "--mode", "max",
                   "--study", "s", "--max_failures", "2", "--", sys.executable, "train_fake.py", "--output_dir", "out"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "2 trials in a row failed" in err, err
    assert [t.state.name for t in journal_trials(fake_search / "out" / "s.journal", "s")] == ["FAIL", "FAIL"]
    assert "exited with status 1" in (fake_search / "out" / "s_t1" / "FAILED").read_text()


def test_search_stops_when_the_script_refuses_its_flags(fake_search, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "usage")
    with pytest.raises(SystemExit) as e:
        runs.main(["search", "--trials", "5", "--space", "x=0:1", "--metric", "val/score", "--mode", "max",
                   "--study", "s", "--", sys.executable, "train_fake.py", "--output_dir", "out"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "refused a flag" in err, err
    assert len((fake_search / "out" / "launches.txt").read_text().splitlines()) == 1  # stopped at once


def test_a_new_study_never_reuses_run_directories_of_an_old_one(fake_search, capsys):
    """An earlier study's journal deleted, its runs kept: the new study must neither resume nor remove them."""
    old = fake_search / "out" / "s_t0"
    old.mkdir(parents=True)
    (old / "args.yaml").write_text("x: 0.5\n")
    with pytest.raises(SystemExit) as e:
        runs.main(["search", "--trials", "1", "--space", "x=0:1", "--metric", "val/score", "--mode", "max",
                   "--study", "s", "--", sys.executable, "train_fake.py", "--output_dir", "out"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "s_t0" in err and "move them away" in err, err
    assert sorted(p.name for p in (fake_search / "out").iterdir()) == ["s_t0"]
    assert (old / "args.yaml").read_text() == "x: 0.5\n"


def test_search_minimises_in_an_sqlite_storage(fake_search, capsys):
    db = fake_search / "study.db"
    cmd = ["search", "--trials", "2", "--space", "x=0.001:1:log", "--metric", "val/score", "--mode", "min",
           "--study", "m", "--storage", f"sqlite:///{db}", "--sampler_seed", "1", "--",
           sys.executable, "train_fake.py", "--output_dir", "out"]
    assert runs.main(cmd) == 0
    assert "best: trial 1, val/score 2" in capsys.readouterr().out  # the second launch scores 2 < 4
    assert runs.main(cmd) == 0  # the study is in the database: nothing more is launched
    assert len((fake_search / "out" / "launches.txt").read_text().splitlines()) == 2
    import optuna
    trials = optuna.load_study(study_name="m", storage=f"sqlite:///{db}").get_trials()
    assert [t.value for t in trials] == [4.0, 2.0] and all(0.001 <= t.params["x"] <= 1 for t in trials)


SEARCH_OK = ["--trials", "2", "--metric", "val/score", "--mode", "max"]


@pytest.mark.parametrize("args, expected", [
    (["--space", "x=1:0", *SEARCH_OK], "finite LOW < HIGH"),
    (["--space", "x=0:1:cubic", *SEARCH_OK], "expected LOW:HIGH"),
    (["--space", "x=a:b", *SEARCH_OK], "must be numbers"),
    (["--space", "x=0:1:log", *SEARCH_OK], "LOW > 0"),
    (["--space", "x=1.5:3:int", *SEARCH_OK], "must be integers"),
    (["--space", "x", *SEARCH_OK], "expected NAME=LOW:HIGH"),
    (["--space", "x=a||b", *SEARCH_OK], "distinct and non-empty"),
    (["--space", "x=0:1,x=a|b", *SEARCH_OK], "names x twice"),
    (["--space", "", *SEARCH_OK], "--space is empty"),
    (["--space", "run_name=a|b", *SEARCH_OK], "sets --run_name itself"),
    (["--space", "x=0:1", "--trials", "0", "--metric", "m", "--mode", "max"], "--trials must be at least 1"),
    (["--space", "x=0:1", *SEARCH_OK, "--storage", "study.db"], "database URL"),
    (["--space", "x=0:1", *SEARCH_OK, "--study", "a/b"], "plain name"),
    (["--space", "x=0:1", *SEARCH_OK, "--", sys.executable, "train_fake.py", "--x", "3"], "in --space"),
    (["--space", "x=0:1", *SEARCH_OK, "--", sys.executable, "train_fake.py", "--run_name", "r"], "--run_name r"),
    (["--space", "x=0:1", *SEARCH_OK, "--", sys.executable, "-c", "pass"], "not a train script"),
])
def test_search_bad_input_one_line_exit_2_nothing_written(fake_search, capsys, args, expected):
    if "--" not in args:
        args = [*args, "--", sys.executable, "train_fake.py", "--output_dir", "out"]
    with pytest.raises(SystemExit) as e:
        runs.main(["search", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in fake_search.iterdir()) == ["train_fake.py"]


@pytest.mark.parametrize("args, expected", [
    (["nowhere"], "nowhere: no such run directory"),
    (["."], "not a run directory"),
    (["zz*"], "matches no run directory"),
    (["RUN", "--metrics", "val/nope"], "--metrics val/nope: no run logs it"),
    (["RUN", "--metrics", "a,,b"], "comma-separated metric names"),
    (["RUN", "--sort", "val/nope"], "--sort val/nope: no run logs it"),
    (["RUN", "--sort", "val/score:up"], "METRIC:asc"),
    (["RUN", "--plot", "curves.txt"], ".png, .pdf or .svg"),
    (["RUN", "--smooth", "1"], "--smooth"),
])
def test_compare_bad_input_one_line_exit_2(fake_search, capsys, args, expected):
    run = fake_search / "runs" / "r"
    (run / "final").mkdir(parents=True)
    (run / "args.yaml").write_text("lr: 0.1\n")
    (run / "env.yaml").write_text("task: fake\n")
    (run / "summary.csv").write_text("step,val/score\n1,0.5\n")
    (run / "final" / "metrics.json").write_text('{"global_step": 1, "val/score": 0.5}')
    args = [str(run) if a == "RUN" else a for a in args]
    with pytest.raises(SystemExit) as e:
        runs.main(["compare", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (fake_search / "curves.txt").exists()


def test_search_pair_resumes_after_a_killed_trial(pair_data, tmp_path):
    """A real 3-trial pair search killed (SIGKILL, the tool only) during trial 1; the same command again stops
    the orphaned launch, counts trial 1 as failed, re-runs its values in its run directory and ends with 3 trials."""
    out = tmp_path / "search"
    cmd, env = launch_cmd("train_pair.py", [*PAIR_TINY, "--data_dir", str(pair_data), "--output_dir", str(out),
                                            "--max_steps", "4", "--eval_every_steps", "2", "--num_figures", "0"])
    tool = [sys.executable, "-m", "training.runs", "search", "--trials", "3", "--study", "st", "--space",
            "lr=1e-4:1e-2:log,weight_decay=1e-5:1e-2:log", "--metric", "val/accuracy", "--mode", "max", "--", *cmd]
    env = {**env, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(tool, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "st_t1" / "summary.csv").exists():  # trial 1 evaluated once: kill the search, not the launch
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    first.kill()
    first.wait()
    second = subprocess.run(tool, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "trial 1: interrupted" in second.stdout and "best: trial" in second.stdout
    trials = journal_trials(out / "st.journal", "st")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1
    assert trials[2].user_attrs["run_dir"] == str(out / "st_t1") and "--resume auto" in trials[2].user_attrs["command"]
    assert sorted(p.name for p in out.iterdir()) == ["st.journal", "st_t0", "st_t1", "st_t3"]
    for name in ("st_t0", "st_t1", "st_t3"):
        assert (out / name / "final" / "metrics.json").is_file() and not (out / name / "INTERRUPTED").exists()
        result = json.loads((out / name / "best" / "metrics.json").read_text())
        number = {"st_t0": 0, "st_t1": 2, "st_t3": 3}[name]
        assert trials[number].value == pytest.approx(result["val/accuracy"])
    rows = list(csv.reader(run_tool("compare", str(out / "st_t*"), "--csv", cwd=tmp_path).stdout.splitlines()))
    assert rows[0][-2:] == ["lr", "weight_decay"] and len(rows) == 4

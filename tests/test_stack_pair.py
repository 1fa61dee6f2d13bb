"""Stacking is honest: out-of-fold rows are never seen by the meta-model that scores them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from conftest import call_main
from metrics.pair import CORRUPTION_SETS, pair_metrics
from stack_pair import combine, features, fit_lgbm, out_of_fold


def members(n: int, m: int, seed: int, noise: float = 1.5):
    """Labels and m noisy member probabilities of them (each member alone ~75-80 % accurate)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    logits = (2 * y - 1)[:, None] * 1.2 + rng.normal(0, noise, (n, m))
    return y, 1 / (1 + np.exp(-logits))


class Memoriser:
    """A 'meta-learner' that answers 1 exactly for the rows it was trained on (the first column is a row id)."""

    def __init__(self, x):
        self.seen = set(x[:, 0].astype(int))

    def predict_proba(self, x):
        p = np.array([1.0 if int(r) in self.seen else 0.0 for r in x[:, 0]])
        return np.stack([1 - p, p], axis=1)


def test_out_of_fold_never_scores_a_row_with_a_model_that_saw_it():
    y = np.arange(200) % 2
    x = np.stack([np.arange(200), np.zeros(200)], axis=1).astype(float)
    oof = out_of_fold(lambda xs, ys, seed: Memoriser(xs), x, y, folds=5, seed=0)
    assert np.all(oof == 0.0)
    # The same memoriser scored in-sample would look perfect: the check above can fail.
    assert np.all(Memoriser(x).predict_proba(x)[:, 1] == 1.0)


@pytest.mark.parametrize("fit", [fit_lgbm, lambda x, y, s: LogisticRegression().fit(x, y)], ids=["lgbm", "logreg"])
def test_meta_learner_on_shuffled_labels_stays_at_chance(fit):
    y, prob = members(2000, 6, seed=1)
    shuffled = np.random.default_rng(2).permutation(y)
    oof = out_of_fold(fit, features(prob), shuffled, folds=5, seed=0)
    accuracy = pair_metrics(oof, shuffled)["accuracy"]
    assert 45 <= accuracy <= 55, accuracy
    # With the real labels the same pipeline is far above chance, so the band is not trivially met.
    assert pair_metrics(out_of_fold(fit, features(prob), y, folds=5, seed=0), y)["accuracy"] > 80


def test_combine_reports_every_method_and_ensembles_beat_members():
    y_val, val = members(3000, 5, seed=3)
    y_test, test = members(2000, 5, seed=4)
    rows, fitted = combine(val, y_val, test, [f"m{i}" for i in range(5)], folds=5, seed=0)
    names = list(rows)
    assert names[0].startswith("best single (m") and names[1:] == [
        "mean of probabilities", "majority vote", "logreg stacking", "lgbm stacking"]
    test_acc = {name: pair_metrics(t, y_test)["accuracy"] for name, (_, t) in rows.items()}
    best_single = test_acc[names[0]]
    for name in names[1:]:
        assert test_acc[name] > best_single + 3, (name, test_acc)
    assert set(fitted) == {"logreg stacking", "lgbm stacking"}
    for val_score, test_score in rows.values():
        assert val_score.shape == y_val.shape and test_score.shape == y_test.shape
        assert np.all((test_score >= 0) & (test_score <= 1))


def test_combine_without_test_split():
    y_val, val = members(400, 3, seed=5)
    rows, _ = combine(val, y_val, None, ["a", "b", "c"], folds=4, seed=0)
    assert all(t is None for _, t in rows.values())


ROBUST = ("robust_clean", *CORRUPTION_SETS, "robust_uci_digits")


def test_pair_quality_benchmark_aggregates_runs(tmp_path):
    """benchmarks/pair_quality.py on hand-made runs: per-variant mean +- std and every ensemble method."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    y_val, _ = members(400, 1, seed=6)
    y_test, _ = members(300, 1, seed=7)
    accs, aucs = {}, {}
    for variant in ("fusion", "fpn"):
        for k, seed in enumerate((1, 2)):
            run = tmp_path / f"cpu_{variant}_s{seed}"
            (run / "predictions").mkdir(parents=True)
            rng = np.random.default_rng(100 * k + len(variant))
            for split, y in (("val", y_val), ("test", y_test), *((name, y_test) for name in ROBUST)):
                prob = 1 / (1 + np.exp(-((2 * y - 1) * 1.2 + rng.normal(0, 1.5, len(y)))))
                lines = ["id,prob,label"] + [f"{split}{i},{p:.6f},{t}" for i, (p, t) in enumerate(zip(prob, y))]
                (run / "predictions" / f"{split}.csv").write_text("\n".join(lines) + "\n")
                if split != "val":
                    accs[(variant, seed, split)] = pair_metrics(prob, y)["accuracy"]
                    aucs[(variant, seed, split)] = pair_metrics(prob, y)["roc_auc"]
            accs[(variant, seed)] = accs[(variant, seed, "test")]
            result = {"seed": seed, "params": 1000, "val/accuracy": 70.0 + k, "test/accuracy": accs[(variant, seed)],
                      "test/f1": 70.0, "test/roc_auc": 0.8, "train_minutes": 1.0 + k}
            (run / "results.json").write_text(json.dumps(result))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pair_quality.py"), "--runs_dir", str(tmp_path),
                           "--variants", "fusion,fpn", "--seeds", "1,2", "--folds", "3", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pair_quality.json").read_text())
    variants, ensembles = report["tables"][0]["rows"], report["tables"][1]["rows"]
    fusion = next(r for r in variants if r["variant"] == "fusion")
    values = [accs[("fusion", 1)], accs[("fusion", 2)]]
    assert fusion["test/accuracy"] == f"{np.mean(values):.2f} +- {np.std(values, ddof=1):.2f}"
    assert fusion["seeds"] == 2 and fusion["val/accuracy"] == "70.50 +- 0.71"
    assert [e["method"] for e in ensembles][1:] == ["mean of probabilities", "majority vote", "logreg stacking",
                                                    "lgbm stacking"]
    assert ensembles[-1]["val_is"] == "OOF"
    # robustness: one row per variant (the mean over its seeds) and per ensemble, a column per set
    robust = report["tables"][2]
    assert robust["columns"] == ["model", "test", *sorted(ROBUST), "mCA", "min_auc"]
    rows = {r["model"]: r for r in robust["rows"]}
    assert list(rows)[:2] == ["fusion", "fpn"] and "lgbm stacking" in rows
    for name in ROBUST:
        acc = np.mean([accs[("fusion", s, name)] for s in (1, 2)])
        auc = np.mean([aucs[("fusion", s, name)] for s in (1, 2)])
        assert rows["fusion"][name] == f"{acc:.1f} ({auc:.3f})"
    mca = np.mean([np.mean([accs[("fusion", s, name)] for s in (1, 2)]) for name in CORRUPTION_SETS])
    assert abs(rows["fusion"]["mCA"] - mca) < 1e-9
    assert rows["fusion"]["min_auc"] == min(np.mean([aucs[("fusion", s, n)] for s in (1, 2)]) for n in ROBUST)

    # --runs: any runs, each its own row
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pair_quality.py"), "--runs",
                           str(tmp_path / "cpu_fusion_s1"), str(tmp_path / "cpu_fpn_s2"), "--folds", "3",
                           "--out", str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out2" / "pair_quality.json").read_text())
    rows = {r["model"]: r for r in report["tables"][2]["rows"]}
    assert list(rows)[:2] == ["cpu_fusion_s1", "cpu_fpn_s2"]
    assert rows["cpu_fpn_s2"]["robust_blur"].startswith(f"{accs[('fpn', 2, 'robust_blur')]:.1f} (")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pair_quality.py"), "--runs",
                           str(tmp_path / "no_run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no_run" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def write_run(folder, y_val, y_test, seed: int, mangle=None):
    """A hand-made train_pair.py run: predictions/val.csv and test.csv (id,prob,label) of a noisy member."""
    rng = np.random.default_rng(seed)
    (folder / "predictions").mkdir(parents=True)
    for split, y in (("val", y_val), ("test", y_test)):
        prob = 1 / (1 + np.exp(-((2 * y - 1) * 1.2 + rng.normal(0, 1.5, len(y)))))
        lines = ["id,prob,label"] + [f"{split}{i},{p:.6f},{t}" for i, (p, t) in enumerate(zip(prob, y))]
        if mangle is not None and split == "val":
            lines = mangle(lines)
        (folder / "predictions" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


def stack_cli(capsys, *argv):
    """stack_pair.main in this process -> (exit status, stdout, stderr)."""
    import stack_pair

    return call_main(capsys, stack_pair.main, *argv)


def test_cli_refuses_bad_runs_and_keeps_the_output_folder(tmp_path, capsys):
    y_val, _ = members(120, 1, seed=8)
    y_test, _ = members(60, 1, seed=9)
    good = [write_run(tmp_path / f"good{k}", y_val, y_test, seed=k) for k in range(2)]
    out = tmp_path / "stack"
    code, stdout, err = stack_cli(capsys, "--runs", *good, "--out", out, "--folds", "3")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["lgbm.txt", "report.json", "report.md", "stacker.json"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def duplicate(lines):  # row of val7 again, with the same label
        return [*lines, lines[8]]

    def relabel(lines):
        return [lines[0]] + [line[:-1] + ("7" if i % 3 == 0 else "2" if i % 3 == 1 else line[-1])
                             for i, line in enumerate(lines[1:])]

    dup = write_run(tmp_path / "dup", y_val, y_test, seed=2, mangle=duplicate)
    labels = write_run(tmp_path / "labels", y_val, y_test, seed=3, mangle=relabel)
    labels_too = write_run(tmp_path / "labels_too", y_val, y_test, seed=4, mangle=relabel)
    (tmp_path / "a_file").write_text("x\n")
    for argv, named in [
        ((good[0], dup), "dup/predictions/val.csv: id val7 is listed twice (lines 9 and 122)"),
        ((dup, good[0]), "dup/predictions/val.csv: id val7 is listed twice"),
        ((labels, labels_too), "labels/predictions/val.csv: labels must be 0 or 1; found 2, 7"),
    ]:
        code, _, err = stack_cli(capsys, "--runs", *argv, "--out", out, "--folds", "3", "--overwrite")
        assert code == 2 and err.count("\n") == 1 and named in err, err
    for target, named in ((out, "not empty (pass --overwrite"), (tmp_path / "a_file", "not a folder"),
                          (tmp_path / "a_file" / "stack", "a_file is a file")):
        code, _, err = stack_cli(capsys, "--runs", *good, "--out", target, "--folds", "3")
        assert code == 2 and err.count("\n") == 1 and named in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    code, _, err = stack_cli(capsys, "--runs", *reversed(good), "--out", out, "--folds", "3", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "stacker.json").read_text())["member_names"] == ["good1", "good0"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("stack")) == ["stack"]  # no .tmp, .old

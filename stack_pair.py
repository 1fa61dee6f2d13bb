"""Honest stacking of trained pair models: a LightGBM meta-learner scored only on rows it never saw.

    python stack_pair.py --runs runs/pair/<group>_s* runs/pair/<other>_s* --out runs/pair_stack/<name>

Input: the ``predictions/val.csv`` and ``predictions/test.csv`` (``id,prob,label``) that
``train_pair.py`` writes with each run's best weights. The base models never trained on
val or test, so val is the meta-learner's training set ("blending"):

- val: every meta-learner is scored by k-fold cross-validation on val (out-of-fold
  predictions: each row is predicted by a meta-model fitted on the other folds);
- test: the meta-learner refitted on all of val predicts the test split, which nothing
  (base models, meta-learner, early stopping, threshold) has seen.

The in-sample accuracy of a meta-learner fitted on val and scored on val is never
reported (the original project's 93 % headline was exactly that number). Reported beside
the stackers: the best single model (chosen by val accuracy), the mean of probabilities,
and the majority vote. LightGBM's tree count comes from early stopping on an inner split
of the meta-training rows. Written to ``--out``: ``report.json``, ``report.md``, the
refitted LightGBM model (``lgbm.txt``, LightGBM's own text format) and ``stacker.json``
(member runs in feature order), which ``predict_pair.py --stacker`` loads.

Checked before any fitting, each with one line naming the file or flag and exit status 2: ``--out`` (a new or
empty folder; a non-empty one only with ``--overwrite``; not a file; its parent writable), each run's CSVs
(columns, probabilities in [0, 1], no id listed twice, the same ids and labels in every run) and the val
labels (0 or 1, both present). The folder is written as ``<out>.tmp`` and renamed; a replaced ``--out`` is
moved aside and deleted only once the new one is in place.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from lightgbm import LGBMClassifier, early_stopping
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split

from metrics.pair import pair_metrics
from training.config import UsageError, fail
from training.io import check_output, write_folder_atomically

EPS = 1e-6
LGBM_PARAMS = dict(num_leaves=7, learning_rate=0.05, min_child_samples=50, feature_fraction=0.9,
                   bagging_fraction=0.8, bagging_freq=5, reg_lambda=1.0, verbose=-1, deterministic=True,
                   force_row_wise=True, n_jobs=1)
MAX_TREES = 500


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``id,prob,label`` CSV -> (ids, prob, label); one-line error on a malformed file."""
    if not path.is_file():
        fail(f"{path}: not found (train_pair.py writes predictions/val.csv and test.csv at the end of a run)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "prob", "label"} <= set(reader.fieldnames):
            fail(f"{path}: expected the columns id,prob,label; got {reader.fieldnames}")
        rows = list(reader)
    try:
        prob = np.array([float(r["prob"]) for r in rows])
        label = np.array([int(r["label"]) for r in rows])
    except ValueError as e:
        fail(f"{path}: {e}")
    ids = np.array([r["id"] for r in rows])
    if len(rows) == 0 or not np.all((prob >= 0) & (prob <= 1)):
        fail(f"{path}: expected one probability in [0, 1] per row")
    first = {}
    for row, key in enumerate(ids, start=2):  # row 1 is the header
        if key in first:
            fail(f"{path}: id {key} is listed twice (lines {first[key]} and {row}); expected one row per id")
        first[key] = row
    return ids, prob, label


def check_labels(label: np.ndarray, path: Path) -> None:
    """One line unless ``label`` holds only 0 and 1, both of them (what a meta-learner is fitted on)."""
    found = np.unique(label)
    other = found[(found != 0) & (found != 1)]
    if len(other):
        fail(f"{path}: labels must be 0 or 1; found {', '.join(map(str, other[:5]))}"
             f"{', ...' if len(other) > 5 else ''}")
    if len(found) < 2:
        fail(f"{path}: needs labels of both classes to fit a meta-learner; found only {found[0]}")


def load_members(runs: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities of every run on one split as (N, M) in the first run's row order, plus ids and labels."""
    ids, probs, label = None, [], None
    for run in runs:
        run_ids, prob, run_label = read_predictions(run / "predictions" / f"{split}.csv")
        if ids is None:
            ids, label = run_ids, run_label
        else:
            if set(run_ids) != set(ids) or len(run_ids) != len(ids):
                fail(f"{run}: predictions/{split}.csv has other ids than {runs[0]}; stack runs of the same data")
            order = {k: i for i, k in enumerate(run_ids)}
            take = np.array([order[k] for k in ids])
            prob, run_label = prob[take], run_label[take]
            if not np.array_equal(run_label, label):
                fail(f"{run}: predictions/{split}.csv labels disagree with {runs[0]} for the same ids")
        probs.append(prob)
    return ids, np.stack(probs, axis=1), label


def features(prob: np.ndarray) -> np.ndarray:
    """Meta features: the logit of each member's probability, (N, M)."""
    p = np.clip(prob, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def fit_lgbm(x: np.ndarray, y: np.ndarray, seed: int) -> LGBMClassifier:
    """Tree count by early stopping on a stratified 20 % of (x, y), then a refit on all of it."""
    x_fit, x_stop, y_fit, y_stop = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    probe = LGBMClassifier(n_estimators=MAX_TREES, random_state=seed, **LGBM_PARAMS)
    probe.fit(x_fit, y_fit, eval_X=(x_stop,), eval_y=(y_stop,), callbacks=[early_stopping(50, verbose=False)])
    trees = max(1, probe.best_iteration_ or MAX_TREES)
    return LGBMClassifier(n_estimators=trees, random_state=seed, **LGBM_PARAMS).fit(x, y)


def fit_logreg(x: np.ndarray, y: np.ndarray, seed: int) -> LogisticRegression:
    return LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(x, y)


META_LEARNERS = {"logreg stacking": fit_logreg, "lgbm stacking": fit_lgbm}


def out_of_fold(fit, x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """P(same) for every row from a meta-model that never saw that row (stratified k-fold)."""
    oof = np.full(len(y), np.nan)
    for train_idx, hold_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        oof[hold_idx] = fit(x[train_idx], y[train_idx], seed).predict_proba(x[hold_idx])[:, 1]
    assert not np.isnan(oof).any()
    return oof


def combine(val_prob: np.ndarray, val_y: np.ndarray, test_prob: np.ndarray | None, names: list[str],
            folds: int = 5, seed: int = 0) -> tuple[dict, dict]:
    """Every ensembling method's (val, test) probabilities -> (table, refitted LightGBM and logreg)."""
    best = int(np.argmax([pair_metrics(val_prob[:, m], val_y)["accuracy"] for m in range(val_prob.shape[1])]))
    rows = {f"best single ({names[best]})": (val_prob[:, best], None if test_prob is None else test_prob[:, best]),
            "mean of probabilities": (val_prob.mean(1), None if test_prob is None else test_prob.mean(1))}
    # Vote share as the score; a tie (even member count) goes to the mean probability.
    def vote(prob):
        share = (prob >= 0.5).mean(1)
        return np.where(share == 0.5, prob.mean(1), share)
    rows["majority vote"] = (vote(val_prob), None if test_prob is None else vote(test_prob))
    x_val = features(val_prob)
    x_test = None if test_prob is None else features(test_prob)
    fitted = {}
    for name, fit in META_LEARNERS.items():
        oof = out_of_fold(fit, x_val, val_y, folds, seed)
        fitted[name] = fit(x_val, val_y, seed)
        rows[name] = (oof, None if x_test is None else fitted[name].predict_proba(x_test)[:, 1])
    return rows, fitted


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="train_pair.py run directories (at least 2)")
    parser.add_argument("--out", required=True, help="output folder for the report and the stacker")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds on val for the meta-learners")
    parser.add_argument("--seed", type=int, default=0, help="fold split and LightGBM seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    if len(runs) < 2:
        fail(f"--runs: stacking needs at least 2 runs, got {len(runs)}")
    if len({r.resolve() for r in runs}) != len(runs):
        fail("--runs: a run is listed twice")
    if args.folds < 2:
        fail(f"--folds must be >= 2, got {args.folds}")
    try:
        out = check_output(args.out, args.overwrite, folder=True)
    except UsageError as e:
        fail(str(e))

    val_ids, val_prob, val_y = load_members(runs, "val")
    check_labels(val_y, runs[0] / "predictions" / "val.csv")
    if np.bincount(val_y).min() < 2 * args.folds:
        fail(f"--folds {args.folds}: too many folds for {len(val_y)} validation rows")
    test_prob, test_y = None, None
    if all((r / "predictions" / "test.csv").is_file() for r in runs):
        _, test_prob, test_y = load_members(runs, "test")
    names = [r.name for r in runs]
    rows, fitted = combine(val_prob, val_y, test_prob, names, args.folds, args.seed)

    has_test_labels = test_y is not None and set(np.unique(test_y)) <= {0, 1}
    report = {"members": {}, "methods": {}, "folds": args.folds, "val_rows": len(val_y),
              "test_rows": 0 if test_prob is None else len(test_prob)}
    for m, name in enumerate(names):
        report["members"][name] = {"val": pair_metrics(val_prob[:, m], val_y),
                                   "test": pair_metrics(test_prob[:, m], test_y) if has_test_labels else None}
    for name, (val_score, test_score) in rows.items():
        report["methods"][name] = {"val_oof" if "stacking" in name else "val": pair_metrics(val_score, val_y),
                                   "test": pair_metrics(test_score, test_y) if has_test_labels else None}

    lines = ["| method | val acc | val AUC | test acc | test F1 | test AUC |", "|---|---|---|---|---|---|"]
    for name, entry in report["methods"].items():
        val = entry.get("val_oof") or entry["val"]
        test = entry["test"]
        cells = [f"{test['accuracy']:.2f}", f"{test['f1']:.2f}", f"{test['roc_auc']:.4f}"] if test else ["-"] * 3
        suffix = " (OOF)" if "stacking" in name else ""
        lines.append(f"| {name} | {val['accuracy']:.2f}{suffix} | {val['roc_auc']:.4f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    def write(tmp):
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(f"{len(runs)} members, {len(val_y)} val rows ({args.folds}-fold OOF for "
                                       f"the stackers), {report['test_rows']} test rows\n\n{table}\n")
        fitted["lgbm stacking"].booster_.save_model(str(tmp / "lgbm.txt"))
        logreg = fitted["logreg stacking"]
        (tmp / "stacker.json").write_text(json.dumps({
            "members": [str(r.resolve()) for r in runs], "member_names": names,
            "features": "logit of each member's prob", "lgbm_model": "lgbm.txt",
            "logreg": {"coef": logreg.coef_[0].tolist(), "intercept": float(logreg.intercept_[0])},
        }, indent=1))
    write_folder_atomically(out, write)
    print(f"{len(runs)} members, {len(val_y)} val rows, {report['test_rows']} test rows")
    print(table)
    print(f"report and stacker: {out}")


if __name__ == "__main__":
    main()

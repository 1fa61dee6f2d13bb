"""Quality of the pair-classifier variants over several seeds, of every way to ensemble them, and their
robustness to clean, harsher and unseen digits.

    python -m data.pair build --out datasets/pair        # once
    python benchmarks/pair_quality.py --train --runs_dir runs/pair_cpu --seeds 42,2023,2024 --out bench_out
    python benchmarks/pair_quality.py --runs runs/pair/a_s42 runs/pair/b_s42 --tta --out bench_out   # any runs

With ``--train`` every variant preset (``configs/pair_<variant>.yaml``) is trained once per
seed through ``accelerate launch train_pair.py`` with the CPU overrides below (runs that
already have ``results.json`` are kept, an interrupted one continues from its newest checkpoint); seeds are
the outer loop, so an early stop still leaves every variant with the same seeds. Without
``--train`` it only reads ``<runs_dir>/cpu_<variant>_s<seed>/``.

Table 1: per variant, the mean +- std over seeds of the best model's validation and test
metrics, and the test accuracy of the mean probability of its seeds. Table 2: ensembles of
all runs (stack_pair.combine): the best single model (by val accuracy), the mean of
probabilities, the majority vote, and logistic-regression and LightGBM stacking, whose val
numbers are k-fold out-of-fold and whose test numbers come from a refit on all of val. Table 3:
accuracy and ROC AUC on the test set and on every robustness set the runs predicted
(``predictions/robust_*.csv``, written by train_pair.py for the ``robust_*.npz`` of its data folder),
per variant (mean over seeds) and per ensemble (the same refitted meta-learners applied to each set), with
the mean corruption accuracy (``metrics.pair.CORRUPTION_SETS``) and the lowest AUC of any set. With
``--runs`` every given run is its own row instead of the variants; with ``--tta`` every variant or run row is
followed by its test-time-augmentation row (``predict_pair.py --tta``: the runs' best weights predict each set
again; the ensembles stay without TTA, their stackers were fitted on probabilities without it).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import json
import subprocess

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from benchmarks.common import int_list, print_header, report, table
from data.pair import PairNPZDataset
from metrics.pair import CORRUPTION_SETS, mean_corruption_accuracy, pair_metrics
from predict_pair import predict_probs
from stack_pair import combine, load_members
from training.config import fail
from training.export import load_export_or_exit

VARIANTS = ("resnet222", "resnet333", "fusion", "fpn")


def train_variant(variant: str, seed: int, flags) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "train_pair.py"),
           "--config", str(ROOT / "configs" / f"pair_{variant}.yaml"), "--cpu", "--seed", str(seed),
           "--run_name", f"cpu_{variant}_s{seed}", "--resume", "auto", "--output_dir", flags.runs_dir, "--data_dir", flags.data_dir or "datasets/pair",
           "--epochs", str(flags.epochs), "--width_mult", str(flags.width_mult), "--feat_dim", str(flags.feat_dim),
           "--lr_schedule", "cosine", "--num_workers", "1", "--report_to", "none", "--num_figures", "0"]
    print(f"training {variant} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def eval_splits(runs: list[Path]) -> list[str]:
    """The labelled evaluation splits every run predicted: test, then the robustness sets (sorted)."""
    found = [sorted(p.stem for p in (run / "predictions").glob("robust_*.csv")) for run in runs]
    common = [name for name in found[0] if all(name in f for f in found)]
    return ["test", *common]


def tta_probs(run: Path, splits: dict[str, np.ndarray], data_dir: str | None) -> dict[str, np.ndarray]:
    """Probabilities of the run's best weights with test-time augmentation on every split, in the row order of
    its predictions/<split>.csv; splits: name -> the ids of those rows. The files are the run's own (its
    args.yaml data_dir and test_file) unless --data_dir is given; ids that differ end with one line."""
    args = yaml.safe_load((run / "args.yaml").read_text()) or {}
    folder = Path(data_dir or args.get("data_dir") or "datasets/pair")
    model = load_export_or_exit(run, torch.device("cpu")).model
    out = {}
    for split, ids in splits.items():
        path = folder / ((args.get("test_file") or "test.npz") if split == "test" else f"{split}.npz")
        try:
            dataset = PairNPZDataset(path)
        except ValueError as e:
            fail(f"--tta: {e}")
        if not np.array_equal(dataset.ids, ids):
            fail(f"--tta: {path} holds other pairs than {run}/predictions/{split}.csv; give the run's --data_dir")
        out[split] = predict_probs(model, DataLoader(dataset, batch_size=256), torch.device("cpu"), tta=True)
    return out


def robustness_row(name: str, probs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """One table-3 row. probs[split]: (runs, N) probabilities of the runs the row averages (one row for a
    single run or an ensemble). Cells: 'accuracy (AUC)', each the mean over the runs; mCA of those mean
    accuracies; min_auc the lowest mean AUC of any robustness set."""
    acc, auc = {}, {}
    for split, prob in probs.items():
        metrics = [pair_metrics(p, labels[split]) for p in prob]
        acc[split] = float(np.mean([m["accuracy"] for m in metrics]))
        auc[split] = float(np.mean([m["roc_auc"] for m in metrics]))
    row = {"model": name, **{split: f"{acc[split]:.1f} ({auc[split]:.3f})" for split in probs}}
    row["mCA"] = mean_corruption_accuracy(acc)
    robust_auc = [v for split, v in auc.items() if split != "test"]
    row["min_auc"] = min(robust_auc) if robust_auc else float("nan")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs_dir", default="runs/pair_cpu", help="where the cpu_<variant>_s<seed> runs live")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated preset names (configs/pair_<name>.yaml)")
    p.add_argument("--seeds", default="42,2023,2024")
    p.add_argument("--runs", nargs="+", default=None,
                   help="report these train_pair.py runs, each its own row (instead of --variants x --seeds)")
    p.add_argument("--train", action="store_true", help="train the missing runs first")
    p.add_argument("--tta", action="store_true", help="also each variant or run with test-time augmentation")
    p.add_argument("--data_dir", default=None,
                   help="data folder: for --train (default datasets/pair) and --tta (default: each run's own)")
    p.add_argument("--epochs", type=int, default=3, help="CPU override of the presets' 30 epochs")
    p.add_argument("--width_mult", type=float, default=0.25, help="CPU override of the presets' width 1.0")
    p.add_argument("--feat_dim", type=int, default=128, help="CPU override of the presets' 256")
    p.add_argument("--folds", type=int, default=5, help="out-of-fold folds of the stackers on val")
    p.add_argument("--out", default=None, help="folder for pair_quality.md/.json")
    flags = p.parse_args()
    if flags.runs is not None and flags.train:
        fail("--train trains --variants x --seeds; give --runs without it")
    if flags.runs is not None:
        groups = {}
        for run in map(Path, flags.runs):
            if not (run / "results.json").is_file():
                fail(f"--runs {run}: no results.json (not a finished train_pair.py run)")
            if run.name in groups:
                fail(f"--runs: two runs named {run.name}; rows are named by run, give runs with distinct names")
            groups[run.name] = [run]
    else:
        variants = [v for v in flags.variants.split(",") if v]
        for v in variants:
            if not (ROOT / "configs" / f"pair_{v}.yaml").is_file():
                fail(f"--variants {v}: no configs/pair_{v}.yaml")
        seeds = int_list(flags.seeds, "--seeds")
        if flags.train:
            for seed in seeds:
                for variant in variants:
                    if not (Path(flags.runs_dir) / f"cpu_{variant}_s{seed}" / "results.json").is_file():
                        train_variant(variant, seed, flags)
        groups = {v: [r for r in (Path(flags.runs_dir) / f"cpu_{v}_s{s}" for s in seeds)
                      if (r / "results.json").is_file()] for v in variants}
        groups = {v: runs for v, runs in groups.items() if runs}
    info = print_header("Pair classifier: variants x seeds, ensembles, robustness")

    per_variant, all_runs = [], []
    for variant, runs in groups.items():
        all_runs += runs
        results = [json.loads((r / "results.json").read_text()) for r in runs]
        params = results[0].get("params")
        row = {"variant": variant, "params_M": params / 1e6 if params else None, "seeds": len(runs)}
        for key in ("val/accuracy", "test/accuracy", "test/f1", "test/roc_auc", "train_minutes"):
            values = np.array([r[key] for r in results])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            row[key] = f"{values.mean():.2f} +- {std:.2f}" if key != "test/roc_auc" else f"{values.mean():.4f} +- {std:.4f}"
        _, test_prob, test_y = load_members(runs, "test")
        row["seed_mean_test_acc"] = pair_metrics(test_prob.mean(1), test_y)["accuracy"]
        per_variant.append(row)
    if not all_runs:
        fail(f"{flags.runs_dir}: no finished runs; train them with --train")

    # Every labelled split in one (N_all, M) array, so the ensembles are fitted once (on val) and applied to all.
    splits = eval_splits(all_runs)
    _, val_prob, val_y = load_members(all_runs, "val")
    members = {split: load_members(all_runs, split) for split in splits}
    loaded = {split: (prob, y) for split, (_, prob, y) in members.items()}
    labels = {split: y for split, (_, y) in loaded.items()}
    bounds = np.cumsum([0] + [len(labels[s]) for s in splits])
    eval_prob = np.concatenate([loaded[s][0] for s in splits])
    robust_rows, ensembles = [], []
    member = {run: k for k, run in enumerate(all_runs)}
    for variant, runs in groups.items():
        columns = [member[r] for r in runs]
        robust_rows.append(robustness_row(variant, {s: loaded[s][0][:, columns].T for s in splits}, labels))
        if flags.tta:
            tta = [tta_probs(r, {s: members[s][0] for s in splits}, flags.data_dir) for r in runs]
            robust_rows.append(robustness_row(f"{variant} + TTA", {s: np.stack([t[s] for t in tta]) for s in splits},
                                              labels))
    if len(all_runs) >= 2:
        rows, _ = combine(val_prob, val_y, eval_prob, [r.name for r in all_runs], flags.folds, seed=0)
        for name, (val_score, score) in rows.items():
            val, test = pair_metrics(val_score, val_y), pair_metrics(score[: bounds[1]], labels["test"])
            ensembles.append({"method": name, "val_acc": val["accuracy"], "val_is": "OOF" if "stacking" in name else "direct",
                              "test_acc": test["accuracy"], "test_f1": test["f1"], "test_auc": test["roc_auc"]})
            robust_rows.append(robustness_row(name, {s: score[None, bounds[i]:bounds[i + 1]]
                                                     for i, s in enumerate(splits)}, labels))

    columns1 = ["variant", "params_M", "seeds", "val/accuracy", "test/accuracy", "test/f1", "test/roc_auc",
                "seed_mean_test_acc", "train_minutes"]
    columns2 = ["method", "val_acc", "val_is", "test_acc", "test_f1", "test_auc"]
    columns3 = ["model", *splits, "mCA", "min_auc"]
    tables = [table(per_variant, columns1, "Variants (mean +- std over seeds)", formats={"params_M": ".3f"})]
    notes = [
        f"Data: {flags.data_dir or 'each run its own (args.yaml)'} (python -m data.pair build). Runs: "
        + (" ".join(flags.runs) if flags.runs else
           f"{flags.runs_dir}/cpu_<variant>_s<seed>, CPU overrides of the presets: --epochs {flags.epochs} "
           f"--width_mult {flags.width_mult} --feat_dim {flags.feat_dim} --lr_schedule cosine; everything else "
           "(AdamW 1e-3, wd 5e-4, focal loss, affine augmentation, batch 64) from configs/pair_<variant>.yaml."),
        "Accuracies in %, mean +- sample std over seeds; every run's model is its best validation checkpoint.",
    ]
    if ensembles:
        best_single = ensembles[0]["test_acc"]
        tables.append(table(ensembles, columns2, "Ensembles of all runs", formats={"test_auc": ".4f"}))
        notes.append(f"Ensembles over all {len(all_runs)} runs; stackers: {flags.folds}-fold OOF on val, test and "
                     "robustness sets = the refit on all val. Test-accuracy gain over the best single model: "
                     + ", ".join(f"{e['method']} {e['test_acc'] - best_single:+.2f}" for e in ensembles[1:]) + ".")
    tables.append(table(robust_rows, columns3, "Robustness: accuracy % (ROC AUC) per set",
                        formats={"mCA": ".1f", "min_auc": ".3f"}))
    notes.append("Robustness rows of a variant: accuracy and AUC averaged over its seeds; mCA = mean accuracy over "
                 f"{', '.join(CORRUPTION_SETS)}; min_auc = the lowest AUC of any robustness set (test excluded). "
                 "The sets are described in docs/pair.md (data.pair.ROBUST_SETS).")
    report("pair_quality", "Same-digit pairs: variants, ensembles, robustness", info, tables, notes, flags.out)


if __name__ == "__main__":
    main()

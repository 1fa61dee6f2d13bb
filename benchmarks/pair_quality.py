"""Quality of the pair-classifier variants over several seeds, and of every way to ensemble them.

    python -m data.pair build --out datasets/pair        # once
    python benchmarks/pair_quality.py --train --runs_dir runs/pair_cpu --seeds 42,2023,2024 --out bench_out

With ``--train`` every variant preset (``configs/pair_<variant>.yaml``) is trained once per
seed through ``accelerate launch train_pair.py`` with the CPU overrides below (runs that
already have ``results.json`` are kept, an interrupted one continues from its newest checkpoint); seeds are
the outer loop, so an early stop still leaves every variant with the same seeds. Without
``--train`` it only reads ``<runs_dir>/cpu_<variant>_s<seed>/``.

Table 1: per variant, the mean +- std over seeds of the best model's validation and test
metrics, and the test accuracy of the mean probability of its seeds. Table 2: ensembles of
all runs (stack_pair.combine): the best single model (by val accuracy), the mean of
probabilities, the majority vote, and logistic-regression and LightGBM stacking, whose val
numbers are k-fold out-of-fold and whose test numbers come from a refit on all of val.
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

from benchmarks.common import int_list, print_header, report, table
from metrics.pair import pair_metrics
from stack_pair import combine, load_members
from training.config import fail

VARIANTS = ("resnet222", "resnet333", "fusion", "fpn")


def train_variant(variant: str, seed: int, flags) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "train_pair.py"),
           "--config", str(ROOT / "configs" / f"pair_{variant}.yaml"), "--cpu", "--seed", str(seed),
           "--run_name", f"cpu_{variant}_s{seed}", "--resume", "auto", "--output_dir", flags.runs_dir, "--data_dir", flags.data_dir,
           "--epochs", str(flags.epochs), "--width_mult", str(flags.width_mult), "--feat_dim", str(flags.feat_dim),
           "--lr_schedule", "cosine", "--num_workers", "1", "--report_to", "none", "--num_figures", "0"]
    print(f"training {variant} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs_dir", default="runs/pair_cpu", help="where the cpu_<variant>_s<seed> runs live")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated preset names (configs/pair_<name>.yaml)")
    p.add_argument("--seeds", default="42,2023,2024")
    p.add_argument("--train", action="store_true", help="train the missing runs first")
    p.add_argument("--data_dir", default="datasets/pair")
    p.add_argument("--epochs", type=int, default=3, help="CPU override of the presets' 30 epochs")
    p.add_argument("--width_mult", type=float, default=0.25, help="CPU override of the presets' width 1.0")
    p.add_argument("--feat_dim", type=int, default=128, help="CPU override of the presets' 256")
    p.add_argument("--folds", type=int, default=5, help="out-of-fold folds of the stackers on val")
    p.add_argument("--out", default=None, help="folder for pair_quality.md/.json")
    flags = p.parse_args()
    variants = [v for v in flags.variants.split(",") if v]
    for v in variants:
        if not (ROOT / "configs" / f"pair_{v}.yaml").is_file():
            fail(f"--variants {v}: no configs/pair_{v}.yaml")
    seeds = int_list(flags.seeds, "--seeds")
    info = print_header("Pair classifier: variants x seeds and ensembles")

    if flags.train:
        for seed in seeds:
            for variant in variants:
                if not (Path(flags.runs_dir) / f"cpu_{variant}_s{seed}" / "results.json").is_file():
                    train_variant(variant, seed, flags)

    per_variant, all_runs = [], []
    for variant in variants:
        runs = [Path(flags.runs_dir) / f"cpu_{variant}_s{s}" for s in seeds]
        runs = [r for r in runs if (r / "results.json").is_file()]
        if not runs:
            continue
        all_runs += runs
        results = [json.loads((r / "results.json").read_text()) for r in runs]
        params = json.loads((runs[0] / "results.json").read_text()).get("params")
        row = {"variant": variant, "params_M": params / 1e6 if params else None, "seeds": len(runs)}
        for key in ("val/accuracy", "test/accuracy", "test/f1", "test/roc_auc", "train_minutes"):
            values = np.array([r[key] for r in results])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            row[key] = f"{values.mean():.2f} +- {std:.2f}" if key != "test/roc_auc" else f"{values.mean():.4f} +- {std:.4f}"
        _, test_prob, test_y = load_members(runs, "test")
        row["seed_mean_test_acc"] = pair_metrics(test_prob.mean(1), test_y)["accuracy"]
        per_variant.append(row)
    if len(all_runs) < 2:
        fail(f"{flags.runs_dir}: fewer than 2 finished runs; train them with --train")

    _, val_prob, val_y = load_members(all_runs, "val")
    _, test_prob, test_y = load_members(all_runs, "test")
    rows, _ = combine(val_prob, val_y, test_prob, [r.name for r in all_runs], flags.folds, seed=0)
    ensembles = []
    for name, (val_score, test_score) in rows.items():
        val, test = pair_metrics(val_score, val_y), pair_metrics(test_score, test_y)
        ensembles.append({"method": name, "val_acc": val["accuracy"], "val_is": "OOF" if "stacking" in name else "direct",
                          "test_acc": test["accuracy"], "test_f1": test["f1"], "test_auc": test["roc_auc"]})

    columns1 = ["variant", "params_M", "seeds", "val/accuracy", "test/accuracy", "test/f1", "test/roc_auc",
                "seed_mean_test_acc", "train_minutes"]
    columns2 = ["method", "val_acc", "val_is", "test_acc", "test_f1", "test_auc"]
    best_single = ensembles[0]["test_acc"]
    notes = [
        f"Data: {flags.data_dir} (python -m data.pair build defaults: 20k/4k/4k pairs, severity 5). CPU overrides of the "
        f"presets: --epochs {flags.epochs} --width_mult {flags.width_mult} --feat_dim {flags.feat_dim} "
        "--lr_schedule cosine; everything else (AdamW 1e-3, wd 5e-4, focal loss, affine augmentation, batch 64) "
        "from configs/pair_<variant>.yaml.",
        "Accuracies in %, mean +- sample std over seeds; every run's model is its best validation checkpoint.",
        f"Ensembles over all {len(all_runs)} runs; stackers: {flags.folds}-fold OOF on val, test = refit on all val. "
        f"Test-accuracy gain over the best single model: "
        + ", ".join(f"{e['method']} {e['test_acc'] - best_single:+.2f}" for e in ensembles[1:]) + ".",
    ]
    report("pair_quality", "Same-digit pairs: variants and ensembles", info,
           [table(per_variant, columns1, "Variants (mean +- std over seeds)", formats={"params_M": ".3f"}),
            table(ensembles, columns2, "Ensembles of all runs", formats={"test_auc": ".4f"})], notes, flags.out)


if __name__ == "__main__":
    main()

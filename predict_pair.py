"""Predict same-digit pairs of an npz file with one or more trained runs.

    python predict_pair.py --checkpoint runs/pair/<run> --data test_public.npz --out preds.csv
    python predict_pair.py --checkpoint runs/pair/<group>_s* --data x.npz --out preds.csv                 # mean prob
    python predict_pair.py --checkpoint runs/pair/<group>_s* --data x.npz --stacker runs/pair_stack/<name> --out preds.csv

Each run contributes the probability of its best weights (``best/``, else ``final/``; the model is
rebuilt from the export's ``model.json``, ``training.export.load_export``);
several runs are averaged, or combined by the LightGBM meta-learner of ``stack_pair.py``
(``--stacker``; the runs given must be its members). Output columns: ``id,prob,pred``
(pred = prob >= 0.5). When the file has labels, accuracy and AUC are printed. ``--tta`` averages each
run's logit over both half orders and 1 px shifts of the pair (10 views, 10x the compute); with
``--stacker`` the meta-learner then sees TTA probabilities it was not fitted on.

Everything is checked before the first prediction: ``--out`` (an existing file is only replaced with
``--overwrite``; a directory or an unwritable folder is refused), ``--device``, ``--data``, the stacker and
every run's weights. The CSV is written to ``<out>.tmp`` and renamed. Bad input ends with one line naming the
file or flag, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import lightgbm
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.pair import PairNPZDataset
from metrics.pair import pair_metrics
from stack_pair import features
from training.config import UsageError, fail
from training.export import load_export_or_exit, resolve_device
from training.io import check_output, write_atomically


# Test-time augmentation: both half orders at each of these (dy, dx) shifts in px, the same shift for both
# halves (a pair stays aligned); the mean logit of the 10 views. Symmetric in the halves by construction.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(N, C, H, W) moved by dy rows and dx columns; the pixels that come in repeat the edge they come from
    (black for a clean digit, and no black border on a grey or noisy background)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")
    return padded[..., abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


@torch.no_grad()
def pair_logits(model, a: torch.Tensor, b: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits (B,) of pairs (a, b), each (B, 1, 28, 28); with tta the mean over TTA_SHIFTS x both orders.
    One forward per view at the loader's batch size: one batch of all ten views multiplies the activations'
    memory by ten, and on CPU those large short-lived buffers are mapped and unmapped at every batch."""
    if not tta:
        return model(a, b)
    total = torch.zeros(len(a), device=a.device)
    for dy, dx in TTA_SHIFTS:
        sa, sb = shift_images(a, dy, dx), shift_images(b, dy, dx)
        total = total + model(sa, sb).float() + model(sb, sa).float()
    return total / (2 * len(TTA_SHIFTS))


@torch.no_grad()
def predict_probs(model, dataloader, device, tta: bool = False) -> np.ndarray:
    """Probability of 'same digit' for every pair of the loader, in order: (N,) float32."""
    probs = [torch.sigmoid(pair_logits(model, batch["a"].to(device), batch["b"].to(device), tta).float()).cpu()
             for batch in dataloader]
    return torch.cat(probs).numpy()


def load_stacker(stacker_dir: Path, runs: list[Path]) -> tuple[lightgbm.Booster, list[int]]:
    """A stack_pair.py LightGBM meta-learner and, for each of its features, the index of the run in ``runs``;
    checked before any prediction (one line naming the file on a bad stacker)."""
    spec_path = stacker_dir / "stacker.json"
    if not spec_path.is_file():
        fail(f"--stacker {stacker_dir}: no stacker.json (made by stack_pair.py --out)")
    try:
        spec = json.loads(spec_path.read_text())
        members, names, model_file = spec["members"], spec["member_names"], stacker_dir / spec["lgbm_model"]
    except (ValueError, KeyError, TypeError) as e:
        fail(f"--stacker {spec_path}: not a stacker.json written by stack_pair.py ({type(e).__name__}: {e})")
    given = {str(r.resolve()): i for i, r in enumerate(runs)}
    if set(given) != set(members):
        fail(f"--stacker {stacker_dir}: expects exactly the runs {', '.join(names)} as --checkpoint")
    try:
        booster = lightgbm.Booster(model_file=str(model_file))
    except lightgbm.basic.LightGBMError as e:
        fail(f"--stacker {model_file}: not a readable LightGBM model ({' '.join(str(e).split())})")
    return booster, [given[m] for m in members]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, nargs="+", help="train_pair.py run directories")
    parser.add_argument("--data", required=True, help="npz with x uint8 (N, 28, 56) and id (y optional)")
    parser.add_argument("--out", default="preds.csv", help="output CSV (id,prob,pred)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--stacker", default=None, help="stack_pair.py output folder: combine the runs with its meta-learner")
    parser.add_argument("--batch_size", type=int, default=256, help="pairs per forward pass")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: mean logit over both half orders and 1 px shifts (10 views)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch_size must be >= 1, got {args.batch_size}")
    runs = [Path(r) for r in args.checkpoint]
    if args.stacker is not None and len(runs) < 2:
        fail("--stacker needs the member runs as --checkpoint (at least 2)")
    try:
        out = check_output(args.out, args.overwrite)
        device = resolve_device(args.device)
    except UsageError as e:
        fail(str(e))
    try:
        dataset = PairNPZDataset(args.data)
    except (ValueError, FileNotFoundError) as e:
        fail(f"--data {e}")
    stacker = load_stacker(Path(args.stacker), runs) if args.stacker else None
    models = [load_export_or_exit(run, device).model for run in runs]  # all checked before any work

    dataloader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    start = time.perf_counter()
    probs = np.stack([predict_probs(model, dataloader, device, args.tta) for model in models], axis=1)  # (N, runs)
    seconds = time.perf_counter() - start
    if stacker is not None:
        booster, columns = stacker
        prob = booster.predict(features(probs[:, columns]))
    else:
        prob = probs.mean(1)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "prob", "pred"])
            writer.writerows([i, f"{p:.6f}", int(p >= 0.5)] for i, p in zip(dataset.ids, prob))
    write_atomically(out, write)
    how = "stacked" if args.stacker else ("mean of" if len(runs) > 1 else "one run,")
    print(f"{len(dataset)} pairs -> {out} ({how} {len(runs)} model(s); {len(dataset) * len(runs) / seconds:.0f} "
          f"pair-model evaluations/s on {device})")
    if dataset.has_labels:
        metrics = pair_metrics(prob, dataset.labels)
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()

"""Same-digit pair classifier: a siamese ResNet with comparison heads, one run per seed.

    python -m data.pair build --out datasets/pair                                      # once: corrupted MNIST pairs
    accelerate launch train_pair.py --config configs/pair_quick.yaml --cpu             # minutes on a laptop CPU
    accelerate launch train_pair.py --config configs/pair_fusion.yaml --seeds 42,2023,2024,2025
    python stack_pair.py --runs runs/pair/<group>_s* --out runs/pair_stack/<group>     # ensemble the seeds

Each sample is two 28x28 grey digits side by side (``x`` uint8 (N, 28, 56) in
``train.npz``/``val.npz``/``test.npz``); the label is 1 when both show the same digit.
Model selection and early stopping use validation accuracy. After training, the best
weights predict the validation and test files, written to ``predictions/{val,test}.csv``
(``id,prob,label``) for ``stack_pair.py``. ``--seeds a,b,c`` trains one run per seed
(``<run_name>_s<seed>``, one W&B group) and prints mean +- std over the seeds.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from accelerate import PartialState
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.pair import PairNPZDataset
from losses.pair import bce_loss, focal_loss
from metrics.pair import pair_metrics
from models.compare_net import ResNetCompareNet
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.run import log_images
from training.summary import append_summary

SUMMARY_KEYS = ("val/accuracy", "val/roc_auc", "test/accuracy", "test/f1", "test/roc_auc", "train_minutes")


@dataclass
class Args:
    """Train the same-digit pair classifier (siamese ResNet + comparison heads)."""
    config: str | None = None             # YAML preset that sets defaults; the command line wins
    output_dir: str = "runs/pair"         # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>; with --seeds: <run_name>_s<seed>
    data_dir: str = "datasets/pair"       # folder with the npz files (python -m data.pair build --out DIR)
    train_file: str = "train.npz"         # inside --data_dir
    val_file: str = "val.npz"             # inside --data_dir; selects the model, feeds the stacker
    test_file: str | None = "test.npz"    # inside --data_dir; predicted once with the best weights; none to skip
    max_train_samples: int | None = None  # use only the first N training pairs (quick runs)
    epochs: int = 30                      # passes over the training file
    max_steps: int | None = None          # optimizer updates; default: epochs x updates per epoch
    batch_size: int = 64                  # per device, per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 1e-3                      # AdamW learning rate
    weight_decay: float = 5e-4
    lr_schedule: Literal["plateau", "cosine"] = "plateau"  # plateau: halve on stalled val accuracy; cosine: to min_lr at max_steps
    plateau_factor: float = 0.5           # lr multiplier when val accuracy stalls (plateau)
    plateau_patience: int = 3             # evaluations without improvement before the lr drops (plateau)
    min_lr: float = 1e-6                  # floor of either schedule
    clip_grad: float = 1.0                # max global gradient norm
    seed: int = 42
    seeds: str | None = None              # comma-separated seeds: one run each, then mean +- std (overrides --seed)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU (with ACCELERATE_USE_CPU=1 for multi-process gloo runs)
    num_workers: int = 2                  # DataLoader workers per process (augmentation runs there)
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = None   # updates between evaluations; default: one epoch
    save_every_steps: int | None = None   # updates between full-state checkpoints; default: one epoch
    keep_last: int = 2                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by val/accuracy) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"
    arch: Literal["resnet", "fpn"] = "resnet"  # fpn: embedding pooled from a top-down pyramid over all stages
    layers: str = "2,2,2"                 # residual blocks per stage (28 -> 14 -> 7 px)
    width_mult: float = 1.0               # stage widths 64/128/256 x this
    use_bottleneck: bool = False          # Bottleneck blocks (1x1-3x3-1x1, expansion 4) instead of BasicBlock
    attention: Literal["none", "se", "cbam"] = "se"  # attention on every residual branch
    feat_dim: int = 256                   # embedding size of each digit
    fusion: bool = True                   # all six comparison heads mixed by learned softmax weights
    head: Literal["diff", "concat", "product", "cosine", "l2", "residual"] = "concat"  # the one head with --no-fusion
    dropout: float = 0.3                  # in the embedding MLP and the heads
    loss: Literal["focal", "bce"] = "focal"
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0
    label_smoothing: float = 0.1          # targets 1 -> 1 - eps/2, 0 -> eps/2 (both losses)
    augment: Literal["none", "affine", "randaugment"] = "affine"  # per-half training augmentation + random swap
    patience: int = 5                     # evaluations without val accuracy gain before stopping; 0 disables
    num_figures: int = 8                  # misclassified validation pairs drawn per evaluation; 0 disables

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "log_every_steps", "feat_dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every_steps", "save_every_steps", "max_train_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1 (or none), got {getattr(self, name)}")
        if self.lr <= 0 or self.width_mult <= 0:
            raise UsageError("--lr and --width_mult must be > 0")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise UsageError("--label_smoothing and --dropout must be in [0, 1)")
        if not 0 < self.plateau_factor < 1:
            raise UsageError(f"--plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if min(self.num_workers, self.keep_last, self.save_top_k, self.patience, self.num_figures) < 0:
            raise UsageError("--num_workers, --keep_last, --save_top_k, --patience and --num_figures must be >= 0")
        self.layer_list()
        self.seed_list()

    def layer_list(self) -> tuple[int, ...]:
        try:
            layers = tuple(int(v) for v in self.layers.split(","))
        except ValueError:
            raise UsageError(f"--layers expects comma-separated block counts such as 2,2,2; got {self.layers!r}") from None
        if not layers or min(layers) < 1:
            raise UsageError(f"--layers needs at least one stage with >= 1 block each; got {self.layers!r}")
        return layers

    def seed_list(self) -> list[int]:
        if self.seeds is None:
            return [self.seed]
        try:
            seeds = [int(v) for v in self.seeds.split(",")]
        except ValueError:
            raise UsageError(f"--seeds expects comma-separated integers such as 42,2023; got {self.seeds!r}") from None
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"--seeds has duplicates: {self.seeds!r}")
        return seeds


def build_dataloaders(args: Args):
    data_dir = Path(args.data_dir)
    if not (data_dir / args.train_file).is_file():
        fail(f"--data_dir {data_dir}: no {args.train_file}; build the data with "
             f"`python -m data.pair build --out {data_dir}` or point --data_dir at a folder of npz files")
    try:
        train_ds = PairNPZDataset(data_dir / args.train_file, augment=args.augment, max_samples=args.max_train_samples,
                                  seed=args.seed)
        val_ds = PairNPZDataset(data_dir / args.val_file)
        test_ds = PairNPZDataset(data_dir / args.test_file) if args.test_file else None
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    for ds in (train_ds, val_ds):
        if not ds.has_labels:
            fail(f"{ds.path}: has no labels (key y or a <stem>_labels.csv); training and validation need them")
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    # Its own generator: starting an epoch's iterator (also the one a resumed run starts mid-epoch) then
    # leaves the global RNG, which drives dropout, untouched. drop_last: the heads' BatchNorm needs >= 2 pairs.
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                          **common)
    val_dl = DataLoader(val_ds, shuffle=False, **common)
    test_dl = DataLoader(test_ds, shuffle=False, **common) if test_ds is not None else None
    return train_dl, val_dl, test_dl


def build_model(args: Args) -> ResNetCompareNet:
    return ResNetCompareNet(arch=args.arch, layers=args.layer_list(),
                            block="bottleneck" if args.use_bottleneck else "basic", width_mult=args.width_mult,
                            feat_dim=args.feat_dim, attention=args.attention, fusion=args.fusion, head=args.head,
                            dropout=args.dropout)


def build_scheduler(optimizer, args: Args, max_steps: int):
    """plateau: step(val accuracy) once per evaluation; cosine: step() once per real update, min_lr at max_steps."""
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=args.plateau_factor, patience=args.plateau_patience, min_lr=args.min_lr)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps, eta_min=args.min_lr)


def compute_loss(logits: torch.Tensor, label: torch.Tensor, args: Args):
    if args.loss == "focal":
        return focal_loss(logits, label, alpha=args.focal_alpha, gamma=args.focal_gamma,
                          label_smoothing=args.label_smoothing)
    return bce_loss(logits, label, label_smoothing=args.label_smoothing)


@torch.no_grad()
def predict(model, dataloader, accelerator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gathered (index, prob, label) over a whole dataset, in dataset order."""
    model.eval()
    index, prob, label = [], [], []
    for batch in dataloader:
        with accelerator.autocast():
            logits = model(batch["a"], batch["b"])
        gathered = accelerator.gather_for_metrics((batch["index"], torch.sigmoid(logits.float()), batch["label"]))
        for out, value in zip((index, prob, label), gathered):
            out.append(value.cpu())
    index, prob, label = (torch.cat(v).numpy() for v in (index, prob, label))
    order = np.argsort(index, kind="stable")
    return index[order], prob[order], label[order]


def draw_pairs(dataset: PairNPZDataset, index: np.ndarray, prob: np.ndarray, scale: int = 3) -> np.ndarray:
    """Pairs stacked vertically (RGB uint8), each captioned with its label and predicted probability."""
    tiles = []
    for i, p in zip(index, prob):
        grey = cv2.resize(dataset.x[i], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        tile = np.concatenate([np.zeros((16, grey.shape[1]), np.uint8), grey])
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2RGB)
        text = f"{dataset.ids[i]} y={dataset.labels[i]} p={p:.2f}"
        cv2.putText(tile, text, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    return np.concatenate(tiles, axis=0)


def write_predictions(path: Path, dataset: PairNPZDataset, index: np.ndarray, prob: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prob", "label"])
        for i, p in zip(index, prob):
            writer.writerow([dataset.ids[i], f"{p:.6f}", int(dataset.labels[i])])


def train(args: Args) -> dict:
    """One run (one seed); returns the best model's validation and test metrics."""
    train_dl, val_dl, test_dl = build_dataloaders(args)  # before start_run: bad data fails before a run exists
    accelerator, run = start_run(args, task="pair")
    val_ds, test_ds = val_dl.dataset, test_dl.dataset if test_dl is not None else None
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    run.log.info("model: %.3f M parameters (heads: %s); %d training pairs, %d validation pairs",
                 n_params / 1e6, ", ".join(model.head_names), len(train_dl.dataset), len(val_ds))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    test_dl = accelerator.prepare(test_dl) if test_dl is not None else None
    updates_per_epoch = max(1, len(train_dl) // args.grad_accum)  # len(train_dl) is per process after prepare
    max_steps = args.max_steps or math.ceil(args.epochs * len(train_dl) / args.grad_accum)
    eval_every = args.eval_every_steps or updates_per_epoch
    save_every = args.save_every_steps or updates_per_epoch
    run.log.info("%d updates (%d per epoch), evaluation every %d, checkpoint every %d",
                 max_steps, updates_per_epoch, eval_every, save_every)
    scheduler = build_scheduler(optimizer, args, max_steps)  # not prepared: see build_scheduler
    monitor = "val/accuracy"
    state = TrainState()
    stopper = EarlyStopping(monitor, mode="max", patience=args.patience)
    ckpt = Checkpointer(accelerator, run, monitor=monitor, mode="max", keep_last=args.keep_last,
                        save_top_k=args.save_top_k)
    ckpt.register(scheduler, state, stopper)
    ckpt.resume(state)
    stop = 0 < args.patience <= stopper.bad_evals  # a resumed run that had stopped early stays stopped
    if state.global_step >= max_steps or stop:
        run.log.info("nothing left to train at update %d; exporting and predicting", state.global_step)

    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0, "samples": 0, "data_s": 0.0}
    parts_sum: dict[str, torch.Tensor] = {}
    window_start = train_start = time.perf_counter()
    metrics: dict = {}
    model.train()
    while state.global_step < max_steps and not stop:
        train_dl.set_epoch(state.epoch)
        # Accelerate forwards set_epoch to the dataset only in some sampler layouts (not in multi-process runs).
        train_dl.dataset.set_epoch(state.epoch)
        fetch_start = time.perf_counter()
        for batch in ckpt.remaining_batches(train_dl, state):
            window["data_s"] += time.perf_counter() - fetch_start
            with accelerator.accumulate(model):
                logits = model(batch["a"], batch["b"])
                loss, parts = compute_loss(logits, batch["label"], args)
                finite = torch.isfinite(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window["loss"] += loss.detach()
            window["micro"] += 1
            window["samples"] += batch["a"].shape[0] * accelerator.num_processes
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0) + value

            if accelerator.reduce(finite.float().logical_not().float(), "sum").item() > 0:
                run.log.error("non-finite loss at update %d (micro-batch %d of epoch %d); stopping. "
                              "The last good checkpoint is kept in %s", state.global_step + 1, state.step_in_epoch,
                              state.epoch, run.dir / "checkpoints")
                accelerator.end_training()
                raise SystemExit(1)
            if not accelerator.sync_gradients:
                fetch_start = time.perf_counter()
                continue

            if args.lr_schedule == "cosine" and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            progress.update(1)

            if state.global_step % args.log_every_steps == 0:
                elapsed = time.perf_counter() - window_start
                logs = {"train/loss": accelerator.reduce(window["loss"], "mean").item() / window["micro"],
                        "train/lr": optimizer.param_groups[0]["lr"],
                        "train/grad_norm": float(grad_norm),
                        "perf/samples_per_s": window["samples"] / elapsed,
                        "perf/data_time_frac": window["data_s"] / elapsed}
                logs.update({k.replace("loss/", "train/"): accelerator.reduce(v, "mean").item() / window["micro"]
                             for k, v in parts_sum.items()})
                accelerator.log(logs, step=state.global_step)
                run.log.info("update %d  loss %.4f  lr %.2e  grad %.3f  %.1f samples/s  data %.0f%%",
                             state.global_step, logs["train/loss"], logs["train/lr"], logs["train/grad_norm"],
                             logs["perf/samples_per_s"], 100 * logs["perf/data_time_frac"])
                window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0, "samples": 0, "data_s": 0.0}
                parts_sum = {}
                window_start = time.perf_counter()

            last_step = state.global_step >= max_steps
            if state.global_step % eval_every == 0 or last_step:
                index, prob, label = predict(model, val_dl, accelerator)
                metrics = {f"val/{k}": v for k, v in pair_metrics(prob, label).items()}
                metrics.update({f"fusion/{k}": v for k, v in accelerator.unwrap_model(model).fusion_weights().items()})
                if args.lr_schedule == "plateau":
                    scheduler.step(metrics[monitor])
                state.last_metrics = metrics
                accelerator.log(metrics, step=state.global_step)
                run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                             "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                if accelerator.is_main_process:
                    append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch,
                                                      "train/lr": optimizer.param_groups[0]["lr"], **metrics})
                    wrong = np.flatnonzero((prob >= 0.5) != (label == 1))
                    worst = wrong[np.argsort(-np.abs(prob[wrong] - 0.5))][: args.num_figures]
                    if len(worst):
                        log_images(accelerator, run, {"vis/worst": draw_pairs(val_ds, index[worst], prob[worst])},
                                   state.global_step)
                ckpt.update_best(state, metrics, model)
                if stopper.step(metrics):
                    accelerator.set_trigger()
                if accelerator.check_trigger():
                    run.log.info("early stopping at update %d: %s has not improved for %d evaluations",
                                 state.global_step, monitor, stopper.bad_evals)
                    stop = True
                model.train()
            if state.global_step % save_every == 0 or stop or last_step:  # the end too: resuming a finished run is free
                ckpt.save(state)
            if stop or last_step:
                break
            fetch_start = time.perf_counter()
        else:
            state.epoch += 1
    progress.close()
    train_minutes = (time.perf_counter() - train_start) / 60

    metrics = metrics or state.last_metrics  # a resumed run that had already reached max_steps
    ckpt.export_final(model, None, metrics, state)
    # The best weights (by validation accuracy) predict val and test for reporting and stacking.
    accelerator.unwrap_model(model).load_state_dict(load_file(run.dir / "best" / "model.safetensors"))
    result = {"run": str(run.dir), "seed": args.seed, "params": n_params, "best_step": state.best_step,
              "train_minutes": train_minutes}
    for split, dl, ds in (("val", val_dl, val_ds), ("test", test_dl, test_ds)):
        if dl is None:
            continue
        index, prob, label = predict(model, dl, accelerator)
        if accelerator.is_main_process:
            write_predictions(run.dir / "predictions" / f"{split}.csv", ds, index, prob)
        if ds.has_labels:
            result.update({f"{split}/{k}": v for k, v in pair_metrics(prob, label).items()})
    accelerator.log({k: v for k, v in result.items() if k.startswith("test/")}, step=state.global_step)
    if accelerator.is_main_process:
        (run.dir / "results.json").write_text(json.dumps(result, indent=1))
        print(f"\nbest model (update {state.best_step}) of {run.dir}:")
        for key, value in result.items():
            if "/" in key:
                print(f"  {key:20s} {value:10.4f}")
        print(f"predictions: {run.dir / 'predictions'}  weights: best/ and final/ model.safetensors")
    for tracker in accelerator.trackers:  # end_training() would also end the process group the next seed needs
        tracker.finish()
    return result


def seed_summary(results: list[dict]) -> dict[str, tuple[float, float]]:
    """Mean and sample std (ddof=1; 0 for one seed) of each SUMMARY_KEYS metric over the seeds."""
    summary = {}
    for key in SUMMARY_KEYS:
        values = np.array([r[key] for r in results if key in r], dtype=np.float64)
        if len(values):
            summary[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return summary


def main():
    args = parse_args(Args)
    seeds = args.seed_list()
    if args.seeds is not None and args.resume == "auto" and not args.run_name:
        fail("--resume auto with --seeds needs --run_name (the runs are <run_name>_s<seed>)")
    group = args.run_name
    results = []
    for seed in seeds:
        run_name = f"{group}_s{seed}" if args.seeds is not None and group else args.run_name
        results.append(train(replace(args, seed=seed, run_name=run_name)))
        group = group or Path(results[-1]["run"]).name.removesuffix(f"_s{seed}")
    PartialState().destroy_process_group()
    if len(results) > 1 and PartialState().is_main_process:
        summary = seed_summary(results)
        print(f"\n{len(results)} seeds ({', '.join(str(r['seed']) for r in results)}), mean +- std:")
        for key, (mean, std) in summary.items():
            print(f"  {key:20s} {mean:8.3f} +- {std:.3f}")
        path = Path(args.output_dir) / f"{group}_seeds.json"
        path.write_text(json.dumps({"runs": [r["run"] for r in results],
                                    "mean": {k: m for k, (m, _) in summary.items()},
                                    "std": {k: s for k, (_, s) in summary.items()}}, indent=1))
        print(f"seed summary: {path}")


if __name__ == "__main__":
    main()

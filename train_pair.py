"""Same-digit pair classifier: a siamese ResNet with comparison heads, one seed per launch.

    python -m data.pair build --out datasets/pair                                      # once: corrupted MNIST pairs
    accelerate launch train_pair.py --config configs/pair_fusion.yaml --cpu --epochs 3 --width_mult 0.25
    python -m training.runs seeds --seeds 42,2023,2024,2025 --name fusion -- \
        accelerate launch train_pair.py --config configs/pair_fusion.yaml                 # one launch per seed
    python stack_pair.py --runs runs/pair/fusion_s* --out runs/pair_stack/fusion          # ensemble the seeds

Each sample is two 28x28 grey digits side by side (``x`` uint8 (N, 28, 56) in
``train.npz``/``val.npz``/``test.npz``); the label is 1 when both show the same digit.
Model selection and early stopping use validation accuracy. After training, the best
weights predict the validation and test files and the robustness sets of the data folder
(``robust_*.npz``), written to ``predictions/<split>.csv`` (``id,prob,label``) for ``stack_pair.py`` and the
benchmarks, and ``results.json`` holds their metrics (with the mean corruption accuracy). Several seeds are
separate launches (``python -m training.runs seeds``: runs ``<name>_s<seed>`` in one W&B group, then
mean +- std over the seeds).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.pair import PairNPZDataset
from losses.pair import bce_loss, digit_loss, focal_loss
from metrics.pair import mean_corruption_accuracy, pair_metrics
from models.compare_net import ResNetCompareNet
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.export import build_model, load_weights, model_record, read_weights
from training.run import log_images
from training.summary import TrainMeter, append_summary


@dataclass
class Args:
    """Train the same-digit pair classifier (siamese ResNet + comparison heads)."""
    config: str | None = None             # YAML preset that sets defaults; the command line wins
    output_dir: str = "runs/pair"         # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>
    data_dir: str = "datasets/pair"       # folder with the npz files (python -m data.pair build --out DIR)
    train_file: str = "train.npz"         # inside --data_dir
    val_file: str = "val.npz"             # inside --data_dir; selects the model, feeds the stacker
    test_file: str | None = "test.npz"    # inside --data_dir; predicted once with the best weights; none to skip
    robust_files: str | None = "robust_*.npz"  # glob inside --data_dir: robustness sets, predicted like the test file; none to skip
    max_train_samples: int | None = None  # use only the first N training pairs (quick runs)
    epochs: int = 30                      # passes over the training file
    max_steps: int | None = None          # optimizer updates; default: epochs x updates per epoch
    batch_size: int = 64                  # per device, per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 1e-3                      # AdamW learning rate
    weight_decay: float = 5e-4            # AdamW decoupled weight decay
    lr_schedule: Literal["plateau", "cosine"] = "plateau"  # plateau: halve on stalled val accuracy; cosine: to min_lr at max_steps
    plateau_factor: float = 0.5           # lr multiplier when val accuracy stalls (plateau)
    plateau_patience: int = 3             # evaluations without improvement before the lr drops (plateau)
    min_lr: float = 1e-6                  # floor of either schedule
    clip_grad: float = 1.0                # max global gradient norm
    seed: int = 42                        # seeds weights, sampler order, augmentation and dropout
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU (with ACCELERATE_USE_CPU=1 for multi-process gloo runs)
    num_workers: int = 2                  # DataLoader workers per process (augmentation runs there)
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = None   # updates between evaluations; default: one epoch
    save_every_steps: int | None = None   # updates between full-state checkpoints; default: one epoch
    keep_last: int = 2                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by val/accuracy) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    init_from: str | None = None          # start from these weights (run dir, export or checkpoint)
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # tracker; W&B runs offline unless logged in
    arch: Literal["resnet", "fpn"] = "resnet"  # fpn: embedding pooled from a top-down pyramid over all stages
    layers: str = "2,2,2"                 # residual blocks per stage (28 -> 14 -> 7 px)
    width_mult: float = 1.0               # stage widths 64/128/256 x this
    use_bottleneck: bool = False          # Bottleneck blocks (1x1-3x3-1x1, expansion 4) instead of BasicBlock
    attention: Literal["none", "se", "cbam"] = "se"  # attention on every residual branch
    feat_dim: int = 256                   # embedding size of each digit
    fusion: bool = True                   # all six comparison heads mixed by learned softmax weights
    head: Literal["diff", "concat", "product", "cosine", "l2", "residual"] = "concat"  # the one head with --no-fusion
    dropout: float = 0.3                  # in the embedding MLP and the heads
    input_norm: Literal["none", "per_image"] = "none"  # per_image: each digit to zero mean, unit std before the encoder
    aux_digit_weight: float = 0.0         # > 0: a digit-class head on the encoder, its CE added with this weight (needs digit_a/digit_b)
    loss: Literal["focal", "bce"] = "focal"  # focal: down-weights pairs the model already gets right
    focal_alpha: float = 1.0              # focal-loss weight of the positive (same-digit) class
    focal_gamma: float = 2.0              # focal-loss focusing exponent: (1 - p_t)^gamma
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
        if self.lr <= 0 or self.width_mult <= 0 or self.clip_grad <= 0:
            raise UsageError("--lr, --width_mult and --clip_grad must be > 0")
        if self.robust_files is not None and (Path(self.robust_files).is_absolute() or ".." in Path(self.robust_files).parts):
            raise UsageError(f"--robust_files {self.robust_files}: expected a file pattern inside --data_dir "
                             "(such as robust_*.npz), not a path")
        if not (self.aux_digit_weight >= 0 and math.isfinite(self.aux_digit_weight)):
            raise UsageError(f"--aux_digit_weight must be a finite number >= 0, got {self.aux_digit_weight}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise UsageError("--label_smoothing and --dropout must be in [0, 1)")
        if not 0 < self.plateau_factor < 1:
            raise UsageError(f"--plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if min(self.num_workers, self.keep_last, self.save_top_k, self.patience, self.num_figures) < 0:
            raise UsageError("--num_workers, --keep_last, --save_top_k, --patience and --num_figures must be >= 0")
        self.layer_list()

    def layer_list(self) -> tuple[int, ...]:
        try:
            layers = tuple(int(v) for v in self.layers.split(","))
        except ValueError:
            raise UsageError(f"--layers expects comma-separated block counts such as 2,2,2; got {self.layers!r}") from None
        if not layers or min(layers) < 1:
            raise UsageError(f"--layers needs at least one stage with >= 1 block each; got {self.layers!r}")
        return layers


def build_dataloaders(args: Args):
    data_dir = Path(args.data_dir)
    if not (data_dir / args.train_file).is_file():
        fail(f"--data_dir {data_dir}: no {args.train_file}; build the data with "
             f"`python -m data.pair build --out {data_dir}` or point --data_dir at a folder of npz files")
    try:
        train_ds = PairNPZDataset(data_dir / args.train_file, augment=args.augment, max_samples=args.max_train_samples,
                                  seed=args.seed)
        val_ds = PairNPZDataset(data_dir / args.val_file)
        # the test file and the robustness sets: predicted once by the best weights, never used for selection
        extra_ds = {"test": PairNPZDataset(data_dir / args.test_file)} if args.test_file else {}
        for path in sorted(data_dir.glob(args.robust_files)) if args.robust_files else []:
            if path.name in (args.train_file, args.val_file, args.test_file) or path.stem in ("val", "test"):
                fail(f"--robust_files {args.robust_files}: matches {path.name}, a training, validation or test "
                     "file; the robustness sets must be other files")
            extra_ds[path.stem] = PairNPZDataset(path)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if args.aux_digit_weight > 0 and not train_ds.has_digits:
        fail(f"--aux_digit_weight {args.aux_digit_weight}: {train_ds.path} has no per-half digit labels "
             "(digit_a, digit_b; python -m data.pair build writes them); use 0 for data without them")
    for ds in (train_ds, val_ds):
        if not ds.has_labels:
            fail(f"{ds.path}: has no labels (key y or a <stem>_labels.csv); training and validation need them")
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    # Its own generator: starting an epoch's iterator (also the one a resumed run starts mid-epoch) then
    # leaves the global RNG, which drives dropout, untouched. drop_last: the heads' BatchNorm needs >= 2 pairs.
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                          **common)
    val_dl = DataLoader(val_ds, shuffle=False, **common)
    extra_dls = {name: DataLoader(ds, shuffle=False, **common) for name, ds in extra_ds.items()}
    return train_dl, val_dl, extra_dls


def model_kwargs(args: Args) -> dict:
    """ResNetCompareNet's constructor arguments (recorded in model.json, so exports rebuild the model)."""
    return dict(arch=args.arch, layers=list(args.layer_list()), block="bottleneck" if args.use_bottleneck else "basic",
                width_mult=args.width_mult, feat_dim=args.feat_dim, attention=args.attention, fusion=args.fusion,
                head=args.head, dropout=args.dropout, input_norm=args.input_norm,
                digit_classes=10 if args.aux_digit_weight > 0 else 0)


def build_scheduler(optimizer, args: Args, max_steps: int):
    """plateau: step(val accuracy) once per evaluation; cosine: step() once per real update, min_lr at max_steps."""
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=args.plateau_factor, patience=args.plateau_patience, min_lr=args.min_lr)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps, eta_min=args.min_lr)


def compute_loss(outputs, batch: dict, args: Args):
    """outputs: pair logits (B,), or (logits, digit logits of a, of b) with --aux_digit_weight."""
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    if args.loss == "focal":
        loss, parts = focal_loss(logits, batch["label"], alpha=args.focal_alpha, gamma=args.focal_gamma,
                                 label_smoothing=args.label_smoothing)
    else:
        loss, parts = bce_loss(logits, batch["label"], label_smoothing=args.label_smoothing)
    if isinstance(outputs, tuple):
        aux, aux_parts = digit_loss(outputs[1], outputs[2], batch["digit_a"], batch["digit_b"])
        loss = loss + args.aux_digit_weight * aux
        parts = {**parts, **aux_parts}
    return loss, parts


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


def train_step(model, batch, optimizer, accelerator, args: Args):
    """One micro-batch: forward, loss, backward; on the last micro-batch of an accumulation group also clip
    and step. -> (detached loss, loss parts, clipped-gradient norm or None between updates)."""
    grad_norm = None
    with accelerator.accumulate(model):
        outputs = model(batch["a"], batch["b"], return_digits=args.aux_digit_weight > 0)
        loss, parts = compute_loss(outputs, batch, args)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()  # between updates Accelerate's wrapper skips the step and keeps the gradients
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), parts, grad_norm


def validate(model, val_dl, accelerator, run, state: TrainState, args: Args, lr: float) -> dict:
    """Evaluate on the validation file, log val/* and the fusion weights, append summary.csv, draw the worst pairs."""
    index, prob, label = predict(model, val_dl, accelerator)
    metrics = {f"val/{k}": v for k, v in pair_metrics(prob, label).items()}
    metrics.update({f"fusion/{k}": v for k, v in accelerator.unwrap_model(model).fusion_weights().items()})
    state.last_metrics = metrics
    accelerator.log(metrics, step=state.global_step)
    run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                 "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if accelerator.is_main_process:
        append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch, "train/lr": lr, **metrics})
        wrong = np.flatnonzero((prob >= 0.5) != (label == 1))
        worst = wrong[np.argsort(-np.abs(prob[wrong] - 0.5))][: args.num_figures]
        if len(worst):
            log_images(accelerator, run, {"vis/worst": draw_pairs(val_dl.dataset, index[worst], prob[worst])},
                       state.global_step)
    model.train()
    return metrics


def predict_splits(model, splits: dict, accelerator, run, state: TrainState, result: dict) -> dict:
    """The best weights (by validation accuracy) predict every split -> predictions/<split>.csv, and
    ``result`` with their metrics -> results.json."""
    best = run.dir / "best" / "model.safetensors"
    load_weights(accelerator.unwrap_model(model), read_weights(best), best)
    result = {"run": str(run.dir), "best_step": state.best_step, **result}
    for split, dl in splits.items():
        index, prob, label = predict(model, dl, accelerator)
        if accelerator.is_main_process:
            write_predictions(run.dir / "predictions" / f"{split}.csv", dl.dataset, index, prob)
        if dl.dataset.has_labels:
            result.update({f"{split}/{k}": v for k, v in pair_metrics(prob, label).items()})
    mca = mean_corruption_accuracy({split: result.get(f"{split}/accuracy") for split in splits
                                    if f"{split}/accuracy" in result})
    if not math.isnan(mca):
        result["robust/mean_corruption_accuracy"] = mca
    accelerator.log({k: v for k, v in result.items() if "/" in k and not k.startswith("val/")}, step=state.global_step)
    if accelerator.is_main_process:
        (run.dir / "results.json").write_text(json.dumps(result, indent=1))
    return result


def main():
    args = parse_args(Args)
    train_dl, val_dl, extra_dls = build_dataloaders(args)  # before start_run: bad data fails before a run exists
    model_json = model_record(ResNetCompareNet, **model_kwargs(args))
    accelerator, run = start_run(args, task="pair", model_json=model_json)
    model = build_model(model_json)
    run.load_init(model)
    n_params = sum(p.numel() for p in model.parameters())
    run.log.info("model: %.3f M parameters (heads: %s); %d training pairs, %d validation pairs",
                 n_params / 1e6, ", ".join(model.head_names), len(train_dl.dataset), len(val_dl.dataset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    extra_dls = {name: accelerator.prepare(dl) for name, dl in extra_dls.items()}
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
                        save_top_k=args.save_top_k, model_json=model_json)
    ckpt.register(scheduler, state, stopper)
    ckpt.resume(state)

    stop = stopper.stopped  # a resumed run that had stopped early stays stopped
    if state.global_step >= max_steps or stop:
        run.log.info("nothing left to train at update %d; exporting", state.global_step)
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    train_start = time.perf_counter()
    model.train()
    if args.init_from and state.global_step == 0:  # the starting point's own score, logged at update 0
        metrics = validate(model, val_dl, accelerator, run, state, args, optimizer.param_groups[0]["lr"])
        ckpt.update_best(state, metrics, model)
    meter = TrainMeter(accelerator, run.log)
    while state.global_step < max_steps and not stop:
        for batch in meter.timed(ckpt.remaining_batches(train_dl, state)):
            loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
            meter.add(loss, parts, batch["a"].shape[0])
            if not accelerator.sync_gradients:
                continue
            ckpt.check_finite(grad_norm, state)
            # The schedule counts applied updates: under fp16 the scaler may skip an overflowing one.
            if args.lr_schedule == "cosine" and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % args.log_every_steps == 0:
                meter.write(state.global_step, optimizer.param_groups[0]["lr"], grad_norm)
            last_step = state.global_step >= max_steps
            if state.global_step % eval_every == 0 or last_step:
                metrics = validate(model, val_dl, accelerator, run, state, args, optimizer.param_groups[0]["lr"])
                if args.lr_schedule == "plateau":
                    scheduler.step(metrics[monitor])
                ckpt.update_best(state, metrics, model)
                stop = stopper.should_stop(metrics, accelerator)
                if stop:
                    run.log.info("early stopping at update %d: %s has not improved for %d evaluations",
                                 state.global_step, monitor, stopper.bad_evals)
            if state.global_step % save_every == 0 or stop or last_step:  # the end too: resuming is free
                ckpt.save(state)
            if stop or last_step:
                break
    progress.close()

    # final/ is written last (a run with final/ is finished): the best weights predict first, then the final
    # weights come back for the export.
    final_weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    splits = {"val": val_dl, **extra_dls}
    train_minutes = (time.perf_counter() - train_start) / 60
    result = predict_splits(model, splits, accelerator, run, state,
                            {"seed": args.seed, "params": n_params, "train_minutes": train_minutes})
    accelerator.unwrap_model(model).load_state_dict(final_weights)
    ckpt.export_final(model, None, state.last_metrics, state)
    if accelerator.is_main_process:
        print(f"\nbest model (update {state.best_step}) of {run.dir}, {train_minutes:.1f} min:")
        for key, value in result.items():
            if "/" in key:
                print(f"  {key:20s} {value:10.4f}")
        print(f"predictions: {run.dir / 'predictions'}  weights: best/ and final/ model.safetensors")
    accelerator.end_training()


if __name__ == "__main__":
    main()

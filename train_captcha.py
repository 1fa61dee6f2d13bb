"""Slider-CAPTCHA localisation: Lite-HRNet-18 + LiteFPN with CenterNet heads.

    accelerate launch train_captcha.py --config configs/captcha_quick.yaml --cpu   # minutes on a laptop CPU
    accelerate launch train_captcha.py --config configs/captcha_full.yaml          # the GPU recipe
    accelerate launch train_captcha.py --resume auto                               # continue the latest run

The model finds the gap and the slider piece in a composite CAPTCHA letterboxed to
512x256 (RGB + padding mask). Training data is generated online in the DataLoader
workers (a fresh set every epoch, rendered with the ``--render`` mix); the validation set
is fixed by ``--val_seed`` and always rendered as the original generator did. A second,
held-out set (``--heldout_size``, ``--heldout_seed``) is rendered with settings the training
mix never uses and is evaluated beside it (``val_heldout/*``). ``--backgrounds DIR`` adds your
own photos to the training backgrounds. Bring your own labelled images with
``--train_dir``/``--val_dir`` (a folder with ``labels.csv``, see ``python -m data.captcha export``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.captcha import (CANVAS_H, CANVAS_W, CATEGORIES, RENDER_HELDOUT, RENDERS, CaptchaFolderDataset,
                          SyntheticCaptchaDataset, halve_canvas, load_backgrounds)
from losses.captcha import captcha_loss
from metrics.captcha import captcha_metrics, decode_on, point_errors
from models.lite_hrnet import LiteHRNet18FPN
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.export import build_model, model_record
from training.run import log_images
from training.summary import TrainMeter, append_summary


@dataclass
class Args:
    """Train the slider-CAPTCHA solver (Lite-HRNet-18 + LiteFPN, CenterNet heads)."""
    config: str | None = None             # YAML preset that sets defaults; the command line wins
    output_dir: str = "runs/captcha"      # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>
    max_steps: int = 20_000               # optimizer updates, not micro-batches
    batch_size: int = 32                  # per device, per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 3e-4                      # peak AdamW learning rate
    weight_decay: float = 0.05            # AdamW decoupled weight decay
    warmup_steps: int = 500               # linear warm-up, in updates
    restart_steps: int = 2_000            # first cosine cycle in updates; each next cycle is twice as long
    min_lr: float = 3e-6                  # floor of every cosine cycle
    clip_grad: float = 1.0                # max global gradient norm
    ema_decay: float = 0.999              # EMA of weights and BN buffers (timm ModelEmaV3); 0 disables
    seed: int = 42                        # seeds weights, sampler order and the synthetic training data
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU (with ACCELERATE_USE_CPU=1 for multi-process gloo runs)
    num_workers: int = 4                  # DataLoader workers per process (the generator runs there)
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = 1_000  # updates between evaluations; none: one epoch
    save_every_steps: int | None = 1_000  # updates between full-state checkpoints; none: one epoch
    keep_last: int = 3                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by the monitored metric) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    init_from: str | None = None          # start from these weights (run dir, export or checkpoint; EMA if present)
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # tracker; W&B runs offline unless logged in
    train_size: int = 50_000              # synthetic samples per epoch (new ones every epoch)
    val_size: int = 2_000                 # fixed synthetic validation samples
    val_seed: int = 1_000_003             # seed of the validation set (keep it apart from --seed)
    heldout_size: int | None = None       # held-out rendering set (val_heldout/*); none: = val_size (0 with --val_dir)
    heldout_seed: int = 2_000_003         # seed of the held-out set (keep it apart from --seed and --val_seed)
    render: Literal["default", "train"] = "default"  # training data mix: default (original) or train (docs/captcha.md)
    backgrounds: str | None = None        # folder of your images (png/jpg/jpeg/webp/bmp) added to the backgrounds
    backgrounds_prob: float = 0.5         # share of training samples drawn on a --backgrounds image
    train_dir: str | None = None          # folder with labels.csv + images to train on instead of synthetic data
    val_dir: str | None = None            # folder with labels.csv + images to validate on
    fpn_channels: int = 64                # LiteFPN width
    head_channels: int = 64               # width of the CenterNet heads' trunk
    with_angle: bool = True               # predict the gap's rotation (sin, cos)
    freeze_bn: bool = False               # BatchNorm in eval mode (running stats frozen), e.g. tiny per-device batches
    channels_last: bool = False           # NHWC memory format (faster convolutions on recent GPUs)
    compile: bool = False                 # torch.compile the model
    small_canvas_steps: int = 0           # progressive resizing: the first N updates train on the canvas halved
    input_scale: Literal[1, 2, 4] = 1     # the model shrinks the canvas this many times first (2: runs on 256x128)
    focal_alpha: float = 2.0              # CenterNet focal loss exponents
    focal_beta: float = 4.0               # down-weights negatives near a peak: (1 - target)^beta
    pos_threshold: float = 1.0            # heatmap cells >= this are positives (1.0 = peak cell only)
    heatmap_sigma: float = 1.5            # Gaussian target sigma, in output cells (4 px x input_scale)
    offset_weight: float = 1.0            # weight of the sub-cell offset L1 loss
    hard_negative_weight: float = 0.5     # margin loss of the true gap against fake gaps
    hard_negative_margin: float = 0.2     # required logit gap between the true gap and a fake gap
    angle_weight: float = 0.5             # weight of the gap-rotation loss (with --with_angle)
    patience: int = 10                    # evaluations without improvement before stopping; 0 disables
    min_evals: int = 5                    # evaluations before early stopping may count
    guard_min_delta: float = 0.05         # mae_px gain (px) that credits patience back (second guard)
    num_figures: int = 6                  # samples per figure (overlays, heatmaps, worst failures)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "log_every_steps", "train_size", "val_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every_steps", "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1 (or none), got {getattr(self, name)}")
        for name in ("lr", "restart_steps", "clip_grad"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise UsageError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.small_canvas_steps < 0:
            raise UsageError(f"--small_canvas_steps must be >= 0 (0 trains on the full canvas), got "
                             f"{self.small_canvas_steps}")
        if self.small_canvas_steps and self.input_scale > 1:
            raise UsageError(f"--small_canvas_steps halves the canvas of a full-size model; with --input_scale "
                             f"{self.input_scale} the model already runs on a smaller one")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.keep_last < 0 or self.save_top_k < 0:
            raise UsageError("--warmup_steps, --num_workers, --keep_last and --save_top_k must be >= 0")
        if self.val_seed == self.seed and self.train_dir is None and self.val_dir is None:
            raise UsageError("--val_seed must differ from --seed, or validation samples repeat training samples")
        if self.heldout_size is None:   # your own validation folder: no synthetic held-out set unless asked
            self.heldout_size = 0 if self.val_dir is not None else self.val_size
        if self.heldout_size < 0:
            raise UsageError(f"--heldout_size must be >= 0 (0 skips the held-out set), got {self.heldout_size}")
        if self.heldout_size and self.heldout_seed in (self.seed, self.val_seed):
            # the same seed draws the same layouts (categories, sizes, positions) under any render mix
            raise UsageError(f"--heldout_seed {self.heldout_seed} must differ from --seed and --val_seed")
        if not 0 <= self.backgrounds_prob <= 1:
            raise UsageError(f"--backgrounds_prob must be in [0, 1], got {self.backgrounds_prob}")
        if self.backgrounds is not None and self.train_dir is not None:
            raise UsageError("--backgrounds adds to the synthetic training data; with --train_dir it would be unused")
        if self.render != "default" and self.train_dir is not None:
            raise UsageError(f"--render {self.render} renders the synthetic training data; with --train_dir it "
                             "would be unused")


def build_dataloaders(args: Args):
    """Training, validation and held-out loaders (the last None with --heldout_size 0). The validation set
    keeps the original rendering whatever --render says, so its numbers stay comparable across runs and
    with benchmarks/captcha_quality.py, which regenerates it from --val_seed."""
    try:
        backgrounds = load_backgrounds(args.backgrounds) if args.backgrounds else ()
        render = dataclasses.replace(RENDERS[args.render], user_prob=args.backgrounds_prob)
        train_ds = (CaptchaFolderDataset(args.train_dir) if args.train_dir
                    else SyntheticCaptchaDataset(args.train_size, seed=args.seed, fresh_each_epoch=True,
                                                 render=render, backgrounds=backgrounds))
        val_ds = (CaptchaFolderDataset(args.val_dir) if args.val_dir
                  else SyntheticCaptchaDataset(args.val_size, seed=args.val_seed, fresh_each_epoch=False))
        heldout_ds = (SyntheticCaptchaDataset(args.heldout_size, seed=args.heldout_seed, fresh_each_epoch=False,
                                              render=RENDER_HELDOUT) if args.heldout_size else None)
    except ValueError as e:
        fail(str(e))
    # Workers are not persistent: each epoch they get a fresh copy of the dataset with the new epoch.
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=True, **common)
    val_dl = DataLoader(val_ds, shuffle=False, drop_last=False, **common)
    heldout_dl = DataLoader(heldout_ds, shuffle=False, drop_last=False, **common) if heldout_ds else None
    return train_dl, val_dl, heldout_dl


def build_scheduler(optimizer, args: Args):
    """Linear warm-up, then cosine annealing with warm restarts (cycles of restart_steps x 1, 2, 4, ...)."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=args.restart_steps, T_mult=2, eta_min=args.min_lr)
    if args.warmup_steps == 0:
        return cosine
    # From lr/1000, not 0: LinearLR cannot start at 0, and the first updates of a freshly initialised model
    # (random heads, BatchNorm statistics still settling) are the ones a full-size step would blow up.
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=args.warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[args.warmup_steps])


def model_kwargs(args: Args) -> dict:
    """LiteHRNet18FPN's constructor arguments (recorded in model.json, so exports rebuild the model).
    input_scale only when it is not 1: the model.json of runs made before it existed stays the same, so
    they still resume."""
    scale = {"input_scale": args.input_scale} if args.input_scale != 1 else {}
    return dict(in_chans=4, fpn_channels=args.fpn_channels, head_channels=args.head_channels,
                with_angle=args.with_angle, **scale)


def loss_kwargs(args: Args) -> dict:
    return dict(alpha=args.focal_alpha, beta=args.focal_beta, pos_threshold=args.pos_threshold,
                sigma=args.heatmap_sigma, offset_weight=args.offset_weight,
                hard_negative_weight=args.hard_negative_weight,
                hard_negative_margin=args.hard_negative_margin, angle_weight=args.angle_weight)


def set_train_mode(model, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def to_input(image: torch.Tensor, args: Args) -> torch.Tensor:
    return image.contiguous(memory_format=torch.channels_last) if args.channels_last else image


@torch.no_grad()
def evaluate(model, val_dl, accelerator, args: Args):
    """Gathered per-sample predictions over the whole validation set -> (metrics, arrays)."""
    model.eval()
    collected = {"pred": [], "true": [], "score": [], "index": [], "category": []}
    for batch in val_dl:
        image = to_input(batch["image"], args)
        with accelerator.autocast():
            outputs = model(image)
        points, scores = decode_on(outputs, batch["image"])
        true = torch.stack([batch["gap"], batch["slider"]], dim=1)
        gathered = accelerator.gather_for_metrics((points, true, scores, batch["index"], batch["category"]))
        for key, value in zip(collected, gathered):
            collected[key].append(value.cpu())
    arrays = {k: torch.cat(v).numpy() for k, v in collected.items()}
    metrics = {**captcha_metrics(arrays["pred"], arrays["true"]), "num_samples": float(len(arrays["pred"]))}
    return metrics, arrays


def _draw(image: torch.Tensor, true: np.ndarray, pred: np.ndarray, text: str) -> np.ndarray:
    """RGB uint8 canvas with truth (green) and prediction (red); circle = gap, square = slider."""
    rgb = np.ascontiguousarray((image[:3].permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8))
    for k, color in enumerate(((0, 255, 0), (255, 0, 0))):
        points = true if k == 0 else pred
        gx, gy, sx, sy = (int(round(float(v))) for v in points.reshape(-1))
        cv2.circle(rgb, (gx, gy), 6, color, 1, cv2.LINE_AA)
        cv2.rectangle(rgb, (sx - 6, sy - 6), (sx + 6, sy + 6), color, 1, cv2.LINE_AA)
    cv2.putText(rgb, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
    return rgb


def _heat(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Heatmap scaled to its own peak (early in training peaks are far below 1), peak value printed."""
    prob = torch.sigmoid(logits.float()).cpu().numpy()
    heat = (prob / max(float(prob.max()), 1e-6) * 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(cv2.resize(heat, size, interpolation=cv2.INTER_NEAREST),
                                          cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    cv2.putText(heat, f"peak {prob.max():.2f}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return heat


@torch.no_grad()
def make_figures(model, val_ds, arrays: dict, args: Args, device) -> dict:
    """Prediction overlays, heatmaps and the worst failures of one evaluation, as RGB arrays."""
    k = min(args.num_figures, len(arrays["index"]))
    errors = point_errors(arrays["pred"], arrays["true"])["combined"]
    worst = np.argsort(-errors)[:k]
    first = np.arange(k)
    rows = {"vis/overlay": [], "vis/heatmaps": [], "vis/worst": []}
    for name, picks in (("vis/overlay", first), ("vis/worst", worst)):
        samples = [val_ds[int(arrays["index"][p])] for p in picks]
        image = torch.stack([s["image"] for s in samples]).to(device)
        outputs = model(to_input(image, args))
        for row, p in enumerate(picks):
            cat = CATEGORIES[arrays["category"][p]] if arrays["category"][p] >= 0 else "user"
            text = f"#{arrays['index'][p]} {cat} err {errors[p]:.1f}px"
            rows[name].append(_draw(image[row], arrays["true"][p], arrays["pred"][p], text))
            if name == "vis/overlay":
                size = (image.shape[-1], image.shape[-2])
                rows["vis/heatmaps"].append(np.concatenate(
                    [_heat(outputs["gap"][row, 0], size), _heat(outputs["slider"][row, 0], size)], axis=1))
    return {key: np.concatenate(tiles, axis=0) for key, tiles in rows.items() if tiles}


def train_step(model, batch, optimizer, accelerator, args: Args):
    """One micro-batch: forward, loss, backward; on the last micro-batch of an accumulation group also clip
    and step. -> (detached loss, loss parts, clipped-gradient norm or None between updates)."""
    grad_norm = None
    with accelerator.accumulate(model):
        outputs = model(to_input(batch["image"], args))
        loss, parts = captcha_loss(outputs, batch, **loss_kwargs(args))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()  # between updates Accelerate's wrapper skips the step and keeps the gradients
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), parts, grad_norm


def validate(model, ema, val_dl, heldout_dl, accelerator, run, state: TrainState, args: Args, lr: float) -> dict:
    """Evaluate the raw and the EMA weights on the validation set (val/*, val_ema/*) and the held-out
    rendering set (val_heldout/*, val_heldout_ema/*), log them, append summary.csv, draw figures."""
    metrics, arrays = evaluate(model, val_dl, accelerator, args)
    metrics = {f"val/{k}": v for k, v in metrics.items()}
    if heldout_dl is not None:  # reported only: model selection and early stopping look at val/* alone
        metrics.update({f"val_heldout/{k}": v for k, v in evaluate(model, heldout_dl, accelerator, args)[0].items()})
    selected = model
    if ema is not None:
        ema_metrics, arrays = evaluate(ema.module, val_dl, accelerator, args)
        metrics.update({f"val_ema/{k}": v for k, v in ema_metrics.items()})
        if heldout_dl is not None:
            metrics.update({f"val_heldout_ema/{k}": v
                            for k, v in evaluate(ema.module, heldout_dl, accelerator, args)[0].items()})
        selected = ema.module
    state.last_metrics = metrics
    accelerator.log(metrics, step=state.global_step)
    run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                 "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "hit" in k or "mae_px" in k))
    if accelerator.is_main_process:
        append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch,
                                          "train/lr": lr, **metrics})
        if args.num_figures > 0:
            figures = make_figures(accelerator.unwrap_model(selected), val_dl.dataset, arrays, args, accelerator.device)
            log_images(accelerator, run, figures, state.global_step)
    set_train_mode(model, args.freeze_bn)
    return metrics


def main():
    args = parse_args(Args)
    train_dl, val_dl, heldout_dl = build_dataloaders(args)  # before start_run: bad data fails before a run exists
    model_json = model_record(LiteHRNet18FPN, **model_kwargs(args))
    accelerator, run = start_run(args, task="captcha", model_json=model_json)
    if args.backgrounds:
        run.log.info("backgrounds: %d images from %s in %.0f %% of the training samples",
                     len(train_dl.dataset.backgrounds), args.backgrounds, 100 * args.backgrounds_prob)
    model = build_model(model_json)
    run.load_init(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run.log.info("model: %.3f M parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    if args.small_canvas_steps:
        run.log.info("progressive resizing: updates 1-%d on the canvas halved (%dx%d), then %dx%d; evaluation on "
                     "the full canvas", min(args.small_canvas_steps, args.max_steps), CANVAS_W // 2, CANVAS_H // 2,
                     CANVAS_W, CANVAS_H)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    heldout_dl = accelerator.prepare(heldout_dl) if heldout_dl is not None else None
    if args.compile:
        model = torch.compile(model)
    scheduler = build_scheduler(optimizer, args)  # not prepared: stepped once per real update
    updates_per_epoch = max(1, len(train_dl) // args.grad_accum)  # len(train_dl) is per process after prepare
    eval_every = args.eval_every_steps or updates_per_epoch
    save_every = args.save_every_steps or updates_per_epoch
    # warmup_power 3/4 (timm's default is 2/3): the EMA's effective horizon grows a little faster, so short
    # CPU runs are not judged on weights averaged mostly over the first, worst updates.
    ema = (ModelEmaV3(accelerator.unwrap_model(model), decay=args.ema_decay, use_warmup=True, warmup_power=3 / 4)
           if args.ema_decay > 0 else None)
    monitor = "val_ema/hit_le_5px" if ema is not None else "val/hit_le_5px"
    state = TrainState()
    stopper = EarlyStopping(monitor, mode="max", patience=args.patience, min_evals=args.min_evals,
                            guard_monitor=monitor.replace("hit_le_5px", "mae_px"), guard_mode="min",
                            guard_min_delta=args.guard_min_delta)
    ckpt = Checkpointer(accelerator, run, monitor=monitor, mode="max", keep_last=args.keep_last,
                        save_top_k=args.save_top_k, model_json=model_json)
    ckpt.register(scheduler, state, stopper, *([ema] if ema is not None else []))
    ckpt.resume(state)

    stop = stopper.stopped  # a resumed run that had stopped early stays stopped
    if state.global_step >= args.max_steps or stop:
        run.log.info("nothing left to train at update %d; exporting", state.global_step)
    progress = tqdm(total=args.max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    set_train_mode(model, args.freeze_bn)
    if args.init_from and state.global_step == 0:  # the starting point's own score, logged at update 0
        metrics = validate(model, ema, val_dl, heldout_dl, accelerator, run, state, args,
                           optimizer.param_groups[0]["lr"])
        ckpt.update_best(state, metrics, model, ema)
    meter = TrainMeter(accelerator, run.log)
    while state.global_step < args.max_steps and not stop:
        for batch in meter.timed(ckpt.remaining_batches(train_dl, state)):
            if state.global_step < args.small_canvas_steps:   # 3.4x cheaper per update (docs/captcha.md)
                batch = halve_canvas(batch)
            loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
            meter.add(loss, parts, batch["image"].shape[0])
            if not accelerator.sync_gradients:
                continue
            ckpt.check_finite(grad_norm, state)
            # The schedule counts applied updates: under fp16 the scaler may skip an overflowing one.
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.global_step)
            progress.update(1)
            if state.global_step % args.log_every_steps == 0:
                meter.write(state.global_step, optimizer.param_groups[0]["lr"], grad_norm)
            last_step = state.global_step >= args.max_steps
            if state.global_step % eval_every == 0 or last_step:
                metrics = validate(model, ema, val_dl, heldout_dl, accelerator, run, state, args,
                                   optimizer.param_groups[0]["lr"])
                ckpt.update_best(state, metrics, model, ema)
                stop = stopper.should_stop(metrics, accelerator)
                if stop:
                    run.log.info("early stopping at update %d: %s has not improved for %d evaluations",
                                 state.global_step, monitor, stopper.bad_evals)
            if state.global_step % save_every == 0 or stop or last_step:  # the end too: resuming is free
                ckpt.save(state)
            if stop or last_step:
                break
    progress.close()

    ckpt.export_final(model, ema, state.last_metrics, state)
    if accelerator.is_main_process:
        best = f"{state.best:.2f}" if state.best is not None else "n/a"
        print(f"\nvalidation after {state.global_step} updates:")
        for key, value in state.last_metrics.items():
            print(f"  {key:28s} {value:10.4f}")
        print(f"best {monitor} = {best} at update {state.best_step}")
        print(f"run directory: {run.dir}  (best/ and final/ hold model.safetensors and model_ema.safetensors)")
    accelerator.end_training()


if __name__ == "__main__":
    main()

"""Two-colour ratiometric SMLM: DoubleMUNet trained on simulated two-channel movies (smlm.md §7.3, §11).

    accelerate launch train_smlm_colour.py --config configs/smlm_colour_quick.yaml --cpu
    accelerate launch train_smlm_colour.py --config configs/smlm_colour_cpu.yaml --cpu
    accelerate launch train_smlm_colour.py --config configs/smlm_colour_cpu.yaml --cpu --teacher runs/smlm_colour/T \
        --initial_features 8 --inter_features 8 --shared_weights          # distil a smaller student

The single-colour script (train_smlm.py) with two channels. What differs:

- The preset's ``simulation:`` section is a ``data.smlm.colour.ColourConfig``: channel1 (SimConfig keys; the
  emitters are channel1's), channel2 (the keys that differ: PSF, camera, background), dyes (ratio mean and
  spread, fraction), registration (channel 2's shift, rotation, scale, undone before the network) and an
  optional curriculum.
- Loss: per channel the DECODE mixture-model loss, plus the ratio's Gaussian NLL, photon conservation and
  consistency (losses/smlm_colour.py), each weighted by a schedule, a pure function of ``global_step``
  (``--w_<term> kind:start:end:start_step:end_step``, kinds constant, linear, exponential, cosine), logged as
  train/weight/<term> at every log line. Nothing is a stateful scheduler, so a resumed run recomputes them.
- Curriculum: stage s of the simulation holds for updates [until_step_{s-1}, until_step_s); the stage of an
  epoch is the stage of its first update, and every until_step must be a whole number of epochs, so the stage
  is an exact function of global_step and a resumed run simulates the stage it stopped in. Each switch is
  logged (train/curriculum_stage and a log line).
- Distillation (``--teacher RUN``): a trained two-colour run's p maps and Gaussians are soft targets for this
  (smaller) network: BCE on p and KL between the Gaussians (not a softmax over channels, smlm.md §10 #8),
  added with the weight ``--w_distill``.
- Evaluation on the fixed validation movie: per-channel detection and localisation (val/ch1/*, val/ch2/*),
  the merged localisations of both channels (val/jaccard, rmse, effcy as train_smlm.py), the ratio error of
  the matched ones (val/ratio_rmse, val/ratio_bias, val/ratio_z_std), and their colour by maximum likelihood
  over the dyes (val/colour_accuracy, val/crosstalk, val/rejected at ``--min_confidence``, and
  val/crosstalk_i_j per pair of dyes).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.smlm.colour import (ColourConfig, ColourMovieWindowDataset, ColourSimDataset, collate_colour,
                              colour_ground_truth, load_colour_config, simulate_colour_movie, write_colour_h5)
from losses.smlm_colour import colour_loss_terms, distillation_terms, parse_schedule, schedule_value, weighted_sum
from metrics.smlm_colour import assign_colour, colour_scores
from models.double_munet import N_CHANNELS_2C, DoubleMUNet
from models.double_munet_post import colour_detections
from models.sigma_munet import check_size
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.export import build_model, load_export, model_record
from training.run import log_images
from training.summary import TrainMeter, append_summary

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RAW_TH_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)   # detection thresholds tried at each evaluation
LOSS_TERMS = ("ch1", "ch2", "ratio", "conservation", "consistency")


@dataclass
class Args:
    """Train a two-colour DoubleMUNet on simulated ratiometric SMLM movies."""
    config: str | None = None             # YAML preset: flat training flags and a simulation: section (ColourConfig)
    sim_config: str | None = None         # YAML whose simulation: section sets the simulator; default: --config's
    output_dir: str = "runs/smlm_colour"  # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>
    samples_per_epoch: int = 10_000       # fresh training windows simulated per epoch
    val_frames: int = 512                 # frames of the fixed validation movie
    val_seed: int = 1                     # seed of the validation movie (independent of --seed)
    window: int = 3                       # consecutive frames per input and channel, centred on the target frame
    max_steps: int = 156_000              # optimizer updates
    batch_size: int = 64                  # per device, per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 6e-4                      # AdamW learning rate (smlm.md §4)
    weight_decay: float = 0.1             # AdamW (smlm.md §4)
    lr_step_epochs: int = 10              # StepLR step size in epochs of --samples_per_epoch
    lr_gamma: float = 0.9                 # StepLR factor per step
    clip_grad: float = 0.03               # max global gradient norm (smlm.md §4)
    count_times_num_emitters: bool = True  # per-channel count term x emitters per frame, as DECODE's code
    w_ch1: str = "constant:1"             # weight schedule of channel 1's mixture-model loss (kind:start:end:from:to)
    w_ch2: str = "constant:1"             # weight schedule of channel 2's mixture-model loss
    w_ratio: str = "constant:1"           # weight schedule of the ratio's Gaussian NLL
    w_conservation: str = "constant:0.1"  # weight schedule of photon conservation (ch1 + ch2 = total)
    w_consistency: str = "constant:0.05"  # weight schedule of ratio head vs the channels' photon estimates
    w_distill: str = "constant:1"         # weight schedule of the distillation terms (only with --teacher)
    teacher: str | None = None            # trained two-colour run (or export) whose outputs supervise this one
    curriculum: bool = True               # follow the simulation's curriculum stages; --no-curriculum: its final one throughout
    initial_features: int = 48            # U-Net features at the top level (per channel)
    inter_features: int = 48              # features between the U-Nets and the heads
    depth_shared: int = 2                 # down steps of the per-frame U-Net
    depth_union: int = 2                  # down steps of the union U-Net
    activation: Literal["elu", "relu"] = "elu"  # U-Net non-linearity
    shared_weights: bool = False          # one SigmaMUNet for both channels (half the parameters)
    raw_th: float | None = None           # SpatialIntegration threshold on p; None: best of RAW_TH_GRID on val
    min_confidence: float = 0.9           # colour assignments below this posterior are left unassigned (dye -1)
    select_metric: Literal["effcy_lat", "jaccard", "colour_accuracy"] = "effcy_lat"  # picks best/
    patience: int = 0                     # evaluations without improvement before stopping; 0 disables
    seed: int = 42                        # seeds weights and the simulated training windows
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU
    num_workers: int = 4                  # DataLoader workers per process; they run the simulation
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = None   # updates between evaluations; default: one epoch
    save_every_steps: int | None = None   # updates between full-state checkpoints; default: one epoch
    keep_last: int = 2                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by --select_metric) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    init_from: str | None = None          # start from these weights (run dir, export or checkpoint)
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # tracker; W&B runs offline unless logged in
    num_figures: int = 1                  # busiest validation frames drawn per evaluation; 0 disables

    def __post_init__(self):
        for name in ("samples_per_epoch", "val_frames", "max_steps", "batch_size", "grad_accum", "lr_step_epochs",
                     "initial_features", "inter_features", "log_every_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every_steps", "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1 (or none), got {getattr(self, name)}")
        if self.window < 1 or self.window % 2 == 0:
            raise UsageError(f"--window must be an odd number of frames >= 1, got {self.window}")
        if self.lr <= 0 or self.clip_grad <= 0 or self.weight_decay < 0:
            raise UsageError("--lr and --clip_grad must be > 0 and --weight_decay >= 0")
        if not 0 < self.lr_gamma <= 1 or (self.raw_th is not None and not 0 < self.raw_th < 1):
            raise UsageError("--lr_gamma must be in (0, 1] and --raw_th in (0, 1) (or none)")
        if not 0 <= self.min_confidence < 1:
            raise UsageError(f"--min_confidence must be in [0, 1), got {self.min_confidence}")
        if min(self.depth_shared, self.depth_union, self.num_workers, self.keep_last, self.save_top_k,
               self.patience, self.num_figures) < 0:
            raise UsageError("--depth_*, --num_workers, --keep_last, --save_top_k, --patience and --num_figures "
                             "must be >= 0")
        for term in (*LOSS_TERMS, "distill"):
            try:
                parse_schedule(getattr(self, f"w_{term}"))
            except ValueError as e:
                raise UsageError(f"--w_{term}: {e}") from None


def loss_weights(args: Args, step: int) -> dict[str, float]:
    """Every loss term's weight at update `step`: a pure function of the step (resume needs no state)."""
    return {term: schedule_value(step, **parse_schedule(getattr(args, f"w_{term}")))
            for term in (*LOSS_TERMS, "distill")}


def parse_colour_args(argv: list[str] | None = None) -> tuple[Args, ColourConfig]:
    args = parse_args(Args, argv, sections=("simulation",))
    try:
        if args.sim_config is not None:
            cfg = load_colour_config(args.sim_config)
        elif args.config is not None and "simulation" in (yaml.safe_load(Path(args.config).read_text()) or {}):
            cfg = load_colour_config(args.config)
        else:
            cfg = ColourConfig()
        if not args.curriculum:
            cfg = dataclasses.replace(cfg, curriculum=())
        check_size(*cfg.img_size, max(args.depth_shared, args.depth_union))
    except ValueError as e:
        fail(str(e))
    # Batches per process and epoch as Accelerate will shard them (drop_last), checked before a run exists.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_curriculum_grid(cfg, args.samples_per_epoch // args.batch_size // world, args.grad_accum)
    return args, cfg


def check_curriculum_grid(cfg: ColourConfig, batches_per_epoch: int, grad_accum: int) -> None:
    """The curriculum's stage of an epoch is the stage of its first update, so every until_step must be a whole
    number of epochs of whole updates; else one line and exit 2."""
    if not cfg.curriculum:
        return
    if batches_per_epoch % grad_accum:
        fail(f"simulation curriculum: {batches_per_epoch} batches per epoch are not a whole number of updates of "
             f"--grad_accum {grad_accum}; the stages need whole epochs of updates")
    updates = max(1, batches_per_epoch // grad_accum)
    bad = [s["until_step"] for s in cfg.curriculum if s["until_step"] % updates]
    if bad:
        fail(f"simulation curriculum: until_step {bad[0]} is not a whole number of epochs of {updates} updates "
             f"(the stage of an epoch is the stage of its first update)")


def build_validation(cfg: ColourConfig, args: Args):
    """The fixed validation movie (simulated from --val_seed on the CPU: the same on every rank), its windows
    and its ground truth."""
    try:
        movie = simulate_colour_movie(cfg, args.val_frames, torch.Generator().manual_seed(args.val_seed))
        val_ds = ColourMovieWindowDataset(movie, cfg, args.window)
        val_ds[0]
    except ValueError as e:
        fail(f"validation movie: {e}")
    return movie, val_ds, colour_ground_truth(movie, cfg)


def build_dataloaders(cfg: ColourConfig, val_ds, args: Args):
    train_ds = ColourSimDataset(cfg, args.samples_per_epoch, seed=args.seed, window=args.window)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_colour,
                  pin_memory=torch.cuda.is_available())
    # No shuffle: every window is a fresh simulation already. Not persistent workers: a new epoch (and a new
    # curriculum stage) must reach the workers' copies of the dataset.
    return (DataLoader(train_ds, shuffle=False, drop_last=True, **common),
            DataLoader(val_ds, shuffle=False, **common))


def model_kwargs(args: Args) -> dict:
    return dict(n_frames=args.window, depth_shared=args.depth_shared, depth_union=args.depth_union,
                initial_features=args.initial_features, inter_features=args.inter_features,
                activation=args.activation, shared_weights=args.shared_weights)


def load_teacher(args: Args, device: torch.device):
    """The --teacher network (eval mode, frozen, on `device`), checked to be a two-colour model with our window."""
    if args.teacher is None:
        return None
    try:
        export = load_export(args.teacher)
    except UsageError as e:
        fail(f"--teacher {e}")
    if not isinstance(export.model, DoubleMUNet) or export.model.n_frames != args.window:
        fail(f"--teacher {args.teacher}: expected a two-colour DoubleMUNet run with --window {args.window}, got "
             f"{type(export.model).__name__}")
    for p in export.model.parameters():
        p.requires_grad_(False)
    return export.model.to(device)


def train_step(model, batch, optimizer, accelerator, args: Args):
    """One micro-batch: forward, the loss weighted by batch["loss_weights"] (the update's schedules), plus
    distillation towards batch["teacher_maps"] when a teacher gave them, backward; on the last micro-batch of an
    accumulation group also clip and step. -> (detached loss, loss parts, clipped-gradient norm or None)."""
    grad_norm = None
    with accelerator.accumulate(model):
        output = model(batch["frames"]).float()   # the mixture likelihoods in float32 also under autocast
        terms = colour_loss_terms(output, batch["target_emitters"], batch["target_mask"], batch["channel_mask"],
                                  batch["target_bg"], count_times_num_emitters=args.count_times_num_emitters)
        if "teacher_maps" in batch:
            distill = distillation_terms(output, batch["teacher_maps"])
            terms["distill"] = distill["distill/p"] + distill["distill/gauss"]
        loss, parts = weighted_sum(terms, {k: w for k, w in batch["loss_weights"].items() if k in terms})
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), parts, grad_norm


@torch.no_grad()
def predict(model, dataloader, accelerator) -> tuple[np.ndarray, torch.Tensor]:
    """Gathered (frame index (T,), output (T, 22, H, W) on the CPU), in frame order."""
    model.eval()
    index, output = [], []
    for batch in dataloader:
        with accelerator.autocast():
            out = model(batch["frames"])
        i, o = accelerator.gather_for_metrics((batch["index"], out.float()))
        index.append(i.cpu())
        output.append(o.cpu())
    index, output = torch.cat(index), torch.cat(output)
    order = torch.argsort(index, stable=True)
    return index[order].numpy(), output[order]


def evaluate(index: np.ndarray, output: torch.Tensor, gt: dict, cfg: ColourConfig, args: Args):
    """(val/* metrics, detections) at --raw_th, or at the threshold of RAW_TH_GRID with the best
    --select_metric (NaN lowest; ties to the lower threshold)."""
    ch1, ch2 = cfg.channels
    best = None
    for raw_th in (RAW_TH_GRID if args.raw_th is None else (args.raw_th,)):
        det = colour_detections(output, raw_th, px_size_nm=ch1.px_size_nm, z_max_nm=ch1.z_max,
                                phot_max=ch1.phot_max, bg_max=(ch1.bg_max, ch2.bg_max))
        for part in det.values():
            part["frame_ix"] = index[part["frame_ix"]]
        metrics = colour_scores(det, gt, cfg.dye_means, cfg.dye_spreads, cfg.dye_priors, args.min_confidence)
        metrics["raw_th"], metrics["frames"] = raw_th, float(len(index))
        value = metrics[args.select_metric]
        if best is None or (np.isfinite(value) and not value <= best[0]):
            best = (value if np.isfinite(value) else -np.inf, metrics, det)
    return {f"val/{k}": v for k, v in best[1].items()}, best[2]


def draw_frame(frames: torch.Tensor, frame: int, gt: dict, det: dict, n_dyes: int) -> np.ndarray:
    """Both channels (channel 2 registered) of one frame: true emitters as circles and merged detections as
    crosses, coloured by (true, assigned) dye; grey crosses are unassigned."""
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), dpi=100)
    g, d = gt["frame_ix"] == frame, det["frame_ix"] == frame
    for c, ax in enumerate(axes):
        ax.imshow(frames[c, frame].numpy(), cmap="gray")
        for k in range(n_dyes):
            gk, dk = g & (gt["dye"] == k), d & (det["dye"] == k)
            ax.scatter(gt["xyz_px"][gk, 0], gt["xyz_px"][gk, 1], s=70, facecolors="none", edgecolors=colours(k))
            ax.scatter(det["xyz_px"][dk, 0], det["xyz_px"][dk, 1], s=30, marker="x", color=colours(k))
        un = d & (det["dye"] < 0)
        ax.scatter(det["xyz_px"][un, 0], det["xyz_px"][un, 1], s=30, marker="x", color="grey")
        ax.set_title(f"channel {c + 1}, frame {frame}: {int(g.sum())} true, {int(d.sum())} found")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def validate(model, val_dl, accelerator, run, state: TrainState, args: Args, lr: float, val_ds, gt: dict,
             cfg: ColourConfig) -> dict:
    index, output = predict(model, val_dl, accelerator)
    metrics, det = evaluate(index, output, gt, cfg, args)
    state.last_metrics = metrics
    accelerator.log(metrics, step=state.global_step)
    run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                 "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "crosstalk_" not in k))
    if accelerator.is_main_process:
        append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch, "train/lr": lr, **metrics})
        if args.num_figures > 0:
            merged = dict(det["merged"])
            merged["dye"], _ = assign_colour(merged["ratio"], merged["ratio_sigma"], cfg.dye_means, cfg.dye_spreads,
                                             cfg.dye_priors, args.min_confidence)
            busiest = np.argsort(-np.bincount(gt["frame_ix"], minlength=len(index)), kind="stable")[:args.num_figures]
            image = np.concatenate([draw_frame(val_ds.frames, int(f), gt, merged, len(cfg.dyes)) for f in busiest])
            log_images(accelerator, run, {"vis/frames": image}, state.global_step)
    model.train()
    return metrics


def main():
    args, cfg = parse_colour_args()
    movie, val_ds, gt = build_validation(cfg, args)
    model_json = model_record(DoubleMUNet, **model_kwargs(args))
    accelerator, run = start_run(args, task="smlm_colour", model_json=model_json)
    teacher = load_teacher(args, accelerator.device)
    if accelerator.is_main_process:
        (run.dir / "simulation.yaml").write_text(yaml.safe_dump({"simulation": cfg.to_dict()}, sort_keys=False))
        write_colour_h5(run.dir / "val_movie.h5", movie, cfg, mode="val", seed=args.val_seed)
    train_dl, val_dl = build_dataloaders(cfg, val_ds, args)
    model = build_model(model_json)
    run.load_init(model)
    n_params = sum(p.numel() for p in model.parameters())
    run.log.info("model: %.3f M parameters%s; frames %dx%d px, %.1f emitters/frame, %d dyes; validation: %d "
                 "frames, %d emitters", n_params / 1e6,
                 "" if teacher is None else f" (teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.3f} M)",
                 *cfg.img_size, cfg.channel1.em_avg, len(cfg.dyes), len(val_ds), len(gt["phot"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    updates_per_epoch = max(1, len(train_dl) // args.grad_accum)
    check_curriculum_grid(cfg, len(train_dl), args.grad_accum)   # as predicted before the run; now for certain
    eval_every = args.eval_every_steps or updates_per_epoch
    save_every = args.save_every_steps or updates_per_epoch
    run.log.info("%d updates (%d per epoch), evaluation every %d, checkpoint every %d; curriculum: %s",
                 args.max_steps, updates_per_epoch, eval_every, save_every,
                 ", ".join(f"stage {i} until update {s['until_step']}" for i, s in enumerate(cfg.curriculum))
                 or "none")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_epochs * updates_per_epoch,
                                                gamma=args.lr_gamma)
    monitor = f"val/{args.select_metric}"
    state = TrainState()
    stopper = EarlyStopping(monitor, mode="max", patience=args.patience)
    ckpt = Checkpointer(accelerator, run, monitor=monitor, mode="max", keep_last=args.keep_last,
                        save_top_k=args.save_top_k, model_json=model_json, export_files=("simulation.yaml",))
    ckpt.register(scheduler, state, stopper)
    ckpt.resume(state)

    stop = stopper.stopped
    progress = tqdm(total=args.max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    model.train()
    meter = TrainMeter(accelerator, run.log)
    stage = None
    while state.global_step < args.max_steps and not stop:
        # The stage of this epoch is that of its first update: a function of the epoch, so of global_step.
        epoch_stage = cfg.stage_at(state.epoch * updates_per_epoch)
        if epoch_stage != stage:
            stage = epoch_stage
            train_dl.dataset.set_stage(stage)
            if cfg.curriculum:
                run.log.info("curriculum stage %d of %d from update %d", stage, len(cfg.curriculum),
                             state.global_step)
                accelerator.log({"train/curriculum_stage": stage}, step=state.global_step)
        for batch in meter.timed(ckpt.remaining_batches(train_dl, state)):
            batch["loss_weights"] = weights = loss_weights(args, state.global_step)   # pure function of the update
            if teacher is not None:
                with torch.no_grad():
                    batch["teacher_maps"] = teacher(batch["frames"]).float()
            loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
            meter.add(loss, parts, batch["frames"].shape[0])
            if not accelerator.sync_gradients:
                continue
            ckpt.check_finite(grad_norm, state)
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % args.log_every_steps == 0:
                logs = meter.write(state.global_step, optimizer.param_groups[0]["lr"], grad_norm)
                used = {k: w for k, w in weights.items() if k != "distill" or teacher is not None}
                accelerator.log({f"train/weight/{k}": w for k, w in used.items()}, step=state.global_step)
                run.log.info("  terms %s  weights %s",
                             "  ".join(f"loss/{k} {logs[f'train/{k}']:.4g}" for k in used if f"train/{k}" in logs),
                             "  ".join(f"{k} {w:.3g}" for k, w in used.items()))
            last_step = state.global_step >= args.max_steps
            if state.global_step % eval_every == 0 or last_step:
                metrics = validate(model, val_dl, accelerator, run, state, args, optimizer.param_groups[0]["lr"],
                                   val_ds, gt, cfg)
                ckpt.update_best(state, metrics, model)
                stop = stopper.should_stop(metrics, accelerator)
                if stop:
                    run.log.info("early stopping at update %d: %s has not improved for %d evaluations",
                                 state.global_step, monitor, stopper.bad_evals)
            if state.global_step % save_every == 0 or stop or last_step:
                ckpt.save(state)
            if stop or last_step:
                break
    progress.close()

    ckpt.export_final(model, None, state.last_metrics, state)
    if accelerator.is_main_process:
        print(f"\nfinal model (update {state.global_step}) of {run.dir}; best {monitor} at update {state.best_step}:")
        for key, value in state.last_metrics.items():
            if "crosstalk_" not in key:
                print(f"  {key:24s} {value:10.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

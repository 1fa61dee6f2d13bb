"""DECODE-style single-molecule localisation: SigmaMUNet trained on simulated movies (smlm.md).

    accelerate launch train_smlm.py --config configs/smlm_quick.yaml --cpu            # minutes on a laptop CPU
    accelerate launch train_smlm.py --config configs/smlm_full.yaml                   # the DECODE recipe on a GPU
    accelerate launch train_smlm.py --config configs/smlm_full.yaml --sim_config my_microscope.yaml

Configuration: a preset YAML holds the flat training flags (the fields of ``Args``) and, optionally, a
top-level ``simulation:`` section with the keys of ``data.smlm.SimConfig`` (camera, PSF, emitters). The
section comes from ``--sim_config FILE`` when given, else from the ``--config`` file, else the SimConfig
defaults (smlm.md §12). Both parts reject unknown keys and bad values with one line and exit status 2.
The resolved simulation is written to ``<run>/simulation.yaml``.

Training windows are simulated on the fly (``SMLMSimDataset``), a fresh set of ``--samples_per_epoch`` every
epoch (DECODE's ``SMLMLiveDataset``), cut 16 at a time from short simulated movies (a batch size that is a
multiple of 16 simulates each movie once). Validation is one fixed movie of ``--val_frames`` frames simulated from
``--val_seed``, identically on every rank, and stored as ``<run>/val_movie.h5``. Every evaluation runs the
model over all its windows (gathered over the ranks), post-processes with SpatialIntegration at the detection
threshold ``--raw_th`` or, by default (``raw_th: null``), at the threshold of ``RAW_TH_GRID`` that maximises
``--select_metric`` on the validation movie at that evaluation (logged as val/raw_th; DECODE fixes 0.5 in
training and its fitting notebook uses 0.1; an early, under-confident network needs a lower one),
matches against the ground truth (250 nm lateral, 500 nm axial) and logs val/{jaccard, recall, precision,
f1, rmse_lat, rmse_ax, rmse_vol, mad_*, effcy_lat, effcy_ax, effcy_vol, tp, fp, fn, crlb_lat,
rmse_over_crlb, frames}. Model selection uses ``--select_metric`` (default val/effcy_lat, the SMLM-challenge
lateral efficiency; it is NaN until something is matched, so no best/ exists before that).

val/rmse_over_crlb = rmse_lat / crlb_lat, where crlb_lat = sqrt(mean(CRLB_lat^2)) over the matched
ground-truth emitters (the same emitters rmse_lat averages over), CRLB_lat = sqrt(CRLB_x^2 + CRLB_y^2) of each
emitter from metrics.smlm_crlb.emitter_crlb_nm: its photons in that frame, the frame's background, its PSF widths,
(x, y, z, photons, bg) all estimated (z only for the astigmatic PSF), the EMCCD excess-noise factor 2. It
counts only the pixels inside the frame and ignores the multi-frame input and neighbours, so it is the
single-emitter, single-frame limit; a network that sees 3 frames of a blinking emitter can go below 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.smlm import (MovieWindowDataset, SimConfig, SMLMSimDataset, collate_smlm, load_sim_config,
                       simulate_movie, write_movie_h5)
from losses.smlm import gmm_loss
from metrics.smlm import match_emitters, smlm_metrics
from metrics.smlm_crlb import ground_truth
from models.sigma_munet import SigmaMUNet, check_size
from models.sigma_munet_post import detections_from_output
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.export import build_model, model_record
from training.run import log_images
from training.summary import TrainMeter, append_summary

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RAW_TH_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # detection thresholds tried at each evaluation


@dataclass
class Args:
    """Train DECODE's SigmaMUNet on simulated SMLM movies (GMM loss, SpatialIntegration, SMLM-challenge metrics)."""
    config: str | None = None             # YAML preset: flat training flags, optionally a simulation: section
    sim_config: str | None = None         # YAML whose simulation: section sets the simulator; default: --config's, else SimConfig defaults
    output_dir: str = "runs/smlm"         # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>
    samples_per_epoch: int = 10_000       # fresh training windows simulated per epoch (smlm.md §1.7, §4)
    val_frames: int = 512                 # frames of the fixed validation movie (smlm.md §1.7)
    val_seed: int = 1                     # seed of the validation movie (independent of --seed)
    window: int = 3                       # consecutive frames per input, centred on the target frame (smlm.md §1.7)
    max_steps: int = 156_000              # optimizer updates; 1000 epochs x 156 updates (smlm.md §4)
    batch_size: int = 64                  # per device, per micro-batch (smlm.md §4)
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 6e-4                      # AdamW learning rate (smlm.md §12; §4: 2e-4 to 6e-4)
    weight_decay: float = 0.1             # AdamW (smlm.md §4)
    lr_step_epochs: int = 10              # StepLR step size in epochs of --samples_per_epoch (smlm.md §4)
    lr_gamma: float = 0.9                 # StepLR factor per step (smlm.md §4)
    clip_grad: float = 0.03               # max global gradient norm (smlm.md §4; note how small)
    count_times_num_emitters: bool = True  # count term x emitters per frame, as DECODE's code (smlm.md §3.1, §10 #2, §12)
    initial_features: int = 48            # U-Net features at the top level (smlm.md §2, §12)
    inter_features: int = 48              # features between the shared U-Net, the union U-Net and the heads
    depth_shared: int = 2                 # down steps of the per-frame U-Net
    depth_union: int = 2                  # down steps of the union U-Net
    activation: Literal["elu", "relu"] = "elu"  # U-Net non-linearity (DECODE: elu)
    raw_th: float | None = None           # SpatialIntegration threshold on p (smlm.md §5, §12); None: best of RAW_TH_GRID on val
    select_metric: Literal["effcy_lat", "jaccard"] = "effcy_lat"  # val metric that picks best/ and checkpoints
    patience: int = 0                     # evaluations without improvement before stopping; 0 disables (DECODE has none)
    seed: int = 42                        # seeds weights and the simulated training windows
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU (with ACCELERATE_USE_CPU=1 for multi-process gloo runs)
    num_workers: int = 4                  # DataLoader workers per process; they run the simulation (smlm.md §1.7)
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = None   # updates between evaluations; default: one epoch
    save_every_steps: int | None = None   # updates between full-state checkpoints; default: one epoch
    keep_last: int = 2                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by --select_metric) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    init_from: str | None = None          # start from these weights (run dir, export or checkpoint)
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # tracker; W&B runs offline unless logged in
    num_figures: int = 1                  # busiest validation frames drawn per evaluation (with residual histograms); 0 disables

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
        if min(self.depth_shared, self.depth_union, self.num_workers, self.keep_last, self.save_top_k,
               self.patience, self.num_figures) < 0:
            raise UsageError("--depth_*, --num_workers, --keep_last, --save_top_k, --patience and --num_figures "
                             "must be >= 0")


def parse_smlm_args(argv: list[str] | None = None) -> tuple[Args, SimConfig]:
    """``parse_args(Args)`` for a preset that may also carry a ``simulation:`` section, plus the SimConfig
    (from ``--sim_config``, else the preset's section, else the defaults)."""
    args = parse_args(Args, argv, sections=("simulation",))
    try:
        if args.sim_config is not None:
            cfg = load_sim_config(args.sim_config)
        elif args.config is not None and "simulation" in (yaml.safe_load(Path(args.config).read_text()) or {}):
            cfg = load_sim_config(args.config)
        else:
            cfg = SimConfig()
        check_size(*cfg.img_size, max(args.depth_shared, args.depth_union))
    except ValueError as e:
        fail(str(e))
    return args, cfg


def build_validation(cfg: SimConfig, args: Args):
    """The fixed validation movie (same on every rank: a CPU generator seeded with --val_seed), its window
    dataset and its `ground_truth`."""
    try:
        movie = simulate_movie(cfg, args.val_frames, torch.Generator().manual_seed(args.val_seed))
        val_ds = MovieWindowDataset(movie, cfg, args.window)
        val_ds[0]  # raises on a frame with more than max_targets emitters
    except ValueError as e:
        fail(f"validation movie: {e}")
    return movie, val_ds, ground_truth(movie, cfg)


def build_dataloaders(cfg: SimConfig, val_ds: MovieWindowDataset, args: Args):
    train_ds = SMLMSimDataset(cfg, args.samples_per_epoch, seed=args.seed, window=args.window)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_smlm,
                  pin_memory=torch.cuda.is_available())
    # No shuffle: every window is a fresh simulation seeded by (seed, epoch, index) already.
    # Not persistent_workers: a persistent worker keeps its copy of the dataset and would miss set_epoch.
    train_dl = DataLoader(train_ds, shuffle=False, drop_last=True, **common)
    val_dl = DataLoader(val_ds, shuffle=False, **common)
    return train_dl, val_dl


def model_kwargs(args: Args) -> dict:
    """SigmaMUNet's constructor arguments (recorded in model.json, so exports rebuild the model)."""
    return dict(n_frames=args.window, depth_shared=args.depth_shared, depth_union=args.depth_union,
                initial_features=args.initial_features, inter_features=args.inter_features, activation=args.activation)


@torch.no_grad()
def predict(model, dataloader, accelerator) -> tuple[np.ndarray, torch.Tensor]:
    """Gathered (frame index (T,), activated output (T, 10, H, W) on the CPU) over the movie, in frame order."""
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


def evaluate(index: np.ndarray, output: torch.Tensor, gt: dict, cfg: SimConfig, args: Args):
    """(metrics as val/*, detections with movie frame indices) at --raw_th, or at the threshold of RAW_TH_GRID
    with the highest --select_metric (NaN counts as lowest; ties go to the lower threshold)."""
    best = None
    for raw_th in (RAW_TH_GRID if args.raw_th is None else (args.raw_th,)):
        det = detections_from_output(output, raw_th=raw_th, px_size_nm=cfg.px_size_nm, z_max_nm=cfg.z_max,
                                     phot_max=cfg.phot_max, bg_max=cfg.bg_max)
        det["frame_ix"] = index[det["frame_ix"]]
        metrics = smlm_metrics(det["xyz_nm"], det["frame_ix"], gt["xyz_nm"], gt["frame_ix"],
                               gt_crlb_lat_nm=gt["crlb_lat_nm"])
        metrics["raw_th"], metrics["frames"] = raw_th, float(len(index))
        score = metrics[args.select_metric]
        if best is None or (np.isfinite(score) and not score <= best[0]):
            best = (score if np.isfinite(score) else -np.inf, metrics, det)
    return {f"val/{k}": v for k, v in best[1].items()}, best[2]


def figure_to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def draw_frame(movie, frame: int, gt: dict, det: dict) -> np.ndarray:
    """Frame `frame` (photons) with the true emitters (green circles) and the detections (red crosses), px."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(movie.frames[frame].numpy(), cmap="gray")
    g, d = gt["frame_ix"] == frame, det["frame_ix"] == frame
    ax.scatter(gt["xyz_px"][g, 0], gt["xyz_px"][g, 1], s=60, facecolors="none", edgecolors="lime", label="true")
    ax.scatter(det["xyz_px"][d, 0], det["xyz_px"][d, 1], s=30, marker="x", c="red", label="predicted")
    h, w = movie.frames.shape[1:]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(f"frame {frame}: {int(g.sum())} true, {int(d.sum())} predicted")
    ax.legend(loc="upper right", fontsize=8)
    return figure_to_rgb(fig)


def draw_residuals(gt: dict, det: dict) -> np.ndarray:
    """Histograms of prediction - truth (nm) in x, y and z over the matched pairs."""
    pred_idx, gt_idx = match_emitters(det["xyz_nm"], det["frame_ix"], gt["xyz_nm"], gt["frame_ix"])
    residual = det["xyz_nm"][pred_idx] - gt["xyz_nm"][gt_idx]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), dpi=100)
    for k, (ax, name) in enumerate(zip(axes, ("x", "y", "z"))):
        ax.hist(residual[:, k], bins=40, color="tab:blue")
        ax.set_xlabel(f"d{name} (nm)")
    axes[0].set_title(f"{len(pred_idx)} matched pairs")
    fig.tight_layout()
    return figure_to_rgb(fig)


def train_step(model, batch, optimizer, accelerator, args: Args):
    """One micro-batch: forward, loss, backward; on the last micro-batch of an accumulation group also clip
    and step. -> (detached loss, loss parts, clipped-gradient norm or None between updates)."""
    grad_norm = None
    with accelerator.accumulate(model):
        output = model(batch["frames"])
        # The loss in float32 also under bf16 autocast: the Gaussian-mixture log-likelihood needs the range.
        loss, parts = gmm_loss(output.float(), batch["target_emitters"], batch["target_mask"], batch["target_bg"],
                               count_times_num_emitters=args.count_times_num_emitters)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()  # between updates Accelerate's wrapper skips the step and keeps the gradients
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), parts, grad_norm


def validate(model, val_dl, accelerator, run, state: TrainState, args: Args, lr: float, movie, gt: dict,
             cfg: SimConfig) -> dict:
    """Localise the validation movie, log val/*, append summary.csv, draw the busiest frames and the residuals."""
    index, output = predict(model, val_dl, accelerator)
    metrics, det = evaluate(index, output, gt, cfg, args)
    state.last_metrics = metrics
    accelerator.log(metrics, step=state.global_step)
    run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                 "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if accelerator.is_main_process:
        append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch, "train/lr": lr, **metrics})
        if args.num_figures > 0:
            busiest = np.argsort(-np.bincount(gt["frame_ix"], minlength=len(index)), kind="stable")[:args.num_figures]
            frames = np.concatenate([draw_frame(movie, int(f), gt, det) for f in busiest], axis=0)
            log_images(accelerator, run, {"vis/frames": frames, "vis/residuals": draw_residuals(gt, det)},
                       state.global_step)
    model.train()
    return metrics


def main():
    args, cfg = parse_smlm_args()
    # The validation movie, its ground truth and the model size check come first: bad input fails before a run exists.
    movie, val_ds, gt = build_validation(cfg, args)
    model_json = model_record(SigmaMUNet, **model_kwargs(args))
    accelerator, run = start_run(args, task="smlm", model_json=model_json)
    if accelerator.is_main_process:
        (run.dir / "simulation.yaml").write_text(yaml.safe_dump({"simulation": cfg.to_dict()}, sort_keys=False))
        write_movie_h5(run.dir / "val_movie.h5", movie, cfg, seed=args.val_seed)
    train_dl, val_dl = build_dataloaders(cfg, val_ds, args)
    model = build_model(model_json)
    run.load_init(model)
    run.log.info("model: %.3f M parameters; frames %dx%d px, %.1f emitters/frame; validation: %d frames, %d "
                 "emitters, median lateral CRLB %.1f nm", sum(p.numel() for p in model.parameters()) / 1e6,
                 *cfg.img_size, cfg.em_avg, len(val_ds), len(gt["phot"]),
                 float(np.median(gt["crlb_lat_nm"])) if len(gt["phot"]) else float("nan"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    updates_per_epoch = max(1, len(train_dl) // args.grad_accum)  # len(train_dl) is per process after prepare
    eval_every = args.eval_every_steps or updates_per_epoch
    save_every = args.save_every_steps or updates_per_epoch
    run.log.info("%d updates (%d per epoch), evaluation every %d, checkpoint every %d",
                 args.max_steps, updates_per_epoch, eval_every, save_every)
    # DECODE steps StepLR once per epoch; stepping once per update with the step size in updates is the same.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_epochs * updates_per_epoch,
                                                gamma=args.lr_gamma)  # not prepared: stepped once per real update
    monitor = f"val/{args.select_metric}"
    state = TrainState()
    stopper = EarlyStopping(monitor, mode="max", patience=args.patience)
    ckpt = Checkpointer(accelerator, run, monitor=monitor, mode="max", keep_last=args.keep_last,
                        save_top_k=args.save_top_k, model_json=model_json, export_files=("simulation.yaml",))
    ckpt.register(scheduler, state, stopper)
    ckpt.resume(state)

    stop = stopper.stopped  # a resumed run that had stopped early stays stopped
    if state.global_step >= args.max_steps or stop:
        run.log.info("nothing left to train at update %d; exporting", state.global_step)
    progress = tqdm(total=args.max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    model.train()
    if args.init_from and state.global_step == 0:  # the starting point's own score, logged at update 0
        metrics = validate(model, val_dl, accelerator, run, state, args, optimizer.param_groups[0]["lr"], movie,
                           gt, cfg)
        ckpt.update_best(state, metrics, model)
    meter = TrainMeter(accelerator, run.log)
    while state.global_step < args.max_steps and not stop:
        for batch in meter.timed(ckpt.remaining_batches(train_dl, state)):
            loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
            meter.add(loss, parts, batch["frames"].shape[0])
            if not accelerator.sync_gradients:
                continue
            ckpt.check_finite(grad_norm, state)
            # The schedule counts applied updates: under fp16 the scaler may skip an overflowing one.
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % args.log_every_steps == 0:
                meter.write(state.global_step, optimizer.param_groups[0]["lr"], grad_norm)
            last_step = state.global_step >= args.max_steps
            if state.global_step % eval_every == 0 or last_step:
                metrics = validate(model, val_dl, accelerator, run, state, args, optimizer.param_groups[0]["lr"],
                                   movie, gt, cfg)
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

    ckpt.export_final(model, None, state.last_metrics, state)
    if state.best_step < 0:
        run.log.warning("no best/ export: %s was never finite (nothing matched at raw_th %s)", monitor,
                        args.raw_th if args.raw_th is not None else RAW_TH_GRID)
    if accelerator.is_main_process:
        print(f"\nfinal model (update {state.global_step}) of {run.dir}; best {monitor} at update {state.best_step}:")
        for key, value in state.last_metrics.items():
            print(f"  {key:22s} {value:10.4f}")
        print(f"weights: best/ and final/ model.safetensors; validation movie: {run.dir / 'val_movie.h5'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

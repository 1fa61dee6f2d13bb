"""Unified anomaly detection (UniAD): one feature-reconstruction transformer for every category.

    python -m data.anomaly build --out datasets/anomaly                            # once: a synthetic mini-MVTec
    accelerate launch train_anomaly.py --config configs/anomaly_cpu.yaml --cpu     # CPU preset
    accelerate launch train_anomaly.py --config configs/anomaly_full.yaml          # the paper's recipe (GPU)
    python predict_anomaly.py --checkpoint runs/anomaly/<run> --data DIR --out OUT

Data: ``--data_dir`` is an MVTec-AD-layout folder (``<category>/train/good``, ``<category>/test/<defect>``,
``<category>/ground_truth/<defect>/<stem>_mask.png``), or the image folder of UniAD's JSON-lines meta files
(``--train_meta``, ``--test_meta``). One model learns every category found (or ``--categories a,b``). Only
normal images train it: a frozen timm backbone and the MFCN neck turn each image into ``feature_align``, the
transformer rebuilds it from the tokens outside each position's neighbourhood, and the loss is the MSE of the
two (anomaly.md §1). The reconstruction error's L2 norm is the anomaly map.

The backbone is frozen and the jitter acts on features, so ``feature_align`` of an image never changes during
a run: with ``--cache_features`` (the default) it is computed once for the training and validation images and
the transformer trains on the cache (``benchmarks/anomaly_step.py`` measures the speed-up).

Validation (selects ``best/`` by ``val/aupro``, drives early stopping): the normal images carved from
``train/good`` (``--val_fraction`` per category) plus ``--val_defects`` synthetic defective copies of each, with
exact masks (``data/anomaly/synth.py``). The test set is scored once at the end, with the best and with the
final weights (``results.json``: ``test/*`` and ``test_final/*``); ``--eval_test`` also logs it at every
evaluation, never for selection. At the end, each category's image and pixel thresholds are set on the normal
validation images (``--threshold_fpr``) and saved as ``thresholds.json`` in ``best/`` and ``final/``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import h5py
import matplotlib
import numpy as np
import PIL
import timm
import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.anomaly import AnomalyDataset, SyntheticDefects, load_splits
from data.anomaly.io import heatmap_overlay, to_rgb
from losses.anomaly import feature_mse
from metrics.anomaly import SCORE_METHODS, anomaly_map, anomaly_metrics, image_scores, threshold_at_fpr
from models.uniad import UniAD
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.export import load_weights, model_record, read_weights
from training.io import write_atomically
from training.run import log_images
from training.summary import TrainMeter, append_summary


@dataclass
class Args:
    """Train UniAD (one model for all categories) on normal images of an MVTec-layout folder."""
    config: str | None = None             # YAML preset that sets defaults; the command line wins
    output_dir: str = "runs/anomaly"      # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>
    data_dir: str = "datasets/anomaly"    # MVTec-layout folder, or the image folder of --train_meta/--test_meta
    train_meta: str | None = None         # UniAD JSON-lines meta file of the training images (with --test_meta)
    test_meta: str | None = None          # UniAD JSON-lines meta file of the test images (with --train_meta)
    categories: str | None = None         # comma-separated subset of the categories; default: all found
    val_fraction: float = 0.1             # of each category's train/good images, held out for validation
    val_defects: int = 1                  # synthetic defective copies of each validation image (exact masks)
    split_seed: int = 0                   # draws the validation split and its defects (not --seed: seeds share data)
    eval_test: bool = False               # also score the test set at every evaluation (test/*; never selects)
    input_size: int = 224                 # images are resized to input_size x input_size px
    backbone: str = "efficientnet_b4"     # any timm model with features_only
    out_indices: str = "0,1,2,3"          # backbone stages whose features are concatenated (b4: strides 2-16)
    backbone_weights: str | None = None   # a local timm state dict, "timm" (the pretrained tag; online), or none (random)
    hidden_dim: int = 256                 # transformer width
    num_heads: int = 8                    # attention heads
    num_encoder_layers: int = 4           # encoder layers
    num_decoder_layers: int = 4           # layer-wise query decoder layers
    dim_feedforward: int = 1024           # FFN width
    dropout: float = 0.1                  # in attention and FFN
    neighbor_size: int = 7                # side of the masked neighbourhood, in feature cells (odd)
    jitter_scale: float = 20.0            # feature jitter: noise std = scale x ||token|| / channels (training only)
    jitter_prob: float = 1.0              # probability that a token is jittered
    cache_features: bool = True           # compute the frozen features once; --no-cache_features recomputes each step
    feature_cache_dir: str | None = None  # also keep them on disk (<dir>/<key>.h5), reused by runs with the same key
    epochs: int = 1000                    # passes over the training images
    max_steps: int | None = None          # optimizer updates; default: epochs x updates per epoch
    batch_size: int = 8                   # per device, per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 1e-4                      # AdamW learning rate
    weight_decay: float = 1e-4            # AdamW decoupled weight decay
    lr_step_epochs: int = 800             # the lr is multiplied by lr_gamma every lr_step_epochs epochs (StepLR)
    lr_gamma: float = 0.1                 # StepLR factor
    clip_grad: float = 0.1                # max global gradient norm (UniAD: 0.1)
    score: Literal["max", "mean", "std"] = "max"  # image score for thresholds and predictions (max of the avg-pooled map)
    score_pool: int = 16                  # avg-pool side in px of the "max" image score
    threshold_fpr: float = 0.01           # thresholds flag at most this fraction of normal validation images / pixels
    seed: int = 42                        # seeds weights, sampler order, jitter and dropout
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU (with ACCELERATE_USE_CPU=1 for multi-process gloo runs)
    num_workers: int = 2                  # DataLoader workers per process (image decoding and resizing)
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = None   # updates between evaluations; default: 10 epochs
    save_every_steps: int | None = None   # updates between full-state checkpoints; default: 10 epochs
    keep_last: int = 2                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by val/aupro) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    init_from: str | None = None          # start from these weights (run dir, export or checkpoint of the same model)
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # tracker; W&B runs offline unless logged in
    patience: int = 0                     # evaluations without val/aupro gain before stopping; 0 disables
    num_figures: int = 8                  # validation images drawn per evaluation (defects and worst normals); 0 disables

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "log_every_steps", "input_size", "hidden_dim", "num_heads",
                     "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "neighbor_size", "lr_step_epochs",
                     "score_pool"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every_steps", "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1 (or none), got {getattr(self, name)}")
        if self.lr <= 0 or self.clip_grad <= 0 or self.weight_decay < 0 or not 0 < self.lr_gamma <= 1:
            raise UsageError("--lr and --clip_grad must be > 0, --weight_decay >= 0, --lr_gamma in (0, 1]")
        if not 0 < self.val_fraction < 1 or not 0 <= self.threshold_fpr < 1:
            raise UsageError("--val_fraction must be in (0, 1) and --threshold_fpr in [0, 1)")
        if not 0 <= self.dropout < 1 or not 0 <= self.jitter_prob <= 1 or self.jitter_scale < 0:
            raise UsageError("--dropout must be in [0, 1), --jitter_prob in [0, 1], --jitter_scale >= 0")
        if self.neighbor_size % 2 == 0:
            raise UsageError(f"--neighbor_size must be odd (a window centred on its cell), got {self.neighbor_size}")
        if self.hidden_dim % self.num_heads or self.hidden_dim % 2:
            raise UsageError("--hidden_dim must be even and a multiple of --num_heads")
        if min(self.val_defects, self.split_seed, self.num_workers, self.keep_last, self.save_top_k, self.patience,
               self.num_figures) < 0:
            raise UsageError("--val_defects, --split_seed, --num_workers, --keep_last, --save_top_k, --patience and "
                             "--num_figures must be >= 0")
        if self.feature_cache_dir:
            folder = Path(self.feature_cache_dir).absolute()
            existing = next(p for p in (folder, *folder.parents) if p.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise UsageError(f"--feature_cache_dir {self.feature_cache_dir}: {existing} is not a writable folder")
        self.index_list()

    def index_list(self) -> list[int]:
        try:
            indices = [int(v) for v in self.out_indices.split(",")]
        except ValueError:
            raise UsageError(f"--out_indices expects comma-separated stage indices such as 0,1,2,3; "
                             f"got {self.out_indices!r}") from None
        if not indices or min(indices) < 0:
            raise UsageError(f"--out_indices needs at least one stage index >= 0; got {self.out_indices!r}")
        return indices


class FeatureItems(Dataset):
    """Cached features with per-item tensors beside them: item i is {"feature_align": features[i], k: v[i]}."""

    def __init__(self, features: torch.Tensor, **extra: torch.Tensor):
        self.features, self.extra = features, extra

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return {"feature_align": self.features[i], **{k: v[i] for k, v in self.extra.items()}}


def load_data(args: Args):
    """(splits, training images, validation images with synthetic defects, test images); bad data fails here,
    before a run exists, with one line naming the file."""
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    try:
        splits = load_splits(args.data_dir, categories, args.val_fraction, args.split_seed, args.train_meta,
                             args.test_meta)
    except ValueError as e:
        fail(str(e))
    train = AnomalyDataset(splits.train, splits.categories, args.input_size)
    val = SyntheticDefects(AnomalyDataset(splits.val, splits.categories, args.input_size), args.val_defects,
                           args.split_seed)
    test = AnomalyDataset(splits.test, splits.categories, args.input_size) if splits.test else None
    return splits, train, val, test


def model_kwargs(args: Args, weights: bool) -> dict:
    """UniAD's constructor arguments; model.json records them with pretrained=False (the export holds the
    backbone's weights, so rebuilding never needs the weights file or the network)."""
    pretrained = False
    if weights and args.backbone_weights:
        pretrained = True if args.backbone_weights == "timm" else args.backbone_weights
    return dict(backbone=args.backbone, out_indices=args.index_list(), pretrained=pretrained,
                input_size=args.input_size, hidden_dim=args.hidden_dim, num_heads=args.num_heads,
                num_encoder_layers=args.num_encoder_layers, num_decoder_layers=args.num_decoder_layers,
                dim_feedforward=args.dim_feedforward, dropout=args.dropout, neighbor_size=args.neighbor_size,
                jitter_scale=args.jitter_scale, jitter_prob=args.jitter_prob)


@torch.no_grad()
def extract(model: UniAD, dataset: Dataset, args: Args, device,
            keys=("mask", "has_mask", "label", "category")) -> FeatureItems:
    """Every image of ``dataset`` through the frozen backbone and neck, once, in dataset order (each process
    holds the whole cache; the prepared loaders then shard it). -> FeatureItems with ``keys`` beside."""
    # Its own generator: a DataLoader without one draws its base seed from the global RNG, which would shift
    # the jitter and dropout draws of a cached run against a recomputing one.
    loader = DataLoader(dataset, batch_size=max(args.batch_size, 32), num_workers=args.num_workers,
                        generator=torch.Generator())
    features, extra = [], {k: [] for k in (*keys, "index")}
    for batch in loader:
        features.append(model.features(batch["image"].to(device)).cpu())
        for k in extra:
            extra[k].append(batch[k].to(torch.uint8) if k == "mask" else batch[k])  # masks are 0/1: a byte each
    return FeatureItems(torch.cat(features), **{k: torch.cat(v) for k, v in extra.items()})


def backbone_fingerprint(model: UniAD) -> str:
    """Hash of what the features depend on besides the images: the backbone's weights, the code that reads,
    resizes and normalises images, draws the validation defects, runs the backbone and neck and extracts (those
    source files, and extract() itself), and the library versions underneath."""
    h = hashlib.sha256()
    for name, tensor in model.backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    root = Path(__file__).parent
    for source in ("data/anomaly/dataset.py", "data/anomaly/synth.py", "models/uniad.py"):
        h.update((root / source).read_bytes())
    h.update(inspect.getsource(extract).encode())
    h.update(json.dumps([torch.__version__, timm.__version__, PIL.__version__, np.__version__, cv2.__version__]).encode())
    return h.hexdigest()


def feature_key(fingerprint: str, dataset: Dataset, args: Args, device, keys: tuple[str, ...]) -> str:
    """The cache file's name for one split: the backbone fingerprint, the stages and input size, the device type
    (CPU and GPU kernels round differently), the extracted keys, and every item (image and mask file with size
    and modification time, category, label; the synthetic defects' copies, seed and kinds). The transformer's
    settings are not in it: runs that differ only there share the files."""
    h = hashlib.sha256(json.dumps({"fingerprint": fingerprint, "backbone": args.backbone,
                                   "out_indices": args.index_list(), "input_size": args.input_size,
                                   "device": torch.device(device).type, "keys": list(keys)}).encode())
    if isinstance(dataset, SyntheticDefects):
        h.update(json.dumps({"copies": dataset.copies, "seed": dataset.seed, "kinds": dataset.kinds}).encode())
        dataset = dataset.base
    h.update(json.dumps(dataset.categories).encode())
    for r in dataset.records:
        files = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in (r.path, r.mask) if f]
        h.update(json.dumps([files, r.category, r.label, r.defect]).encode())
    return h.hexdigest()[:32]


def _read_h5(path: Path, n: int, keys: tuple[str, ...], shape: tuple[int, ...]) -> FeatureItems:
    with h5py.File(path, "r") as f:
        found = (sorted(f.keys()), f["feature_align"].shape if "feature_align" in f else None)
        if found != (sorted({"feature_align", "index", *keys}), (n, *shape)):
            raise ValueError(f"holds {found[0]} with features {found[1]}, expected {n} x {shape}")
        tensors = {k: torch.from_numpy(f[k][()]) for k in f.keys()}
    return FeatureItems(tensors.pop("feature_align"), **tensors)


def _write_h5(items: FeatureItems, path: Path) -> None:
    """Written to a temporary file of its own, then renamed: two runs that share a cold cache may write the
    same key at once (same content; the last rename wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("feature_align", data=items.features.numpy())
            for k, v in items.extra.items():
                f.create_dataset(k, data=v.numpy())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _data_error(e: ValueError) -> str:
    # from a DataLoader worker the message ends with the original "ValueError: ..." line
    return f"--data_dir {str(e).strip().splitlines()[-1].removeprefix('ValueError: ')}"


def cached_extract(model: UniAD, dataset: Dataset, args: Args, accelerator, run, split: str, fingerprint: str,
                   keys: tuple[str, ...] = ("mask", "has_mask", "label", "category")) -> FeatureItems:
    """extract(), or with --feature_cache_dir the features of an earlier run with the same key, read from
    <dir>/<key>.h5. The main process reads, or computes and writes, the file and tells the others what
    happened (so that a bad image ends every process with the same line); they then read the file, so that a
    multi-process run computes the backbone once. The folder must be one that every process sees."""
    device = accelerator.device
    if not args.feature_cache_dir:
        try:
            return extract(model, dataset, args, device, keys)
        except ValueError as e:
            fail(_data_error(e))
    path = Path(args.feature_cache_dir) / f"{feature_key(fingerprint, dataset, args, device, keys)}.h5"
    expected = (len(dataset), keys, (model.channels, *model.feature_size))
    status, items = ["file"], None
    if accelerator.is_main_process:
        try:
            items = _read_h5(path, *expected) if path.is_file() else None
        except (OSError, KeyError, ValueError) as e:
            run.log.warning("%s features: %s is unreadable (%s); computing them again", split, path,
                            " ".join(str(e).split())[:200])
        if items is not None:
            run.log.info("%s features read from %s", split, path)
        else:
            try:
                items = extract(model, dataset, args, device, keys)
                _write_h5(items, path)
                run.log.info("%s features written to %s", split, path)
            except ValueError as e:
                status = [_data_error(e)]
            except OSError as e:   # a full disk, say: the run goes on with the features in memory
                run.log.warning("%s features could not be written to %s (%s); every process computes them",
                                split, path, " ".join(str(e).split())[:200])
                status = ["compute"]
    status = broadcast_object_list(status) if accelerator.num_processes > 1 else status
    if status[0] not in ("file", "compute"):
        fail(status[0])
    if accelerator.is_main_process:
        return items
    return extract(model, dataset, args, device, keys) if status[0] == "compute" else _read_h5(path, *expected)


def build_dataloaders(model: UniAD, train_ds, val_ds, test_ds, args: Args, accelerator, run):
    """(train, val, test) loaders. The frozen backbone + neck give a fixed image the same features all run long,
    so validation and test images are always read from a feature cache, and the training images too unless
    --no-cache_features. Decoding happens here (the listing read headers only): a truncated file ends the
    run with one line."""
    start = time.perf_counter()
    fingerprint = backbone_fingerprint(model) if args.feature_cache_dir else ""
    val_items = cached_extract(model, val_ds, args, accelerator, run, "validation", fingerprint)
    test_items = (cached_extract(model, test_ds, args, accelerator, run, "test", fingerprint)
                  if test_ds is not None else None)
    train_items = (cached_extract(model, train_ds, args, accelerator, run, "training", fingerprint, keys=())
                   if args.cache_features else train_ds)
    run.log.info("features of %d images ready in %.1f s", len(val_items) + len(test_items or []) +
                 (len(train_items) if args.cache_features else 0), time.perf_counter() - start)
    common = dict(batch_size=args.batch_size, pin_memory=torch.cuda.is_available())
    # Its own generator: starting an epoch's iterator leaves the global RNG (jitter, dropout) untouched.
    train_dl = DataLoader(train_items, shuffle=True, drop_last=len(train_items) >= args.batch_size,
                          num_workers=0 if args.cache_features else args.num_workers,
                          generator=torch.Generator().manual_seed(args.seed), **common)
    test_dl = DataLoader(test_items, **common) if test_items is not None else None
    return train_dl, DataLoader(val_items, **common), test_dl


def build_scheduler(optimizer, batches_per_epoch: int, args: Args):
    """UniAD's StepLR (x lr_gamma every lr_step_epochs epochs), written per update so that it is stepped once per
    real update like every other schedule here, and resumes with the update count alone. The epoch of an update
    counts micro-batches: with --grad_accum an accumulation group may straddle two epochs."""
    def factor(step: int) -> float:
        return args.lr_gamma ** ((step * args.grad_accum // batches_per_epoch) // args.lr_step_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model, batch, optimizer, accelerator, args: Args):
    """One micro-batch: forward (cached features, or images through the frozen backbone), feature MSE, backward;
    on the last micro-batch of an accumulation group also clip and step. -> (loss, parts, grad norm or None)."""
    grad_norm = None
    with accelerator.accumulate(model):
        out = model(images=batch.get("image"), feature_align=batch.get("feature_align"))
        loss, parts = feature_mse(out["feature_rec"], out["feature_align"])
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()  # between updates Accelerate's wrapper skips the step and keeps the gradients
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), parts, grad_norm


@torch.no_grad()
def predict(model, loader, accelerator, args: Args) -> dict[str, np.ndarray]:
    """Anomaly maps (N, H, W) at the input size and the items' mask, has_mask, label, category and index,
    gathered over processes, in dataset order."""
    model.eval()
    out = {k: [] for k in ("map", "mask", "has_mask", "label", "category", "index")}
    for batch in loader:
        with accelerator.autocast():
            rec = model(feature_align=batch["feature_align"])
        maps = anomaly_map(rec["feature_rec"].float(), rec["feature_align"].float(), args.input_size)[:, 0]
        gathered = accelerator.gather_for_metrics((maps, batch["mask"][:, 0].to(torch.uint8), batch["has_mask"],
                                                   batch["label"], batch["category"], batch["index"]))
        for key, value in zip(out, gathered):
            out[key].append(value.cpu())
    model.train()
    result = {k: torch.cat(v).numpy() for k, v in out.items()}
    order = np.argsort(result["index"], kind="stable")
    return {k: v[order] for k, v in result.items()}


def draw_score_histograms(scores: np.ndarray, labels: np.ndarray, category: np.ndarray, categories) -> np.ndarray:
    """One panel per category: histograms of the image scores of normal and defective validation images."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(categories))
    rows = math.ceil(len(categories) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    bins = np.linspace(scores.min(), scores.max() + 1e-9, 25)
    for ax, (cid, name) in zip(axes.flat, enumerate(categories)):
        for label, colour, text in ((0, "tab:blue", "normal"), (1, "tab:red", "defective")):
            ax.hist(scores[(category == cid) & (labels == label)], bins=bins, color=colour, alpha=0.6, label=text)
        ax.set_title(name, fontsize=9)
    for ax in axes.flat[len(categories):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def draw_overlays(dataset, pred: dict, scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of (image, anomaly map over it, mask): the first n // 2 defective validation images (the same ones at
    every evaluation) and the n - n // 2 normal ones that score highest (the worst false positives). The heat
    scale runs from the 99th percentile of the normal pixels (blue) to the highest drawn value (red)."""
    normal = np.flatnonzero(pred["label"] == 0)
    chosen = [*np.flatnonzero(pred["label"] == 1)[: n // 2], *normal[np.argsort(-scores[normal])][: n - n // 2]]
    low = float(np.percentile(pred["map"][normal], 99)) if normal.size else float(pred["map"].min())
    high = max(float(pred["map"][chosen].max()), low + 1e-6)
    rows = []
    for i in chosen:
        rgb = to_rgb(dataset[int(i)]["image"])
        mask = np.repeat(pred["mask"][i][..., None] * 255, 3, axis=2).astype(np.uint8)
        row = np.concatenate([rgb, heatmap_overlay(rgb, pred["map"][i], low, high), mask], axis=1)
        row = cv2.resize(row, None, fx=max(1, 128 // rgb.shape[0]), fy=max(1, 128 // rgb.shape[0]),
                         interpolation=cv2.INTER_NEAREST)
        cv2.putText(row, f"y={pred['label'][i]} s={scores[i]:.3g}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 255, 0), 1, cv2.LINE_AA)
        rows.append(row)
    return np.concatenate(rows, axis=0)


def score(pred: dict, categories, args: Args, prefix: str) -> dict[str, float]:
    metrics = anomaly_metrics(pred["map"], pred["mask"], pred["label"], pred["category"], categories,
                              pred["has_mask"], pool=args.score_pool)
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def validate(model, val_dl, test_dl, accelerator, run, state: TrainState, args: Args, lr: float,
             categories, val_images) -> dict:
    """Score the validation images (and the test images with --eval_test), log, append summary.csv, draw
    figures: per-category score histograms, defects with their maps and masks, the worst normal images."""
    pred = predict(model, val_dl, accelerator, args)
    metrics = score(pred, categories, args, "val")
    if args.eval_test and test_dl is not None:
        metrics.update(score(predict(model, test_dl, accelerator, args), categories, args, "test"))
    state.last_metrics = metrics
    accelerator.log(metrics, step=state.global_step)
    run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.count("/") == 1))
    if accelerator.is_main_process:
        append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch, "train/lr": lr, **metrics})
        if args.num_figures:
            scores = image_scores(pred["map"], args.score, args.score_pool)
            log_images(accelerator, run, {
                "vis/scores": draw_score_histograms(scores, pred["label"], pred["category"], categories),
                "vis/val": draw_overlays(val_images, pred, scores, args.num_figures)}, state.global_step)
    return metrics


def set_thresholds(model, val_dl, accelerator, categories, args: Args) -> dict:
    """Per category: the image threshold (on the --score of the map) and the pixel threshold that flag at most
    --threshold_fpr of that category's normal validation images and pixels (metrics.anomaly.threshold_at_fpr)."""
    pred = predict(model, val_dl, accelerator, args)
    scores = image_scores(pred["map"], args.score, args.score_pool)
    normal = pred["label"] == 0
    thresholds = {}
    for cid, name in enumerate(categories):
        idx = normal & (pred["category"] == cid)
        thresholds[name] = {"image": threshold_at_fpr(scores[idx], args.threshold_fpr),
                            "pixel": threshold_at_fpr(pred["map"][idx], args.threshold_fpr),
                            "normal_val_images": int(idx.sum())}
    return {"rule": f"flag at most {args.threshold_fpr:g} of the normal validation images (pixels) per category",
            "score": args.score, "score_pool": args.score_pool, "input_size": args.input_size,
            "categories": thresholds}


def finish(model, val_dl, test_dl, accelerator, run, state: TrainState, args: Args, categories) -> dict:
    """The best weights, then the final ones: thresholds on the validation images (best/thresholds.json and
    thresholds.json, which export_final copies into final/) and the test metrics (results.json)."""
    unwrapped = accelerator.unwrap_model(model)
    final_weights = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    result = {"run": str(run.dir), "best_step": state.best_step}
    best = run.dir / "best" / "model.safetensors"
    for name, weights in (("best", read_weights(best) if best.is_file() else None), ("final", final_weights)):
        if weights is None:
            continue
        if name == "best":
            load_weights(unwrapped, weights, best)
        else:
            unwrapped.load_state_dict(weights)
        thresholds = set_thresholds(model, val_dl, accelerator, categories, args)
        if test_dl is not None:
            result.update(score(predict(model, test_dl, accelerator, args), categories, args,
                                "test" if name == "best" else "test_final"))
        if accelerator.is_main_process:
            target = run.dir / ("best" if name == "best" else "") / "thresholds.json"
            write_atomically(target, lambda tmp: tmp.write_text(json.dumps(thresholds, indent=1)))
    # "results/": --eval_test logs test/* of the current weights at the same step
    accelerator.log({f"results/{k}": v for k, v in result.items() if k.startswith("test")}, step=state.global_step)
    if accelerator.is_main_process:
        (run.dir / "results.json").write_text(json.dumps(result, indent=1))
    return result


def main():
    args = parse_args(Args)
    splits, train_ds, val_ds, test_ds = load_data(args)  # before start_run: bad data fails before a run exists
    # Built before start_run so that a bad backbone, weights file or window fails before a run exists; seeded
    # here because start_run, which seeds everything else, comes after.
    set_seed(args.seed)
    try:
        model = UniAD(**model_kwargs(args, weights=True))
    except (ValueError, RuntimeError, OSError, IndexError, KeyError, AssertionError) as e:
        # OSError: timm's pretrained tag offline or not on the hub; IndexError: an --out_indices stage it lacks
        fail(f"--backbone {args.backbone} / --out_indices {args.out_indices} / --backbone_weights "
             f"{args.backbone_weights}: {' '.join(str(e).split())[:300] or type(e).__name__}")
    model_json = model_record(UniAD, **model_kwargs(args, weights=False))
    accelerator, run = start_run(args, task="anomaly", model_json=model_json)
    run.load_init(model)
    categories = splits.categories
    run.log.info("UniAD on %s: %s; %d training, %d validation (%d with synthetic defects), %d test images; "
                 "%.2f M trainable parameters, features %s x %s", args.backbone, ", ".join(categories),
                 len(train_ds), len(val_ds), len(val_ds) - len(splits.val), len(test_ds or []),
                 sum(p.numel() for p in model.reconstruction.parameters()) / 1e6, model.channels, model.feature_size)
    train_dl, val_dl, test_dl = build_dataloaders(model.to(accelerator.device), train_ds, val_ds, test_ds, args,
                                                  accelerator, run)
    optimizer = torch.optim.AdamW(model.reconstruction.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    test_dl = accelerator.prepare(test_dl) if test_dl is not None else None
    updates_per_epoch = max(1, len(train_dl) // args.grad_accum)  # len(train_dl) is per process after prepare
    max_steps = args.max_steps or math.ceil(args.epochs * len(train_dl) / args.grad_accum)
    eval_every = args.eval_every_steps or 10 * updates_per_epoch
    save_every = args.save_every_steps or 10 * updates_per_epoch
    scheduler = build_scheduler(optimizer, len(train_dl), args)  # not prepared: stepped once per real update
    monitor = "val/aupro"
    state = TrainState()
    stopper = EarlyStopping(monitor, mode="max", patience=args.patience)
    ckpt = Checkpointer(accelerator, run, monitor=monitor, mode="max", keep_last=args.keep_last,
                        save_top_k=args.save_top_k, model_json=model_json, export_files=("thresholds.json",))
    ckpt.register(scheduler, state, stopper)
    ckpt.resume(state)
    if accelerator.is_main_process:  # thresholds of the weights a resumed run had: stale once it trains on
        (run.dir / "thresholds.json").unlink(missing_ok=True)

    stop = stopper.stopped  # a resumed run that had stopped early stays stopped
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    train_start = time.perf_counter()
    model.train()
    if args.init_from and state.global_step == 0:  # the starting point's own score, logged at update 0
        metrics = validate(model, val_dl, test_dl, accelerator, run, state, args, scheduler.get_last_lr()[0],
                           categories, val_ds)
        ckpt.update_best(state, metrics, model)
    meter = TrainMeter(accelerator, run.log)
    while state.global_step < max_steps and not stop:
        for batch in meter.timed(ckpt.remaining_batches(train_dl, state)):
            loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
            meter.add(loss, parts, len(batch["index"]))
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
            last_step = state.global_step >= max_steps
            if state.global_step % eval_every == 0 or last_step:
                metrics = validate(model, val_dl, test_dl, accelerator, run, state, args,
                                   optimizer.param_groups[0]["lr"], categories, val_ds)
                ckpt.update_best(state, metrics, model)
                stop = stopper.should_stop(metrics, accelerator)
            if state.global_step % save_every == 0 or stop or last_step:  # the end too: resuming is free
                ckpt.save(state)
            if stop or last_step:
                break
    progress.close()

    # final/ is written last (a run with final/ is finished): thresholds and test metrics of the best and the
    # final weights first.
    result = finish(model, val_dl, test_dl, accelerator, run, state, args, categories)
    ckpt.export_final(model, None, state.last_metrics, state)
    if accelerator.is_main_process:
        minutes = (time.perf_counter() - train_start) / 60
        print(f"\nbest model (update {state.best_step}) of {run.dir}, {minutes:.1f} min:")
        for key, value in {**state.last_metrics, **result}.items():
            if isinstance(value, float) and key.count("/") == 1:
                print(f"  {key:28s} {value:10.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

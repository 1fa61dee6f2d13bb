"""Training and validation items: input scaling, per-frame targets, frame windows and the two datasets."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .camera import load_read_sigma_map
from .config import SimConfig
from .simulate import Emitters, Movie, simulate_movie


def scale_frames(frames: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Network input (frames - input_offset) / input_scale (smlm.md §1.6), frames in photons."""
    return (frames - cfg.input_offset) / cfg.input_scale


def is_target(emitters: Emitters, cfg: SimConfig) -> torch.Tensor:
    """(N,) bool: rows with >= label_photon_min photons inside the frame extent, the emitters the loss learns
    and the evaluation counts (smlm.md §1.2 target filter)."""
    h, w = cfg.img_size
    x, y = emitters.xyz[:, 0], emitters.xyz[:, 1]
    return (emitters.phot >= cfg.label_photon_min) & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def frame_targets(emitters: Emitters, frame: int, cfg: SimConfig) -> torch.Tensor:
    """(E, 4) targets of one frame in the loss's scaled units (photons / phot_max, x px, y px, z / z_max):
    its rows that pass `is_target`."""
    keep = (emitters.frame_ix == frame) & is_target(emitters, cfg)
    if int(keep.sum()) > cfg.max_targets:
        raise ValueError(f"frame {frame} has {int(keep.sum())} target emitters, more than max_targets="
                         f"{cfg.max_targets}; raise max_targets or lower the emitter density")
    e = emitters.subset(keep)
    return torch.stack([e.phot / cfg.phot_max, e.xyz[:, 0], e.xyz[:, 1], e.xyz[:, 2] / cfg.z_max], dim=1)



def window_indices(n_frames: int, window: int = 3) -> torch.Tensor:
    """(n_frames, window) frame indices centred on each frame, clamped at the movie ends (smlm.md §1.7)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of frames >= 1, got {window}")
    half = window // 2
    ix = torch.arange(n_frames)[:, None] + torch.arange(-half, half + 1)
    return ix.clamp(0, n_frames - 1)


def _item(frames: torch.Tensor, bg: torch.Tensor, emitters: Emitters, centre: int, cfg: SimConfig) -> dict:
    return {"frames": scale_frames(frames, cfg).to(torch.float32),
            "target_emitters": frame_targets(emitters, centre, cfg).to(torch.float32),
            "target_bg": (bg[centre] / cfg.bg_max).to(torch.float32)}


class SMLMSimDataset(Dataset):
    """Fresh simulated windows for training (module docstring). Item i of epoch e is a pure function of
    (seed, e, i), whatever the worker. Items: frames (window, H, W) scaled input; target_emitters (E_i, 4) scaled
    targets of the centre frame; target_bg (H, W) bg / bg_max; index int64. Batch with `collate_smlm`.
    Call `set_epoch` at the start of every epoch for a new movie.

    block: windows per simulated movie. The last block's movie is simulated once per process and reused
    while its items are read, so a DataLoader whose batches hold whole blocks (batch size a multiple of
    block, no shuffling) simulates each movie once. block=1 gives independent windows."""

    def __init__(self, cfg: SimConfig, length: int, seed: int = 0, window: int = 3, block: int = 16):
        if length < 1 or block < 1:
            raise ValueError(f"length and block must be >= 1 windows, got {length} and {block}")
        window_indices(1, window)
        self.cfg, self.length, self.seed, self.window, self.epoch = cfg, int(length), int(seed), int(window), 0
        self.block = int(block)
        self.read_sigma_map = load_read_sigma_map(cfg)   # the whole sensor, read once; each movie takes a window
        self._cached: tuple[tuple[int, int], Movie] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _block_movie(self, b: int) -> Movie:
        key = (self.epoch, b)
        if self._cached is None or self._cached[0] != key:
            n_windows = min(self.block, self.length - b * self.block)
            seed = np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(seed))
            self._cached = key, simulate_movie(self.cfg, n_windows + self.window - 1, gen, self.read_sigma_map)
        return self._cached[1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        b, k = divmod(int(i), self.block)
        movie = self._block_movie(b)
        item = _item(movie.frames[k:k + self.window], movie.bg, movie.emitters, k + self.window // 2, self.cfg)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


class MovieWindowDataset(Dataset):
    """Windows of a fixed movie (validation/test): item t is centred on frame t, indices clamped at the ends,
    so every frame is a target once. Same item layout as `SMLMSimDataset`."""

    def __init__(self, movie: Movie, cfg: SimConfig, window: int = 3):
        self.movie, self.cfg = movie, cfg
        self.windows = window_indices(movie.frames.shape[0], window)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, t: int) -> dict:
        ix = self.windows[t]
        item = _item(self.movie.frames[ix], self.movie.bg, self.movie.emitters, int(t), self.cfg)
        item["index"] = torch.tensor(t, dtype=torch.int64)
        return item


def collate_smlm(items: list[dict]) -> dict:
    """Batch for `gmm_loss`: frames (B, window, H, W); target_emitters (B, E, 4) zero-padded to the batch's
    largest count E (at least 1); target_mask (B, E) bool; target_bg (B, H, W); index (B,)."""
    n_max = max(1, max(item["target_emitters"].shape[0] for item in items))
    em = torch.zeros(len(items), n_max, 4)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for b, item in enumerate(items):
        n = item["target_emitters"].shape[0]
        em[b, :n], mask[b, :n] = item["target_emitters"], True
    return {"frames": torch.stack([item["frames"] for item in items]), "target_emitters": em,
            "target_mask": mask, "target_bg": torch.stack([item["target_bg"] for item in items]),
            "index": torch.stack([item["index"] for item in items])}


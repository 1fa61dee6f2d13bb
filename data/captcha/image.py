"""Model input: letterboxing any source image onto the fixed (CANVAS_H, CANVAS_W) canvas and turning
it into the (4, H, W) tensor the network reads (RGB plus a padding mask).

Letterboxing is an exact affine map, canvas px = source px * scale + pad, under the continuous-pixel
convention (pixel (col, row) has its centre at (col + 0.5, row + 0.5)). That is what lets labels and
predictions move between source and canvas with one multiply-add, and it matches the stride-4
decode x = (j + 0.5 + du) * 4.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from models.lite_hrnet import pool_canvas

# px; 2:1 is the middle of the sources' aspect range (1.8-2.4), so the letterbox padding stays thin
CANVAS_W, CANVAS_H = 512, 256


def letterbox(image_rgb_uint8: np.ndarray, out_w: int = CANVAS_W, out_h: int = CANVAS_H):
    """Fit an image into (out_h, out_w), centred, padding filled with 0.

    Returns canvas (out_h, out_w, 3) uint8, mask (out_h, out_w) uint8 (1 = image, 0 = padding),
    scale and pad (pad_x, pad_y) such that canvas px = source px * scale + pad exactly.
    """
    image = image_rgb_uint8
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"letterbox expects an (h, w, 3) uint8 RGB array, got {got}")
    h, w = image.shape[:2]
    scale = min(out_w / w, out_h / h)
    pad_x, pad_y = (out_w - w * scale) / 2, (out_h - h * scale) / 2
    sx = sy = scale
    if scale < 1:
        # shrink by area averaging first (bilinear warping alone would alias); the warp below
        # then applies the small remaining factors so the overall map stays exactly `scale`
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = scale * w / nw, scale * h / nh
    # cv2 maps pixel-centre indices, hence the half-pixel terms
    m = np.array([[sx, 0.0, pad_x + 0.5 * sx - 0.5], [0.0, sy, pad_y + 0.5 * sy - 0.5]])
    canvas = cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    cols, rows = np.arange(out_w) + 0.5, np.arange(out_h) + 0.5
    inside_x = (cols > pad_x) & (cols < pad_x + w * scale)
    inside_y = (rows > pad_y) & (rows < pad_y + h * scale)
    canvas[~inside_y] = 0
    canvas[:, ~inside_x] = 0
    mask = (inside_y[:, None] & inside_x[None, :]).astype(np.uint8)
    return canvas, mask, float(scale), (float(pad_x), float(pad_y))


def to_input_tensor(canvas: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 canvas + (H, W) padding mask -> (4, H, W) float32: RGB / 255 and the mask."""
    if canvas.ndim != 3 or canvas.shape[2] != 3 or mask.shape != canvas.shape[:2]:
        raise ValueError(f"expected canvas (H, W, 3) and mask (H, W), got {canvas.shape} and {mask.shape}")
    x = torch.empty((4, *mask.shape), dtype=torch.float32)
    x[:3] = torch.from_numpy(canvas).permute(2, 0, 1)
    x[:3].div_(255)
    x[3] = torch.from_numpy(mask)
    return x


def halve_canvas(batch: dict) -> dict:
    """A collated batch on the canvas halved (CANVAS_W/2 x CANVAS_H/2): progressive resizing's first phase.

    RGB is averaged over 2x2 pixels, the padding mask stays 1 only where all four pixels were real, and every
    coordinate (gap, slider, fake_gaps) is halved: under the continuous-pixel convention a 2x2 average is the
    exact map x -> x / 2, so targets encoded at stride 4 of the small canvas, and points decoded there times 2,
    are in the full canvas's px. The other keys and the input batch are left as they are."""
    small = dict(batch, image=pool_canvas(batch["image"], 2))
    for key in ("gap", "slider", "fake_gaps"):
        small[key] = batch[key] / 2
    return small

"""A synthetic mini-MVTec, offline and deterministic (anomaly.md §5.2): texture and object categories whose
normal images vary like real ones, and defects with exact masks.

    python -m data.anomaly build --out DIR [--seed 0] [--size 128] [--n_train 48] [--n_test 20] [--n_defect 8]

Categories (CATEGORIES): textures brick, grass, gravel (random crops of scikit-image's bundled 512x512
photographs, tinted; scale +-10 %, flips, any rotation except for brick, whose courses stay within +-4 deg of
horizontal) and wood (procedural: warped growth rings and streaks, grain within +-6 deg); objects capsule (a
two-tone capsule on a dark backdrop, shift +-4 % of the side, rotation +-6 deg, size +-4 %) and nut (a hex nut
with a bore, any rotation, on a dark backdrop). Every image also gets a colour jitter of its palette (+-3 %), a
brightness gain of +-5 % and Gaussian noise of NOISE_SIGMA grey levels.

Defects (each category has three, see CATEGORIES): scratch (1.5-3 px wide Bezier stroke, bright or dark,
35-55 % of the side long), crack (dark random-walk polyline with a branch), hole (dark ellipse with a bright
lip), color (a smooth-noise blob under a Gaussian envelope, DRAEM style, blended towards a colour far from the
surface's), cutpaste (a flipped, brightness- and colour-jittered rectangle of 5-12 % of the image pasted
elsewhere, CutPaste style), missing (a disc of an object replaced by the backdrop behind it). Scratches, cracks
and stains stay on the object of object categories.

Masks are exact: a pixel is 255 in the mask if and only if the defective image differs from its clean source
there, and there it differs by more than MASK_EPS grey levels in some channel (pixels a defect would change
less are nudged by MASK_EPS + 1 levels, or, for missing parts, left unchanged). Each mask's bounding box spans at
least MIN_EXTENT of the side and it covers at least MIN_AREA of the image (32 px and 171 px^2 at the default
128 px, 16 px and 43 px^2 at 64 px, so every defect reaches a stride-16 feature cell); a draw that misses this
is redrawn.

Image k of a category is a pure function of (seed, category, kind, k), kind being train, good (test) or a
defect name: render_sample returns it with its clean source, and builds with one seed are byte-identical.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import skimage.data
from PIL import Image

MASK_EPS = 10          # grey levels (0..255); a defect changes each of its pixels by more than this
MIN_EXTENT = 0.25      # fraction of the side: the shortest allowed long side of a defect's bounding box
MIN_AREA = 1 / 96      # fraction of the image area: the smallest allowed defect
NOISE_SIGMA = 2.0      # grey levels, sensor noise of every image
DEFECTS = ("color", "crack", "cutpaste", "hole", "missing", "scratch")
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {   # name -> (kind, defect types)
    "brick": ("texture", ("color", "crack", "hole")),
    "capsule": ("object", ("color", "crack", "missing")),
    "grass": ("texture", ("color", "cutpaste", "scratch")),
    "gravel": ("texture", ("crack", "cutpaste", "hole")),
    "nut": ("object", ("color", "missing", "scratch")),
    "wood": ("texture", ("color", "hole", "scratch")),
}
# dark and light RGB of the tinted textures (grey 0 -> dark, 1 -> light)
_PALETTES = {"brick": ((62, 30, 24), (214, 128, 96)), "grass": ((24, 54, 16), (158, 206, 94)),
             "gravel": ((48, 44, 40), (208, 200, 188)), "wood": ((118, 74, 38), (218, 172, 118))}
# stain colours; each stain takes one of the two farthest from the colour under it
_STAIN_COLOURS = np.array([(196, 40, 160), (40, 86, 210), (236, 206, 36), (24, 170, 164), (96, 44, 18),
                           (240, 240, 240)], np.float32)


@dataclass
class Scene:
    """A clean image, and for objects the same scene without the object and the object's coverage."""
    image: np.ndarray                     # (H, W, 3) uint8
    background: np.ndarray | None = None  # (H, W, 3) uint8, same noise as image
    alpha: np.ndarray | None = None       # (H, W) float32 in [0, 1]


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys)])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) float32 pixel-centre coordinates, px."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int | None = None) -> np.ndarray:
    """(size, size) float32 smooth value noise, zero mean and unit std: a (cells_y + 1) x (cells_x + 1) grid
    of N(0, 1) values, bicubic-upsampled (cells = features per side)."""
    grid = rng.standard_normal((cells_y + 1, (cells_x or cells_y) + 1)).astype(np.float32)
    n = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return (n - n.mean()) / (n.std() + 1e-6)


def _finish(rng: np.random.Generator, img: np.ndarray, bg: np.ndarray | None = None,
            alpha: np.ndarray | None = None) -> Scene:
    """Brightness gain and sensor noise, shared by the scene and its backdrop so that a missing part shows
    exactly the pixels the backdrop has."""
    gain = rng.uniform(0.95, 1.05)
    noise = rng.normal(0.0, NOISE_SIGMA, img.shape).astype(np.float32)
    quantise = lambda a: np.clip(np.rint(a * gain + noise), 0, 255).astype(np.uint8)
    return Scene(quantise(img), None if bg is None else quantise(bg), alpha)


def _tint(rng: np.random.Generator, name: str, g: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB from grey g in [0, 1], palette jittered by +-3 % per channel."""
    dark, light = (np.array(c, np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32) for c in _PALETTES[name])
    return dark + (light - dark) * np.clip(g, 0, 1)[..., None]


@functools.lru_cache(maxsize=8)
def _texture_source(name: str, side: int) -> np.ndarray:
    """scikit-image's bundled photograph (no download) as (side, side) float32 grey, 1st-99th percentile -> 0-1."""
    g = getattr(skimage.data, name)().astype(np.float32)
    lo, hi = np.percentile(g, (1, 99))
    g = np.clip((g - lo) / (hi - lo), 0, 1)
    return cv2.resize(g, (side, side), interpolation=cv2.INTER_AREA)


def _photo_texture(rng: np.random.Generator, size: int, name: str) -> Scene:
    # at scale 1 a crop is a quarter of the photograph's width (128 of its 512 px)
    src = _texture_source(name, 4 * size)
    # the brick photograph has vertical courses: turned 90 deg, +-4 deg, they read as a wall
    angle = np.deg2rad(rng.uniform(86, 94) if name == "brick" else rng.uniform(0, 360))
    flips = np.diag(rng.choice([-1.0, 1.0], 2))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a = rng.uniform(0.9, 1.1) * rot @ flips            # output px -> source px
    centre = rng.uniform(size, 3 * size, 2)             # keeps the rotated window inside the source
    c = (size - 1) / 2
    m = np.hstack([a, (centre - a @ np.array([c, c]))[:, None]])
    g = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REFLECT)
    g = (g - 0.5) * rng.uniform(0.93, 1.07) + 0.5
    return _finish(rng, _tint(rng, name, g))


def _wood(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    t = np.deg2rad(rng.uniform(-6, 6))
    across = (yy * np.cos(t) - xx * np.sin(t)) / size          # side units across the grain
    warp = 0.06 * _noise(rng, size, 2) + 0.015 * _noise(rng, size, 5)
    rings = rng.uniform(4, 7) * (across + warp) + rng.uniform(0, 1)
    late = (0.5 + 0.5 * np.cos(2 * np.pi * rings)) ** rng.uniform(2, 4)   # narrow dark latewood bands
    # fibres: a 1-D random profile across the grain, so streaks run along it
    profile = rng.standard_normal(3 * size + 1)
    streaks = np.interp((across - across.min()) * 3 * size, np.arange(profile.size), profile).astype(np.float32)
    g = 0.78 - 0.55 * late + 0.06 * streaks
    return _finish(rng, _tint(rng, "wood", g))


def _backdrop(rng: np.random.Generator, size: int, rgb) -> np.ndarray:
    shade = 1 + 0.04 * _noise(rng, size, 2)   # uneven lighting
    return np.array(rgb, np.float32) * rng.uniform(0.95, 1.05) * shade[..., None]


def _pose(rng: np.random.Generator, size: int, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Object-frame coordinates (u along the object's axis, v across), px, centre shifted by +-4 % of the side."""
    yy, xx = _grid(size)
    cx, cy = (size - 1) / 2 + rng.uniform(-0.04, 0.04, 2) * size
    t = np.deg2rad(angle_deg)
    return (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t), -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)


def _capsule(rng: np.random.Generator, size: int) -> Scene:
    bg = _backdrop(rng, size, (44, 50, 60))
    u, v = _pose(rng, size, rng.uniform(-6, 6))
    s = rng.uniform(0.96, 1.04)
    length, r = 0.66 * size * s, 0.15 * size * s
    d = np.hypot(np.maximum(np.abs(u) - (length / 2 - r), 0), v) - r   # px to the outline, < 0 inside
    alpha = np.clip(0.5 - d, 0, 1)
    red = np.array((188, 42, 48), np.float32) * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    ivory = np.array((232, 226, 208), np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    seam = np.clip(0.5 + u, 0, 1)[..., None]     # 1 px wide, antialiased
    vn = np.clip(v / r, -1, 1)
    light = 1 - 0.3 * vn ** 2 + 0.2 * np.exp(-((vn + 0.45) / 0.18) ** 2)   # cylinder shading, specular stripe
    obj = (red * (1 - seam) + ivory * seam) * light[..., None]
    img = bg * (1 - alpha[..., None]) + obj * alpha[..., None]
    return _finish(rng, img, bg, alpha)


def _nut(rng: np.random.Generator, size: int) -> Scene:
    bg = _backdrop(rng, size, (26, 26, 30))
    u, v = _pose(rng, size, rng.uniform(0, 60))      # a hexagon repeats every 60 deg
    s = rng.uniform(0.96, 1.04)
    apothem, bore = 0.34 * size * s, 0.13 * size * s
    normals = np.deg2rad(np.arange(6) * 60.0)
    d_hex = np.max([u * np.cos(a) + v * np.sin(a) for a in normals], axis=0) - apothem
    rho = np.hypot(u, v)
    alpha = np.clip(0.5 - np.maximum(d_hex, bore - rho), 0, 1)
    light = rng.uniform(0, 2 * np.pi)
    tone = (150 + 30 * (u * np.cos(light) + v * np.sin(light)) / apothem        # light from one side
            + 6 * np.sin(2 * np.pi * rho / (0.05 * size))                       # machining rings
            + 40 * np.exp(-((rho - bore - 0.04 * size) / (0.03 * size)) ** 2)  # bright chamfer of the bore
            - 35 * np.exp(-(np.minimum(d_hex, 0) / (0.03 * size)) ** 2))       # darker outer bevel
    obj = tone[..., None] * (np.array((1.0, 1.0, 1.04), np.float32) * rng.uniform(0.97, 1.03, 3)).astype(np.float32)
    img = bg * (1 - alpha[..., None]) + obj * alpha[..., None]
    return _finish(rng, img, bg, alpha)


_SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "brick": lambda rng, size: _photo_texture(rng, size, "brick"),
    "grass": lambda rng, size: _photo_texture(rng, size, "grass"),
    "gravel": lambda rng, size: _photo_texture(rng, size, "gravel"),
    "wood": _wood, "capsule": _capsule, "nut": _nut}


# ---------------------------------------------------------------------------- defects
# Each returns (candidate image float32 (H, W, 3), region bool (H, W), nudge): _settle keeps the candidate
# inside the region only and makes the mask exact.

def _anchor(rng: np.random.Generator, scene: Scene, size: int, margin: float) -> np.ndarray:
    """(x, y) px where a defect starts: on the object, or anywhere but the outer `margin` of a texture."""
    if scene.alpha is None:
        return rng.uniform(margin * size, (1 - margin) * size, 2)
    ys, xs = np.nonzero(scene.alpha > 0.95)
    k = rng.integers(len(xs))
    return np.array([xs[k], ys[k]], np.float64)


def _on_surface(scene: Scene, region: np.ndarray) -> np.ndarray:
    return region if scene.alpha is None else region & (scene.alpha > 0.5)


def _strokes(lines: Sequence[tuple[np.ndarray, float]], size: int) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of polylines ((N, 2) x, y px; width px), antialiased by
    drawing at 4x and averaging."""
    ss = 4
    canvas = np.zeros((size * ss, size * ss), np.uint8)
    for points, width in lines:
        pts = np.rint((np.asarray(points) + 0.5) * ss - 0.5).astype(np.int32)   # pixel centres at integers
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, 255, thickness=max(1, round(width * ss)))
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _paint(clean: np.ndarray, alpha: np.ndarray, paint: np.ndarray) -> np.ndarray:
    return clean * (1 - alpha[..., None]) + paint * alpha[..., None]


def _scratch(rng, scene: Scene, size: int):
    clean = scene.image.astype(np.float32)
    p0 = _anchor(rng, scene, size, 0.2)
    phi, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.55) * size
    p2 = p0 + length * np.array([np.cos(phi), np.sin(phi)])
    p1 = (p0 + p2) / 2 + rng.uniform(-0.15, 0.15) * length * np.array([-np.sin(phi), np.cos(phi)])
    t = np.linspace(0, 1, 24)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2      # quadratic Bezier
    alpha = _strokes([(curve, rng.uniform(1.0, 1.5) * max(1.5, size / 32))], size)
    # bare material shows bright; a groove that catches no light shows dark
    paint = 0.25 * clean + 0.75 * np.float32(236) if rng.random() < 0.6 else 0.3 * clean
    return _paint(clean, alpha, paint), _on_surface(scene, alpha > 0.3), True


def _crack(rng, scene: Scene, size: int):
    clean = scene.image.astype(np.float32)
    step, width = rng.uniform(0.06, 0.09) * size, rng.uniform(1.0, 1.3) * max(1.5, size / 40)
    heading = rng.uniform(0, 2 * np.pi)
    trunk = [_anchor(rng, scene, size, 0.25)]
    for _ in range(rng.integers(6, 10)):
        heading += rng.uniform(-0.7, 0.7)
        trunk.append(trunk[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    branch, turn = [trunk[len(trunk) // 2]], heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
    for _ in range(rng.integers(2, 4)):
        turn += rng.uniform(-0.5, 0.5)
        branch.append(branch[-1] + 0.8 * step * np.array([np.cos(turn), np.sin(turn)]))
    alpha = _strokes([(np.array(trunk), width), (np.array(branch), 0.75 * width)], size)
    return _paint(clean, alpha, clean * rng.uniform(0.12, 0.3)), _on_surface(scene, alpha > 0.3), True


def _hole(rng, scene: Scene, size: int):
    clean = scene.image.astype(np.float32)
    cx, cy = _anchor(rng, scene, size, 0.2)
    a, b = rng.uniform(0.09, 0.16, 2) * size
    t = rng.uniform(0, np.pi)
    yy, xx = _grid(size)
    u, v = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t), -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    d = (np.hypot(u / a, v / b) - 1) * min(a, b)        # ~px to the rim, < 0 inside
    inside = np.clip(0.5 - d, 0, 1)
    lip = np.clip(1 - np.abs(d - 1.0), 0, 1)            # ~2 px raised rim just outside
    cand = clean * (1 - rng.uniform(0.7, 0.9) * inside)[..., None] * (1 + 0.3 * lip)[..., None]
    return cand, _on_surface(scene, (inside > 0.02) | (lip > 0.02)), True


def _color(rng, scene: Scene, size: int):
    clean = scene.image.astype(np.float32)
    cx, cy = _anchor(rng, scene, size, 0.2)
    radius = rng.uniform(0.1, 0.16) * size
    yy, xx = _grid(size)
    envelope = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))
    field = envelope * (1 + 0.45 * _noise(rng, size, max(3, size // 12)))
    soft = np.clip((field - 0.5) / 0.15, 0, 1)          # ragged blob with a soft edge
    under = clean[soft > 0].mean(0) if (soft > 0).any() else clean.reshape(-1, 3).mean(0)
    far = np.argsort(np.linalg.norm(_STAIN_COLOURS - under, axis=1))[-2:]
    colour = _STAIN_COLOURS[rng.choice(far)]
    return _paint(clean, rng.uniform(0.55, 0.85) * soft, colour), _on_surface(scene, soft > 0), True


def _cutpaste(rng, scene: Scene, size: int):
    clean = scene.image.astype(np.float32)
    area, aspect = rng.uniform(0.05, 0.12) * size * size, math.exp(rng.uniform(math.log(0.5), math.log(2)))
    w = int(np.clip(round(math.sqrt(area * aspect)), 4, size // 2))
    h = int(np.clip(round(math.sqrt(area / aspect)), 4, size // 2))
    sx, sy, dx, dy = (int(rng.integers(0, size - n + 1)) for n in (w, h, w, h))
    patch = clean[sy:sy + h, sx:sx + w]
    patch = patch[:, ::-1] if rng.random() < 0.5 else patch
    patch = patch[::-1] if rng.random() < 0.5 else patch
    gain = rng.uniform(0.72, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.3)
    cand = clean.copy()
    cand[dy:dy + h, dx:dx + w] = patch * gain * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    region = np.zeros((size, size), bool)
    region[dy:dy + h, dx:dx + w] = True
    return cand, region, True


def _missing(rng, scene: Scene, size: int):
    if scene.alpha is None:
        raise ValueError("the missing defect needs an object category (a scene with a backdrop)")
    clean, alpha = scene.image.astype(np.float32), scene.alpha
    ys, xs = np.nonzero(alpha > 0.5)
    centroid = np.array([xs.mean(), ys.mean()])
    yy, xx = _grid(size)
    # the outer outline only: the nut's bore is an edge too
    edge = (alpha > 0.2) & (alpha < 0.8) & (np.hypot(xx - centroid[0], yy - centroid[1]) > 0.2 * size)
    ey, ex = np.nonzero(edge)
    k = rng.integers(len(ex))
    p = np.array([ex[k], ey[k]], np.float64)
    radius = rng.uniform(0.14, 0.22) * size
    c = p + (centroid - p) / np.linalg.norm(centroid - p) * rng.uniform(0, 0.4) * radius
    bite = np.clip(radius + 0.5 - np.hypot(xx - c[0], yy - c[1]), 0, 1)
    return _paint(clean, bite, scene.background.astype(np.float32)), bite > 0, False


_DEFECTS = {"color": _color, "crack": _crack, "cutpaste": _cutpaste, "hole": _hole, "missing": _missing,
            "scratch": _scratch}


def _settle(clean: np.ndarray, candidate: np.ndarray, region: np.ndarray, nudge: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, mask bool): the candidate inside the mask, the clean image outside, so that mask ==
    (image != clean).any(-1) exactly, with every masked pixel off by more than MASK_EPS in some channel.
    nudge: region pixels the candidate barely changes are pushed MASK_EPS + 1 levels towards mid-grey;
    otherwise they drop out of the mask (a missing part where the object looked like its backdrop)."""
    cand = np.clip(np.rint(candidate), 0, 255).astype(np.uint8)
    change = np.abs(cand.astype(np.int16) - clean.astype(np.int16)).max(-1)
    if nudge:
        weak = region & (change <= MASK_EPS)
        c = clean[weak].astype(np.int16)
        cand[weak] = (c + np.where(c < 128, MASK_EPS + 1, -(MASK_EPS + 1))).astype(np.uint8)
        mask = region.copy()
    else:
        mask = region & (change > MASK_EPS)
    return np.where(mask[..., None], cand, clean), mask


def min_defect_px(size: int) -> tuple[int, int]:
    """(bounding-box long side, area) in px that every defect of a size x size image reaches."""
    return math.ceil(MIN_EXTENT * size), math.ceil(MIN_AREA * size * size)


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator, background: np.ndarray | None = None,
               alpha: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(defective image (S, S, 3) uint8, mask (S, S) bool) for a clean square (S, S, 3) uint8 RGB image, with
    the exact-mask and size rules of the module docstring. Without background and alpha the whole image is the
    surface (textures, or any real image); "missing" needs both (an object's backdrop and coverage)."""
    size = image.shape[0]
    if image.dtype != np.uint8 or image.shape != (size, size, 3) or size < 16:
        raise ValueError(f"add_defect needs a square (S, S, 3) uint8 RGB image with S >= 16, got {image.dtype} "
                         f"{image.shape}")
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect {kind!r}; expected one of {', '.join(DEFECTS)}")
    scene = Scene(image, background, alpha)
    extent, area = min_defect_px(size)
    for _ in range(100):   # a draw that misses the size rule (off the edge, clipped by the object) is redrawn
        out, mask = _settle(image, *_DEFECTS[kind](rng, scene, size))
        ys, xs = np.nonzero(mask)
        if len(ys) >= area and max(np.ptp(ys), np.ptp(xs)) + 1 >= extent:
            return out, mask
    raise RuntimeError(f"no {kind} defect of at least {extent} px across and {area} px in 100 draws on a "
                       f"{size} px image")


def render_sample(category: str, kind: str, index: int, seed: int = 0, size: int = 128
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean, image, mask) of image `index` of a category: kind "train" (train/good), "good" (test/good) or
    one of the category's defects. clean and image are (size, size, 3) uint8 RGB (equal for normal images),
    mask (size, size) bool."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; expected one of {', '.join(CATEGORIES)}")
    defects = CATEGORIES[category][1]
    if kind not in ("train", "good", *defects):
        raise ValueError(f"kind {kind!r} for {category}: expected train, good or one of {', '.join(defects)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    rng = _rng(seed, category, kind, index)
    scene = _SCENES[category](rng, size)
    if kind in ("train", "good"):
        return scene.image, scene.image, np.zeros((size, size), bool)
    image, mask = add_defect(scene.image, kind, rng, scene.background, scene.alpha)
    return scene.image, image, mask


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")   # PIL writes no time stamp: same pixels, same bytes


def build_mini_mvtec(out_dir, seed: int = 0, size: int = 128, n_train: int = 48, n_test: int = 20,
                     n_defect: int = 8, categories: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Write a synthetic dataset in the MVTec-AD layout into out_dir (new or empty unless overwrite): per
    category n_train train/good, n_test test/good and n_defect test/<defect> images per defect type with
    ground_truth/<defect>/<stem>_mask.png (0/255); UniAD meta files train.jsonl and test.jsonl (paths relative
    to out_dir); and meta.json (the arguments and counts). Returns the meta dict."""
    for name, value, low in (("seed", seed, 0), ("size", size, 32), ("n_train", n_train, 2), ("n_test", n_test, 1),
                             ("n_defect", n_defect, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    if size > 1024:
        raise ValueError(f"--size must be <= 1024 px, got {size}")
    names = list(CATEGORIES) if categories is None else list(dict.fromkeys(categories))
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise ValueError(f"unknown synthetic categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(unknown) or '(none)'}; expected some of {', '.join(CATEGORIES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; expected a new or empty output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; refusing to overwrite (pass --overwrite)")

    width = max(3, len(str(max(n_train, n_test, n_defect) - 1)))
    extent, area = min_defect_px(size)
    meta = {"generator": "data.anomaly.synth", "layout": "MVTec-AD", "seed": int(seed), "size": int(size),
            "n_train": int(n_train), "n_test": int(n_test), "n_defect": int(n_defect), "mask_eps": MASK_EPS,
            "min_defect_extent_px": extent, "min_defect_area_px": area, "categories": {}}
    # build beside the target and rename at the end: an interrupted build never looks like a complete one
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    train_lines, test_lines = [], []
    try:
        for cat in names:
            kind, defects = CATEGORIES[cat]
            meta["categories"][cat] = {"kind": kind, "defects": list(defects), "train_good": int(n_train),
                                       "test_good": int(n_test), "test_defective": {d: int(n_defect) for d in defects}}
            for sample_kind, count in (("train", n_train), ("good", n_test), *((d, n_defect) for d in defects)):
                folder = f"{cat}/train/good" if sample_kind == "train" else f"{cat}/test/{sample_kind}"
                (tmp / folder).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    _, image, mask = render_sample(cat, sample_kind, i, seed, size)
                    stem = f"{i:0{width}d}"
                    _save_png(image, tmp / folder / f"{stem}.png")
                    line = {"filename": f"{folder}/{stem}.png", "label": int(mask.any()),
                            "label_name": "good" if sample_kind in ("train", "good") else "defective", "clsname": cat}
                    if mask.any():
                        line["maskname"] = f"{cat}/ground_truth/{sample_kind}/{stem}_mask.png"
                        (tmp / line["maskname"]).parent.mkdir(parents=True, exist_ok=True)
                        _save_png(mask.astype(np.uint8) * 255, tmp / line["maskname"])
                    (train_lines if sample_kind == "train" else test_lines).append(line)
        for name, lines in (("train.jsonl", train_lines), ("test.jsonl", test_lines)):
            (tmp / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
        meta["images"] = {"train": len(train_lines), "test": len(test_lines),
                          "test_defective": sum(line["label"] for line in test_lines)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta

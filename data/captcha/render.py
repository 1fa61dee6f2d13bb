"""The slider-CAPTCHA renderer: generate_captcha(seed, render) draws a background (a skimage photograph,
a procedural image or one of the user's images), a piece outline, cuts a shaded gap (plus fake gaps) into
the background, pastes the slider piece at the left edge, then optionally shifts the colours and
compresses the whole image as a web page would deliver it.

Coordinates are continuous pixels: pixel (col, row) covers [col, col+1) x [row, row+1), so its centre
is (col + 0.5, row + 0.5). Labels are alpha-weighted centroids (image moments) of the anti-aliased
piece masks, kept as floats (the original truncated them to ints: bug #15). A sample is a pure
function of its seed and its RenderConfig (np.random.SeedSequence): every draw of the original generator
comes from one Generator in a fixed order, so reordering or adding draws there changes every sample of
every seed. The rendering options of RenderConfig draw from child streams of the same SeedSequence, one
per option (_STREAMS), so RenderConfig() reproduces the original samples bit for bit, and switching one
option on or off leaves the draws of every other option as they were.
Fields are float32 (h, w) in [0, 1] unless stated; images are (h, w, 3) uint8 RGB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

CATEGORIES = ("none", "rotation", "perlin_noise", "highlight", "confusing_gap", "hollow_center",
              "gap_edge_highlight", "combined")
CATEGORY_PROBS = (0.30, 0.10, 0.05, 0.10, 0.20, 0.05, 0.10, 0.10)
COMBINABLE = ("rotation", "perlin_noise", "highlight", "confusing_gap", "hollow_center", "gap_edge_highlight")
SHAPES = ("jigsaw", "circle", "square", "triangle", "hexagon", "pentagon", "star", "rounded_rect")
SHAPE_PROBS = (0.44,) + (0.08,) * 7
MAX_FAKE_GAPS = 2     # per sample; the datasets pad fake gaps to this many slots so items collate

_SS = 4               # supersampling of piece masks: 16 sub-samples per pixel of anti-aliased alpha
_SHIFT = 4            # fixed-point fraction bits of cv2 drawing coordinates (1/16 supersampled px)
_SLIDER_X_MAX = 10    # px: the slider's bbox starts in [0, 10], so its centre is in [half, half + 10]
_GAP_MARGIN = 10      # px between the real gap and the image border or the slider area
_FAKE_MARGIN = 4      # px between a fake gap and the image border
_FAKE_MIN_DIST = 10   # px of clear space between the bboxes of a fake gap and the real gap
_ROT_PAD = 3          # px around a rotated gap: 1.8 deg moves a 75 px piece's corners by < 2 px

_COMMON_SIZES = ((320, 160), (360, 180), (400, 200), (384, 192))
# skimage.data photographs stored inside the wheel; the others need a network download
_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
           "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")
_PROCEDURAL = ("gradient", "noise", "stripes", "clutter", "mosaic")
_PROCEDURAL_PROBS = (0.2, 0.3, 0.15, 0.35, 0.0)  # mosaic: a family only the held-out set uses


GAP_STYLES = ("darken", "veil", "inset", "outline", "bevel")
PHOTOS = _PHOTOS
HELDOUT_PHOTOS = ("brick", "chelsea", "coffee", "rocket")   # never in RENDER_TRAIN's background pool
PROCEDURAL = _PROCEDURAL
# one child stream of the sample's SeedSequence per rendering option, in this (fixed) order
_STREAMS = ("background", "gap_style", "slider", "colour", "compression")
_SLIDER_X_WIDE_MAX = 40   # px: a 280 px wide image still fits the gap and a fake right of a 70 px slider there


def _check_probs(name: str, probs: tuple, n: int) -> None:
    if len(probs) != n or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-9):
        raise ValueError(f"RenderConfig.{name}: expected {n} probabilities >= 0 summing to 1, got {probs}")


def _check_range(name: str, pair: tuple, lo: float, hi: float) -> None:
    if len(pair) != 2 or not lo <= pair[0] <= pair[1] <= hi:
        raise ValueError(f"RenderConfig.{name}: expected (low, high) with {lo} <= low <= high <= {hi}, got {pair}")


@dataclass(frozen=True)
class RenderConfig:
    """How a sample is rendered beyond the confusion categories (which keep CATEGORY_PROBS in every config).

    Each option is a probability per sample plus the range its strength is drawn from. The defaults are
    the original generator: darkened gaps, every photo and the four procedural kinds, no slider shadow,
    the slider on the gap's row at x 0-10 px, no colour shift, lossless output."""
    photos: tuple[str, ...] = PHOTOS                  # skimage photographs in the background pool
    procedural_probs: tuple[float, ...] = _PROCEDURAL_PROBS  # over PROCEDURAL: gradient ... clutter, mosaic
    user_prob: float = 0.5                            # share of backgrounds from the user's images, when given any
    gap_style_probs: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0)  # over GAP_STYLES, for the real gap and its fakes
    slider_shadow_prob: float = 0.0                   # a soft drop shadow under the slider
    slider_offset_prob: float = 0.0                   # the slider off the gap's row ...
    slider_offset_px: tuple[int, int] = (1, 6)        # ... by this many px (either sign); the label follows
    slider_x_prob: float = 0.0                        # the slider's left edge drawn from slider_x_px instead of 0-10 px
    slider_x_px: tuple[int, int] = (0, _SLIDER_X_WIDE_MAX)
    colour_prob: float = 0.0                          # brightness/contrast/gamma/white balance of the whole image
    brightness: float = 25.0                          # +- grey levels
    contrast: tuple[float, float] = (0.8, 1.25)       # gain about mid-grey
    gamma: tuple[float, float] = (0.8, 1.25)
    channel_gain: tuple[float, float] = (0.9, 1.1)    # per RGB channel
    jpeg_prob: float = 0.0                            # JPEG round trip of the final image ...
    jpeg_quality: tuple[int, int] = (40, 95)
    webp_prob: float = 0.0                            # ... or WebP (never both)
    webp_quality: tuple[int, int] = (40, 95)

    def __post_init__(self):
        unknown = [p for p in self.photos if p not in PHOTOS]
        if not self.photos or unknown or len(set(self.photos)) != len(self.photos):
            raise ValueError(f"RenderConfig.photos: expected distinct names out of {PHOTOS}, got {self.photos}")
        _check_probs("procedural_probs", self.procedural_probs, len(PROCEDURAL))
        _check_probs("gap_style_probs", self.gap_style_probs, len(GAP_STYLES))
        for name in ("user_prob", "slider_shadow_prob", "slider_offset_prob", "slider_x_prob", "colour_prob",
                     "jpeg_prob", "webp_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"RenderConfig.{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        if self.jpeg_prob + self.webp_prob > 1:
            raise ValueError(f"RenderConfig: jpeg_prob + webp_prob must be <= 1, got {self.jpeg_prob + self.webp_prob}")
        # the gap keeps _GAP_MARGIN px from the image's top and bottom, so any offset up to that fits
        _check_range("slider_offset_px", self.slider_offset_px, 1, _GAP_MARGIN)
        _check_range("slider_x_px", self.slider_x_px, 0, _SLIDER_X_WIDE_MAX)
        _check_range("contrast", self.contrast, 0.1, 10)
        _check_range("gamma", self.gamma, 0.1, 10)
        _check_range("channel_gain", self.channel_gain, 0.1, 10)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 100)
        _check_range("webp_quality", self.webp_quality, 1, 100)
        if not 0 <= self.brightness <= 255:
            raise ValueError(f"RenderConfig.brightness: expected 0-255 grey levels, got {self.brightness}")

    def uses(self) -> dict[str, set]:
        """The settings this config can draw, by kind; the held-out set's are disjoint from the training mix's."""
        return {"photos": set(self.photos),
                "procedural": {k for k, p in zip(PROCEDURAL, self.procedural_probs) if p > 0},
                "gap_styles": {k for k, p in zip(GAP_STYLES, self.gap_style_probs) if p > 0},
                "compression": {k for k, p in (("none", 1 - self.jpeg_prob - self.webp_prob), ("jpeg", self.jpeg_prob),
                                               ("webp", self.webp_prob)) if p > 1e-12}}


# The realistic training mix: every option on part of the time, none of the held-out settings.
RENDER_TRAIN = RenderConfig(
    photos=tuple(p for p in PHOTOS if p not in HELDOUT_PHOTOS),
    gap_style_probs=(0.45, 0.25, 0.15, 0.15, 0.0),
    slider_shadow_prob=0.4, slider_offset_prob=0.3, slider_x_prob=0.3,
    colour_prob=0.5, jpeg_prob=0.7, jpeg_quality=(40, 95))
# Rendering the training mix never uses: other backgrounds (4 held-out photos, Voronoi mosaics), bevelled
# gaps (an edge in relief, lit on one side and shadowed on the other), WebP instead of JPEG. Slider shadow,
# offsets, positions and colour shifts are shared with RENDER_TRAIN.
RENDER_HELDOUT = RenderConfig(
    photos=HELDOUT_PHOTOS, procedural_probs=(0.0, 0.0, 0.0, 0.0, 1.0),
    gap_style_probs=(0.0, 0.0, 0.0, 0.0, 1.0),
    slider_shadow_prob=0.4, slider_offset_prob=0.3, slider_x_prob=0.3,
    colour_prob=0.5, webp_prob=1.0, webp_quality=(40, 95))
RENDERS = {"default": RenderConfig(), "train": RENDER_TRAIN, "heldout": RENDER_HELDOUT}


# ---------------------------------------------------------------------------- backgrounds

def _sample_size(rng) -> tuple[int, int]:
    """(w, h) of the source image in px, both even: 280-480 x 140-240, aspect 1.8-2.4."""
    if rng.random() < 0.3:
        return _COMMON_SIZES[int(rng.integers(len(_COMMON_SIZES)))]
    w = 2 * int(rng.integers(140, 241))
    # half-heights whose aspect w/h stays within [1.8, 2.4]
    lo, hi = max(70, math.ceil(w / 2.4 / 2)), min(120, math.floor(w / 1.8 / 2))
    return w, 2 * int(rng.integers(lo, hi + 1))


def _random_colours(rng, n: int, sat=(0.15, 1.0), val=(0.1, 1.0)) -> np.ndarray:
    """(n, 3) uint8 RGB, uniform in HSV."""
    hsv = np.empty((1, n, 3), np.uint8)
    hsv[0, :, 0] = rng.uniform(0, 180, n)          # OpenCV hue range
    hsv[0, :, 1] = rng.uniform(*sat, n) * 255
    hsv[0, :, 2] = rng.uniform(*val, n) * 255
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def _palette(rng, n_stops: int, **colour_range) -> np.ndarray:
    """(256, 1, 3) uint8 colour ramp through n_stops random colours, a cv2.LUT table."""
    colours = _random_colours(rng, n_stops, **colour_range).astype(np.float64)
    stops = np.concatenate([[0.0], np.sort(rng.random(n_stops - 2)), [1.0]])
    t = np.linspace(0.0, 1.0, 256)
    ramp = np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1)
    return ramp.astype(np.uint8)[:, None, :]


def _colourise(field: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """field (h, w) float32 in [0, 1] -> (h, w, 3) uint8 through a palette."""
    index = cv2.convertScaleAbs(field, alpha=255.0)
    return cv2.LUT(cv2.merge([index, index, index]), palette)


def _normalise(field: np.ndarray) -> np.ndarray:
    return cv2.normalize(field, None, 0.0, 1.0, cv2.NORM_MINMAX, dtype=cv2.CV_32F)


def _axes(h: int, w: int):
    """Pixel-centre coordinates, shaped (1, w) and (h, 1) for broadcasting."""
    return (np.arange(w, dtype=np.float32) + 0.5)[None, :], (np.arange(h, dtype=np.float32) + 0.5)[:, None]


def _along(rng, h: int, w: int, angle: float | None = None) -> np.ndarray:
    """Signed distance (h, w) float32 along a random direction, in px."""
    a = rng.uniform(0, 2 * np.pi) if angle is None else angle
    xs, ys = _axes(h, w)
    return np.float32(np.cos(a)) * xs + np.float32(np.sin(a)) * ys


def _field_radial(rng, h: int, w: int) -> np.ndarray:
    xs, ys = _axes(h, w)
    cx, cy = rng.uniform(-0.2, 1.2) * w, rng.uniform(-0.2, 1.2) * h
    r = np.sqrt((xs - np.float32(cx)) ** 2 + (ys - np.float32(cy)) ** 2)
    r *= np.float32(1.0 / (rng.uniform(0.5, 1.3) * math.hypot(w, h)))
    return np.minimum(r, 1.0, out=r)


def _value_noise(rng, h: int, w: int, cells: int, octaves: int, persistence: float = 0.5) -> np.ndarray:
    """Fractal value noise (h, w) float32 in [0, 1]; cells = lattice cells along the short side at octave 0."""
    field = np.zeros((h, w), np.float32)
    amp = 1.0
    for octave in range(octaves):
        n = cells * 2**octave
        lattice = rng.random((n + 1, max(2, round(n * w / h)) + 1), dtype=np.float32)
        field += np.float32(amp) * cv2.resize(lattice, (w, h), interpolation=cv2.INTER_CUBIC)
        amp *= persistence
    return _normalise(field)


def _perlin(rng, h: int, w: int, cell: float) -> np.ndarray:
    """Gradient (Perlin) noise (h, w) float32, roughly in [-1, 1]; cell = lattice spacing in px."""
    theta = rng.uniform(0, 2 * np.pi, (int(h / cell) + 2, int(w / cell) + 2))
    gx, gy = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    u = (np.arange(w, dtype=np.float32) + 0.5) / np.float32(cell)
    v = (np.arange(h, dtype=np.float32) + 0.5) / np.float32(cell)
    j, i = u.astype(np.int32), v.astype(np.int32)
    fu, fv = (u - j)[None, :], (v - i)[:, None]

    def corner(di: int, dj: int) -> np.ndarray:
        rows, cols = (i + di)[:, None], (j + dj)[None, :]
        return gx[rows, cols] * (fu - dj) + gy[rows, cols] * (fv - di)

    su = fu * fu * fu * (fu * (fu * 6 - 15) + 10)  # quintic fade: C2-continuous across cells
    sv = fv * fv * fv * (fv * (fv * 6 - 15) + 10)
    n00, n10 = corner(0, 0), corner(1, 0)
    top = n00 + su * (corner(0, 1) - n00)
    bottom = n10 + su * (corner(1, 1) - n10)
    return (top + sv * (bottom - top)) * np.float32(math.sqrt(2))


def _field_noise(rng, h: int, w: int) -> np.ndarray:
    kind = int(rng.integers(3))
    if kind == 0:
        return _value_noise(rng, h, w, cells=int(rng.integers(2, 6)), octaves=int(rng.integers(2, 5)))
    if kind == 1:
        # computed at half resolution: the lowest octave has cells of >= 8 px there anyway
        hh, hw = h // 2, w // 2
        cell = rng.uniform(20, 60)
        field = sum(np.float32(0.5**o) * _perlin(rng, hh, hw, cell / 2**o) for o in range(3))
        return _normalise(cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR))
    # marble: sine bands bent by turbulence
    turbulence = _value_noise(rng, h, w, cells=int(rng.integers(2, 5)), octaves=3)
    phase = _along(rng, h, w) / np.float32(rng.uniform(20, 80)) + np.float32(rng.uniform(1.0, 4.0)) * turbulence
    return np.float32(0.5) + np.float32(0.5) * np.sin(np.float32(2 * np.pi) * phase)


def _field_stripes(rng, h: int, w: int) -> np.ndarray:
    angle = rng.choice([0.0, np.pi / 2]) if rng.random() < 0.5 else rng.uniform(0, np.pi)
    u = _along(rng, h, w, angle)
    u -= u.min()
    length = int(u.max()) + 2
    widths = rng.uniform(3, rng.uniform(8, 40), length)  # more bands than needed: each >= 3 px
    band = np.searchsorted(np.cumsum(widths), np.arange(length))
    if rng.random() < 0.5:
        values = np.where(np.arange(length) % 2 == 0, 0.15, 0.85).astype(np.float32)
    else:
        values = rng.random(length, dtype=np.float32)
    field = values[band][u.astype(np.int32)]
    return cv2.GaussianBlur(field, (3, 3), 0.7)


def _background_clutter(rng, h: int, w: int) -> np.ndarray:
    """Dark radial gradient under layers of semi-transparent circles, polygons and lines."""
    img = _colourise(_field_radial(rng, h, w), _palette(rng, 2, val=(0.05, 0.5)))
    for _ in range(int(rng.integers(3, 6))):
        overlay = img.copy()
        n = int(rng.integers(8, 30))
        kinds = rng.integers(0, 6, n)  # 0 circle, 1 line, 2..5 polygon with kind+1 sides
        centres = rng.uniform(0, 1, (n, 2)) * (w, h)
        radii = rng.uniform(3, 0.3 * h, n)
        angles = rng.uniform(0, 2 * np.pi, n)
        thickness = rng.integers(1, 4, n)
        colours = _random_colours(rng, n, sat=(0.3, 1.0), val=(0.4, 1.0)).tolist()
        for k in range(n):
            colour, (cx, cy), r, a = tuple(colours[k]), centres[k], radii[k], angles[k]
            if kinds[k] == 0:
                cv2.circle(overlay, (int(cx), int(cy)), int(r), colour, -1, cv2.LINE_AA)
            elif kinds[k] == 1:
                dx, dy = r * math.cos(a), r * math.sin(a)
                cv2.line(overlay, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), colour,
                         int(thickness[k]), cv2.LINE_AA)
            else:
                t = a + 2 * np.pi * np.arange(kinds[k] + 1) / (kinds[k] + 1)
                pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=-1).astype(np.int32)
                cv2.fillPoly(overlay, [pts], colour, cv2.LINE_AA)
        opacity = rng.uniform(0.25, 0.7)
        cv2.addWeighted(overlay, opacity, img, 1 - opacity, 0, dst=img)
    return img


_PHOTO_CACHE: dict[str, tuple[np.ndarray, bool]] = {}


def _photo(name: str) -> tuple[np.ndarray, bool]:
    """(RGB uint8 photograph, was grey), loaded from skimage.data once per process."""
    if name not in _PHOTO_CACHE:
        import skimage.data  # slow import, only paid by processes that draw a photo

        img = np.asarray(getattr(skimage.data, name)())
        grey = img.ndim == 2
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if grey else np.ascontiguousarray(img[..., :3])
        # crops are >= 35 % of the photo, so 1024 px keeps detail at 480 px outputs and resizes cheap
        shrink = 1024 / max(img.shape[:2])
        if shrink < 1:
            img = cv2.resize(img, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        _PHOTO_CACHE[name] = (img, grey)
    return _PHOTO_CACHE[name]


def _colour_jitter(rng, img: np.ndarray, grey: bool) -> np.ndarray:
    # grey photos get strongly unequal channel gains, i.e. a random tint
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.55 if grey else 0.9, 1.0 if grey else 1.1, 3)
    ramp = (np.arange(256) / 255.0) ** rng.uniform(0.75, 1.35) * 255
    lut = np.clip(ramp[:, None] * gain[None, :] + rng.uniform(-30, 30), 0, 255).astype(np.uint8)
    img = cv2.LUT(img, lut[:, None, :])
    if not grey:
        s = rng.uniform(0.5, 1.4)
        luma = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        img = cv2.addWeighted(img, s, luma, 1 - s, 0)
        if rng.random() < 0.25:
            img = np.ascontiguousarray(img[..., rng.permutation(3)])
    return img


def _random_crop(rng, src: np.ndarray, h: int, w: int, min_share: float = 0.35) -> np.ndarray:
    """A random crop of src with the aspect w/h, at least min_share of its largest such crop, resized to (w, h)."""
    sh, sw = src.shape[:2]
    cw = min(sw, sh * w / h) * rng.uniform(min_share, 1.0)
    ch = cw * h / w
    x0, y0 = int(rng.uniform(0, sw - cw)), int(rng.uniform(0, sh - ch))
    crop = src[y0:y0 + max(1, int(ch)), x0:x0 + max(1, int(cw))]
    img = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA if crop.shape[1] > w else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        img = cv2.flip(img, 1)
    return img


def _background_photo(rng, h: int, w: int, photos: tuple[str, ...]) -> tuple[np.ndarray, str]:
    name = photos[int(rng.integers(len(photos)))]
    src, grey = _photo(name)
    img = _random_crop(rng, src, h, w)
    if rng.random() < 0.2:
        img = cv2.flip(img, 0)
    return _colour_jitter(rng, img, grey), name


def _background_mosaic(rng, h: int, w: int) -> np.ndarray:
    """Voronoi cells of random colours with anti-aliased seams and a soft light gradient (held-out family)."""
    n = int(rng.integers(12, 60))
    points = rng.uniform(0, 1, (n, 2)) * (w, h)
    colours = _random_colours(rng, n).astype(np.float32)
    xs, ys = _axes(h, w)
    # nearest and second-nearest squared distances, one seed point at a time: (h, w) memory instead of (h, w, n)
    best = np.full((h, w), np.inf, np.float32)
    second = best.copy()
    label = np.zeros((h, w), np.int32)
    for k, (px, py) in enumerate(points.astype(np.float32)):
        d = (xs - px) ** 2 + (ys - py) ** 2
        closer = d < best
        second = np.where(closer, best, np.minimum(second, d))
        best = np.where(closer, d, best)
        label[closer] = k
    img = colours[label]
    # half the distance difference to the two nearest seeds is the distance to the seam, in px
    seam = np.clip(np.float32(rng.uniform(0.5, 2.5)) + 0.5 - (np.sqrt(second) - np.sqrt(best)) / 2, 0, 1)
    seam_level = np.float32(rng.choice([20.0, 235.0]))
    img += (seam_level - img) * seam[..., None]
    light = np.float32(0.8) + np.float32(0.4) * _normalise(_along(rng, h, w))
    return np.clip(img * light[..., None], 0, 255).astype(np.uint8)


def _background(rng, h: int, w: int, photos: tuple[str, ...] = _PHOTOS,
                procedural_probs: tuple[float, ...] = _PROCEDURAL_PROBS) -> tuple[np.ndarray, str]:
    """(h, w, 3) uint8 RGB and its source (a photo's or a procedural kind's name): a skimage photograph or a
    procedural image, about half each."""
    if rng.random() < 0.5:
        img, kind = _background_photo(rng, h, w, photos)
    else:
        kind = _PROCEDURAL[rng.choice(len(_PROCEDURAL), p=procedural_probs)]
        if kind == "gradient":
            field = _normalise(_along(rng, h, w)) if rng.random() < 0.6 else _field_radial(rng, h, w)
            if rng.random() < 0.5:
                field = 0.8 * field + 0.2 * _value_noise(rng, h, w, cells=int(rng.integers(3, 8)), octaves=3)
            img = _colourise(field, _palette(rng, int(rng.integers(2, 4))))
        elif kind == "noise":
            img = _colourise(_field_noise(rng, h, w), _palette(rng, int(rng.integers(2, 5))))
        elif kind == "stripes":
            field = _field_stripes(rng, h, w)
            if rng.random() < 0.3:
                field = 0.5 * (field + _field_stripes(rng, h, w))
            img = _colourise(field, _palette(rng, int(rng.integers(2, 6))))
        elif kind == "clutter":
            img = _background_clutter(rng, h, w)
        else:
            img = _background_mosaic(rng, h, w)
    if rng.random() < 0.3:
        noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(2, 10))
        img = cv2.add(img, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)
    if rng.random() < 0.15:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    return img, kind


# ---------------------------------------------------------------------------- piece shapes

def _regular_polygon(n: int, radius: float, rotation: float) -> np.ndarray:
    t = rotation - np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=-1)


def _shape_primitives(rng, shape: str, size: float) -> list:
    """A piece outline around (0, 0) in px, as drawing primitives in order:
    ("poly", (k, 2) points, fill) or ("circle", (cx, cy, r), fill); fill 255 adds, 0 cuts."""
    rotation = rng.uniform(0, 2 * np.pi)
    if shape == "jigsaw":
        side = size / 1.4                  # a square plus a knob of radius 0.2 * side on each side
        r, half = 0.2 * side, side / 2
        knobs = rng.integers(0, 3, 4)      # top, right, bottom, left: 0 concave, 1 flat, 2 convex
        while (knobs == 1).all():
            knobs = rng.integers(0, 3, 4)
        mids = ((0.0, -half), (half, 0.0), (0.0, half), (-half, 0.0))
        square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        convex = [("circle", (*m, r), 255) for m, k in zip(mids, knobs) if k == 2]
        concave = [("circle", (*m, r), 0) for m, k in zip(mids, knobs) if k == 0]
        return [("poly", square, 255), *convex, *concave]
    if shape == "circle":
        return [("circle", (0.0, 0.0, 0.425 * size), 255)]
    if shape == "square":
        s = 0.4 * size
        return [("poly", np.array([[-s, -s], [s, -s], [s, s], [-s, s]]), 255)]
    if shape == "triangle":
        return [("poly", _regular_polygon(3, 0.95 * size / math.sqrt(3), rotation), 255)]
    if shape == "hexagon":
        return [("poly", _regular_polygon(6, size / 2, rotation), 255)]
    if shape == "pentagon":
        return [("poly", _regular_polygon(5, size / 2, rotation), 255)]
    if shape == "star":
        pts = _regular_polygon(10, size / 2, rotation)
        pts[1::2] *= rng.uniform(0.45, 0.55)
        return [("poly", pts, 255)]
    if shape == "rounded_rect":
        hw, hh = 0.425 * size, 0.5 * size * rng.uniform(0.6, 0.85)
        rc = 0.25 * min(hw, hh) * 2
        arcs = []
        for (sx, sy), start in zip(((1, 1), (-1, 1), (-1, -1), (1, -1)), (0.0, 0.5, 1.0, 1.5)):
            t = np.pi * (start + np.linspace(0, 0.5, 8))
            arcs.append(np.stack([sx * (hw - rc) + rc * np.cos(t), sy * (hh - rc) + rc * np.sin(t)], axis=-1))
        pts = np.concatenate(arcs)
        if rng.random() < 0.5:
            pts = pts[:, ::-1].copy()
        return [("poly", pts, 255)]
    raise ValueError(f"unknown piece shape {shape!r}; expected one of {SHAPES}")


def _transform(points: np.ndarray, angle: float, scale: float, centre) -> np.ndarray:
    """Rotate by angle (radians, counter-clockwise on screen as cv2.getRotationMatrix2D), scale, then
    move (0, 0) to centre."""
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    x, y = points[:, 0], points[:, 1]
    return np.stack([centre[0] + c * x + s * y, centre[1] - s * x + c * y], axis=-1)


def _draw(prims: list, angle: float, scale: float, centre, hw: tuple[int, int]) -> np.ndarray:
    """(h*SS, w*SS) uint8 coverage of the primitives; centre in px of the (h, w) patch."""
    canvas = np.zeros((hw[0] * _SS, hw[1] * _SS), np.uint8)
    one = 1 << _SHIFT
    for kind, geom, fill in prims:
        if kind == "poly":
            p = _transform(np.asarray(geom, np.float64), angle, scale, centre)
            # px -> supersampled pixel-centre coordinates -> cv2 fixed point
            q = np.round((p * _SS - 0.5) * one).astype(np.int32)
            cv2.fillPoly(canvas, [q], fill, cv2.LINE_AA, _SHIFT)
        else:
            cx, cy, r = geom
            p = _transform(np.array([[cx, cy]]), angle, scale, centre)[0]
            q = np.round((p * _SS - 0.5) * one).astype(np.int64)
            cv2.circle(canvas, (int(q[0]), int(q[1])), int(round(r * scale * _SS * one)), fill, -1,
                       cv2.LINE_AA, _SHIFT)
    return canvas


def _rasterise(prims: list, hole: float, angle: float, scale: float, centre, hw) -> np.ndarray:
    """Supersampled (h*SS, w*SS) uint8 coverage; hole > 0 cuts the same shape scaled by hole about (0, 0)."""
    hr = _draw(prims, angle, scale, centre, hw)
    if hole > 0:
        hr = cv2.multiply(hr, cv2.bitwise_not(_draw(prims, angle, scale * hole, centre, hw)), scale=1 / 255)
    return hr


def _downsample(hr: np.ndarray) -> np.ndarray:
    """Supersampled coverage -> anti-aliased alpha; an exact SS x SS box average, so centroids carry over."""
    return cv2.resize(hr, (hr.shape[1] // _SS, hr.shape[0] // _SS), interpolation=cv2.INTER_AREA)


def _extent(prims: list) -> float:
    """Radius around (0, 0) that contains every primitive, px."""
    reach = [np.hypot(*np.asarray(g, np.float64).T).max() if k == "poly" else math.hypot(g[0], g[1]) + g[2]
             for k, g, _ in prims]
    return float(max(reach))


def _centre_on_centroid(prims: list) -> list:
    """Shift primitives so that the area centroid of the shape sits at (0, 0), so that holes,
    rotations and scalings about (0, 0) keep the centroid in place."""
    n = int(math.ceil(2 * _extent(prims))) + 4
    m = cv2.moments(_draw(prims, 0.0, 1.0, (n / 2, n / 2), (n, n)))
    dx = (m["m10"] / m["m00"] + 0.5) / _SS - n / 2
    dy = (m["m01"] / m["m00"] + 0.5) / _SS - n / 2
    shifted = []
    for kind, geom, fill in prims:
        if kind == "poly":
            shifted.append((kind, np.asarray(geom, np.float64) - (dx, dy), fill))
        else:
            shifted.append((kind, (geom[0] - dx, geom[1] - dy, geom[2]), fill))
    return shifted


def _tight(alpha: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Crop alpha to the bbox of its non-zero pixels -> (crop, x0, y0)."""
    x, y, w, h = cv2.boundingRect(alpha)
    return np.ascontiguousarray(alpha[y:y + h, x:x + w]), x, y


def _centroid(alpha: np.ndarray) -> tuple[float, float]:
    """Alpha-weighted centroid in px (pixel centres at +0.5)."""
    m = cv2.moments(alpha)
    return m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5


def _render_piece(rng, prims: list, hole: float, angle: float = 0.0, scale: float = 1.0):
    """Tight alpha of the piece at a random sub-pixel position -> (alpha, (cx, cy) centroid in it,
    its supersampled coverage)."""
    # +4 px: room for the random sub-pixel shift (< 1 px) of the centre and the anti-aliased edge
    n = int(math.ceil(2 * _extent(prims) * scale)) + 4
    hr = _rasterise(prims, hole, angle, scale, (n / 2 + rng.random(), n / 2 + rng.random()), (n, n))
    alpha, x0, y0 = _tight(_downsample(hr))
    hr = hr[y0 * _SS:(y0 + alpha.shape[0]) * _SS, x0 * _SS:(x0 + alpha.shape[1]) * _SS]
    return alpha, _centroid(alpha), hr


def _rotate_about_centroid(hr: np.ndarray, angle: float, pad: int) -> tuple[np.ndarray, int, int]:
    """Rotate a piece's supersampled coverage about its centroid -> (tight alpha, x0, y0 of it relative
    to the unrotated alpha). Warping the coverage keeps the centroid to ~0.01 px; re-drawing the
    rotated outline would not, because cv2's polygon fill has an orientation-dependent bias of ~0.1 px."""
    hr = cv2.copyMakeBorder(hr, *(pad * _SS,) * 4, cv2.BORDER_CONSTANT, value=0)
    m = cv2.moments(hr)
    rot = cv2.getRotationMatrix2D((m["m10"] / m["m00"], m["m01"] / m["m00"]), math.degrees(angle), 1.0)
    hr = cv2.warpAffine(hr, rot, (hr.shape[1], hr.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)
    alpha, x0, y0 = _tight(_downsample(hr))
    return alpha, x0 - pad, y0 - pad


# ---------------------------------------------------------------------------- lighting

def _rim(dist: np.ndarray, width: float, decay: float) -> np.ndarray:
    """1 at the edge falling to 0 about width/2 px inside: (1 - tanh((d/width - 0.5) * 4 decay)) / 2."""
    curve = 0.5 * (1 - np.tanh((dist / np.float32(width) - np.float32(0.5)) * np.float32(4 * decay)))
    return np.where(dist <= width, curve, np.float32(0)).astype(np.float32)


def _inner_distance(alpha: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel of the solid piece to its outline (including holes)."""
    solid = cv2.copyMakeBorder((alpha > 127).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return cv2.distanceTransform(solid, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def _direction_cosine(alpha: np.ndarray, light_angle: float) -> np.ndarray:
    """(h, w) float32 cosine between each pixel's direction from the alpha centroid and the light
    direction (radians, y down: pi/4 points to the bottom-right)."""
    cx, cy = _centroid(alpha)
    xs, ys = _axes(*alpha.shape)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    r = np.sqrt(dx * dx + dy * dy) + np.float32(1e-6)
    return (dx * np.float32(math.cos(light_angle)) + dy * np.float32(math.sin(light_angle))) / r


def _sample_light(rng, effects: set) -> dict:
    """Gap lighting, in grey levels; shared by the real gap and its fakes."""
    light = {"angle": np.pi / 4 + rng.uniform(-0.3, 0.3), "rim_opacity": 0.0, "rim_width": 6.0, "rim_decay": 2.0}
    if "highlight" in effects:
        light.update(sign=1.0, base=rng.uniform(20, 40), edge=rng.uniform(40, 60), directional=rng.uniform(15, 30))
    else:
        light.update(sign=-1.0, base=rng.uniform(30, 50), edge=rng.uniform(40, 60), directional=rng.uniform(15, 25))
    if "gap_edge_highlight" in effects:
        # the white rim replaces the edge shadow; lightness 90-100 of the original maps to opacity <= 0.7
        light.update(edge=0.0, rim_opacity=0.7 * rng.uniform(0.9, 1.0), rim_width=rng.uniform(6, 7),
                     rim_decay=rng.uniform(2.0, 2.5))
        if "highlight" not in effects:
            light.update(base=rng.uniform(35, 45))
    return light


def _sample_gap_style(stream, render: RenderConfig) -> dict:
    """Gap style and its strengths (light levels in grey levels), merged into the light dict; {} for the
    original darkened gap, so that style's light dict and pixels stay exactly as before."""
    style = GAP_STYLES[stream.choice(len(GAP_STYLES), p=render.gap_style_probs)]
    if style == "darken":
        return {}
    return {"style": style, "level": stream.uniform(0, 60),       # colour of a dark veil or outline
            "opacity": stream.uniform(0.35, 0.75),                # veil opacity
            "inset_base": stream.uniform(10, 30), "inset_depth": stream.uniform(60, 110),
            "inset_offset": stream.uniform(2, 5), "inset_blur": stream.uniform(1.5, 3.0),
            "outline_width": stream.uniform(1.0, 2.5), "outline_opacity": stream.uniform(0.6, 0.95),
            "outline_tint": stream.uniform(0, 10),
            "bevel_width": stream.uniform(1.5, 3.0), "bevel_depth": stream.uniform(50, 90),
            "bevel_tint": stream.uniform(0, 15)}


def _gap_pixels(region: np.ndarray, a: np.ndarray, dist: np.ndarray, a8: np.ndarray, light: dict) -> None:
    """Shade region (h, w, 3) float32 in place under alpha a (h, w) in [0, 1] in the light's gap style.
    Every style keeps to the piece's alpha, so the gap's pixels change where its label says it is; light["sign"]
    (the highlight confusion) turns darkening into brightening, dark veils and outlines into white ones and
    mirrors a bevel's relief."""
    style, sign = light.get("style", "darken"), np.float32(light["sign"])
    if style == "darken":
        edge = 1 - dist / max(float(dist.max()), 1.0)
        # strongest along the light axis, both towards and away from the light (top-left and bottom-right)
        along = np.abs(_direction_cosine(a8, light["angle"]))
        shade = light["base"] + light["edge"] * edge + light["directional"] * (0.5 + 0.5 * along)
        region += (sign * shade * a)[..., None]
    elif style == "veil":
        target = np.float32(255 if sign > 0 else light["level"])
        region += (target - region) * (np.float32(light["opacity"]) * a)[..., None]
    elif style == "inset":
        # the hole's rim towards the light casts a shadow into it: the outside, moved along the light and
        # blurred, seen through the alpha
        dx = light["inset_offset"] * math.cos(light["angle"])
        dy = light["inset_offset"] * math.sin(light["angle"])
        outside = cv2.warpAffine(1 - a, np.float32([[1, 0, dx], [0, 1, dy]]), (a.shape[1], a.shape[0]),
                                 flags=cv2.INTER_LINEAR, borderValue=1.0)
        shadow = cv2.GaussianBlur(outside, (0, 0), light["inset_blur"]) * a
        region += (sign * (np.float32(light["inset_base"]) * a + np.float32(light["inset_depth"]) * shadow))[..., None]
    elif style == "bevel":
        # a cut edge in relief: a band of bevel_width px inside the edge, lit on the side the light points to
        # and shadowed on the opposite one (antisymmetric, unlike darken's), the interior barely tinted
        band = np.clip(np.float32(light["bevel_width"] + 1) - dist, 0, 1) * a
        relief = np.float32(light["bevel_depth"]) * _direction_cosine(a8, light["angle"])
        region += (sign * np.float32(light["bevel_tint"]) * a - sign * relief * band)[..., None]
    else:
        # outline only: a line of outline_width px inside the edge, the interior barely tinted
        line = np.clip(np.float32(light["outline_width"] + 1) - dist, 0, 1) * a
        target = np.float32(255 if sign > 0 else light["level"])
        region += (sign * np.float32(light["outline_tint"]) * a)[..., None]
        region += (target - region) * (np.float32(light["outline_opacity"]) * line)[..., None]


def _shade_gap(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, light: dict) -> None:
    """Darken (or brighten, veil, outline: light["style"]) img in place under alpha placed at (x0, y0), then
    blur it slightly."""
    ph, pw = alpha.shape
    # one px of context around the piece so the blur also softens the outline
    y_lo, x_lo = y0 - 1, x0 - 1
    if y_lo < 0 or x_lo < 0 or y0 + ph + 1 > img.shape[0] or x0 + pw + 1 > img.shape[1]:
        raise ValueError(f"gap at ({x0}, {y0}) of size {pw}x{ph} does not fit in the "
                         f"{img.shape[1]}x{img.shape[0]} image")
    a8 = cv2.copyMakeBorder(alpha, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    a = a8.astype(np.float32) * np.float32(1 / 255)
    dist = _inner_distance(a8)
    region = img[y_lo:y0 + ph + 1, x_lo:x0 + pw + 1].astype(np.float32)
    _gap_pixels(region, a, dist, a8, light)
    if light["rim_opacity"] > 0:
        opacity = _rim(dist, light["rim_width"], light["rim_decay"]) * np.float32(light["rim_opacity"]) * a
        region += (255 - region) * opacity[..., None]
    np.clip(region, 0, 255, out=region)
    region += (cv2.GaussianBlur(region, (3, 3), 0.8) - region) * a[..., None]
    img[y_lo:y0 + ph + 1, x_lo:x0 + pw + 1] = (region + 0.5).astype(np.uint8)


def _slider_pixels(rng, texture: np.ndarray, alpha: np.ndarray, noise: bool) -> np.ndarray:
    """(ph, pw, 3) float32 slider colours: the un-darkened patch, optional Perlin noise, light rim."""
    pixels = texture.astype(np.float32)
    ph, pw = alpha.shape
    if noise:
        n = _perlin(rng, ph, pw, cell=10.0)  # scale 0.1 of the original
        n *= np.float32(rng.uniform(0.2, 0.5) * 50 / max(float(np.abs(n).max()), 1e-6))  # grey levels
        pixels += (n * (alpha > 127))[..., None]
    dist = _inner_distance(alpha)
    max_opacity = rng.uniform(0.55, 0.7)
    curve = _rim(dist, rng.uniform(5, 7), 2.0)
    # stronger rim towards the top-left and bottom-right, as if lit along that diagonal
    diag = _direction_cosine(alpha, np.pi / 4)
    boost = np.minimum(1.0, np.maximum(-diag, 0) ** 3 + 1.2 * np.maximum(diag, 0) ** 3)
    opacity = np.minimum(curve * (1 + 0.5 * rng.uniform(0.2, 0.4) * boost), 1.0) * np.float32(max_opacity)
    pixels += (255 - pixels) * opacity[..., None]
    return np.clip(pixels, 0, 255, out=pixels)


def _drop_shadow(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, stream) -> None:
    """Darken img in place under a soft copy of alpha moved 1-4 px down-right of (x0, y0), as if the
    slider floated above the picture; the slider is pasted over it afterwards."""
    dx, dy = (int(v) for v in stream.integers(1, 5, 2))
    sigma, opacity = stream.uniform(1.0, 3.0), stream.uniform(0.25, 0.6)
    pad = int(math.ceil(3 * sigma)) + 4
    soft = cv2.copyMakeBorder(alpha, pad + dy, pad - dy, pad + dx, pad - dx, cv2.BORDER_CONSTANT, value=0)
    soft = cv2.GaussianBlur(soft.astype(np.float32) * np.float32(opacity / 255), (0, 0), sigma)
    # the part of the (ph + 2 pad, pw + 2 pad) shadow that lies inside the image
    h, w = img.shape[:2]
    top, left = y0 - pad, x0 - pad
    iy0, ix0, iy1, ix1 = max(top, 0), max(left, 0), min(top + soft.shape[0], h), min(left + soft.shape[1], w)
    keep = 1 - soft[iy0 - top:iy1 - top, ix0 - left:ix1 - left]
    img[iy0:iy1, ix0:ix1] = (img[iy0:iy1, ix0:ix1].astype(np.float32) * keep[..., None] + 0.5).astype(np.uint8)


def _slider_place(stream, render: RenderConfig, slider_x: int) -> tuple[int, int, bool]:
    """x of the slider's box, its row offset from the gap's (px) and whether it casts a shadow. Every value
    is drawn whatever the probabilities, so one option on or off leaves the others' draws alone."""
    shadow = stream.random() < render.slider_shadow_prob
    off = stream.random() < render.slider_offset_prob
    dy = int(stream.integers(render.slider_offset_px[0], render.slider_offset_px[1] + 1)) * int(stream.choice([-1, 1]))
    wide = stream.random() < render.slider_x_prob
    x = int(stream.integers(render.slider_x_px[0], render.slider_x_px[1] + 1))
    return (x if wide else slider_x), (dy if off else 0), shadow


def _colour_shift(img: np.ndarray, stream, render: RenderConfig) -> bool:
    """Brightness, contrast, gamma and per-channel gain of the whole image in place (one LUT); True if applied."""
    apply = stream.random() < render.colour_prob
    b = stream.uniform(-render.brightness, render.brightness)
    k, gamma = stream.uniform(*render.contrast), stream.uniform(*render.gamma)
    gain = stream.uniform(*render.channel_gain, 3)
    if apply:
        v = 255 * (np.arange(256) / 255.0) ** gamma
        v = (v - 128) * k + 128 + b
        lut = np.clip(v[:, None] * gain[None, :] + 0.5, 0, 255).astype(np.uint8)
        img[...] = cv2.LUT(img, lut[:, None, :])
    return apply


def _compress(img: np.ndarray, stream, render: RenderConfig) -> tuple[np.ndarray, str, int | None]:
    """JPEG or WebP round trip of the RGB image -> (image, "none" | "jpeg" | "webp", quality)."""
    u = stream.random()
    jpeg_q = int(stream.integers(render.jpeg_quality[0], render.jpeg_quality[1] + 1))
    webp_q = int(stream.integers(render.webp_quality[0], render.webp_quality[1] + 1))
    if u < render.jpeg_prob:
        kind, ext, quality, flag = "jpeg", ".jpg", jpeg_q, cv2.IMWRITE_JPEG_QUALITY
    elif u < render.jpeg_prob + render.webp_prob:
        kind, ext, quality, flag = "webp", ".webp", webp_q, cv2.IMWRITE_WEBP_QUALITY
    else:
        return img, "none", None
    ok, data = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [flag, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {kind}: its build lacks the codec")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), kind, quality


# ---------------------------------------------------------------------------- generator

def _clearance(a: tuple, b: tuple) -> int:
    """Largest axis gap (px) between boxes (x0, y0, x1, y1); negative when they overlap."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _fake_transforms(rng, n: int) -> list[tuple[float, float]]:
    """(extra rotation in radians, scale) of each fake gap: +-10-30 deg, 0.7-1.3."""
    return [(math.radians(rng.uniform(10, 30)) * rng.choice([-1.0, 1.0]), rng.uniform(0.7, 1.3)) for _ in range(n)]


def _place_fakes(rng, fakes: list, gap_box: tuple, gap_row: int, piece_h: int, x_lo: int, w: int, h: int) -> list:
    """Integer top-left corners for as many fake alphas as fit; same-row placement half the time."""
    boxes = []
    for alpha in fakes:
        fh, fw = alpha.shape
        x_hi, y_lo, y_hi = w - fw - _FAKE_MARGIN, _FAKE_MARGIN, h - fh - _FAKE_MARGIN
        if x_hi < x_lo or y_hi < y_lo:
            break
        for _ in range(10):
            x = int(rng.integers(x_lo, x_hi + 1))
            if rng.random() < 0.5:
                y = int(np.clip(gap_row + (piece_h - fh) // 2 + rng.integers(-3, 4), y_lo, y_hi))
            else:
                y = int(rng.integers(y_lo, y_hi + 1))
            box = (x, y, x + fw, y + fh)
            if _clearance(box, gap_box) >= _FAKE_MIN_DIST and all(_clearance(box, b) >= 4 for b in boxes):
                boxes.append(box)
                break
        else:
            break
    return boxes


def _layout(rng, prims, hole, angle, piece_hw, gap_hw, rot_offset, n_fakes: int, w: int, h: int,
            slider_x_max: int = _SLIDER_X_MAX):
    """Top-left corner (gx, gy) of the unrotated gap and up to n_fakes fake gaps with their corners, all
    right of a slider whose box starts at or before slider_x_max.

    The real gap's position is drawn again while the fakes do not fit (and their rotations and
    scales every 10 tries), so small images still get fakes; the real gap stays uniform otherwise.
    Returns gx, gy, fakes [(alpha, centroid, coverage)], boxes [(x0, y0, x1, y1)]."""
    (ph, pw), (rh, rw), (rot_dx, rot_dy) = piece_hw, gap_hw, rot_offset
    x_lo = max(_SLIDER_X_MAX, slider_x_max) + pw + _GAP_MARGIN
    gx_hi, gy_hi = w - pw - _GAP_MARGIN, h - ph - _GAP_MARGIN
    fakes, best = [], None
    for attempt in range(40 if n_fakes else 1):
        if n_fakes and attempt % 10 == 0:
            fakes = [_render_piece(rng, prims, hole, angle + a, s) for a, s in _fake_transforms(rng, n_fakes)]
        gx, gy = int(rng.integers(x_lo, gx_hi + 1)), int(rng.integers(_GAP_MARGIN, gy_hi + 1))
        gap_box = (gx + rot_dx, gy + rot_dy, gx + rot_dx + rw, gy + rot_dy + rh)
        boxes = _place_fakes(rng, [f[0] for f in fakes], gap_box, gy, ph, x_lo, w, h)
        if best is None or len(boxes) > len(best[3]):
            best = (gx, gy, fakes, boxes)
        if len(boxes) == n_fakes:
            return best
    gx, gy, fakes, boxes = best
    if boxes:
        return gx, gy, fakes[:len(boxes)], boxes
    # small image and large piece: the gap at its leftmost and the smallest, least rotated fake at
    # the far right always fit (>= 49 px apart for 280 px wide images and 70 px pieces, >= 19 px with the
    # slider at _SLIDER_X_WIDE_MAX)
    fake = _render_piece(rng, prims, hole, angle + math.radians(10) * rng.choice([-1.0, 1.0]), 0.7)
    fh, fw = fake[0].shape
    fx, fy = w - fw - _FAKE_MARGIN, int(np.clip(gy + (ph - fh) // 2, _FAKE_MARGIN, h - fh - _FAKE_MARGIN))
    gap_box = (x_lo + rot_dx, gy + rot_dy, x_lo + rot_dx + rw, gy + rot_dy + rh)
    if _clearance((fx, fy, fx + fw, fy + fh), gap_box) < _FAKE_MIN_DIST:
        raise RuntimeError(f"no room for a fake gap in a {w}x{h} image with a {pw}x{ph} piece")
    return x_lo, gy, [fake], [(fx, fy, fx + fw, fy + fh)]


def _user_background(stream, backgrounds: tuple, render: RenderConfig, h: int, w: int) -> np.ndarray | None:
    """A random crop of one of the user's images, render.user_prob of the time (None otherwise)."""
    if not backgrounds or stream.random() >= render.user_prob:
        return None
    return _random_crop(stream, backgrounds[int(stream.integers(len(backgrounds)))], h, w, min_share=0.5)


def generate_captcha(seed, render: RenderConfig = RenderConfig(), backgrounds: tuple = ()) -> dict:
    """One composite slider CAPTCHA, a pure function of seed (int or tuple of non-negative ints), render and
    backgrounds (the user's (h, w, 3) uint8 RGB images, see io.load_backgrounds; render.user_prob of the
    samples are drawn on one of them).

    Returns "image" (h, w, 3) uint8 RGB at its source size (280-480 x 140-240); "gap", "slider":
    (x, y) float centroids in source px; "fake_gaps": list of (x, y); "angle": the gap's rotation
    in radians (counter-clockwise on screen, 0 unless rotated); "category"; "shape";
    "piece_alpha": (ph, pw) uint8 alpha of the unrotated piece, whose centroid plus the corner of
    "slider_box" (x0, y0, x1, y1) is the slider label; "render": what the options drew (background,
    gap_style, slider_shadow, slider_offset in px, colour_shift, compression, quality). The gap's centroid is
    the slider's moved by a whole number of px (the gap is rotated about it), so gap_y == slider_y exactly
    unless the slider is drawn off the gap's row (then slider_y - gap_y = render["slider_offset"]).
    Colour shifts and compression change pixels only: the labels are those of the masks as drawn.
    """
    sequence = np.random.SeedSequence(seed)
    rng = np.random.default_rng(sequence)
    streams = dict(zip(_STREAMS, (np.random.default_rng(s) for s in sequence.spawn(len(_STREAMS)))))
    category = CATEGORIES[rng.choice(len(CATEGORIES), p=CATEGORY_PROBS)]
    if category == "combined":
        effects = set(rng.choice(COMBINABLE, size=int(rng.integers(2, 4)), replace=False).tolist())
    else:
        effects = set() if category == "none" else {category}
    w, h = _sample_size(rng)
    # drawn even when a user image replaces it, so that the rest of the sample stays the same
    background, source = _background(rng, h, w, render.photos, render.procedural_probs)
    user = _user_background(streams["background"], backgrounds, render, h, w)
    if user is not None:
        background, source = user, "user"

    shape = SHAPES[rng.choice(len(SHAPES), p=SHAPE_PROBS)]
    prims = _centre_on_centroid(_shape_primitives(rng, shape, rng.uniform(40, 70)))   # size in px
    hole = rng.uniform(0.3, 0.4) if "hollow_center" in effects else 0.0              # fraction of the size
    piece, (cx, cy), piece_hr = _render_piece(rng, prims, hole)
    ph, pw = piece.shape
    angle = float(math.radians(rng.uniform(0.5, 1.8)) * rng.choice([-1.0, 1.0])) if "rotation" in effects else 0.0
    if angle:
        # rot_dx, rot_dy: corner of the rotated alpha relative to the piece's corner
        gap_alpha, rot_dx, rot_dy = _rotate_about_centroid(piece_hr, angle, _ROT_PAD)
    else:
        gap_alpha, rot_dx, rot_dy = piece, 0, 0
    light = _sample_light(rng, effects)
    light.update(_sample_gap_style(streams["gap_style"], render))

    slider_x = int(rng.integers(0, _SLIDER_X_MAX + 1))
    n_fakes = int(rng.integers(1, MAX_FAKE_GAPS + 1)) if "confusing_gap" in effects else 0
    slider_x, slider_dy, shadow = _slider_place(streams["slider"], render, slider_x)
    gx, gy, fakes, boxes = _layout(rng, prims, hole, angle, piece.shape, gap_alpha.shape, (rot_dx, rot_dy),
                                   n_fakes, w, h, slider_x_max=slider_x)
    slider_y = gy + slider_dy

    img = background.copy()
    # the slider shows the gap's patch as it was before shading, hence cut from the untouched background
    texture = background[gy:gy + ph, gx:gx + pw]
    _shade_gap(img, gap_alpha, gx + rot_dx, gy + rot_dy, light)
    fake_gaps = []
    for (fake_alpha, (fcx, fcy), _), box in zip(fakes, boxes):
        _shade_gap(img, fake_alpha, box[0], box[1], light)
        fake_gaps.append((box[0] + fcx, box[1] + fcy))
    slider = _slider_pixels(rng, texture, piece, "perlin_noise" in effects)
    if shadow:
        _drop_shadow(img, piece, slider_x, slider_y, streams["slider"])
    # alpha-blend the slider over the image; + 0.5 rounds instead of truncating towards black
    a = (piece.astype(np.float32) * np.float32(1 / 255))[..., None]
    region = img[slider_y:slider_y + ph, slider_x:slider_x + pw].astype(np.float32)
    img[slider_y:slider_y + ph, slider_x:slider_x + pw] = (region + (slider - region) * a + 0.5).astype(np.uint8)

    shifted = _colour_shift(img, streams["colour"], render)
    img, compression, quality = _compress(img, streams["compression"], render)
    drawn = {"background": source, "gap_style": light.get("style", "darken"), "slider_shadow": bool(shadow),
             "slider_offset": slider_dy, "colour_shift": bool(shifted), "compression": compression, "quality": quality}
    return {"image": img, "gap": (gx + cx, gy + cy), "slider": (slider_x + cx, slider_y + cy),
            "fake_gaps": fake_gaps, "angle": angle, "category": category, "shape": shape, "piece_alpha": piece,
            "slider_box": (slider_x, slider_y, slider_x + pw, slider_y + ph), "render": drawn}

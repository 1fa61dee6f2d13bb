"""Slider-CAPTCHA data: a deterministic synthetic generator, letterboxing to the model canvas, a
synthetic and a folder dataset, and a PNG + labels.csv exporter.

    python -m data.captcha export --out DIR --n N [--seed S] [--render default|train|heldout] [--backgrounds DIR]
                                  [--backgrounds_prob P]

    render.py       generate_captcha(seed, render): backgrounds, piece shapes, gap and slider lighting, layout;
                    RenderConfig (gap styles, slider shadow/offset/position, colour shift, JPEG/WebP) and
                    the named mixes RENDERS: default (the original generator), train, heldout
    image.py        letterbox to the CANVAS_W x CANVAS_H canvas, the (4, H, W) input tensor, halve_canvas
                    (a batch on the half canvas: progressive resizing)
    io.py           load_image, labels.csv reading, export (the labelled-folder format), load_backgrounds
    dataset.py      SyntheticCaptchaDataset, CaptchaFolderDataset
    __main__.py     the command line

Coordinates are continuous pixels: pixel (col, row) covers [col, col+1) x [row, row+1), so its
centre is (col + 0.5, row + 0.5). This is the convention of the stride-4 decode
x = (j + 0.5 + du) * 4 and it makes letterboxing an exact affine map,
canvas = source * scale + pad. Labels are alpha-weighted centroids (image moments) of the
anti-aliased piece masks, kept as floats (the original truncated them to ints: bug #15).

A sample is a pure function of its seed (np.random.SeedSequence), so training data is
generated online in DataLoader workers and the validation set is fixed by its seed alone.
"""
from .dataset import CaptchaFolderDataset, SyntheticCaptchaDataset
from .image import CANVAS_H, CANVAS_W, halve_canvas, letterbox, to_input_tensor
from .io import BACKGROUND_SUFFIXES, LABEL_COLUMNS, MIN_IMAGE_SIDE, export, load_backgrounds, load_image
from .render import (CATEGORIES, CATEGORY_PROBS, COMBINABLE, GAP_STYLES, HELDOUT_PHOTOS, MAX_FAKE_GAPS, RENDER_HELDOUT,
                     RENDER_TRAIN, RENDERS, SHAPE_PROBS, SHAPES, RenderConfig, generate_captcha)

__all__ = ["BACKGROUND_SUFFIXES", "CANVAS_H", "CANVAS_W", "CATEGORIES", "CATEGORY_PROBS", "COMBINABLE", "GAP_STYLES",
           "HELDOUT_PHOTOS", "LABEL_COLUMNS", "MAX_FAKE_GAPS", "MIN_IMAGE_SIDE", "RENDERS", "RENDER_HELDOUT",
           "RENDER_TRAIN", "SHAPES", "SHAPE_PROBS", "CaptchaFolderDataset", "RenderConfig", "SyntheticCaptchaDataset",
           "export", "generate_captcha", "halve_canvas", "letterbox", "load_backgrounds", "load_image", "to_input_tensor"]

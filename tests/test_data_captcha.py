"""Synthetic slider-CAPTCHA generator, letterboxing, datasets and the export CLI (data/captcha/)."""
import csv
import dataclasses
import hashlib
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import data.captcha.render as render
from data.captcha import (CANVAS_H, CANVAS_W, CATEGORIES, CATEGORY_PROBS, HELDOUT_PHOTOS, LABEL_COLUMNS,
                          MIN_IMAGE_SIDE, RENDER_HELDOUT, RENDER_TRAIN, RENDERS, SHAPES, CaptchaFolderDataset,
                          RenderConfig, SyntheticCaptchaDataset, export, generate_captcha, letterbox, load_backgrounds,
                          load_image, to_input_tensor)

REPO = Path(__file__).resolve().parents[1]


def centroid(alpha: np.ndarray) -> tuple[float, float]:
    """Alpha-weighted centroid with pixel centres at +0.5 (the module's coordinate convention)."""
    m = cv2.moments(alpha.astype(np.float64))
    return m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5


def with_layers(seed, config: RenderConfig = RenderConfig(), backgrounds: tuple = ()) -> dict:
    """generate_captcha(seed, config, backgrounds) plus "background" (the image before any gap or slider was drawn) and
    "gap_alpha", "fake_alpha" ((h, w) uint8 alpha of the real gap and of the fakes) and "light" (the gap's).

    Recorded by wrapping render._shade_gap, whose first call shades the real gap into a copy of the
    untouched background and whose further calls shade the fakes; the sample itself is unchanged."""
    layers, shade = {}, render._shade_gap

    def recording(img, alpha, x0, y0, light):
        if not layers:
            layers.update(background=img.copy(), gap_alpha=np.zeros(img.shape[:2], np.uint8),
                          fake_alpha=np.zeros(img.shape[:2], np.uint8), light=dict(light))
            target = layers["gap_alpha"]
        else:
            target = layers["fake_alpha"]
        target[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha
        shade(img, alpha, x0, y0, light)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "_shade_gap", recording)
        s = generate_captcha(seed, config, backgrounds)
    return {**s, **layers}


@pytest.fixture(scope="module")
def samples():
    """The first 300 seeds with their intermediate layers, shared by the statistical tests."""
    return [with_layers(seed) for seed in range(300)]


def by_category(samples, category):
    found = [s for s in samples if s["category"] == category]
    assert found, f"no {category} sample in the first {len(samples)} seeds"
    return found


def test_same_seed_same_sample_bit_for_bit():
    a, b = generate_captcha(123), generate_captcha(123)
    assert a["image"].dtype == np.uint8 and a["image"].ndim == 3 and a["image"].shape[2] == 3
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["piece_alpha"], b["piece_alpha"])
    for key in ("gap", "slider", "fake_gaps", "angle", "category", "shape", "slider_box"):
        assert a[key] == b[key]
    assert np.array_equal(generate_captcha((4, 0, 9))["image"], generate_captcha((4, 0, 9))["image"])
    c = generate_captcha(124)
    assert c["image"].shape != a["image"].shape or not np.array_equal(c["image"], a["image"])
    assert c["gap"] != a["gap"]


def test_training_set_is_fresh_each_epoch_and_validation_is_fixed():
    train = SyntheticCaptchaDataset(4, seed=11, fresh_each_epoch=True)
    first = train[2]
    train.set_epoch(1)
    second = train[2]
    assert not torch.equal(first["image"], second["image"])
    train.set_epoch(0)
    assert torch.equal(train[2]["image"], first["image"]) and torch.equal(train[2]["gap"], first["gap"])

    val = SyntheticCaptchaDataset(4, seed=11, fresh_each_epoch=False)
    before = val[2]
    val.set_epoch(5)
    assert torch.equal(val[2]["image"], before["image"]) and torch.equal(val[2]["gap"], before["gap"])
    assert torch.equal(before["image"], first["image"])  # validation item i is (seed, 0, i)
    assert len(val) == 4
    with pytest.raises(IndexError):
        val[4]


def test_dataset_item_shapes_and_dtypes():
    item = SyntheticCaptchaDataset(2, seed=3, fresh_each_epoch=False)[1]
    expected = {"image": ((4, CANVAS_H, CANVAS_W), torch.float32), "gap": ((2,), torch.float32),
                "slider": ((2,), torch.float32), "fake_gaps": ((2, 2), torch.float32),
                "fake_mask": ((2,), torch.bool), "angle": ((), torch.float32), "category": ((), torch.int64),
                "scale": ((), torch.float32), "pad": ((2,), torch.float32), "index": ((), torch.int64)}
    assert set(item) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(item[key].shape) == shape and item[key].dtype == dtype, key
    assert item["index"].item() == 1 and 0 <= item["category"].item() < len(CATEGORIES)
    assert 0 <= item["image"][:3].min() and item["image"][:3].max() <= 1
    assert set(item["image"][3].unique().tolist()) <= {0.0, 1.0}
    batch = torch.utils.data.default_collate([item, item])
    assert batch["image"].shape == (2, 4, CANVAS_H, CANVAS_W)


def test_labels_are_float_centroids_inside_the_image(samples):
    for s in samples[:80]:
        h, w = s["image"].shape[:2]
        assert 280 <= w <= 480 and 140 <= h <= 240 and w % 2 == 0 and h % 2 == 0 and 1.8 <= w / h <= 2.4
        for x, y in (s["gap"], s["slider"], *s["fake_gaps"]):
            assert isinstance(x, float) and isinstance(y, float)
            assert 0 < x < w and 0 < y < h
        assert s["slider"][1] == s["gap"][1]
        x0, y0, x1, y1 = s["slider_box"]
        assert s["piece_alpha"].shape == (y1 - y0, x1 - x0) and s["piece_alpha"].dtype == np.uint8
        cx, cy = centroid(s["piece_alpha"])
        assert s["slider"] == pytest.approx((x0 + cx, y0 + cy), abs=1e-6)
        assert 0 <= x0 <= 10  # slider centre in [half, half + 10]
        # the gap is the same alpha (rotated about this centroid), right of the slider area
        assert centroid(s["gap_alpha"]) == pytest.approx(s["gap"], abs=0.02)
        gap_cols = np.nonzero(s["gap_alpha"].any(axis=0))[0]
        gap_rows = np.nonzero(s["gap_alpha"].any(axis=1))[0]
        assert gap_cols[0] >= 10 + (x1 - x0) + 10 - 3 and gap_cols[-1] < w and gap_rows[0] >= 0 and gap_rows[-1] < h
    labels_fraction = [math.modf(s["gap"][0])[0] for s in samples]
    assert np.std(labels_fraction) > 0.2  # sub-pixel positions are spread, not on a grid


def test_angle_is_signed_radians_only_for_rotated_gaps(samples):
    rotated = by_category(samples, "rotation")
    for s in rotated:
        assert math.radians(0.5) - 1e-9 <= abs(s["angle"]) <= math.radians(1.8) + 1e-9
    assert {np.sign(s["angle"]) for s in samples if s["angle"]} == {-1.0, 1.0}
    assert all(s["angle"] == 0.0 for s in by_category(samples, "none"))


def _gap_shift(s):
    """Mean change of grey level inside the gap (at least 4 px from its outline) and the background there."""
    solid = (s["gap_alpha"] > 250).astype(np.uint8)
    inner = cv2.erode(solid, np.ones((9, 9), np.uint8)).astype(bool)
    grey = lambda img: img.astype(np.float64).mean(axis=2)
    return (grey(s["image"]) - grey(s["background"]))[inner].mean(), grey(s["background"])[inner].mean()


def test_gap_is_darkened_or_brightened_in_place(samples):
    for category in ("none", "rotation", "gap_edge_highlight", "hollow_center"):
        for s in by_category(samples, category):
            shift, level = _gap_shift(s)
            if level > 60:  # darker backgrounds clip at 0
                assert shift < -15, (category, shift, level)
    for s in by_category(samples, "highlight"):
        shift, level = _gap_shift(s)
        if level < 190:
            assert shift > 15, (shift, level)
    # outside the gap, the fakes and the slider, the background is untouched
    s = by_category(samples, "none")[0]
    x0, y0, x1, y1 = s["slider_box"]
    untouched = cv2.dilate((s["gap_alpha"] > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    untouched[y0:y1, x0:x1] = False
    assert np.array_equal(s["image"][untouched], s["background"][untouched])


def test_slider_is_the_original_patch_with_a_light_rim(samples):
    for s in by_category(samples, "none")[:10]:
        x0, y0, x1, y1 = s["slider_box"]
        alpha = s["piece_alpha"]
        gap_x0 = int(round(s["gap"][0] - s["slider"][0])) + x0  # the gap's patch is the slider's, moved along x
        original = s["background"][y0:y1, gap_x0:gap_x0 + (x1 - x0)].astype(np.float64)
        slider = s["image"][y0:y1, x0:x1].astype(np.float64)
        solid = alpha == 255
        inner = cv2.erode(solid.astype(np.uint8), np.ones((17, 17), np.uint8)).astype(bool)
        rim = solid & ~cv2.erode(solid.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if inner.sum() > 10:
            assert np.abs(slider[inner] - original[inner]).max() <= 1  # the interior is the un-darkened texture
        assert (slider[rim] - original[rim]).mean() > 20  # whitened outline


def test_fake_gaps_are_clear_of_the_real_gap(samples):
    confusing = by_category(samples, "confusing_gap")
    assert {len(s["fake_gaps"]) for s in confusing} == {1, 2}
    for s in confusing + [s for s in samples if s["category"] == "combined" and s["fake_gaps"]]:
        assert s["fake_alpha"].any()
        away = cv2.distanceTransform((s["gap_alpha"] == 0).astype(np.uint8), cv2.DIST_L2, 5)
        assert away[s["fake_alpha"] > 0].min() >= 10
        slider_right = s["slider_box"][2]
        assert np.nonzero(s["fake_alpha"].any(axis=0))[0][0] > slider_right
        n, labels = cv2.connectedComponents((s["fake_alpha"] > 0).astype(np.uint8))
        found = sorted(centroid(np.where(labels == k, s["fake_alpha"], 0)) for k in range(1, n))
        assert len(found) == len(s["fake_gaps"])
        for (fx, fy), (cx, cy) in zip(sorted(s["fake_gaps"]), found):
            assert abs(fx - cx) < 0.01 and abs(fy - cy) < 0.01
    assert all(not s["fake_gaps"] for s in by_category(samples, "none"))


def test_categories_follow_the_mix(samples):
    counts = Counter(s["category"] for s in samples)
    n = len(samples)
    for category, p in zip(CATEGORIES, CATEGORY_PROBS):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[category] - n * p) < 4 * sd + 2, (category, counts[category], n * p)
    assert len({s["shape"] for s in samples}) == 8


def _blob(h, w, x, y, sigma=3.0):
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    g = np.exp(-((xs[None] - x) ** 2 + (ys[:, None] - y) ** 2) / (2 * sigma**2))
    return np.repeat((g * 250).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("h, w", [(160, 320), (150, 346), (240, 480), (140, 280), (400, 1000), (300, 300), (57, 131)])
def test_letterbox_maps_source_px_to_canvas_px(h, w):
    x, y = 0.37 * w + 0.3, 0.61 * h + 0.7
    canvas, mask, scale, (pad_x, pad_y) = letterbox(_blob(h, w, x, y, sigma=max(3.0, 2 / min(1, CANVAS_W / w))))
    assert canvas.shape == (CANVAS_H, CANVAS_W, 3) and canvas.dtype == np.uint8
    assert mask.shape == (CANVAS_H, CANVAS_W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert isinstance(scale, float) and isinstance(pad_x, float) and isinstance(pad_y, float)
    assert scale == pytest.approx(min(CANVAS_W / w, CANVAS_H / h))
    assert pad_x == pytest.approx((CANVAS_W - w * scale) / 2) and pad_y == pytest.approx((CANVAS_H - h * scale) / 2)
    assert min(pad_x, pad_y) == pytest.approx(0, abs=1e-9)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    assert rows[0] == pytest.approx(pad_y, abs=0.51) and rows[-1] + 1 == pytest.approx(pad_y + h * scale, abs=0.51)
    assert cols[0] == pytest.approx(pad_x, abs=0.51) and cols[-1] + 1 == pytest.approx(pad_x + w * scale, abs=0.51)
    assert mask.sum() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)  # one solid rectangle
    assert not canvas[mask == 0].any()
    cx, cy = centroid(canvas[..., 0])
    assert cx == pytest.approx(x * scale + pad_x, abs=0.05) and cy == pytest.approx(y * scale + pad_y, abs=0.05)


def test_input_tensor_and_letterbox_errors():
    canvas, mask, _, _ = letterbox(np.full((160, 300, 3), 255, np.uint8))
    x = to_input_tensor(canvas, mask)
    assert x.shape == (4, CANVAS_H, CANVAS_W) and x.dtype == torch.float32
    assert torch.equal(x[3], torch.from_numpy(mask).float())
    assert torch.equal(x[:3], torch.from_numpy(mask).float().expand(3, -1, -1))  # white image / 255 = 1
    with pytest.raises(ValueError, match="uint8"):
        letterbox(np.zeros((10, 20, 3), np.float32))
    with pytest.raises(ValueError, match="canvas"):
        to_input_tensor(canvas, mask[:-1])


def test_export_then_folder_dataset_reproduces_the_labels(tmp_path):
    labels_csv = export(tmp_path / "out", 4, seed=7)
    with open(labels_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == LABEL_COLUMNS and len(rows) == 5
    folder = CaptchaFolderDataset(tmp_path / "out")
    synthetic = SyntheticCaptchaDataset(4, seed=7, fresh_each_epoch=False)
    assert len(folder) == 4
    for i, row in enumerate(rows[1:]):
        s = generate_captcha((7, 0, i))
        assert np.array_equal(load_image(tmp_path / "out" / row[0]), s["image"])
        assert [float(v) for v in row[1:]] == pytest.approx([*s["gap"], *s["slider"]], abs=1e-3)
        a, b = folder[i], synthetic[i]
        assert torch.equal(a["image"], b["image"])
        tolerance = 1e-3 * b["scale"].item()
        assert torch.allclose(a["gap"], b["gap"], atol=tolerance)
        assert torch.allclose(a["slider"], b["slider"], atol=tolerance)
        assert a["category"].item() == -1 and a["angle"].item() == 0 and not a["fake_mask"].any()
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    with pytest.raises(ValueError, match="not an empty directory"):
        export(tmp_path / "out", 1, seed=0)


def _write_folder(root: Path, header: str, lines: list[str], images=("a.png",)):
    root.mkdir()
    for name in images:
        cv2.imwrite(str(root / name), np.zeros((160, 320, 3), np.uint8))
    (root / "labels.csv").write_text("\n".join([header, *lines]) + "\n")


def test_folder_dataset_validation_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="labels.csv"):
        CaptchaFolderDataset(tmp_path)
    _write_folder(tmp_path / "missing_column", "filename,gap_x,gap_y,slider_x", ["a.png,100,80,20"])
    with pytest.raises(ValueError, match=r"missing_column.labels\.csv.*slider_y"):
        CaptchaFolderDataset(tmp_path / "missing_column")
    _write_folder(tmp_path / "extra_column", "filename,gap_x,gap_y,slider_x,slider_y,note", ["a.png,1,2,3,4,x"])
    with pytest.raises(ValueError, match=r"extra_column.labels\.csv.*note"):
        CaptchaFolderDataset(tmp_path / "extra_column")
    _write_folder(tmp_path / "not_numeric", ",".join(LABEL_COLUMNS), ["a.png,100,eighty,20,80"])
    with pytest.raises(ValueError, match=r"not_numeric.labels\.csv.*line 2.*gap_y"):
        CaptchaFolderDataset(tmp_path / "not_numeric")
    _write_folder(tmp_path / "missing_image", ",".join(LABEL_COLUMNS), ["a.png,100,80,20,80", "b.png,1,2,3,4"])
    with pytest.raises(ValueError, match=r"missing_image.labels\.csv.*b\.png"):
        CaptchaFolderDataset(tmp_path / "missing_image")
    _write_folder(tmp_path / "ok", ",".join(LABEL_COLUMNS), ["a.png,100.5,80.25,20,80.25"])
    item = CaptchaFolderDataset(tmp_path / "ok")[0]
    assert item["gap"].tolist() == pytest.approx([100.5 * 1.6, 80.25 * 1.6])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="nothing.png"):
        load_image(tmp_path / "nothing.png")


def test_export_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.captcha", "export", "--out", str(out), "--n", "3", "--seed", "5"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["captcha_000000.png", "captcha_000001.png",
                                                     "captcha_000002.png", "labels.csv"]
    assert len(CaptchaFolderDataset(out)) == 3
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and str(out) in again.stderr


def test_fake_gap_fallback_when_no_random_placement_fits(monkeypatch):
    monkeypatch.setattr(render, "_place_fakes", lambda *args, **kwargs: [])
    checked = 0
    for seed in range(60):
        s = with_layers(seed)
        if s["category"] != "confusing_gap":
            continue
        checked += 1
        assert len(s["fake_gaps"]) == 1
        away = cv2.distanceTransform((s["gap_alpha"] == 0).astype(np.uint8), cv2.DIST_L2, 5)
        assert away[s["fake_alpha"] > 0].min() >= 10
    assert checked > 3


def test_folder_dataset_refuses_an_image_listed_twice_and_too_small_images(tmp_path):
    header = ",".join(LABEL_COLUMNS)
    for name, second in (("same_labels", "a.png,100,80,20,80"), ("other_labels", "a.png,101,80,20,80")):
        _write_folder(tmp_path / name, header, ["a.png,100,80,20,80", "b.png,1,2,3,4", second],
                      images=("a.png", "b.png"))
        with pytest.raises(ValueError, match=rf"{name}.labels\.csv: a\.png is listed twice \(lines 2 and 4\)"):
            CaptchaFolderDataset(tmp_path / name)
    _write_folder(tmp_path / "tiny", header, ["a.png,100,80,20,80", "dot.png,0.5,0.5,0.5,0.5"])
    cv2.imwrite(str(tmp_path / "tiny" / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    folder = CaptchaFolderDataset(tmp_path / "tiny")
    assert folder[0]["image"].shape == (4, CANVAS_H, CANVAS_W)
    with pytest.raises(ValueError, match=r"dot\.png: 1x1 px is too small"):
        folder[1]
    cv2.imwrite(str(tmp_path / "thin.png"), np.zeros((MIN_IMAGE_SIDE - 1, 300, 3), np.uint8))
    with pytest.raises(ValueError, match=rf"thin\.png: 300x{MIN_IMAGE_SIDE - 1} px"):
        load_image(tmp_path / "thin.png")
    cv2.imwrite(str(tmp_path / "small_ok.png"), np.zeros((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3), np.uint8))
    assert load_image(tmp_path / "small_ok.png").shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3)


# ---------------------------------------------------------------------------- rendering options (RenderConfig)

# fingerprint() of generate_captcha(seed) computed with the generator as it was before RenderConfig existed:
# the default config must keep every sample of every seed bit for bit (one seed per confusion category).
ORIGINAL_FINGERPRINTS = {
    0: "570772bf2bb742a7", 1: "97834b812f6441af", 2: "62168fb534de1491", 4: "a6600221def3f2c2",
    5: "bf1ec91d36203c5c", 8: "9f49c03905ec9b07", 19: "588e7ca7216d1f76", 21: "f18fba956545ca38",
    (3, 0, 5): "913d3d36a3b38a68", (1_000_003, 0, 2): "5fc1622ec7172cad",
}
LABEL_KEYS = ("gap", "slider", "fake_gaps", "angle", "category", "shape", "slider_box")
# each option alone, forced on (probability 1), plus the two named mixes
OPTIONS = {
    "veil": RenderConfig(gap_style_probs=(0.0, 1.0, 0.0, 0.0, 0.0)),
    "inset": RenderConfig(gap_style_probs=(0.0, 0.0, 1.0, 0.0, 0.0)),
    "outline": RenderConfig(gap_style_probs=(0.0, 0.0, 0.0, 1.0, 0.0)),
    "bevel": RenderConfig(gap_style_probs=(0.0, 0.0, 0.0, 0.0, 1.0)),
    "slider_shadow": RenderConfig(slider_shadow_prob=1.0),
    "slider_offset": RenderConfig(slider_offset_prob=1.0),
    "slider_x": RenderConfig(slider_x_prob=1.0, slider_x_px=(25, 40)),
    "colour": RenderConfig(colour_prob=1.0),
    "jpeg": RenderConfig(jpeg_prob=1.0),
    "webp": RenderConfig(webp_prob=1.0),
    "mosaic": RenderConfig(procedural_probs=(0.0, 0.0, 0.0, 0.0, 1.0)),
    "train": RENDER_TRAIN,
    "heldout": RENDER_HELDOUT,
}
# options that change pixels only: every label and the layout stay those of the default sample
PIXEL_ONLY = ("veil", "inset", "outline", "bevel", "slider_shadow", "colour", "jpeg", "webp")


def fingerprint(s: dict) -> str:
    h = hashlib.sha256(repr((s["image"].shape, *(s[k] for k in LABEL_KEYS))).encode())
    h.update(s["image"].tobytes())
    h.update(s["piece_alpha"].tobytes())
    return h.hexdigest()[:16]


def test_default_render_is_the_original_generator_bit_for_bit():
    for seed, expected in ORIGINAL_FINGERPRINTS.items():
        s = generate_captcha(seed)
        assert fingerprint(s) == expected, seed
        assert fingerprint(generate_captcha(seed, RenderConfig())) == expected
        assert s["render"] == {"background": s["render"]["background"], "gap_style": "darken", "slider_shadow": False,
                               "slider_offset": 0, "colour_shift": False, "compression": "none", "quality": None}
    assert RENDERS["default"] == RenderConfig()


@pytest.mark.parametrize("option", OPTIONS)
def test_every_render_option_is_deterministic_per_seed(option):
    render = OPTIONS[option]
    changed = 0
    for seed in (0, 1, 2):
        a, b = generate_captcha(seed, render), generate_captcha(seed, render)
        assert fingerprint(a) == fingerprint(b) and a["render"] == b["render"]
        changed += fingerprint(a) != ORIGINAL_FINGERPRINTS.get(seed, fingerprint(generate_captcha(seed)))
    assert changed, f"{option}: no seed rendered differently from the default"
    assert fingerprint(generate_captcha(3, render)) != fingerprint(generate_captcha(4, render))


@pytest.mark.parametrize("option", PIXEL_ONLY)
def test_pixel_only_options_keep_every_label(option):
    """Gap styles, the slider's shadow, colour shifts and compression change pixels, never the labels."""
    for seed in range(6):
        plain, shown = generate_captcha(seed), generate_captcha(seed, OPTIONS[option])
        for key in LABEL_KEYS:
            assert shown[key] == plain[key], (option, seed, key)
        assert np.array_equal(shown["piece_alpha"], plain["piece_alpha"])
        assert shown["image"].shape == plain["image"].shape and not np.array_equal(shown["image"], plain["image"])
    drawn = generate_captcha(0, OPTIONS[option])["render"]
    expected = {"veil": ("gap_style", "veil"), "inset": ("gap_style", "inset"), "outline": ("gap_style", "outline"),
                "bevel": ("gap_style", "bevel"),                "slider_shadow": ("slider_shadow", True), "colour": ("colour_shift", True),
                "jpeg": ("compression", "jpeg"), "webp": ("compression", "webp")}[option]
    assert drawn[expected[0]] == expected[1]


def test_compression_stays_close_to_the_lossless_image():
    for option, limit in (("jpeg", 12.0), ("webp", 12.0)):
        for seed in range(4):
            plain, packed = generate_captcha(seed), generate_captcha(seed, OPTIONS[option])
            assert 40 <= packed["render"]["quality"] <= 95
            assert np.abs(packed["image"].astype(np.float64) - plain["image"]).mean() < limit, (option, seed)


@pytest.mark.parametrize("style", ["veil", "inset", "outline", "bevel"])
def test_gap_styles_draw_inside_the_labelled_gap(style):
    """Each gap style changes pixels only under the gap's (and the fakes') alpha, whose centroid is the label;
    an outline or a bevel changes the edge more than the interior, and a bevel's edge is lit on the side
    the light points to and shadowed on the other (mirrored for a highlighted gap)."""
    for seed in range(8):
        s = with_layers(seed, OPTIONS[style])
        assert s["render"]["gap_style"] == style
        assert centroid(s["gap_alpha"]) == pytest.approx(s["gap"], abs=0.02)
        x0, y0, x1, y1 = s["slider_box"]
        shapes = ((s["gap_alpha"] > 0) | (s["fake_alpha"] > 0)).astype(np.uint8)
        allowed = cv2.dilate(shapes, np.ones((3, 3), np.uint8)).astype(bool)  # the 3x3 blur softens the outline
        allowed[y0:y1, x0:x1] = True
        diff = np.abs(s["image"].astype(np.int16) - s["background"]).max(axis=2)
        assert not diff[~allowed].any(), (style, seed)
        solid = (s["gap_alpha"] == 255).astype(np.uint8)
        edge = solid.astype(bool) & ~cv2.erode(solid, np.ones((3, 3), np.uint8)).astype(bool)
        inner = cv2.erode(solid, np.ones((11, 11), np.uint8)).astype(bool)
        assert diff[edge].mean() > 8, (style, seed)
        if style == "outline":
            assert diff[edge].mean() > 2 * diff[inner].mean() + 4, seed
        if style == "bevel":  # its relief fades to nothing where the edge runs along the light
            assert diff[edge].mean() > diff[inner].mean() + 4, seed
            signed = (s["image"].astype(np.float32) - s["background"]).mean(axis=2)
            ys, xs = np.nonzero(edge)
            cx, cy = s["gap"]
            # the light points to the bottom-right (pi/4 +- 0.3): the edge's half on that side against the other;
            # a white rim (gap_edge_highlight) pushes both halves towards 255 and squeezes the contrast
            lit = (xs - cx) + (ys - cy) > 0
            contrast = signed[ys[lit], xs[lit]].mean() - signed[ys[~lit], xs[~lit]].mean()
            assert -s["light"]["sign"] * contrast > (8 if s["light"]["rim_opacity"] else 20), (seed, contrast)


@pytest.mark.parametrize("option", ["default", "slider_shadow", "slider_offset", "slider_x", "train"])
def test_slider_is_drawn_where_its_label_says(option, monkeypatch):
    """With a plain magenta slider, its solid alpha and nothing outside it shows in magenta at slider_box, and
    the slider label is that box's corner plus the alpha's centroid, also off the gap's row and further right."""
    magenta = np.array([255, 0, 255], np.float32)
    monkeypatch.setattr(render, "_slider_pixels", lambda rng, texture, alpha, noise: np.broadcast_to(
        magenta, (*alpha.shape, 3)).copy())
    # colour shifts and compression off: they would change the magenta
    config = dataclasses.replace(OPTIONS.get(option, RENDERS.get(option)), colour_prob=0.0, jpeg_prob=0.0)
    offsets = set()
    for seed in range(10):
        s = with_layers(seed, config)
        x0, y0, x1, y1 = s["slider_box"]
        alpha = s["piece_alpha"]
        solid, covered = np.zeros(s["image"].shape[:2], bool), np.zeros(s["image"].shape[:2], bool)
        solid[y0:y1, x0:x1], covered[y0:y1, x0:x1] = alpha == 255, alpha > 0
        was = (s["background"] == (255, 0, 255)).all(axis=2)  # pixels that were magenta before tell nothing
        now = (s["image"] == (255, 0, 255)).all(axis=2)
        band = np.s_[:, :x1 + 1]  # the gap and the fakes lie right of the slider
        # every solid pixel is magenta; an outline pixel may round to it too, nothing outside the alpha does
        assert now[solid].all() and not (now & ~was & ~covered)[band].any(), (option, seed)
        cx, cy = centroid(alpha)
        assert s["slider"] == pytest.approx((x0 + cx, y0 + cy), abs=1e-6)
        assert s["slider"][1] - s["gap"][1] == pytest.approx(s["render"]["slider_offset"], abs=1e-9)
        offsets.add(s["render"]["slider_offset"])
        gap_cols = np.nonzero(s["gap_alpha"].any(axis=0))[0]
        assert gap_cols[0] >= x1 + 10 - 3  # the gap stays right of the slider (3 px: rotation padding)
        if option == "slider_offset":
            assert 1 <= abs(s["render"]["slider_offset"]) <= 6
        if option == "slider_x":
            assert 25 <= x0 <= 40
        if option in ("default", "slider_shadow"):
            assert 0 <= x0 <= 10 and s["render"]["slider_offset"] == 0
    if option in ("slider_offset", "train"):
        assert len(offsets) > 1


def test_sub_pixel_centroids_of_anti_aliased_pieces():
    """A piece drawn at a fractional position: its anti-aliased alpha (partial values on the outline) has the
    centroid of its 16x supersampled coverage, so labels keep sub-pixel precision; for a circle, which cv2
    draws without bias, that is the position itself."""
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        prims = render._centre_on_centroid(render._shape_primitives(rng, shape, 55.0))
        n = int(math.ceil(2 * render._extent(prims))) + 4
        for fx, fy in ((0.0, 0.0), (0.25, 0.5), (0.9, 0.1), (0.33, 0.67)):
            centre = (n / 2 + fx, n / 2 + fy)
            coverage = render._rasterise(prims, 0.0, 0.0, 1.0, centre, (n, n))
            alpha = render._downsample(coverage)
            assert ((alpha > 0) & (alpha < 255)).sum() > 50  # anti-aliased outline
            m = cv2.moments(coverage)
            exact = ((m["m10"] / m["m00"] + 0.5) / 4, (m["m01"] / m["m00"] + 0.5) / 4)
            assert render._centroid(alpha) == pytest.approx(exact, abs=0.01), (shape, fx, fy)
            # polygons: cv2's fixed-point fill is biased by up to ~0.25 px, the label measures what was drawn
            tolerance = 0.01 if shape == "circle" else 0.3  # circle: centres on a 1/64 px fixed-point grid
            assert render._centroid(alpha) == pytest.approx(centre, abs=tolerance), (shape, fx, fy)
    fractions = [math.modf(generate_captcha(seed, RENDER_TRAIN)["slider"][0])[0] for seed in range(40)]
    assert np.std(fractions) > 0.2


def test_heldout_render_uses_no_training_setting():
    train, heldout = RENDER_TRAIN.uses(), RENDER_HELDOUT.uses()
    assert train.keys() == heldout.keys()
    for kind in train:
        assert not train[kind] & heldout[kind], kind
    assert heldout == {"photos": set(HELDOUT_PHOTOS), "procedural": {"mosaic"}, "gap_styles": {"bevel"},
                       "compression": {"webp"}}
    assert train["gap_styles"] == {"darken", "veil", "inset", "outline"} and train["compression"] == {"none", "jpeg"}
    for seed in range(30):
        h, t, d = (generate_captcha(seed, r) for r in (RENDER_HELDOUT, RENDER_TRAIN, RenderConfig()))
        assert h["render"]["background"] in (*HELDOUT_PHOTOS, "mosaic")
        assert h["render"]["gap_style"] == "bevel" and h["render"]["compression"] == "webp"
        assert t["render"]["background"] not in (*HELDOUT_PHOTOS, "mosaic")
        assert t["render"]["gap_style"] != "bevel" and t["render"]["compression"] != "webp"
        assert h["category"] == t["category"] == d["category"]  # the confusion mix is the same in every config


def test_render_config_rejects_bad_values():
    for bad, match in (({"gap_style_probs": (0.5, 0.5, 0.5, 0.0, 0.0)}, "gap_style_probs"),
                       ({"gap_style_probs": (0.5, 0.5, 0.0, 0.0)}, "gap_style_probs"),
                       ({"procedural_probs": (1.0,)}, "procedural_probs"),
                       ({"photos": ("astronaut", "nope")}, "photos"), ({"photos": ()}, "photos"),
                       ({"jpeg_prob": 0.7, "webp_prob": 0.5}, "jpeg_prob \\+ webp_prob"),
                       ({"colour_prob": 1.5}, "colour_prob"), ({"slider_offset_px": (1, 11)}, "slider_offset_px"),
                       ({"slider_x_px": (0, 41)}, "slider_x_px"), ({"jpeg_quality": (90, 40)}, "jpeg_quality")):
        with pytest.raises(ValueError, match=f"RenderConfig.*{match}"):
            RenderConfig(**bad)


def _solid_folder(root: Path, colour_rgb=(10, 200, 30)) -> Path:
    root.mkdir()
    cv2.imwrite(str(root / "solid.PNG"), np.full((60, 90, 3), colour_rgb[::-1], np.uint8))
    (root / "notes.txt").write_text("not an image, ignored")
    return root


def test_user_backgrounds_appear_in_the_samples(tmp_path):
    pool = load_backgrounds(_solid_folder(tmp_path / "bg"))
    assert len(pool) == 1 and pool[0].shape == (60, 90, 3) and tuple(pool[0][0, 0]) == (10, 200, 30)
    always = RenderConfig(user_prob=1.0)
    for seed in range(3):
        s = with_layers(seed, always, pool)
        assert s["render"]["background"] == "user"
        assert (s["background"] == (10, 200, 30)).all()  # cropped and resized to the sample's own size
        plain = generate_captcha(seed)
        for key in LABEL_KEYS:
            assert s[key] == plain[key]
    assert generate_captcha(0, RenderConfig(user_prob=0.0), pool)["render"]["background"] != "user"
    sources = Counter(generate_captcha(seed, RenderConfig(), pool)["render"]["background"] == "user"
                      for seed in range(60))
    assert 15 <= sources[True] <= 45  # user_prob 0.5
    item = SyntheticCaptchaDataset(2, seed=1, render=always, backgrounds=pool)[0]
    assert torch.equal(item["image"], SyntheticCaptchaDataset(2, seed=1, render=always, backgrounds=pool)[0]["image"])
    big = tmp_path / "big"
    big.mkdir()
    cv2.imwrite(str(big / "wide.jpg"), np.zeros((300, 2048, 3), np.uint8))
    assert load_backgrounds(big)[0].shape == (150, 1024, 3)


def test_backgrounds_folder_errors_name_the_flag_and_file(tmp_path):
    with pytest.raises(ValueError, match=r"^--backgrounds \S*missing: no such folder; expected a folder of images"):
        load_backgrounds(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"^--backgrounds \S*file\.png: not a folder"):
        load_backgrounds(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"^--backgrounds \S*empty: no images in it; expected .*\.png, \.jpg"):
        load_backgrounds(tmp_path / "empty")
    bad = _solid_folder(tmp_path / "bad")
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"^--backgrounds \S*broken\.jpg: not a decodable image"):
        load_backgrounds(bad)


def test_export_cli_render_and_backgrounds(tmp_path):
    bg = _solid_folder(tmp_path / "bg")
    out = tmp_path / "held"
    cmd = [sys.executable, "-m", "data.captcha", "export", "--out", str(out), "--n", "2", "--seed", "5",
           "--render", "heldout", "--backgrounds", str(bg), "--backgrounds_prob", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    for i, row in enumerate(rows):
        s = generate_captcha((5, 0, i), RENDER_HELDOUT)
        assert np.array_equal(load_image(out / row[0]), s["image"])
        assert [float(v) for v in row[1:]] == pytest.approx([*s["gap"], *s["slider"]], abs=1e-3)
    (bg / "broken.png").write_bytes(b"not a png")
    bad = subprocess.run([*cmd[:5], str(tmp_path / "never"), *cmd[6:]], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--backgrounds" in bad.stderr and "broken.png" in bad.stderr
    assert not (tmp_path / "never").exists()

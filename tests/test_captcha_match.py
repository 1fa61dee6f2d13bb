"""models/captcha_match.py: finding the slider piece, the edge match, the fusion with the network's gap
probability (coordinates between source image, canvas and heatmap cells) and the batch two-stage solver."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.captcha import generate_captcha, letterbox, to_input_tensor
from models.captcha_match import (FALLBACK_BOX, SEARCH_MARGIN, _peak_offset, centroid, cut_piece, find_slider,
                                  match_gap, two_stage, two_stage_gap)

STRIDE = 8  # the preset's --input_scale 2 heads: 32 x 64 cells on the 512 x 256 canvas


@pytest.fixture(scope="module")
def samples():
    return [generate_captcha((1_000_003, 0, i)) for i in range(12)]


def canvas_prob(points_canvas: list[tuple[float, float]], sigma: float = 1.0, h: int = 32, w: int = 64):
    """A (h, w) gap probability map with Gaussian blobs (peak 1) at the given canvas points."""
    rows, cols = np.mgrid[0:h, 0:w]
    prob = np.zeros((h, w), np.float32)
    for x, y in points_canvas:
        prob = np.maximum(prob, np.exp(-((cols + 0.5 - x / STRIDE) ** 2 + (rows + 0.5 - y / STRIDE) ** 2)
                                       / (2 * sigma**2)))
    return prob


def test_find_slider_near_the_slider_cuts_out_the_piece(samples):
    hits = 0
    for s in samples:
        found = find_slider(s["image"], near=s["slider"])
        if found is not None:
            (x0, y0, x1, y1), alpha = found
            assert alpha.shape == (y1 - y0, x1 - x0)
            hits += max(np.abs(np.subtract((x0, y0, x1, y1), s["slider_box"]))) <= 4
    assert hits >= 8, hits
    # nothing piece-like near the point: no piece
    flat = np.full((160, 320, 3), 128, np.uint8)
    assert find_slider(flat, near=(40.0, 80.0)) is None
    assert find_slider(samples[0]["image"], near=(-500.0, -500.0)) is None


def test_cut_piece_falls_back_to_a_square_inside_the_image(samples):
    box, alpha, kind = cut_piece(samples[0]["image"], samples[0]["slider"])
    assert kind == "ring" and box == find_slider(samples[0]["image"], near=samples[0]["slider"])[0]
    flat = np.full((160, 320, 3), 128, np.uint8)
    for point, want in (((100.0, 80.0), (78, 58)), ((3.0, 150.0), (0, 160 - FALLBACK_BOX))):
        box, alpha, kind = cut_piece(flat, point)
        assert kind == "box" and box[:2] == want and box[2] - box[0] == box[3] - box[1] == FALLBACK_BOX
        assert alpha.shape == (FALLBACK_BOX, FALLBACK_BOX) and (alpha == 255).all()


def test_centroid_uses_pixel_centres():
    alpha = np.zeros((20, 30), np.uint8)
    alpha[7, 12] = 255
    assert centroid(alpha) == (12.5, 7.5)   # the generator's label convention
    alpha[7, 13] = 255
    assert centroid(alpha) == (13.0, 7.5)


def test_an_off_centre_square_reports_its_anchor(samples):
    """A square piece that is not centred on the slider point (pushed inside the image) reports the gap at
    the anchor's matched position, not at the square's centre."""
    hits = 0
    for s in samples[:6]:
        image, (sx, sy) = s["image"], s["slider"]
        x0, y0 = int(sx) - 12, int(sy) - 12
        box = (x0, y0, x0 + FALLBACK_BOX, y0 + FALLBACK_BOX)
        alpha = np.full((FALLBACK_BOX, FALLBACK_BOX), 255, np.uint8)
        _, _, scale, pad = letterbox(image)
        (x, y), _ = two_stage_gap(image, box, alpha, np.zeros((32, 64), np.float32), scale, pad, STRIDE, 0.0,
                                  anchor=(sx - x0, sy - y0))
        hits += np.abs(np.subtract((x, y), s["gap"])).max() <= 2
    assert hits >= 4, hits


def test_peak_offset_is_the_parabolas_vertex():
    vertex = 0.3
    lo, mid, hi = (-(x - vertex) ** 2 for x in (-1, 0, 1))
    assert _peak_offset(lo, mid, hi) == pytest.approx(vertex)
    assert _peak_offset(1.0, 0.0, 1.0) == 0.0       # a minimum is not refined
    assert _peak_offset(-100.0, 0.0, 0.0) == 0.5     # clipped to half a position


def test_two_stage_gap_fuses_edge_match_and_network_probability(samples):
    s = samples[0]
    image, box, alpha = s["image"], s["slider_box"], s["piece_alpha"]
    _, _, scale, pad = letterbox(image)
    to_canvas = lambda p: (p[0] * scale + pad[0], p[1] * scale + pad[1])
    # No network weight: the edge match alone, refined by less than a position.
    (x, y), _ = two_stage_gap(image, box, alpha, np.zeros((32, 64), np.float32), scale, pad, STRIDE, weight=0.0)
    assert np.abs(np.subtract((x, y), match_gap(image, box, alpha))).max() <= 0.5
    assert np.abs(np.subtract((x, y), s["gap"])).max() <= 2
    # An overwhelming network weight: the answer follows the probability map, read at the gap centre each
    # template position implies (fails if the source -> canvas -> cell mapping is off). A bilinearly read map
    # peaks at a cell centre, so the targets are cell centres.
    snap = lambda p: tuple((np.floor(np.divide(to_canvas(p), STRIDE)) + 0.5) * STRIDE)
    for near in (s["gap"], (s["gap"][0] - 60, s["gap"][1])):
        target = snap(near)
        (x, y), _ = two_stage_gap(image, box, alpha, canvas_prob([target]), scale, pad, STRIDE, weight=100.0)
        assert np.abs(np.subtract(to_canvas((x, y)), target)).max() <= 1.0, (target, to_canvas((x, y)))


def test_two_stage_gap_maps_each_axis_with_its_own_scale(samples):
    """An image resized by different factors per axis (the matching image of match_resolution): the probability
    is read through (x, y) scales of their own, so an overwhelming peak is found where it is on the canvas."""
    import cv2

    s = samples[0]
    image = s["image"]
    _, _, scale, pad = letterbox(image)
    h, w = image.shape[:2]
    matching = cv2.resize(image, (round(w * 1.25), round(h * 0.8)), interpolation=cv2.INTER_LINEAR)
    rx, ry = matching.shape[1] / w, matching.shape[0] / h
    to_canvas = (scale / rx, scale / ry)
    side = FALLBACK_BOX
    sx, sy = s["slider"][0] * rx, s["slider"][1] * ry
    box = (int(sx - side / 2), int(sy - side / 2), int(sx - side / 2) + side, int(sy - side / 2) + side)
    alpha = np.full((side, side), 255, np.uint8)
    for gap in (s["gap"], (s["gap"][0] - 50, s["gap"][1] - 30)):
        target = tuple((np.floor(np.array([gap[0] * scale + pad[0], gap[1] * scale + pad[1]]) / STRIDE) + 0.5) * STRIDE)
        (x, y), _ = two_stage_gap(matching, box, alpha, canvas_prob([target]), to_canvas, pad, STRIDE, weight=100.0,
                                  anchor=(sx - box[0], sy - box[1]))
        got = (x * to_canvas[0] + pad[0], y * to_canvas[1] + pad[1])
        assert np.abs(np.subtract(got, target)).max() <= 1.0, (target, got)


def test_the_gap_never_lands_on_or_left_of_the_slider(samples):
    """However heavily the network's probability is weighted, positions left of the slider's right edge plus
    the search margin stay excluded; a piece without room to its right gives no answer."""
    s = samples[0]
    image, box, alpha = s["image"], s["slider_box"], s["piece_alpha"]
    _, _, scale, pad = letterbox(image)
    on_slider = canvas_prob([(s["slider"][0] * scale + pad[0], s["slider"][1] * scale + pad[1])])
    for weight in (0.5, 2.0, 4.0, 100.0):
        (x, _), _ = two_stage_gap(image, box, alpha, on_slider, scale, pad, STRIDE, weight)
        assert x - centroid(alpha)[0] >= box[2] + SEARCH_MARGIN, (weight, x)
    h, w = image.shape[:2]
    right = (w - (box[2] - box[0]) - 5, box[1], w - 5, box[3])
    assert two_stage_gap(image, right, alpha, on_slider, scale, pad, STRIDE) is None


def test_two_stage_batch_moves_gaps_where_a_piece_is_found(samples):
    """The batch solver on network outputs that put the slider right and the gap on a wrong spot: where a rim
    ring is found, the edge match wins over a weak wrong probability and the slider is the ring's centroid;
    on a blank image (no edges, a square piece) the answer follows the network's probability."""
    blank = np.full((180, 360, 3), 90, np.uint8)
    sources = [s["image"] for s in samples[:4]] + [blank]
    boxes = [letterbox(src) for src in sources]
    image = torch.stack([to_input_tensor(c, m) for c, m, _, _ in boxes])
    geometry = [(scale, pad) for _, _, scale, pad in boxes]
    true_gap = [s["gap"] for s in samples[:4]] + [(250.0, 90.0)]
    true_slider = [s["slider"] for s in samples[:4]] + [(30.0, 90.0)]
    to_canvas = lambda p, g: (p[0] * g[0] + g[1][0], p[1] * g[0] + g[1][1])
    wrong = [to_canvas((gx - 40, gy), g) for (gx, gy), g in zip(true_gap, geometry)]
    prob = np.stack([0.2 * canvas_prob([w]) for w in wrong])
    logits = torch.from_numpy(np.log(np.clip(prob, 1e-6, 1 - 1e-6) / (1 - np.clip(prob, 1e-6, 1 - 1e-6))))
    outputs = {"gap": logits[:, None]}
    # the network's slider 3 px off: a found ring puts it back on the label
    points = torch.tensor([[w, to_canvas((sx + 3, sy - 2), g)] for w, (sx, sy), g in zip(wrong, true_slider, geometry)],
                          dtype=torch.float32)
    fused, kinds = two_stage(outputs, image, points, sources, geometry, weight=0.5)
    assert kinds[-1] == "box" and np.abs(fused[-1, 0].numpy() - np.array(wrong[-1])).max() <= STRIDE / 2
    for k, kind in enumerate(kinds):  # a ring's centroid is the labelled slider; elsewhere the network's stays
        if kind == "ring":
            assert np.abs(fused[k, 1].numpy() - to_canvas(true_slider[k], geometry[k])).max() <= 2
        else:
            assert torch.equal(fused[k, 1], points[k, 1])
    moved = [np.abs(fused[k, 0].numpy() - to_canvas(true_gap[k], geometry[k])).max() <= 5
             for k in range(4) if kinds[k] == "ring"]  # within the hit@5 radius
    assert len(moved) >= 3 and all(moved), (kinds, moved)
    # a non-finite slider (a diverged network) keeps the network's points, marked "none"
    points[1, 1] = float("nan")
    fused, kinds = two_stage(outputs, image, points, sources, geometry)
    assert kinds[1] == "none" and torch.equal(fused[1, 0], points[1, 0])


def test_two_stage_shrinks_captchas_served_at_twice_the_size(samples, monkeypatch):
    """A CAPTCHA served at 2x is matched after match_resolution shrinks it: the same pieces are found as at
    the generator's size, and the points, in the letterbox of the image as given, land on its labels.
    Without the shrink its rings exceed the piece search's sizes and squares stand in."""
    import cv2
    import models.captcha_match as cm

    image = samples[0]["image"]
    assert cm.match_resolution(image)[0] is image  # generator sizes: untouched
    wide = cv2.resize(image, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
    small, (rx, ry) = cm.match_resolution(wide)
    assert small.shape[1] == cm.MATCH_WIDTH and abs(rx - ry) < 0.01
    assert small.shape[0] == round(wide.shape[0] * cm.MATCH_WIDTH / wide.shape[1])

    def solve(sources, gaps, sliders):
        """two_stage on a weak probability at the true gap and a slider 2 px off -> canvas errors, kinds."""
        boxes = [letterbox(src) for src in sources]
        image = torch.stack([to_input_tensor(c, m) for c, m, _, _ in boxes])
        geometry = [(scale, pad) for _, _, scale, pad in boxes]
        to_canvas = lambda p, g: (p[0] * g[0] + g[1][0], p[1] * g[0] + g[1][1])
        prob = np.clip(np.stack([0.3 * canvas_prob([to_canvas(gap, g)]) for gap, g in zip(gaps, geometry)]),
                       1e-6, 1 - 1e-6)
        outputs = {"gap": torch.from_numpy(np.log(prob / (1 - prob)))[:, None]}
        points = torch.tensor([[to_canvas(gap, g), to_canvas((sx + 2, sy), g)]
                               for gap, (sx, sy), g in zip(gaps, sliders, geometry)], dtype=torch.float32)
        fused, kinds = cm.two_stage(outputs, image, points, sources, geometry)
        truth = [[to_canvas(gap, g), to_canvas(sl, g)] for gap, sl, g in zip(gaps, sliders, geometry)]
        return np.abs(fused.numpy() - np.array(truth)).max(axis=2), kinds

    originals = samples[:6]
    _, base_kinds = solve([s["image"] for s in originals], [s["gap"] for s in originals],
                          [s["slider"] for s in originals])
    doubled = ([cv2.resize(s["image"], None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC) for s in originals],
               [(s["gap"][0] * 2, s["gap"][1] * 2) for s in originals],  # continuous px scale with the image
               [(s["slider"][0] * 2, s["slider"][1] * 2) for s in originals])
    errors, kinds = solve(*doubled)
    assert kinds == base_kinds and kinds.count("ring") >= 4, (kinds, base_kinds)
    for k, kind in enumerate(kinds):
        assert errors[k, 0] <= 5, (k, kind, errors[k])  # the gap within the hit@5 radius
        if kind == "ring":  # the slider on the ring's centroid
            assert errors[k, 1] <= 2, (k, errors[k])
    monkeypatch.setattr(cm, "MAX_MATCH_WIDTH", 10_000)  # no shrinking
    _, unshrunk = solve(*doubled)
    assert unshrunk.count("ring") < kinds.count("ring"), unshrunk

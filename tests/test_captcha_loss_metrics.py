"""CenterNet targets, losses, decoding and metric definitions for the CAPTCHA task."""
from __future__ import annotations

import math

import numpy as np
import torch

from data.captcha import halve_canvas
from losses.captcha import captcha_loss, encode_points, focal_loss, sample_heatmap, valid_cells
from metrics.captcha import captcha_metrics, decode, point_errors, predict_points


def _outputs_from_points(gap, slider, h=64, w=128, with_angle=True):
    """Perfect model outputs for the given canvas points: peaked logits and exact offsets."""
    b = gap.shape[0]
    out = {"gap": torch.full((b, 1, h, w), -10.0), "slider": torch.full((b, 1, h, w), -10.0),
           "offset": torch.zeros(b, 4, h, w)}
    for k, pts in enumerate((gap, slider)):
        heat, cell, off = encode_points(pts, h, w)
        out["gap" if k == 0 else "slider"][:, 0] = torch.where(heat == 1, 10.0, -10.0)
        for n in range(b):
            out["offset"][n, 2 * k:2 * k + 2, cell[n, 0], cell[n, 1]] = off[n]
    if with_angle:
        out["angle"] = torch.stack([torch.zeros(b, h, w), torch.ones(b, h, w)], 1)
    return out


def test_encode_decode_round_trip_subpixel():
    g = torch.Generator().manual_seed(0)
    gap = torch.rand(16, 2, generator=g) * torch.tensor([511.9, 255.9])
    slider = torch.rand(16, 2, generator=g) * torch.tensor([511.9, 255.9])
    outputs = _outputs_from_points(gap, slider)
    points, scores = decode(outputs, torch.ones(16, 64, 128, dtype=torch.bool))
    assert torch.allclose(points[:, 0], gap, atol=1e-4) and torch.allclose(points[:, 1], slider, atol=1e-4)
    assert torch.all(scores > 0.99)


def test_targets_and_decoding_on_the_half_canvas():
    """Progressive resizing: on the halved canvas (halve_canvas) the targets sit at stride 8 of the full canvas,
    and points decoded there, doubled, are the full canvas's points."""
    g = torch.Generator().manual_seed(1)
    gap = torch.rand(16, 2, generator=g) * torch.tensor([511.9, 255.9])
    slider = torch.rand(16, 2, generator=g) * torch.tensor([511.9, 255.9])
    image = torch.ones(16, 4, 256, 512)
    batch = {"image": image, "gap": gap, "slider": slider, "fake_gaps": torch.zeros(16, 2, 2),
             "fake_mask": torch.zeros(16, 2, dtype=torch.bool), "angle": torch.zeros(16)}
    small = halve_canvas(batch)
    _, cell, off = encode_points(small["gap"], 32, 64)
    assert torch.equal(cell, torch.stack([(gap[:, 1] / 8).floor(), (gap[:, 0] / 8).floor()], 1).long())
    assert torch.allclose(off, torch.stack([gap[:, 0] / 8 - cell[:, 1] - 0.5, gap[:, 1] / 8 - cell[:, 0] - 0.5], 1),
                          atol=1e-5)
    outputs = _outputs_from_points(small["gap"], small["slider"], h=32, w=64)
    points, _ = decode(outputs, valid_cells(small["image"]))
    assert torch.allclose(2 * points[:, 0], gap, atol=1e-3) and torch.allclose(2 * points[:, 1], slider, atol=1e-3)
    # the loss of a perfect prediction is as small on the half canvas as on the full one
    full_loss, _ = captcha_loss(_outputs_from_points(gap, slider), batch)
    small_loss, _ = captcha_loss(outputs, small)
    assert small_loss < 0.05 and full_loss < 0.05
    # a model that shrinks its input itself (input_scale 2, stride 8): the loss at stride 8 on the full-canvas
    # batch is the loss of the halved batch, and predict_points decodes at the model's stride, in full px
    stride8, _ = captcha_loss(outputs, batch)   # 32x64 heatmaps of the 256x512 image: stride 8
    torch.testing.assert_close(stride8, small_loss)

    points, _ = predict_points(lambda image: outputs, image)   # the stride comes from the output's shape
    assert torch.allclose(points[:, 0], gap, atol=1e-3) and torch.allclose(points[:, 1], slider, atol=1e-3)


def test_encode_targets_peak_offset_and_radius():
    heat, cell, off = encode_points(torch.tensor([[10.0, 6.0]]), 64, 128, sigma=1.5)
    assert cell.tolist() == [[1, 2]] and torch.allclose(off, torch.tensor([[0.0, 0.0]]))  # 10/4 = 2.5 -> j=2, du=0
    assert heat[0, 1, 2] == 1 and heat.max() == 1
    assert math.isclose(heat[0, 1, 3].item(), math.exp(-1 / 4.5), rel_tol=1e-6)
    assert heat[0, 1, 7] == 0  # beyond int(3 sigma) = 4 cells


def test_decode_ignores_padding_cells():
    gap = torch.tensor([[300.0, 100.0]])
    outputs = _outputs_from_points(gap, gap)
    outputs["gap"][0, 0, 0, 0] = 50.0  # a strong peak in the padding
    valid = torch.ones(1, 64, 128, dtype=torch.bool)
    valid[:, :8] = False
    points, _ = decode(outputs, valid)
    assert torch.allclose(points[0, 0], gap, atol=1e-4)


def test_focal_loss_matches_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, generator=g)
    target = torch.rand(2, 5, 6, generator=g) * 0.9
    target[0, 2, 3] = 1.0
    target[1, 4, 1] = 1.0
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[1, 0] = False
    p = torch.sigmoid(logits)
    expected = []
    for n in range(2):
        pos = target[n] == 1
        loss = (-(1 - p[n]) ** 2 * torch.log(p[n]))[pos & valid[n]].sum()
        loss += (-(1 - target[n]) ** 4 * p[n] ** 2 * torch.log(1 - p[n]))[~pos & valid[n]].sum()
        expected.append(loss / max(int((pos & valid[n]).sum()), 1))
    got = focal_loss(logits, target, valid, alpha=2, beta=4)
    assert torch.allclose(got, torch.stack(expected).mean(), rtol=1e-5)


def test_loss_parts_and_perfect_prediction_is_small():
    gap, slider = torch.tensor([[300.0, 120.0], [200.0, 60.0]]), torch.tensor([[30.0, 120.0], [28.0, 60.0]])
    image = torch.ones(2, 4, 256, 512)
    batch = {"image": image, "gap": gap, "slider": slider, "fake_gaps": torch.tensor([[[400.0, 120.0], [0, 0]]] * 2),
             "fake_mask": torch.tensor([[True, False]] * 2), "angle": torch.zeros(2)}
    good, parts = captcha_loss(_outputs_from_points(gap, slider), batch)
    assert set(parts) == {"loss/focal_gap", "loss/focal_slider", "loss/offset", "loss/hard_negative", "loss/angle"}
    assert parts["loss/offset"] < 1e-6 and parts["loss/angle"] < 1e-6 and parts["loss/hard_negative"] < 1e-6
    bad, _ = captcha_loss(_outputs_from_points(slider, gap), batch)
    assert bad > 10 * good


def test_loss_is_a_per_sample_mean():
    """Accumulating micro-batches must equal the big batch: loss(batch) == mean of per-sample losses."""
    torch.manual_seed(0)
    b = 4
    outputs = {"gap": torch.randn(b, 1, 64, 128), "slider": torch.randn(b, 1, 64, 128),
               "offset": torch.rand(b, 4, 64, 128) - 0.5, "angle": torch.nn.functional.normalize(torch.randn(b, 2, 64, 128), dim=1)}
    image = torch.ones(b, 4, 256, 512)
    image[1, 3, :40] = 0
    batch = {"image": image, "gap": torch.rand(b, 2) * 250 + 100, "slider": torch.rand(b, 2) * 200,
             "fake_gaps": torch.rand(b, 2, 2) * 250, "fake_mask": torch.tensor([[1, 1], [1, 0], [0, 0], [1, 0]]).bool(),
             "angle": torch.randn(b) * 0.02}
    full, _ = captcha_loss(outputs, batch)
    singles = [captcha_loss({k: v[n:n + 1] for k, v in outputs.items()}, {k: v[n:n + 1] for k, v in batch.items()})[0]
               for n in range(b)]
    assert torch.allclose(full, torch.stack(singles).mean(), rtol=1e-5)


def test_sample_heatmap_reads_cell_centres():
    heat = torch.arange(12.0).reshape(1, 3, 4)
    pts = torch.tensor([[[2.0, 2.0], [6.0, 10.0], [4.0, 2.0]]])  # centres of cells (0,0), (2,1); halfway (0,0)-(0,1)
    assert torch.allclose(sample_heatmap(heat, pts), torch.tensor([[0.0, 9.0, 0.5]]))


def test_valid_cells_from_mask():
    image = torch.zeros(1, 4, 8, 16)
    image[:, 3, :, 4:] = 1
    assert valid_cells(image).tolist() == [[[False, True, True, True], [False, True, True, True]]]


def test_metric_definitions():
    true = np.array([[[100, 50], [20, 50]], [[200, 80], [25, 80]]], dtype=float)
    pred = true.copy()
    pred[0, 0] += [2, 0]      # gap err = mean(2, 0) = 1
    pred[1, 1] += [6, 8]      # slider err = 7
    m = captcha_metrics(pred, true)
    combined = np.array([0.5, 3.5])
    assert math.isclose(m["mae_px"], combined.mean())
    assert math.isclose(m["rmse_px"], math.sqrt((combined**2).mean()))
    assert m["hit_le_1px"] == 50 and m["hit_le_2px"] == 50 and m["hit_le_5px"] == 100
    assert math.isclose(m["gap_mae"], 0.5) and math.isclose(m["slider_mae"], 3.5)
    assert math.isclose(m["slide_mae_px"], (2 + 6) / 2)
    assert math.isclose(m["slider_euclid_px"], 5.0)
    assert point_errors(pred, true)["combined"].tolist() == combined.tolist()


def test_decode_takes_the_centre_of_a_flat_top():
    """Tied maxima (a head outputting its bias over several cells) decode to the plateau's centre,
    not to its top-left cell; a second, separate plateau of the same height is ignored."""
    gap = torch.tensor([[300.0, 100.0]])
    outputs = _outputs_from_points(gap, gap)
    outputs["offset"].zero_()
    outputs["gap"][0, 0] = -5.0
    outputs["gap"][0, 0, 10:13, 20:25] = 1.5   # rows 10-12, cols 20-24: centre (11, 22)
    outputs["gap"][0, 0, 40:42, 100:102] = 1.5  # same height, elsewhere
    points, scores = decode(outputs, torch.ones(1, 64, 128, dtype=torch.bool))
    assert torch.allclose(points[0, 0], torch.tensor([(22 + 0.5) * 4, (11 + 0.5) * 4]))
    assert torch.allclose(scores[0, 0], torch.sigmoid(torch.tensor(1.5)))

"""DECODE's Gaussian-mixture loss against a brute-force evaluation with Python loops and `math`."""
from __future__ import annotations

import math

import pytest
import torch

from losses.smlm import gmm_loss, gmm_terms
from models.sigma_munet import BG_CH


def random_output(batch: int, height: int, width: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Activated SigmaMUNet maps (B, 10, H, W) with the activations of smlm.md §2.2."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, 10, height, width, generator=g, dtype=torch.float64) * 1.5
    out = torch.empty_like(raw)
    out[:, 0] = torch.sigmoid(raw[:, 0].clamp(-8, 8))
    out[:, 1] = torch.sigmoid(raw[:, 1])
    out[:, 2:5] = torch.tanh(raw[:, 2:5])
    out[:, 5:9] = torch.sigmoid(raw[:, 5:9]) * 3 + 0.001
    out[:, 9] = torch.sigmoid(raw[:, 9])
    return out.to(dtype)


def random_targets(counts: list[int], e_max: int, height: int, width: int, seed: int, dtype=torch.float64):
    """Padded (B, E_max, 4) emitters with True rows scattered (not left-packed) and NaN in the padding."""
    g = torch.Generator().manual_seed(seed)
    batch = len(counts)
    emitters = torch.full((batch, e_max, 4), float("nan"), dtype=torch.float64)
    mask = torch.zeros(batch, e_max, dtype=torch.bool)
    for b, n in enumerate(counts):
        rows = torch.randperm(e_max, generator=g)[:n]
        mask[b, rows] = True
        emitters[b, rows, 0] = torch.rand(n, generator=g, dtype=torch.float64)
        emitters[b, rows, 1] = torch.rand(n, generator=g, dtype=torch.float64) * width - 0.5
        emitters[b, rows, 2] = torch.rand(n, generator=g, dtype=torch.float64) * height - 0.5
        emitters[b, rows, 3] = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    bg = torch.rand(batch, height, width, generator=g, dtype=torch.float64)
    return emitters.to(dtype), mask, bg.to(dtype)


def log_normal(x: float, mean: float, std: float) -> float:
    return -0.5 * math.log(2 * math.pi) - math.log(std) - 0.5 * ((x - mean) / std) ** 2


def brute_force(output, emitters, mask, bg, times_e: bool):
    """Per-frame (count_nll, mix_nll, bg_sse) from explicit loops over frames, emitters and pixels."""
    out, em, bgt = output.double().tolist(), emitters.double().tolist(), bg.double().tolist()
    batch, _, height, width = output.shape
    frames = []
    for b in range(batch):
        p = [[out[b][0][i][j] for j in range(width)] for i in range(height)]
        p_sum = sum(sum(row) for row in p)
        p_var = sum(p[i][j] * (1 - p[i][j]) for i in range(height) for j in range(width))
        n_true = sum(bool(m) for m in mask[b].tolist())
        count = log_normal(n_true, p_sum, math.sqrt(p_var))
        count_nll = -count * (n_true if times_e else 1)
        mix = 0.0
        for e in range(emitters.shape[1]):
            if not mask[b, e]:
                continue
            u = em[b][e]
            terms = []
            for i in range(height):
                for j in range(width):
                    means = [out[b][1][i][j], j + out[b][2][i][j], i + out[b][3][i][j], out[b][4][i][j]]
                    log_density = sum(log_normal(u[d], means[d], out[b][5 + d][i][j]) for d in range(4))
                    terms.append(math.log(p[i][j] / p_sum) + log_density)
            top = max(terms)
            mix += top + math.log(sum(math.exp(t - top) for t in terms))
        sse = sum((out[b][9][i][j] - bgt[b][i][j]) ** 2 for i in range(height) for j in range(width))
        frames.append((count_nll, -mix, sse))
    return frames


@pytest.mark.parametrize("times_e", [False, True])
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_loss_matches_brute_force(times_e, dtype, rel):
    counts, height, width = [2, 0, 3, 1], 4, 4
    output = random_output(len(counts), height, width, seed=0, dtype=dtype)
    emitters, mask, bg = random_targets(counts, 3, height, width, seed=1, dtype=dtype)
    weights = dict(count_weight=0.7, gmm_weight=1.3, bg_weight=0.4)
    loss, parts = gmm_loss(output, emitters, mask, bg, count_times_num_emitters=times_e, **weights)
    frames = brute_force(output, emitters, mask, bg, times_e)
    n = len(frames)
    expected = {"loss/count": sum(f[0] for f in frames) / n, "loss/gmm": sum(f[1] for f in frames) / n,
                "loss/bg": sum(f[2] for f in frames) / n}
    for key, value in expected.items():
        assert parts[key].item() == pytest.approx(value, rel=rel), key
    total = sum(weights[w] * expected[k] for w, k in
                [("count_weight", "loss/count"), ("gmm_weight", "loss/gmm"), ("bg_weight", "loss/bg")])
    assert loss.item() == pytest.approx(total, rel=rel)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)


def test_unit_weights_with_flag_equal_decode_reduction():
    """DECODE: (B, 2) matrix 2 * [count+gmm, bg] * [1, 1], then .mean() over both axes."""
    counts, height, width = [1, 3], 4, 4
    output = random_output(2, height, width, seed=2)
    emitters, mask, bg = random_targets(counts, 3, height, width, seed=3)
    loss, _ = gmm_loss(output, emitters, mask, bg, count_times_num_emitters=True)
    frames = brute_force(output, emitters, mask, bg, times_e=True)
    decode = torch.tensor([[2 * (c + g), 2 * s] for c, g, s in frames], dtype=torch.float64).mean()
    assert loss.item() == pytest.approx(decode.item(), rel=1e-9)


def test_gradients_finite_despite_nan_padding():
    output = random_output(3, 4, 4, seed=4, dtype=torch.float32).requires_grad_(True)
    emitters, mask, bg = random_targets([0, 2, 3], 4, 4, 4, seed=5, dtype=torch.float32)
    assert torch.isnan(emitters[~mask]).all()
    loss, _ = gmm_loss(output, emitters, mask, bg, count_times_num_emitters=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(output.grad).all()
    assert output.grad.abs().sum() > 0


def test_empty_frame_has_no_mixture_term_but_keeps_count_term_without_flag():
    output = random_output(1, 4, 4, seed=6)
    output[0, 0] = 0.05                        # small p, as at initialisation (p-head bias -6)
    output.requires_grad_(True)
    emitters, mask, bg = random_targets([0], 2, 4, 4, seed=7)
    count_ll, mix_ll, _, n = gmm_terms(output, emitters, mask, bg)
    assert n.item() == 0 and mix_ll.item() == 0.0
    p = output[0, 0].detach()
    mean, var = p.sum().item(), (p * (1 - p)).sum().item()
    assert count_ll.item() == pytest.approx(log_normal(0.0, mean, math.sqrt(var)), rel=1e-12)

    loss, parts = gmm_loss(output, emitters, mask, bg)
    assert parts["loss/gmm"].item() == 0.0 and parts["loss/count"].item() > 0
    loss.backward()
    assert (output.grad[0, 0] > 0).all()       # the count term pushes every p of an empty frame down
    output.grad = None

    loss, parts = gmm_loss(output, emitters, mask, bg, count_times_num_emitters=True)
    assert parts["loss/count"].item() == 0.0   # x E with E = 0: DECODE's code has no count term here
    assert loss.item() == pytest.approx(parts["loss/bg"].item(), rel=1e-12)
    loss.backward()
    assert (output.grad[0, :BG_CH] == 0).all() and output.grad[0, BG_CH].abs().sum() > 0


def test_whole_batch_without_emitters_and_without_bg_target():
    output = random_output(2, 4, 4, seed=8)
    loss, parts = gmm_loss(output, torch.zeros(2, 0, 4, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.bool))
    assert parts["loss/gmm"].item() == 0.0 and parts["loss/bg"].item() == 0.0
    assert loss.item() == pytest.approx(parts["loss/count"].item()) and torch.isfinite(loss)


def single_emitter_case(p_at_target: float, p_elsewhere: float = 0.01, target_pixel=(1, 2)):
    """4x4 frame, one emitter at x = 2.1, y = 1.2 px (pixel row 1, col 2), small sigmas everywhere."""
    output = torch.zeros(1, 10, 4, 4, dtype=torch.float64)
    output[0, 0] = p_elsewhere
    output[0, 0, target_pixel[0], target_pixel[1]] = p_at_target
    output[0, 1] = 0.5
    output[0, 2], output[0, 3] = 0.1, 0.2
    output[0, 5:9] = 0.3
    emitters = torch.tensor([[[0.5, 2.1, 1.2, 0.0]]], dtype=torch.float64)
    return output, emitters, torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.float64)


def test_moving_probability_to_the_true_pixel_lowers_the_loss():
    losses = [gmm_loss(*single_emitter_case(p))[1]["loss/gmm"].item() for p in (0.01, 0.2, 0.6, 0.95)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    wrong = [gmm_loss(*single_emitter_case(p, target_pixel=(2, 1)))[1]["loss/gmm"].item() for p in (0.01, 0.6)]
    assert wrong[1] > wrong[0] > losses[-1], wrong
    total = [gmm_loss(*single_emitter_case(p))[0].item() for p in (0.05, 0.95)]
    assert total[1] < total[0]


def test_pixel_centre_convention_x_is_column_y_is_row():
    """With all weight on pixel (row 1, col 2), the emitter sits exactly at that component's mean."""
    output, emitters, mask, bg = single_emitter_case(1.0, p_elsewhere=0.0)
    _, mix_ll, _, _ = gmm_terms(output, emitters, mask, bg)
    assert mix_ll.item() == pytest.approx(4 * (-0.5 * math.log(2 * math.pi) - math.log(0.3)), rel=1e-12)
    swapped = emitters[..., [0, 2, 1, 3]]
    assert gmm_terms(output, swapped, mask, bg)[1].item() < mix_ll.item() - 5


def test_shape_errors_are_clear():
    output = random_output(1, 4, 4, seed=9)
    emitters, mask, bg = random_targets([1], 2, 4, 4, seed=10)
    with pytest.raises(ValueError, match="output must be"):
        gmm_loss(output[:, :9], emitters, mask, bg)
    with pytest.raises(ValueError, match="target_emitters"):
        gmm_loss(output, emitters[..., :3], mask, bg)
    with pytest.raises(ValueError, match="target_mask"):
        gmm_loss(output, emitters, mask[:, :1], bg)
    with pytest.raises(ValueError, match="target_bg"):
        gmm_loss(output, emitters, mask, bg[:, :3])

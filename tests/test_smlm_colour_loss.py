"""Two-colour loss terms, weight schedules and distillation terms against brute-force loops and closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from losses.smlm import gmm_loss
from losses.smlm_colour import (SCHEDULE_KINDS, TERM_NAMES, colour_loss_terms, distillation_terms, gaussian_kl,
                                parse_schedule, schedule_value, weighted_sum)
from models.double_munet import CH1_SLICE, CH2_SLICE, LOGVAR_CH, LOGVAR_MAX, LOGVAR_MIN, RATIO_CH
from models.sigma_munet import MU_CH, P_CH, SIGMA_CH


def random_output(batch: int, height: int, width: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Activated DoubleMUNet maps (B, 22, H, W) with the activations of models/double_munet.py."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, 22, height, width, generator=g, dtype=torch.float64) * 1.5
    out = torch.empty_like(raw)
    for o in (CH1_SLICE.start, CH2_SLICE.start):
        out[:, o] = torch.sigmoid(raw[:, o].clamp(-8, 8))
        out[:, o + 1] = torch.sigmoid(raw[:, o + 1])
        out[:, o + 2:o + 5] = torch.tanh(raw[:, o + 2:o + 5])
        out[:, o + 5:o + 9] = torch.sigmoid(raw[:, o + 5:o + 9]) * 3 + 0.001
        out[:, o + 9] = torch.sigmoid(raw[:, o + 9])
    out[:, RATIO_CH] = torch.sigmoid(raw[:, RATIO_CH])
    out[:, LOGVAR_CH] = LOGVAR_MIN + (LOGVAR_MAX - LOGVAR_MIN) * torch.sigmoid(raw[:, LOGVAR_CH])
    return out.to(dtype)


def random_targets(counts: list[int], e_max: int, height: int, width: int, seed: int, dtype=torch.float64):
    """(B, E_max, 6) rows scattered among NaN padding, target_mask, channel_mask (each real row is a target of
    one or both channels) and (B, 2, H, W) backgrounds. Positions cover the whole frame extent, borders included."""
    g = torch.Generator().manual_seed(seed)
    batch = len(counts)
    emitters = torch.full((batch, e_max, 6), float("nan"), dtype=torch.float64)
    mask = torch.zeros(batch, e_max, dtype=torch.bool)
    channel_mask = torch.zeros(batch, 2, e_max, dtype=torch.bool)
    for b, n in enumerate(counts):
        rows = torch.randperm(e_max, generator=g)[:n]
        mask[b, rows] = True
        phot = torch.rand(n, 2, generator=g, dtype=torch.float64)
        emitters[b, rows, 0:2] = phot
        emitters[b, rows, 2] = torch.rand(n, generator=g, dtype=torch.float64) * width - 0.5
        emitters[b, rows, 3] = torch.rand(n, generator=g, dtype=torch.float64) * height - 0.5
        emitters[b, rows, 4] = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        emitters[b, rows, 5] = phot[:, 0] / phot.sum(1)
        seen = torch.randint(0, 3, (n,), generator=g)                    # 0: ch1 only, 1: ch2 only, 2: both
        channel_mask[b, 0, rows] = seen != 1
        channel_mask[b, 1, rows] = seen != 0
    bg = torch.rand(batch, 2, height, width, generator=g, dtype=torch.float64)
    return emitters.to(dtype), mask, channel_mask, bg.to(dtype)


def own_pixel(x: float, y: float, height: int, width: int) -> tuple[int, int]:
    """(row, col) of the half-open pixel [j - 1/2, j + 1/2) containing (x, y), clamped into the frame."""
    return min(max(math.floor(y + 0.5), 0), height - 1), min(max(math.floor(x + 0.5), 0), width - 1)


def brute_force_ratio_terms(output, emitters, mask):
    """Per-frame (ratio, conservation, consistency) sums from loops over frames and real rows."""
    out, em = output.double().tolist(), emitters.double().tolist()
    batch, _, height, width = output.shape
    ph1_ch, ph2_ch = CH1_SLICE.start + MU_CH.start, CH2_SLICE.start + MU_CH.start
    frames = []
    for b in range(batch):
        nll = cons = consist = 0.0
        for e in range(emitters.shape[1]):
            if not mask[b, e]:
                continue
            phot1, phot2, x, y, _, r = em[b][e]
            i, j = own_pixel(x, y, height, width)
            m, logvar = out[b][RATIO_CH][i][j], out[b][LOGVAR_CH][i][j]
            ph1, ph2 = out[b][ph1_ch][i][j], out[b][ph2_ch][i][j]
            nll += 0.5 * (logvar + (r - m) ** 2 / math.exp(logvar) + math.log(2 * math.pi))
            cons += (ph1 + ph2 - phot1 - phot2) ** 2
            consist += (m - ph1 / (ph1 + ph2)) ** 2
        frames.append((nll, cons, consist))
    return frames


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_ratio_terms_match_brute_force(dtype, rel):
    counts, height, width = [3, 0, 5, 1], 5, 6
    output = random_output(len(counts), height, width, seed=0, dtype=dtype)
    emitters, mask, channel_mask, bg = random_targets(counts, 6, height, width, seed=1, dtype=dtype)
    terms = colour_loss_terms(output, emitters, mask, channel_mask, bg)
    assert set(terms) == set(TERM_NAMES)
    frames = brute_force_ratio_terms(output, emitters, mask)
    for k, name in enumerate(("ratio", "conservation", "consistency")):
        expected = sum(f[k] for f in frames) / len(frames)
        assert terms[name].item() == pytest.approx(expected, rel=rel), name
        assert terms[name].dtype == torch.promote_types(dtype, torch.float32)


def test_own_pixel_rounds_half_up_and_clamps_at_the_border():
    output = torch.zeros(1, 22, 3, 4, dtype=torch.float64)
    output[0, LOGVAR_CH] = 0.0
    output[0, RATIO_CH] = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 100     # m identifies the pixel
    em = torch.tensor([[[0.2, 0.2, 0.5, 1.5, 0.0, 0.0],                  # half-open pixel: (row 2, col 1)
                        [0.2, 0.2, -0.7, 9.0, 0.0, 0.0]]], dtype=torch.float64)   # clamped: (row 2, col 0)
    for e, (i, j) in enumerate([(2, 1), (2, 0)]):
        mask = torch.zeros(1, 2, dtype=torch.bool)
        mask[0, e] = True
        nll = colour_loss_terms(output, em, mask, mask[:, None].repeat(1, 2, 1))["ratio"].item()
        m = (i * 4 + j) / 100
        assert nll == pytest.approx(0.5 * (m**2 + math.log(2 * math.pi)), rel=1e-12)


@pytest.mark.parametrize("times_e", [False, True])
def test_channel_terms_equal_gmm_loss_on_the_sliced_maps(times_e):
    counts, height, width = [2, 4, 0], 4, 4
    output = random_output(len(counts), height, width, seed=2)
    emitters, mask, channel_mask, bg = random_targets(counts, 5, height, width, seed=3)
    terms = colour_loss_terms(output, emitters, mask, channel_mask, bg, count_times_num_emitters=times_e)
    for c, (name, sl) in enumerate((("ch1", CH1_SLICE), ("ch2", CH2_SLICE))):
        loss, _ = gmm_loss(output[:, sl], emitters[..., [c, 2, 3, 4]], channel_mask[:, c], bg[:, c],
                           count_times_num_emitters=times_e)
        assert terms[name].item() == pytest.approx(loss.item(), rel=1e-12), name
    no_bg = colour_loss_terms(output, emitters, mask, channel_mask, None, count_times_num_emitters=times_e)
    loss, _ = gmm_loss(output[:, CH2_SLICE], emitters[..., [1, 2, 3, 4]], channel_mask[:, 1], None,
                       count_times_num_emitters=times_e)
    assert no_bg["ch2"].item() == pytest.approx(loss.item(), rel=1e-12)


def test_nan_padding_changes_neither_value_nor_gradient():
    counts, height, width = [2, 3], 4, 4
    base = random_output(len(counts), height, width, seed=4, dtype=torch.float32)
    emitters, mask, channel_mask, bg = random_targets(counts, 3, height, width, seed=5, dtype=torch.float32)
    pad = torch.full((2, 4, 6), float("nan"))
    padded = torch.cat([pad[:, :2], emitters, pad[:, 2:]], dim=1)               # NaN rows on both sides
    pad_mask = torch.zeros(2, 2, dtype=torch.bool)
    padded_mask = torch.cat([pad_mask, mask, pad_mask], dim=1)
    # channel_mask set on padded rows must be ignored too (it is intersected with target_mask).
    padded_channel_mask = torch.cat([torch.ones(2, 2, 2, dtype=torch.bool), channel_mask,
                                     torch.ones(2, 2, 2, dtype=torch.bool)], dim=2)
    results = []
    for args in ((emitters, mask, channel_mask), (padded, padded_mask, padded_channel_mask)):
        output = base.clone().requires_grad_(True)
        terms = colour_loss_terms(output, *args, bg)
        sum(terms.values()).backward()
        results.append(({k: v.item() for k, v in terms.items()}, output.grad))
    (values, grad), (padded_values, padded_grad) = results
    assert all(math.isfinite(v) for v in padded_values.values())
    for name in TERM_NAMES:
        assert padded_values[name] == pytest.approx(values[name], rel=1e-6), name
    assert torch.isfinite(padded_grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(padded_grad, grad)


def test_gradient_accumulation_two_halves_equal_the_full_batch():
    counts, height, width = [2, 0, 4, 1], 4, 4
    base = random_output(len(counts), height, width, seed=6)
    emitters, mask, channel_mask, bg = random_targets(counts, 4, height, width, seed=7)
    weights = {"ch1": 1.0, "ch2": 0.5, "ratio": 0.3, "conservation": 2.0, "consistency": 0.1}

    full = base.clone().requires_grad_(True)
    loss_full, _ = weighted_sum(colour_loss_terms(full, emitters, mask, channel_mask, bg), weights)
    loss_full.backward()

    half = base.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        loss, _ = weighted_sum(colour_loss_terms(half[sl], emitters[sl], mask[sl], channel_mask[sl], bg[sl]), weights)
        (loss / 2).backward()
        total += loss.item() / 2
    assert total == pytest.approx(loss_full.item(), rel=1e-12)
    torch.testing.assert_close(half.grad, full.grad, rtol=1e-10, atol=1e-12)


def test_shape_errors_are_clear():
    output = random_output(1, 4, 4, seed=8)
    emitters, mask, channel_mask, bg = random_targets([1], 2, 4, 4, seed=9)
    with pytest.raises(ValueError, match="output must be"):
        colour_loss_terms(output[:, :20], emitters, mask, channel_mask, bg)
    with pytest.raises(ValueError, match="target_emitters"):
        colour_loss_terms(output, emitters[..., :4], mask, channel_mask, bg)
    with pytest.raises(ValueError, match="target_mask"):
        colour_loss_terms(output, emitters, mask[:, :1], channel_mask, bg)
    with pytest.raises(ValueError, match="channel_mask"):
        colour_loss_terms(output, emitters, mask, channel_mask[:, :1], bg)
    with pytest.raises(ValueError, match="target_bg"):
        colour_loss_terms(output, emitters, mask, channel_mask, bg[:, 0])


def test_weighted_sum():
    terms = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(3.0), "c": torch.tensor(5.0)}
    loss, parts = weighted_sum(terms, {"a": 0.5, "c": torch.tensor(2.0)})
    assert loss.item() == pytest.approx(11.0) and loss.requires_grad
    assert set(parts) == {"loss/a", "loss/b", "loss/c"}
    assert parts["loss/b"].item() == 3.0 and not parts["loss/a"].requires_grad
    with pytest.raises(ValueError, match="'d'"):
        weighted_sum(terms, {"a": 1.0, "d": 1.0})
    with pytest.raises(ValueError, match="empty"):
        weighted_sum(terms, {})


@pytest.mark.parametrize("kind,expected", [
    # values at steps 0 (before), 100 (start), 150 (middle), 200 (end), 300 (after) for start 2, end 0.5
    ("constant", [2.0, 2.0, 2.0, 2.0, 2.0]),
    ("linear", [2.0, 2.0, 1.25, 0.5, 0.5]),
    ("cosine", [2.0, 2.0, 1.25, 0.5, 0.5]),
    ("exponential", [2.0, 2.0, 1.0, 0.5, 0.5]),
])
def test_schedule_values_at_start_middle_end_and_outside(kind, expected):
    got = [schedule_value(step, kind, 2.0, 0.5, 100, 200) for step in (0, 100, 150, 200, 300)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(isinstance(v, float) for v in got)


def test_schedule_shapes_between_the_ends():
    # a quarter of the way: linear 3/4 of start, cosine closer to start (slow start), exponential geometric
    assert schedule_value(25, "linear", 1.0, 0.0, 0, 100) == pytest.approx(0.75)
    assert schedule_value(25, "cosine", 1.0, 0.0, 0, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert schedule_value(25, "exponential", 1.0, 1e-4, 0, 100) == pytest.approx(0.1)


def test_schedule_with_an_empty_window_steps_at_start_step():
    assert schedule_value(9, "linear", 0.0, 1.0, 10, 10) == 0.0
    assert schedule_value(10, "linear", 0.0, 1.0, 10, 10) == 1.0
    assert schedule_value(50, "cosine", 0.0, 1.0, 10, 5) == pytest.approx(1.0)


def test_schedule_errors():
    for start, end in [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)]:
        with pytest.raises(ValueError, match="exponential"):
            schedule_value(0, "exponential", start, end, 0, 10)
    with pytest.raises(ValueError, match="kind"):
        schedule_value(0, "step", 1.0, 0.0, 0, 10)


def test_parse_schedule_good_strings():
    assert parse_schedule("linear:0:1:0:2000") == {"kind": "linear", "start": 0.0, "end": 1.0, "start_step": 0,
                                                   "end_step": 2000}
    constant = {"kind": "constant", "start": 0.5, "end": 0.5, "start_step": 0, "end_step": 0}
    assert parse_schedule("constant:0.5") == constant
    assert parse_schedule("0.5") == constant and parse_schedule(0.5) == constant
    assert parse_schedule(2) == {**constant, "start": 2.0, "end": 2.0}
    sched = parse_schedule("exponential:1:1e-3:100:1100")
    assert schedule_value(600, **sched) == pytest.approx(math.sqrt(1e-3))
    assert set(SCHEDULE_KINDS) == {"constant", "linear", "cosine", "exponential"}
    for kind in SCHEDULE_KINDS:
        assert parse_schedule(f"{kind}:1:2:0:10")["kind"] == kind


@pytest.mark.parametrize("spec", ["", "linear", "linear:0:1", "linear:0:1:0", "linear:a:1:0:10", "linear:0:1:0:1.5",
                                  "step:0:1:0:10", "constant:", "constant:x", "0.5:linear", "nan", "linear:0:1:-5:10",
                                  "exponential:0:1:0:10", None, True])
def test_parse_schedule_bad_strings(spec):
    with pytest.raises(ValueError) as info:
        parse_schedule(spec)
    message = str(info.value)
    assert "\n" not in message
    assert "expected" in message or "exponential" in message


def test_gaussian_kl_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(10)
    mu_t, mu_s = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    s_t = torch.rand(50, generator=g, dtype=torch.float64) * 2 + 0.05
    s_s = torch.rand(50, generator=g, dtype=torch.float64) * 2 + 0.05
    kl = gaussian_kl(mu_t, s_t, mu_s, s_s)
    for k in range(50):
        a, s, b, u = mu_t[k].item(), s_t[k].item(), mu_s[k].item(), s_s[k].item()
        assert kl[k].item() == pytest.approx(math.log(u / s) + (s**2 + (a - b) ** 2) / (2 * u**2) - 0.5, rel=1e-10)
    normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(normal(mu_t, s_t), normal(mu_s, s_s))
    torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)
    assert (kl >= 0).all()
    assert gaussian_kl(mu_t, s_t, mu_t, s_t).abs().max().item() < 1e-14


def brute_force_distillation(student, teacher):
    """(bce, gauss) per-frame sums by explicit loops over frames, channels, pixels and dims."""
    s, t = student.double().tolist(), teacher.double().tolist()
    batch, _, height, width = student.shape

    def kl(a, sa, b, sb):
        return math.log(sb / sa) + (sa**2 + (a - b) ** 2) / (2 * sb**2) - 0.5

    bce_sum = gauss_sum = 0.0
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                p_t = []
                for o in (CH1_SLICE.start, CH2_SLICE.start):
                    ps, pt = s[b][o + P_CH][i][j], t[b][o + P_CH][i][j]
                    p_t.append(pt)
                    bce_sum -= pt * math.log(ps) + (1 - pt) * math.log(1 - ps)
                    for d in range(4):
                        mu, sg = o + MU_CH.start + d, o + SIGMA_CH.start + d
                        gauss_sum += pt * kl(t[b][mu][i][j], t[b][sg][i][j], s[b][mu][i][j], s[b][sg][i][j])
                sd_t, sd_s = math.exp(t[b][LOGVAR_CH][i][j] / 2), math.exp(s[b][LOGVAR_CH][i][j] / 2)
                gauss_sum += max(p_t) * kl(t[b][RATIO_CH][i][j], sd_t, s[b][RATIO_CH][i][j], sd_s)
    return bce_sum / batch, gauss_sum / batch


def test_distillation_terms_match_brute_force_and_detach_the_teacher():
    student = random_output(2, 3, 4, seed=11).requires_grad_(True)
    teacher = random_output(2, 3, 4, seed=12).requires_grad_(True)
    terms = distillation_terms(student, teacher)
    bce, gauss = brute_force_distillation(student.detach(), teacher.detach())
    assert terms["distill/p"].item() == pytest.approx(bce, rel=1e-10)
    assert terms["distill/gauss"].item() == pytest.approx(gauss, rel=1e-10)
    (terms["distill/p"] + terms["distill/gauss"]).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_distillation_is_minimal_when_the_student_copies_the_teacher():
    teacher = random_output(2, 4, 4, seed=13)
    student = teacher.clone().requires_grad_(True)
    terms = distillation_terms(student, teacher)
    assert abs(terms["distill/gauss"].item()) < 1e-12
    entropy = 0.0
    for o in (CH1_SLICE.start, CH2_SLICE.start):
        p = teacher[:, o + P_CH]
        entropy += -(p * p.log() + (1 - p) * (1 - p).log()).sum().item() / teacher.shape[0]
    assert terms["distill/p"].item() == pytest.approx(entropy, rel=1e-10)
    (terms["distill/p"] + terms["distill/gauss"]).backward()
    assert student.grad.abs().max().item() < 1e-9                 # a stationary point: BCE and KL are minimal
    moved = distillation_terms(random_output(2, 4, 4, seed=14), teacher)
    assert moved["distill/p"].item() > entropy and moved["distill/gauss"].item() > 0


def test_distillation_float32_and_shape_errors():
    student, teacher = random_output(1, 4, 4, seed=15, dtype=torch.float16), random_output(1, 4, 4, seed=16)
    terms = distillation_terms(student, teacher)
    assert terms["distill/p"].dtype == torch.float32 and torch.isfinite(terms["distill/gauss"])
    with pytest.raises(ValueError, match="student and teacher"):
        distillation_terms(student[:, :10], teacher[:, :10])
    with pytest.raises(ValueError, match="student and teacher"):
        distillation_terms(student, teacher[:, :, :2])

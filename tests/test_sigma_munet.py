import math

import pytest
import torch

from losses.smlm import gmm_loss
from models.sigma_munet import BG_CH, MU_CH, N_CHANNELS, P_BIAS_INIT, P_CH, SIGMA_CH, SIGMA_EPS, SIGMA_SCALE, SigmaMUNet

TINY = dict(initial_features=8, inter_features=8, depth_shared=2, depth_union=2)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def tiny(**kw):
    torch.manual_seed(0)
    return SigmaMUNet(**{**TINY, **kw})


def test_output_shape_and_channel_ranges_even_when_saturated():
    model = tiny()
    # Blow up the head outputs so every activation is driven to its limits, which exercises the clamps.
    with torch.no_grad():
        for head in model.heads.values():
            head[-1].weight.normal_(0.0, 30.0)
    x = torch.randn(2, 3, 16, 12) * 10
    out = model(x)
    assert out.shape == (2, N_CHANNELS, 16, 12)
    p, mu, sigma, bg = out[:, P_CH], out[:, MU_CH], out[:, SIGMA_CH], out[:, BG_CH]
    p_lo, p_hi = torch.sigmoid(torch.tensor(-8.0)), torch.sigmoid(torch.tensor(8.0))
    assert p.min() >= p_lo - 1e-7 and p.max() <= p_hi + 1e-7
    assert mu[:, 0].min() >= 0 and mu[:, 0].max() <= 1
    assert mu[:, 1:].min() >= -1 and mu[:, 1:].max() <= 1
    assert sigma.min() >= SIGMA_EPS - 1e-7 and sigma.max() <= SIGMA_SCALE + SIGMA_EPS + 1e-6
    assert bg.min() >= 0 and bg.max() <= 1
    # Saturation really happened, so the bounds above were reached rather than trivially satisfied.
    assert (p - p_lo).abs().min() < 1e-6 or (p - p_hi).abs().min() < 1e-6
    assert mu[:, 1:].abs().max() > 0.999


def test_init_p_bias_kaiming_and_neutral_heads():
    model = SigmaMUNet()
    assert torch.all(model.heads["p"][-1].bias == P_BIAS_INIT)
    for name in ("mu", "sigma", "bg"):
        assert torch.all(model.heads[name][-1].bias == 0) and torch.all(model.heads[name][-1].weight == 0)
    # Bright frames (a spot of 7 scaled units, as 10,000 photons give) still start at the neutral outputs:
    # offsets and z exactly 0, photons and bg 0.5, sigmas 1.5 + eps, not at the limits of their activations.
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, 6:9, 6:9] = 7.0
    out = tiny()(x)
    assert torch.all(out[:, MU_CH][:, 1:] == 0) and torch.all(out[:, MU_CH][:, 0] == 0.5)
    assert torch.allclose(out[:, SIGMA_CH], torch.full_like(out[:, SIGMA_CH], 0.5 * SIGMA_SCALE + SIGMA_EPS))
    assert torch.all(out[:, BG_CH] == 0.5)
    w = model.unet_union.base[2].weight                     # conv3x3 192 -> 192, fan_in 1728
    assert w.std().item() == pytest.approx(math.sqrt(2 / w[0].numel()), rel=0.02)
    assert float(model.sigma_eps) == pytest.approx(SIGMA_EPS) and "sigma_eps" not in dict(model.named_parameters())
    out = tiny()(torch.zeros(1, 3, 8, 8))
    # With zero input only biases and the -6 p bias shape the output: p = sigmoid(-6) + small terms.
    assert out[:, P_CH].mean().item() == pytest.approx(1 / (1 + math.exp(6)), rel=0.5)


def test_frames_share_the_per_frame_unet():
    model = tiny()
    x = torch.randn(2, 3, 8, 8)
    seen = {}
    # A forward hook that returns a value replaces the module output, so this one returns None.
    model.unet_union.register_forward_hook(lambda m, args, out: seen.update(union_in=args[0]))
    model(x)
    feats = seen["union_in"]                                  # (B, 3*I, H, W), frame-major
    inter = TINY["inter_features"]
    for k in range(3):
        alone = model.unet_shared(x[:, k:k + 1])
        torch.testing.assert_close(feats[:, k * inter:(k + 1) * inter], alone, atol=1e-5, rtol=1e-5)
    # Swapping frames t-1 and t+1 only permutes the union input; the output changes through the union net.
    swapped = model(x[:, [2, 1, 0]])
    assert not torch.allclose(swapped, model(x))


def test_gradients_reach_every_parameter_through_gmm_loss():
    model = tiny()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    emitters = torch.stack([torch.rand(2, 3), torch.rand(2, 3) * 7, torch.rand(2, 3) * 7,
                            torch.rand(2, 3) * 2 - 1], dim=-1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # The mu, sigma and bg heads' output convs start at zero, so on the first update nothing flows back into
    # their hidden convs; the U-Nets learn through the p head from the start, and after one step every
    # parameter has a gradient.
    blocked = {f"heads.{name}.0.{kind}" for name in ("mu", "sigma", "bg") for kind in ("weight", "bias")}
    for step in range(2):
        optimizer.zero_grad()
        loss, parts = gmm_loss(model(x), emitters, mask, torch.rand(2, 8, 8), count_times_num_emitters=True)
        assert torch.isfinite(loss)
        loss.backward()
        for name, prm in model.named_parameters():
            reached = prm.grad is not None and prm.grad.abs().sum() > 0
            assert reached == (step > 0 or name not in blocked), (step, name)
        optimizer.step()


@pytest.mark.parametrize("depth, size, ok", [(1, (6, 10), True), (1, (7, 8), False), (2, (12, 20), True),
                                             (2, (18, 16), False), (0, (7, 5), True)])
def test_size_rule(depth, size, ok):
    model = tiny(depth_shared=depth, depth_union=depth)
    x = torch.randn(1, 3, *size)
    if ok:
        assert model(x).shape == (1, N_CHANNELS, *size)
    else:
        with pytest.raises(ValueError, match=f"multiple of {2 ** depth}"):
            model(x)


def test_wrong_frame_count_raises():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny()(torch.randn(1, 1, 8, 8))
    assert tiny(n_frames=1)(torch.randn(1, 1, 8, 8)).shape == (1, N_CHANNELS, 8, 8)


def test_parameter_count_default_and_scaling():
    assert n_params(SigmaMUNet()) == 2_199_418                # smlm.md §2.1: ~2.20 M
    base = n_params(tiny())
    assert n_params(tiny(depth_shared=1, depth_union=1)) < base
    assert n_params(tiny(depth_union=3)) > base
    assert n_params(tiny(initial_features=16, inter_features=16)) > base
    assert n_params(tiny(activation="relu", pool_mode="max")) < base   # max-pool has no weights

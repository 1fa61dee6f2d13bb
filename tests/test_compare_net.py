import itertools

import pytest
import torch
import torch.nn.functional as F

from models.compare_net import (
    CBAM,
    HEADS,
    BasicBlock,
    Bottleneck,
    CosineHead,
    L2Head,
    MLPHead,
    ResidualHead,
    ResNetCompareNet,
    ResNetEncoder,
    SEBlock,
)

B = 4  # pairs; the encoder sees 2B images, the head BatchNorm1d sees B rows
TINY = dict(width_mult=0.25, layers=(1, 1, 1), feat_dim=16)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def pair_batch(b=B):
    return torch.rand(b, 1, 28, 28), torch.rand(b, 1, 28, 28)


def calibrated_eval(model, a, b):
    """Eval mode with BN running stats set to this batch's statistics; straight after init they are (0, 1)
    and every pair would get nearly the same logit, which would make order checks vacuous."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass stores the batch statistics exactly
    with torch.no_grad():
        model.train()(a, b)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CONFIGS = list(itertools.product(("resnet", "fpn"), ("basic", "bottleneck"), ("none", "se", "cbam"), HEADS + ("fusion",)))


@pytest.mark.parametrize("arch,block,attention,head", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_shape_and_every_parameter_gets_a_gradient(arch, block, attention, head):
    fusion = head == "fusion"
    model = ResNetCompareNet(arch=arch, block=block, attention=attention, fusion=fusion,
                             head="concat" if fusion else head, **TINY).train()
    a, b = pair_batch()
    logits = model(a, b)
    assert logits.shape == (B,)
    F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"dead parameter {name}"
        assert torch.isfinite(p.grad).all(), name
        # stricter than "not None": a parameter whose effect is cancelled (e.g. a bias before BatchNorm) gets zeros
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("head", [h for h in HEADS if h != "concat"])
def test_symmetric_heads_ignore_pair_order(head):
    a, b = pair_batch()
    model = calibrated_eval(ResNetCompareNet(fusion=False, head=head, **TINY), a, b)
    with torch.no_grad():
        ab, ba = model(a, b), model(b, a)
    assert ab.std() > 1e-3  # pairs get different logits, so equality below is not trivial
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-6)


def test_concat_head_and_fusion_depend_on_pair_order():
    # the negative control for the symmetry test: the same check must fail for an order-dependent head
    a, b = pair_batch()
    for kwargs in (dict(fusion=False, head="concat"), dict(fusion=True)):
        model = calibrated_eval(ResNetCompareNet(**kwargs, **TINY), a, b)
        with torch.no_grad():
            assert (model(a, b) - model(b, a)).abs().max() > 1e-3, kwargs


def test_fusion_weights_are_a_softmax_that_learns():
    model = ResNetCompareNet(fusion=True, **TINY)
    w0 = model.fusion_weights()
    assert tuple(w0) == HEADS
    assert sum(w0.values()) == pytest.approx(1.0)
    assert all(v == pytest.approx(1 / len(HEADS)) for v in w0.values())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    a, b = pair_batch()
    F.binary_cross_entropy_with_logits(model(a, b), torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    opt.step()
    w1 = model.fusion_weights()
    assert sum(w1.values()) == pytest.approx(1.0)
    assert max(abs(w1[k] - w0[k]) for k in HEADS) > 1e-6


def test_fusion_output_is_the_weighted_sum_of_head_logits():
    a, b = pair_batch()
    model = calibrated_eval(ResNetCompareNet(fusion=True, **TINY), a, b)
    with torch.no_grad():
        model.fusion_logits.copy_(torch.arange(len(HEADS), dtype=torch.float32))
        fa, fb = model.embed(torch.cat([a, b])).chunk(2)
        weights = model.fusion_weights()
        expected = sum(weights[name] * model.heads[name](fa, fb) for name in HEADS)
        torch.testing.assert_close(model(a, b), expected)


HEAD_CLASSES = {"diff": MLPHead, "concat": MLPHead, "product": MLPHead, "cosine": CosineHead, "l2": L2Head,
                "residual": ResidualHead}


@pytest.mark.parametrize("head", HEADS)
def test_single_head_model_builds_only_that_head(head):
    model = ResNetCompareNet(fusion=False, head=head, **TINY)
    assert model.fusion_weights() == {}
    assert model.fusion_logits is None
    assert not any("fusion" in name for name, _ in model.named_parameters())
    assert list(model.heads) == [head]
    head_modules = [m for m in model.modules() if isinstance(m, tuple(set(HEAD_CLASSES.values())))]
    assert len(head_modules) == 1 and isinstance(head_modules[0], HEAD_CLASSES[head])
    if head in ("diff", "concat", "product"):
        assert head_modules[0].combine == head


def test_fusion_model_builds_all_heads_and_head_argument_is_unused():
    a = ResNetCompareNet(fusion=True, head="concat", **TINY)
    b = ResNetCompareNet(fusion=True, head="l2", **TINY)
    assert list(a.heads) == list(HEADS) == list(a.head_names)
    assert n_params(a) == n_params(b)
    fused = n_params(a) - n_params(a.heads)
    single = ResNetCompareNet(fusion=False, head="concat", **TINY)
    assert fused == n_params(single) - n_params(single.heads) + len(HEADS)  # only the 6 fusion logits differ


def test_encoder_runs_once_per_forward():
    model = ResNetCompareNet(**TINY)
    batches = []
    model.encoder.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    model(*pair_batch())
    assert batches == [2 * B]


def test_forward_rejects_mismatched_pair_shapes():
    model = ResNetCompareNet(**TINY)
    with pytest.raises(ValueError, match="same shape"):
        model(torch.rand(B, 1, 28, 28), torch.rand(B - 1, 1, 28, 28))


def test_se_block_scales_channels_by_gates_in_unit_interval():
    se = SEBlock(32)
    x = torch.rand(2, 32, 7, 7) + 0.5  # strictly positive so out / x is the gate
    out = se(x)
    assert out.shape == x.shape
    gate = out / x
    torch.testing.assert_close(gate, gate[:, :, :1, :1].expand_as(gate))  # one gate per (sample, channel)
    assert (gate > 0).all() and (gate < 1).all()
    assert gate[:, :, 0, 0].std() > 0  # not a constant scale


def test_cbam_has_channel_and_spatial_attention():
    cbam = CBAM(32)
    x = torch.rand(2, 32, 14, 14, requires_grad=True)
    out = cbam(x)
    assert out.shape == x.shape
    channel_gate = cbam.channel(x)
    spatial_gate = cbam.spatial(x * channel_gate)
    assert channel_gate.shape == (2, 32, 1, 1) and spatial_gate.shape == (2, 1, 14, 14)
    assert spatial_gate.flatten(1).std(1).min() > 1e-3  # varies over positions
    assert channel_gate.flatten(1).std(1).min() > 1e-3  # varies over channels
    torch.testing.assert_close(out, x * channel_gate * spatial_gate)
    out.square().sum().backward()
    for part in (cbam.channel, cbam.spatial):
        for name, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cbam_channel_attention_uses_max_pooling():
    cbam = CBAM(16)
    x = torch.zeros(1, 16, 8, 8)
    x[:, :, 0, 0] = 64.0  # per-channel mean 1, max 64
    y = torch.ones(1, 16, 8, 8)  # per-channel mean 1, max 1: same avg-pool descriptor
    # an avg-pool-only channel gate (SE) could not tell these apart
    assert not torch.allclose(cbam.channel(x), cbam.channel(y))


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_attention_gates_the_residual_branch(block_cls, attention):
    block = block_cls(8, 8, stride=2, attention=attention).eval()
    x = torch.rand(2, 8, 14, 14)
    out_ch = 8 * block_cls.expansion
    assert block(x).shape == (2, out_ch, 7, 7)
    with torch.no_grad():
        branch = block.branch(x)
        expected = F.relu(block.attention(branch) + block.shortcut(x))
        torch.testing.assert_close(block(x), expected)
        assert not torch.allclose(block.attention(branch), branch)


def test_fpn_uses_every_stage():
    model = ResNetCompareNet(arch="fpn", **TINY)
    a, b = pair_batch()
    F.binary_cross_entropy_with_logits(model(a, b), torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    assert len(model.pyramid.lateral) == len(model.encoder.stages) == 3
    for i, (lat, smooth) in enumerate(zip(model.pyramid.lateral, model.pyramid.smooth)):
        assert lat.weight.grad.abs().sum() > 0, f"lateral conv of stage {i}"
        assert smooth.weight.grad.abs().sum() > 0, f"smoothing conv of level {i}"
    # every level is pooled into the embedding: 3 levels x round(128 * 0.25) channels
    assert model.embed_mlp[0].in_features == 3 * 32
    # stage 1 reaches the output directly through its lateral conv, not only through stages 2-3
    calibrated_eval(model, a, b)
    with torch.no_grad():
        before = model(a, b)
        model.pyramid.lateral[0].weight.zero_()
        assert (model(a, b) - before).abs().max() > 1e-5


def test_fpn_pyramid_levels_match_stage_resolutions():
    model = ResNetCompareNet(arch="fpn", width_mult=0.25, layers=(1, 1, 1, 1), feat_dim=16)
    feats = model.encoder(torch.rand(2, 1, 28, 28))
    levels = model.pyramid(feats)
    assert [f.shape[-1] for f in feats] == [28, 14, 7, 4]
    assert [p.shape[-2:] for p in levels] == [f.shape[-2:] for f in feats]
    assert all(p.shape[1] == 32 for p in levels)
    assert model(*pair_batch()).shape == (B,)


def test_encoder_depth_and_width():
    def count_blocks(m):
        return sum(isinstance(x, (BasicBlock, Bottleneck)) for x in m.modules())

    assert count_blocks(ResNetEncoder(layers=(2, 2, 2))) == 6
    assert count_blocks(ResNetEncoder(layers=(3, 3, 3))) == 9
    assert n_params(ResNetEncoder(layers=(3, 3, 3))) > n_params(ResNetEncoder(layers=(2, 2, 2)))
    assert ResNetEncoder(width_mult=0.25).out_channels == [16, 32, 64]
    assert ResNetEncoder(width_mult=0.5).out_channels == [32, 64, 128]
    assert ResNetEncoder(width_mult=0.25, block="bottleneck").out_channels == [64, 128, 256]
    feats = ResNetEncoder(layers=(1, 1, 1), width_mult=0.25)(torch.rand(2, 1, 28, 28))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)]


def test_default_model_size():
    # the original's ResNetCompareNet was ~3-5 M parameters; numbers also in the module docstring
    model = ResNetCompareNet()
    assert n_params(model) == 3_720_582
    assert n_params(model.encoder) == 2_796_408


@pytest.mark.parametrize("kwargs,arg", [
    (dict(arch="vit"), "arch"),
    (dict(block="wide"), "block"),
    (dict(attention="eca"), "attention"),
    (dict(head="bilinear"), "head"),
    (dict(width_mult=0.0), "width_mult"),
    (dict(width_mult=-1.0), "width_mult"),
    (dict(feat_dim=0), "feat_dim"),
    (dict(layers=()), "layers"),
    (dict(layers=(2, 0, 2)), "layers"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(input_norm="batch"), "input_norm"),
    (dict(digit_classes=-1), "digit_classes"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        ResNetCompareNet(**kwargs)


def test_per_image_norm_makes_the_model_blind_to_contrast_and_brightness():
    # A digit and the same digit at 20 % contrast on a grey offset reach the encoder as the same image with
    # per_image normalisation (up to its eps), and as different images without it.
    torch.manual_seed(0)
    a = torch.rand(3, 1, 28, 28)
    dim_a = 0.2 * a + 0.3
    gaps = {}
    for norm in ("per_image", "none"):
        torch.manual_seed(1)   # the same weights for both
        model = ResNetCompareNet(width_mult=0.25, feat_dim=16, layers=(1, 1), input_norm=norm).eval()
        with torch.no_grad():
            first_stage = [model.encoder(model.normalize(x))[0] for x in (a, dim_a)]
        gaps[norm] = (first_stage[0] - first_stage[1]).abs().max().item()
    assert gaps["per_image"] < 0.05 * gaps["none"], gaps   # what remains is eps / std of the dim digit
    model = ResNetCompareNet(width_mult=0.25, feat_dim=16, layers=(1, 1), input_norm="per_image")
    normed = model.normalize(torch.cat([a, torch.zeros(1, 1, 28, 28)]))
    assert torch.allclose(normed[:3].mean((1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(normed[:3].std((1, 2, 3)), torch.ones(3), atol=1e-2)
    assert torch.equal(normed[3], torch.zeros(1, 28, 28))   # a blank image stays finite


def test_digit_head_is_optional_and_leaves_the_pair_logit_alone():
    torch.manual_seed(0)
    a, b = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    kwargs = dict(width_mult=0.25, feat_dim=16, layers=(1, 1))
    plain = ResNetCompareNet(**kwargs).eval()
    torch.manual_seed(0)
    with_head = ResNetCompareNet(**kwargs, digit_classes=10).eval()
    assert plain.digit_head is None and with_head.digit_head.out_features == 10
    with torch.no_grad():
        logits, digits_a, digits_b = with_head(a, b, return_digits=True)
        assert torch.equal(logits, with_head(a, b)) and digits_a.shape == digits_b.shape == (4, 10)
        # the digit logits of a are those of a's own embedding, whichever image it is paired with
        _, again_a, _ = with_head(a, torch.rand(4, 1, 28, 28), return_digits=True)
        assert torch.allclose(digits_a, again_a, atol=1e-6)
    with pytest.raises(ValueError, match="digit_classes"):
        plain(a, b, return_digits=True)
    # training: the digit loss reaches the encoder, the pair loss alone never reaches the digit head
    model = ResNetCompareNet(**kwargs, digit_classes=10)
    logits, digits_a, digits_b = model(a, b, return_digits=True)
    logits.sum().backward(retain_graph=True)
    assert model.digit_head.weight.grad is None
    (digits_a.sum() + digits_b.sum()).backward()
    assert model.digit_head.weight.grad.abs().sum() > 0

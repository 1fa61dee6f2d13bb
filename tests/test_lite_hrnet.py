import math

import pytest
import torch

from models.lite_hrnet import (
    BLOCKS_PER_MODULE,
    REDUCE_RATIO,
    SE_RATIO,
    STAGE_MODULES,
    STAGE_WIDTHS,
    ConditionalChannelWeighting,
    LiteHRNet18,
    LiteHRNet18FPN,
    channel_shuffle,
    concat_shuffle,
    pool_canvas,
)

# tiny but still divisible by 32: branch grids 16x32, 8x16, 4x8, 2x4
B, H, W = 2, 64, 128


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("with_angle", [True, False])
def test_output_keys_shapes_and_ranges(with_angle):
    model = LiteHRNet18FPN(in_chans=4, with_angle=with_angle)
    with torch.no_grad():
        out = model(torch.randn(B, 4, H, W))
    expected = {"gap": 1, "slider": 1, "offset": 4}
    if with_angle:
        expected["angle"] = 2
    assert set(out) == set(expected)
    for key, ch in expected.items():
        assert out[key].shape == (B, ch, H // 4, W // 4), key
    assert (out["offset"].abs() < 0.5).all()
    if with_angle:
        torch.testing.assert_close(out["angle"].norm(dim=1), torch.ones(B, H // 4, W // 4))


def test_input_not_divisible_by_32_is_rejected():
    with pytest.raises(ValueError):
        LiteHRNet18FPN()(torch.randn(1, 4, 48, 128))


def test_input_scale_runs_the_same_network_on_the_pooled_canvas():
    full = LiteHRNet18FPN(in_chans=4, fpn_channels=16, head_channels=16)
    half = LiteHRNet18FPN(in_chans=4, fpn_channels=16, head_channels=16, input_scale=2)
    half.load_state_dict(full.state_dict())   # the same parameters: only the input differs
    full.eval(), half.eval()
    x = torch.rand(B, 4, 2 * H, 2 * W)
    x[:, 3] = 1.0
    x[0, 3, :, :7] = 0.0   # padding on the left; a 2x2 block with one padded pixel is padding after pooling
    with torch.no_grad():
        got, ref = half(x), full(pool_canvas(x, 2))
    assert half.stride == 8 and full.stride == 4 and got["gap"].shape == (B, 1, H // 4, W // 4)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])
    pooled = pool_canvas(x, 2)
    torch.testing.assert_close(pooled[:, :3], torch.nn.functional.avg_pool2d(x[:, :3], 2))
    assert pooled[0, 3, :, :3].eq(0).all() and pooled[0, 3, :, 4:].eq(1).all()   # pixel 6 padded: column 3 too
    assert pooled[0, 3, :, 3].eq(0).all() and pooled[1, 3].eq(1).all()
    with pytest.raises(ValueError, match="divisible by 64"):
        half(torch.rand(1, 4, 96, 128))
    quarter = LiteHRNet18FPN(in_chans=4, fpn_channels=16, head_channels=16, input_scale=4).eval()
    quarter.load_state_dict(full.state_dict())
    x4 = torch.rand(1, 4, 4 * H, 4 * W)
    x4[:, 3] = 1.0
    with torch.no_grad():
        got4, ref4 = quarter(x4), full(pool_canvas(x4, 4))
    assert quarter.stride == 16 and got4["gap"].shape == (1, 1, H // 4, W // 4)
    torch.testing.assert_close(got4["offset"], ref4["offset"])
    for bad in ({"input_scale": 3}, {"input_scale": 2.0}, {"input_scale": True}, {"input_scale": 2, "in_chans": 3}):
        with pytest.raises(ValueError, match="input_scale"):
            LiteHRNet18FPN(**bad)


def test_backward_reaches_every_parameter():
    model = LiteHRNet18FPN(in_chans=4, with_angle=True)
    out = model(torch.randn(B, 4, H, W))
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_heatmap_prior_survives_construction():
    model = LiteHRNet18FPN()
    prior_bias = -math.log((1 - 0.1) / 0.1)  # -2.1972
    for head in (model.gap_head, model.slider_head):
        assert torch.allclose(head[-1].bias, torch.full_like(head[-1].bias, prior_bias), atol=1e-3)
        assert head[-1].weight.std() < 0.01  # N(0, 0.001); Kaiming fan_out of a 1-output 1x1 conv would give std 1.41
    with torch.no_grad():
        out = model(torch.randn(B, 4, H, W))
    for key in ("gap", "slider"):
        assert abs(torch.sigmoid(out[key]).mean().item() - 0.1) < 0.01, key
    # offsets start at the cell centre instead of a saturated tanh
    assert out["offset"].abs().max() < 0.1


def test_parameter_counts():
    # Paper Lite-HRNet-18 = 1.1 M (COCO 256x192 config) counts backbone + IterativeHead + TopDownSimpleHead:
    #   IterativeHead DW-separable convs (dw 3x3 + BN, pw 1x1 + BN) 320->160, 160->80, 80->40, 40->40:
    #     (2880+640+51200+320) + (1440+320+12800+160) + (720+160+3200+80) + (360+80+1600+80) = 76,040
    #   final 1x1 conv 40->17 joints with bias: 697
    #   1,054,032 + 76,040 + 697 = 1,130,769 ~ the paper's "1.1 M".
    assert n_params(LiteHRNet18(in_chans=3)) == 1_054_032
    # in_chans=4 adds 32*9 stem weights; LiteFPN(64) 53,318; four 64-ch heads 148,488
    assert n_params(LiteHRNet18(in_chans=4)) == 1_054_032 + 32 * 9
    assert n_params(LiteHRNet18FPN(in_chans=4)) == 1_256_126
    assert n_params(LiteHRNet18FPN(in_chans=4, with_angle=False)) == 1_219_004


def test_structure_is_lite_hrnet_18():
    model = LiteHRNet18(in_chans=3)
    assert [len(stage) for stage in model.stages] == list(STAGE_MODULES) == [2, 4, 2]
    assert STAGE_WIDTHS[-1] == (40, 80, 160, 320)
    for stage, widths in zip(model.stages, STAGE_WIDTHS):
        for module in stage:
            assert module.channels == list(widths)
            assert len(module.blocks) == BLOCKS_PER_MODULE == 2
            assert all(isinstance(b, ConditionalChannelWeighting) for b in module.blocks)
            for block in module.blocks:
                half = [c // 2 for c in widths]
                crw = block.cross_resolution_weighting
                assert crw.conv1[0].out_channels == int(sum(half) / REDUCE_RATIO)
                assert REDUCE_RATIO == 8 and SE_RATIO == 4
                assert [sw.conv1.out_channels for sw in block.spatial_weighting] == [c // 4 for c in half]
                assert [dw[0].groups for dw in block.depthwise_convs] == half
    feats = model(torch.randn(1, 3, H, W))
    assert [tuple(f.shape) for f in feats] == [
        (1, 40, H // 4, W // 4),
        (1, 80, H // 8, W // 8),
        (1, 160, H // 16, W // 16),
        (1, 320, H // 32, W // 32),
    ]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_shuffle_is_the_shufflenet_permutation(memory_format):
    c, groups = 6, 2
    x = torch.arange(c, dtype=torch.float32).view(1, c, 1, 1).expand(2, c, 3, 4).contiguous(memory_format=memory_format)
    y = channel_shuffle(x, groups)
    assert y.is_contiguous(memory_format=memory_format)
    order = y[0, :, 0, 0].long().tolist()
    assert order == [0, 3, 1, 4, 2, 5]
    assert sorted(order) == list(range(c))
    torch.testing.assert_close(y[:, :, 1:, 2:], y[:, :, :1, :1].expand(2, c, 2, 2))

    a = torch.randn(2, 3, 5, 4).contiguous(memory_format=memory_format)
    b = torch.randn(2, 3, 5, 4).contiguous(memory_format=memory_format)
    fused = concat_shuffle(a, b, channels_last=memory_format == torch.channels_last)
    assert torch.equal(fused, channel_shuffle(torch.cat([a, b], 1), 2))
    assert fused.is_contiguous(memory_format=memory_format)


def test_channels_last_matches_contiguous():
    model = LiteHRNet18FPN().eval()
    x = torch.randn(1, 4, H, W)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        out = model(x_cl)
        feats = model.backbone(x_cl)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)
    # no silent fall-back to NCHW inside the backbone (shuffles keep the layout)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)


def test_bf16_autocast_forward():
    # GPU training runs under bf16 autocast; CPU autocast exercises the same dtype paths (fusion weights, normalize)
    model = LiteHRNet18FPN().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 4, H, W))
    for key, v in out.items():
        assert v.shape[-2:] == (H // 4, W // 4), key
        assert torch.isfinite(v.float()).all(), key
    assert (out["offset"].float().abs() <= 0.5).all()

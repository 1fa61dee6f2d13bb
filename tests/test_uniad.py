import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.uniad import (
    EncoderLayer,
    QueryDecoderLayer,
    UniAD,
    UniADReconstruction,
    mfcn,
    neighbor_mask,
)
from training.export import build_model, check_weights_fit, model_record

# test_efficientnet out_indices (0, 1, 2, 3): 16 + 24 + 32 + 48 channels at strides 2, 4, 8, 16; a 64 px input
# gives a 4 x 4 map, on which the default 7 x 7 window would block every key, hence neighbor_size 3.
TINY = dict(backbone="test_efficientnet", input_size=64, neighbor_size=3, hidden_dim=32, num_heads=4,
            num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64)
TINY_CHANNELS = 120


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def tiny(**kw):
    torch.manual_seed(0)
    return UniAD(**{**TINY, **kw})


def images(b=2, size=64):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_shapes_end_to_end_and_only_the_reconstruction_learns():
    model = tiny().train()
    out = model(images())
    assert model.channels == TINY_CHANNELS and model.feature_stride == 16 and model.feature_size == (4, 4)
    assert out["feature_align"].shape == out["feature_rec"].shape == (2, TINY_CHANNELS, 4, 4)
    F.mse_loss(out["feature_rec"], out["feature_align"]).backward()
    for name, p in model.reconstruction.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("size,expected", [(72, (5, 5)), (100, (7, 7))])
def test_input_sizes_that_are_not_multiples_of_the_stride(size, expected):
    # The backbone gives ceil(size / 16) at stride 16; every level is resized to exactly that grid.
    model = tiny(input_size=size).eval()
    assert model.feature_size == expected
    assert model(images(size=size))["feature_rec"].shape == (2, TINY_CHANNELS, *expected)


def test_configurable_feature_stride_upsamples_the_coarse_levels():
    model = tiny(feature_stride=8, out_indices=[1, 2, 3]).eval()
    assert model.channels == 24 + 32 + 48 and model.feature_size == (8, 8)
    assert model.features(images()).shape == (2, 104, 8, 8)


def test_mfcn_matches_align_corners_upsampling_module():
    feats = [torch.randn(1, 2, 112, 112), torch.randn(1, 3, 28, 28), torch.randn(1, 4, 14, 14)]
    out = mfcn(feats, (14, 14))
    expected = torch.cat([torch.nn.UpsamplingBilinear2d(scale_factor=14 / f.shape[-1])(f) for f in feats], dim=1)
    assert out.shape == (1, 9, 14, 14)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[:, 5:], feats[2])  # a level already on the grid is passed through


def test_neighbor_mask_counts_on_a_6x6_map():
    mask = neighbor_mask(6, 6, (3, 3))
    visible = (~mask).sum(-1).reshape(6, 6)
    # 36 keys minus the clipped 3 x 3 window: corner 2 x 2, edge 2 x 3, interior 3 x 3 blocked.
    assert visible[0, 0] == visible[5, 5] == visible[0, 5] == visible[5, 0] == 36 - 4
    assert visible[0, 2] == visible[3, 0] == visible[5, 3] == visible[2, 5] == 36 - 6
    assert (visible[1:5, 1:5] == 36 - 9).all()
    assert mask.diagonal().all()  # the query itself is blocked
    # Token order is row-major: token 7 = (1, 1) blocks (0..2, 0..2) and nothing else.
    assert mask[7].reshape(6, 6)[:3, :3].all() and mask[7].sum() == 9
    brute = torch.tensor([[abs(q // 6 - k // 6) <= 1 and abs(q % 6 - k % 6) <= 1 for k in range(36)]
                          for q in range(36)])
    assert torch.equal(mask, brute)


def test_neighbor_mask_on_the_default_14x14_map():
    visible = (~neighbor_mask(14, 14, (7, 7))).sum(-1)
    assert visible.min() == 196 - 49 and visible.max() == 196 - 16  # anomaly.md §1.3: 147-180


@pytest.mark.parametrize("h,w", [(1, 1), (1, 4), (2, 2), (3, 3), (4, 4), (5, 5), (4, 7), (6, 6)])
def test_window_guard_refuses_exactly_the_windows_that_leave_a_query_no_key(h, w):
    for kh in (1, 3, 5, 7, 9):
        for kw in (1, 3, 5, 7, 9):
            fully_blocked = bool(neighbor_mask(h, w, (kh, kw)).all(-1).any())
            try:
                model = UniADReconstruction(channels=4, feature_size=(h, w), hidden_dim=8, num_heads=2,
                                            num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8,
                                            neighbor_size=(kh, kw)).eval()
            except ValueError as e:
                assert fully_blocked, (h, w, kh, kw)
                assert "blocks every key" in str(e)
                continue
            assert not fully_blocked, (h, w, kh, kw)
            assert torch.isfinite(model(torch.randn(1, 4, h, w))).all()


def test_window_guard_names_the_input_size_and_the_fix():
    with pytest.raises(ValueError, match=r"7x7 .* 4x4 feature map \(input_size 64x64 / feature_stride 16\).*<= 3"):
        UniAD(**{**TINY, "neighbor_size": 7})
    with pytest.raises(ValueError, match="odd"):
        UniADReconstruction(channels=4, feature_size=14, neighbor_size=[8, 8])


def test_jitter_only_in_training():
    model = tiny(dropout=0.0)
    x = images()
    feats = model.features(x)
    model.eval()
    with torch.no_grad():
        a, b = model(feature_align=feats)["feature_rec"], model(feature_align=feats)["feature_rec"]
        assert torch.equal(a, b)
        model.train()
        c, d = model(feature_align=feats)["feature_rec"], model(feature_align=feats)["feature_rec"]
    assert not torch.allclose(c, d) and not torch.allclose(c, a)
    quiet = tiny(dropout=0.0, jitter_scale=0.0)
    with torch.no_grad():
        torch.testing.assert_close(quiet.train()(x)["feature_rec"], quiet.eval()(x)["feature_rec"])


def test_jitter_noise_scale_and_probability():
    rec = UniADReconstruction(channels=64, feature_size=4, hidden_dim=8, num_heads=2, num_encoder_layers=1,
                              num_decoder_layers=1, dim_feedforward=8, neighbor_size=1, jitter_scale=20.0)
    tokens = torch.full((8, 500, 64), 0.5)  # ||token|| = 4, so noise std = 20 * 4 / 64 = 1.25
    torch.manual_seed(0)
    noise = rec.jitter(tokens) - tokens
    assert abs(noise.std().item() - 1.25) < 0.01 and abs(noise.mean().item()) < 0.01
    rec.jitter_prob = 0.25
    jittered = (rec.jitter(tokens) != tokens).any(-1).float().mean().item()
    assert abs(jittered - 0.25) < 0.02


def test_backbone_stays_frozen_and_in_eval_through_training():
    model = tiny()
    model.train()
    assert model.training and model.reconstruction.training
    assert not any(m.training for m in model.backbone.modules())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # BN running stats included
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(images())
        F.mse_loss(out["feature_rec"], out["feature_align"]).backward()
        opt.step()
        opt.zero_grad()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.features(images()).grad_fn is None
    model.eval().train()
    assert not model.backbone.training


def test_feature_cache_gives_the_same_loss_as_recomputing():
    model = tiny()
    x = images()
    cached = model.features(x)
    for mode in (False, True):  # in training the jitter and dropout draw the same numbers under the same seed
        model.train(mode)
        torch.manual_seed(3)
        direct = model(x)
        torch.manual_seed(3)
        from_cache = model(feature_align=cached)
        torch.manual_seed(3)
        rec = model.reconstruct(cached)
        assert torch.equal(direct["feature_align"], cached)
        loss = F.mse_loss(direct["feature_rec"], direct["feature_align"])
        assert torch.equal(loss, F.mse_loss(from_cache["feature_rec"], cached))
        assert torch.equal(loss, F.mse_loss(rec, cached))


def test_forward_argument_and_shape_errors():
    model = tiny()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(images(), feature_align=torch.zeros(2, TINY_CHANNELS, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model(images(size=96))
    with pytest.raises(ValueError, match=r"\(B, 120, 4, 4\)"):
        model(feature_align=torch.zeros(2, TINY_CHANNELS, 5, 5))


def test_positions_go_to_queries_and_keys_but_not_values():
    # With identical input tokens every value is the same vector, so attention returns it whatever the
    # (position-dependent) weights are and all outputs agree; positions on the values would make them differ.
    layer = EncoderLayer(16, 2, 32, 0.0).eval()
    x = torch.randn(1, 1, 16).expand(2, 9, 16)
    out = layer(x, torch.rand(1, 9, 16) * 3, neighbor_mask(3, 3, (1, 1)))
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


def test_attention_never_reads_the_blocked_neighbourhood():
    torch.manual_seed(0)
    mask, pos = neighbor_mask(5, 5, (3, 3)), torch.rand(1, 25, 16)
    q, neighbour, far = 12, 13, 0  # (2, 2), its neighbour (2, 3), the corner (0, 0)
    enc, dec = EncoderLayer(16, 2, 32, 0.0).eval(), QueryDecoderLayer(25, 16, 2, 32, 0.0).eval()
    x, memory, previous = torch.randn(3, 1, 25, 16).unbind(0)
    base_enc, base_dec = enc(x, pos, mask), dec(memory, previous, pos, mask)
    for token, visible in ((neighbour, False), (far, True)):
        x2, memory2, previous2 = x.clone(), memory.clone(), previous.clone()
        x2[:, token] += 5
        memory2[:, token] += 5
        previous2[:, token] += 5
        assert torch.allclose(enc(x2, pos, mask)[:, q], base_enc[:, q]) != visible
        assert torch.allclose(dec(memory2, previous2, pos, mask)[:, q], base_dec[:, q]) != visible
    # The decoder rebuilds a token from the other positions only: its own memory and previous output are blocked.
    memory2, previous2 = memory.clone(), previous.clone()
    memory2[:, q] += 5
    previous2[:, q] += 5
    torch.testing.assert_close(dec(memory2, previous2, pos, mask)[:, q], base_dec[:, q])


def test_default_reconstruction_parameter_count_and_init():
    torch.manual_seed(0)
    rec = UniADReconstruction(channels=272, feature_size=14)  # efficientnet_b4 (0..3) at 224 px
    assert n_params(rec) == 7_717_392  # anomaly.md §1.3: ~7.72 M
    assert n_params(rec.encoder[0]) == 789_760 and n_params(rec.decoder[0]) == 1_103_616
    assert not any(k.endswith("mask") for k in rec.state_dict())  # rebuilt by the constructor, not exported
    for name, m in rec.named_modules():
        if isinstance(m, torch.nn.Linear):
            bound = (6 / (m.in_features + m.out_features)) ** 0.5
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert not m.bias.any(), name
    for emb in (rec.row_embed, rec.col_embed):
        assert emb.weight.min() >= 0 and emb.weight.max() < 1
    query = rec.decoder[0].query.weight
    assert abs(query.std().item() - 1) < 0.02 and abs(query.mean().item()) < 0.02
    pos = rec.position_embedding()
    assert pos.shape == (196, 256)
    assert torch.equal(pos[3 * 14 + 5], torch.cat([rec.col_embed.weight[5], rec.row_embed.weight[3]]))


def test_default_model_sizes_on_the_meta_device():
    with torch.device("meta"):  # no memory, no init cost: what training.export.check_weights_fit does
        model = UniAD()
    assert model.channels == 272 and model.backbone_strides == [2, 4, 8, 16] and model.feature_size == (14, 14)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 7_717_392
    assert n_params(model.backbone) == 16_742_216


def test_rebuilds_from_its_json_record_and_loads_its_state_dict():
    model = tiny(input_size=[64, 80]).eval()
    record = model_record(UniAD, **model.export_kwargs())
    assert json.loads(json.dumps(record))["kwargs"] == model.export_kwargs()
    assert record["kwargs"]["input_size"] == [64, 80] and model.feature_size == (4, 5)
    state = model.state_dict()
    assert any(k.startswith("backbone.") for k in state) and any(k.startswith("reconstruction.") for k in state)
    check_weights_fit(record, state, Path("model.safetensors"))
    torch.manual_seed(123)  # a different init, so equal outputs below come from the loaded weights
    rebuilt = build_model(record)
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x = torch.randn(2, 3, 64, 80)  # input_size is (rows, cols)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["feature_rec"], model(x)["feature_rec"])


def test_local_backbone_weights_travel_in_the_export(tmp_path):
    torch.manual_seed(5)
    full = timm.create_model("test_efficientnet", pretrained=False)
    weights = tmp_path / "test_efficientnet.safetensors"
    save_file(full.state_dict(), weights)
    model = tiny(pretrained=weights).eval()  # a Path is recorded as its string
    assert torch.equal(model.backbone.conv_stem.weight, full.conv_stem.weight)
    assert torch.equal(model.backbone.blocks[3][0].conv_pw.weight, full.blocks[3][0].conv_pw.weight)
    assert model.init_kwargs["pretrained"] == str(weights) and model.export_kwargs()["pretrained"] is False
    weights.unlink()  # predicting must not need the file: the state dict carries the backbone
    rebuilt = build_model(model_record(UniAD, **model.export_kwargs()))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images())["feature_rec"], model(images())["feature_rec"])


def test_unusable_local_backbone_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such weights file"):
        tiny(pretrained=str(tmp_path / "missing.pth"))
    other_names = tmp_path / "lukemelas.pth"  # EfficientNet-PyTorch naming: timm alone would load nothing
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, other_names)
    with pytest.raises(ValueError, match="backbone tensors are not in the file"):
        tiny(pretrained=str(other_names))

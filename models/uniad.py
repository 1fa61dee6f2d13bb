"""UniAD (You et al., NeurIPS 2022): one feature-reconstruction transformer for unified anomaly detection.

Pipeline (anomaly.md §1; shapes for the defaults, 224 x 224 ImageNet-normalised RGB input):

    backbone        frozen timm model, features_only, efficientnet_b4 out_indices (0, 1, 2, 3):
                    (B, 3, 224, 224) -> [(B, 24, 112, 112), (B, 32, 56, 56), (B, 56, 28, 28), (B, 160, 14, 14)]
    neck (mfcn)     every map resized to the feature map size (ceil(input / feature_stride) per side; the stride
                    defaults to the coarsest selected one, 16) with bilinear align_corners=True, then concatenated:
                    feature_align (B, 272, 14, 14). No parameters.
    reconstruction  UniADReconstruction: feature_align -> feature_rec (B, 272, 14, 14), the only trained part.

`UniAD.features(images)` runs the frozen part alone (no autograd graph), so a training script can compute
feature_align once per run and train on the cache: `forward(feature_align=cached)` then gives exactly what
`forward(images)` gives. Going through `forward` (not `reconstruct`) keeps DDP's gradient hooks in the loop.
The anomaly map (per-position L2 norm of feature_rec - feature_align, upsampled to the input) and the loss
(MSE of the two) are computed outside the model, in metrics/anomaly.py and losses/.

Reconstruction transformer (anomaly.md §1.3), hidden d = 256, L = h * w tokens, row-major (h w) order:

    tokens       (B, L, C) from feature_align; in training only, feature jitter is added before input_proj:
                 noise = randn * (||token||_2 / C) * jitter_scale, each token with probability jitter_prob
                 (UniAD draws once per forward pass whether to jitter all tokens; the same at the default 1)
                 (the target stays the clean feature_align)
    input_proj   Linear(C -> d)
    pos          learned: row_embed Embedding(h, d/2), col_embed Embedding(w, d/2), uniform(0, 1) init;
                 pos(i, j) = cat(col[j], row[i]), added to queries and keys of every attention, never to values
    mask         (L, L) bool, True = blocked: the keys inside the k x k window centred on each query (clipped at
                 the border) including the query itself; one mask for encoder self-attention and both decoder
                 attentions, so every token is rebuilt from tokens outside its neighbourhood
    encoder      num_encoder_layers post-norm layers: self-attn (q = k = x + pos, v = x) -> add & LayerNorm ->
                 FFN d -> dim_feedforward -> d (ReLU, dropout) -> add & LayerNorm; no final encoder norm
    decoder      num_decoder_layers layer-wise query layers; layer l owns a learned query (L, d), N(0, 1), read
                 fresh in every layer: attn 1 (q = query + pos, k = memory + pos, v = memory) -> add & norm ->
                 attn 2 (q = . + pos, k = out_{l-1} + pos, v = out_{l-1}; out_0 = memory) -> add & norm -> FFN ->
                 add & norm = out_l; a final LayerNorm after the last layer
    output_proj  Linear(d -> C) -> feature_rec (B, C, h, w)

Init: xavier_uniform on every Linear weight (attention out_proj included), Linear biases 0; the attention
in_proj keeps PyTorch's default (xavier_uniform, bias 0); queries N(0, 1); positional embeddings uniform(0, 1).

Neighbour window: rows i - k//2 .. i + k//2 around a query in row i (same for columns), so k must be odd. A
window that reaches every row and every column from some query leaves that query no key at all, and softmax
over no key is NaN (anomaly.md §7 item 2, §8 bug 14); the constructor refuses such a window. On a 14 x 14 map a
7 x 7 window leaves 147 (interior) to 180 (corner) visible keys per query.

Backbone weights (`pretrained`): False = random init (the offline CPU baseline); True = timm's pretrained tag
for `backbone` (a name such as "tf_efficientnet_b4.aa_in1k" picks the tag; needs the network or the HF cache);
a path = a local timm-format state dict (.pth/.safetensors) loaded through timm's `pretrained_cfg_overlay`,
then checked to cover every backbone tensor, because timm loads a features_only model non-strictly and a file
with other key names (e.g. the lukemelas EfficientNet-PyTorch one UniAD ships) would silently stay random.

Exports: the state dict holds the frozen backbone too (backbone.* beside reconstruction.*), so a model trained
on local pretrained weights predicts from its export alone. `export_kwargs()` is therefore the constructor
kwargs with pretrained=False: rebuilding never needs the weights file or the network, and the export's
weights overwrite the random backbone. The neighbour mask is a non-persistent buffer rebuilt by the
constructor. Only `reconstruction.parameters()` require gradients.

Parameter counts:
    UniADReconstruction, C = 272, 14 x 14, defaults          7,717,392  (anomaly.md §1.3: ~7.72 M)
        per encoder layer 789,760; per decoder layer 1,103,616 (50,176 of them the query); input_proj 69,888;
        output_proj 69,904; positional embeddings 3,584; final decoder norm 512
    efficientnet_b4, out_indices (0, 1, 2, 3), frozen       16,742,216
    test_efficientnet, out_indices (0, 1, 2, 3), frozen         82,300  (C = 120; CPU tests)
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a 2-sequence (JSON lists included) as (rows, cols) of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or [rows, cols] of positive ints, got {value!r}")
    return pair


def mfcn(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """UniAD's neck: [(B, C_i, H_i, W_i)] -> (B, sum C_i, size[0], size[1]).

    Bilinear with align_corners=True as UniAD's UpsamplingBilinear2d; resizing to `size` instead of by a scale
    factor lands every level on the same grid even when the input is not a multiple of the strides.
    """
    size = tuple(size)
    return torch.cat([f if tuple(f.shape[-2:]) == size else
                      F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in features], dim=1)


def neighbor_mask(height: int, width: int, window: tuple[int, int], device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """(L, L) bool attention mask on an height x width map, L = height * width in row-major order; entry [q, k]
    is True (blocked) when key k lies in the window (odd rows x cols) centred on query q, the query included."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (L,) row of each token
    cols = torch.arange(width, device=device).repeat(height)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= window[0] // 2
    near_cols = (cols[:, None] - cols[None, :]).abs() <= window[1] // 2
    return near_rows & near_cols


def _check_window(window: tuple[int, int], feature_size: tuple[int, int], context: str = "") -> None:
    """ValueError unless every query of `neighbor_mask(*feature_size, window)` keeps at least one key;
    `context` (e.g. " (input_size 64x64 / feature_stride 16)") says where the map size came from."""
    if window[0] % 2 == 0 or window[1] % 2 == 0:
        raise ValueError(f"neighbor_size {window[0]}x{window[1]} must be odd on both axes so the window is "
                         "centred on its query")
    h, w = feature_size
    # The middle row (column) is the one closest to both borders; a window reaching both from there covers
    # every row (column), and when that holds on both axes the middle token attends to no key at all.
    rows_covered = window[0] // 2 >= math.ceil((h - 1) / 2)
    cols_covered = window[1] // 2 >= math.ceil((w - 1) / 2)
    if rows_covered and cols_covered:
        fixes = [f"{axis} <= {2 * math.ceil((n - 1) / 2) - 1}" for axis, n in (("rows", h), ("cols", w)) if n > 1]
        fix = f"use neighbor_size {' or '.join(fixes)} or" if fixes else "use"
        raise ValueError(f"neighbor_size {window[0]}x{window[1]} blocks every key of the middle query of the "
                         f"{h}x{w} feature map{context}, so its attention would be NaN; {fix} a larger input_size")


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with positions on queries and keys only: (B, L, d) -> (B, L, d)."""

    def __init__(self, hidden_dim: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden_dim, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, hidden_dim))
        self.norm1, self.norm2 = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(qk, qk, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class QueryDecoderLayer(nn.Module):
    """UniAD's layer-wise query decoder layer: its own learned query attends to the encoder memory, then to the
    previous layer's output; (B, L, d) memory and previous output -> (B, L, d)."""

    def __init__(self, num_tokens: int, hidden_dim: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.query = nn.Embedding(num_tokens, hidden_dim)  # N(0, 1) init, nn.Embedding's default
        self.memory_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.previous_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden_dim, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, hidden_dim))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(hidden_dim) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, memory: torch.Tensor, previous: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        tgt = self.query.weight.expand(memory.shape[0], -1, -1)  # (B, L, d), the same query for every sample
        attn = self.memory_attn(tgt + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.previous_attn(tgt + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class UniADReconstruction(nn.Module):
    """feature_align (B, channels, h, w) -> feature_rec (B, channels, h, w); see the module docstring."""

    def __init__(self, channels: int = 272, feature_size: int | Sequence[int] = 14, hidden_dim: int = 256,
                 num_heads: int = 8, num_encoder_layers: int = 4, num_decoder_layers: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.1, neighbor_size: int | Sequence[int] = 7,
                 jitter_scale: float = 20.0, jitter_prob: float = 1.0):
        super().__init__()
        self.feature_size = _pair(feature_size, "feature_size")
        window = _pair(neighbor_size, "neighbor_size")
        if hidden_dim % 2 or hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be even (half row, half column embedding) and a "
                             f"multiple of num_heads {num_heads}")
        if min(channels, num_encoder_layers, num_decoder_layers, dim_feedforward) < 1:
            raise ValueError("channels, num_encoder_layers, num_decoder_layers and dim_feedforward must be >= 1")
        if not 0 <= dropout < 1 or not 0 <= jitter_prob <= 1 or jitter_scale < 0:
            raise ValueError(f"expected 0 <= dropout < 1, 0 <= jitter_prob <= 1, jitter_scale >= 0; got {dropout}, "
                             f"{jitter_prob}, {jitter_scale}")
        _check_window(window, self.feature_size)
        h, w = self.feature_size
        self.channels, self.jitter_scale, self.jitter_prob = channels, jitter_scale, jitter_prob
        self.input_proj = nn.Linear(channels, hidden_dim)
        self.row_embed = nn.Embedding(h, hidden_dim // 2)
        self.col_embed = nn.Embedding(w, hidden_dim // 2)
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(QueryDecoderLayer(h * w, hidden_dim, num_heads, dim_feedforward, dropout)
                                     for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, channels)
        # Built on the CPU explicitly so the guard above and this buffer also work when the model is built on the
        # meta device (training.export.check_weights_fit); .to(device) moves it with the model. Not persistent:
        # the constructor rebuilds it, and exports stay free of an L x L constant.
        self.register_buffer("mask", neighbor_mask(h, w, window, device="cpu"), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):  # attention out_proj (NonDynamicallyQuantizableLinear) included
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def position_embedding(self) -> torch.Tensor:
        """(L, hidden_dim): cat(col_embed[j], row_embed[i]) for token (i, j), row-major."""
        h, w = self.feature_size
        cols = repeat(self.col_embed.weight, "w d -> h w d", h=h)
        rows = repeat(self.row_embed.weight, "h d -> h w d", w=w)
        return rearrange(torch.cat([cols, rows], dim=-1), "h w d -> (h w) d")

    def jitter(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, C) + Gaussian noise of std jitter_scale * ||token||_2 / C per token (about 1.2x the
        token's RMS at scale 20, C = 272), each token jittered with probability jitter_prob."""
        noise = torch.randn_like(tokens) * tokens.norm(dim=-1, keepdim=True) * (self.jitter_scale / tokens.shape[-1])
        if self.jitter_prob < 1:
            noise = noise * (torch.rand(tokens.shape[:-1] + (1,), device=tokens.device) < self.jitter_prob)
        return tokens + noise

    def forward(self, feature_align: torch.Tensor) -> torch.Tensor:
        if feature_align.ndim != 4 or feature_align.shape[1:] != (self.channels, *self.feature_size):
            raise ValueError(f"UniADReconstruction expects (B, {self.channels}, {self.feature_size[0]}, "
                             f"{self.feature_size[1]}) features, got {tuple(feature_align.shape)}")
        h, w = self.feature_size
        tokens = rearrange(feature_align, "b c h w -> b (h w) c")
        if self.training and self.jitter_scale > 0 and self.jitter_prob > 0:
            tokens = self.jitter(tokens)
        x = self.input_proj(tokens)  # (B, L, d)
        pos = self.position_embedding()[None]  # (1, L, d), broadcast over the batch
        for layer in self.encoder:
            x = layer(x, pos, self.mask)
        memory = out = x
        for layer in self.decoder:
            out = layer(memory, out, pos, self.mask)
        feature_rec = self.output_proj(self.decoder_norm(out))  # (B, L, C)
        return rearrange(feature_rec, "b (h w) c -> b c h w", h=h, w=w)


def _weight_key(name: str) -> str:
    # features_only wrappers may flatten nested modules ("stages.0" -> "stages_0"); compare names modulo that.
    return name.replace("_", ".")


def _check_backbone_weights(backbone: nn.Module, path: str) -> None:
    """ValueError unless the state dict in `path` names every tensor of `backbone` (BN step counters aside)."""
    in_file = {_weight_key(k) for k in timm.models.load_state_dict(path)}
    missing = [k for k in backbone.state_dict()
               if not k.endswith("num_batches_tracked") and _weight_key(k) not in in_file]
    if missing:
        raise ValueError(f"pretrained={path}: {len(missing)} backbone tensors are not in the file, e.g. "
                         f"{missing[0]}; expected a timm state dict of this backbone (a lukemelas EfficientNet-PyTorch "
                         "file uses other key names)")


class UniAD(nn.Module):
    """Frozen timm backbone + MFCN neck + UniADReconstruction; images (B, 3, *input_size) ImageNet-normalised
    -> dict(feature_align, feature_rec), both (B, channels, *feature_size). See the module docstring."""

    def __init__(self, backbone: str = "efficientnet_b4", out_indices: Sequence[int] = (0, 1, 2, 3),
                 pretrained: bool | str | os.PathLike = False, input_size: int | Sequence[int] = 224,
                 feature_stride: int | None = None, hidden_dim: int = 256, num_heads: int = 8,
                 num_encoder_layers: int = 4, num_decoder_layers: int = 4, dim_feedforward: int = 1024,
                 dropout: float = 0.1, neighbor_size: int | Sequence[int] = 7, jitter_scale: float = 20.0,
                 jitter_prob: float = 1.0):
        super().__init__()
        self.input_size = _pair(input_size, "input_size")
        if isinstance(pretrained, os.PathLike):
            pretrained = os.fspath(pretrained)  # a Path is a file to load, not a truthy "use timm's tag"
        out_indices = [int(i) for i in out_indices]
        # JSON values only (lists, not tuples), so model_record / model.json round-trip to equal kwargs.
        self.init_kwargs = dict(
            backbone=backbone, out_indices=out_indices, pretrained=pretrained, input_size=list(self.input_size),
            feature_stride=feature_stride, hidden_dim=hidden_dim, num_heads=num_heads,
            num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward, dropout=dropout,
            neighbor_size=list(_pair(neighbor_size, "neighbor_size")), jitter_scale=jitter_scale,
            jitter_prob=jitter_prob)
        if isinstance(pretrained, str):
            if not Path(pretrained).is_file():
                raise ValueError(f"pretrained={pretrained}: no such weights file (use a timm state dict "
                                 ".pth/.safetensors, true for timm's pretrained tag, or false for random init)")
            overlay = dict(pretrained_cfg_overlay=dict(file=str(pretrained)))
        else:
            overlay = {}
        self.backbone = timm.create_model(backbone, features_only=True, out_indices=out_indices,
                                          pretrained=bool(pretrained), **overlay)
        if isinstance(pretrained, str):
            _check_backbone_weights(self.backbone, pretrained)
        self.backbone.requires_grad_(False)
        self.backbone_channels = list(self.backbone.feature_info.channels())
        self.backbone_strides = list(self.backbone.feature_info.reduction())
        self.feature_stride = max(self.backbone_strides) if feature_stride is None else feature_stride
        if not isinstance(self.feature_stride, int) or self.feature_stride < 1:
            raise ValueError(f"feature_stride must be a positive int, got {feature_stride!r}")
        self.channels = sum(self.backbone_channels)
        # A stride-s conv with 'same' padding gives ceil(n / s), so at the coarsest selected stride the backbone's
        # own map already has this size (the neck's resize is then the identity for it).
        self.feature_size = tuple(math.ceil(n / self.feature_stride) for n in self.input_size)
        _check_window(_pair(neighbor_size, "neighbor_size"), self.feature_size,
                      f" (input_size {self.input_size[0]}x{self.input_size[1]} / feature_stride {self.feature_stride})")
        self.reconstruction = UniADReconstruction(
            self.channels, self.feature_size, hidden_dim, num_heads, num_encoder_layers, num_decoder_layers,
            dim_feedforward, dropout, neighbor_size, jitter_scale, jitter_prob)
        self.backbone.eval()

    def export_kwargs(self) -> dict:
        """Constructor kwargs for model.json: pretrained=False, since the state dict carries the backbone."""
        return {**self.init_kwargs, "pretrained": False}

    def train(self, mode: bool = True) -> UniAD:
        # The backbone's BatchNorm statistics must stay the pretrained ones: frozen means eval, always.
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, *input_size) -> feature_align (B, channels, *feature_size), without autograd; a pure
        function of the images (the backbone is always in eval mode), so it can be cached per run."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"UniAD expects (B, 3, {self.input_size[0]}, {self.input_size[1]}) images "
                             f"(input_size), got {tuple(images.shape)}")
        # Always in float32, also inside a mixed-precision forward: cached features (computed outside autocast)
        # and recomputed ones must be the same numbers.
        with torch.autocast(images.device.type, enabled=False):
            return mfcn(self.backbone(images.float()), self.feature_size)

    def reconstruct(self, feature_align: torch.Tensor) -> torch.Tensor:
        """feature_align (B, channels, *feature_size) -> feature_rec, same shape (jitter in training only)."""
        return self.reconstruction(feature_align)

    def forward(self, images: torch.Tensor | None = None, feature_align: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Exactly one of images (B, 3, *input_size) or cached feature_align (B, channels, *feature_size)
        -> dict(feature_align=..., feature_rec=...), both (B, channels, *feature_size)."""
        if (images is None) == (feature_align is None):
            raise ValueError("UniAD.forward takes exactly one of images or feature_align")
        if feature_align is None:
            feature_align = self.features(images)
        return dict(feature_align=feature_align, feature_rec=self.reconstruct(feature_align))

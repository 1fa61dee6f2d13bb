"""Siamese ResNet (+ optional FPN) with six comparison heads for the same-digit pair task.

Input: two grey digit crops a, b, each (B, in_chans, 28, 28) in [0, 1]. Output: one logit per pair (B,),
positive = same digit.

Encoder (one set of weights for both images; `forward` runs it once on cat([a, b]) so BatchNorm sees both
images in one batch): conv3x3 s1 (round(64w) channels) - BN - ReLU, no max-pool, then len(layers) stages of
BasicBlock or Bottleneck (expansion 4) blocks with planes round(64w * 2^i) at strides 1, 2, 2, ... (28x28 ->
14x14 -> 7x7 for three stages). SE (Hu et al., 2018) or CBAM (Woo et al., 2018) gates the residual branch of
every block before the addition; convs are Kaiming-initialised and the last BN gamma of each branch is NOT
zero-initialised, so every parameter gets a non-zero gradient from the first step.

Embedding, arch="resnet": global average pool of the last stage -> Linear-BN1d-ReLU-Dropout-Linear-BN1d-ReLU
-> (B, feat_dim).
Embedding, arch="fpn": a feature pyramid (Lin et al., 2017) over every stage: 1x1 lateral conv of each stage
to round(128w) channels, top-down pathway (nearest-upsample the coarser level to the finer one's size and add),
3x3 smoothing conv per level; each level is average-pooled, the levels are concatenated
(len(layers) * round(128w) values) and go through the same embedding MLP.

Heads, each with its own parameters, map the two embeddings (B, d) to (B,) logits: diff (MLP on |fa - fb|),
concat (MLP on [fa, fb]; the only one that depends on the order of a and b), product (MLP on fa * fb), cosine
(own projection, s * cos + b), l2 (own projection, b - softplus(s) * RMS distance), residual (projection of
[|fa - fb|, fa * fb] + 2 pre-norm residual MLP blocks). fusion=True builds all six and returns
sum_k softmax(w)_k * logit_k with w learnable (zeros at init = equal weights); fusion=False builds only `head`.

input_norm="per_image" standardises each digit by its own pixel mean and std before the encoder (robustness to
contrast and brightness). digit_classes=10 adds an auxiliary Linear(feat_dim -> 10) on each digit's embedding,
trained when the data know each half's digit; `forward(a, b, return_digits=True)` returns its logits too. The
pair logit never depends on it, so a model trained with it predicts like any other.

Parameter counts (feat_dim=256, layers=(2, 2, 2), attention="se"; asserted for the default in the tests):
    width  block       arch    fusion      params   encoder
    1.0    basic       resnet  yes      3,720,582  2,796,408   (default; the original's ResNetCompareNet was ~3-5 M)
    1.0    basic       resnet  no       3,060,345  2,796,408   (head="concat")
    1.0    basic       fpn     yes      4,253,062  2,796,408   (+ pyramid 499,712)
    1.0    bottleneck  resnet  yes      4,903,854  3,783,072
    1.0    bottleneck  fpn     yes      5,411,758  3,783,072
    0.5    basic       resnet  yes      1,592,270    700,864
    0.5    basic       resnet  no         932,033    700,864
    0.5    basic       fpn     yes      1,733,582    700,864
    0.5    bottleneck  resnet  yes      1,940,190    950,480
    0.25   basic       resnet  yes      1,051,382    176,360
    0.25   basic       resnet  no         391,145    176,360
    0.25   basic       fpn     yes      1,090,806    176,360
    0.25   bottleneck  resnet  yes      1,164,150    239,976
At feat_dim=256 the embedding MLP is 132,096 and the heads do not depend on width: diff 66,305, concat 131,841,
product 66,305, cosine 65,794, l2 65,538, residual 396,289 (+ 6 fusion logits), so below width 0.5 the heads
dominate; feat_dim=128 gives 400,886 at width 0.25. Width 1 variants: attention "none" 3,698,126, "cbam"
3,721,176; layers=(3, 3, 3) 5,281,890.
Compute (torch.utils.flop_counter, forward + backward of 64 pairs = 128 images, fusion): resnet 15.9 / 62.2 /
247 GFLOP at width 0.25 / 0.5 / 1; fpn 23.7 / 93.5 / 373 GFLOP (the 3x3 smoothing conv on the 28x28 level is
most of the extra 50 %).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("diff", "concat", "product", "cosine", "l2", "residual")
ARCHS = ("resnet", "fpn")
BLOCKS = ("basic", "bottleneck")
ATTENTIONS = ("none", "se", "cbam")
INPUT_NORMS = ("none", "per_image")
PER_IMAGE_EPS = 1e-3  # on [0, 1] pixels; far below the std of any digit (about 0.3 clean, 0.05 at low contrast)

MIN_ATTENTION_HIDDEN = 4  # floor for the SE/CBAM bottleneck so width_mult=0.25 (16 channels / 16) still has 4 units
FPN_BASE_CHANNELS = 128  # pyramid width at width_mult=1
RESIDUAL_HEAD_BLOCKS = 2
COSINE_SCALE_INIT = 5.0  # cos is in [-1, 1]; a scale of 5 lets the head reach probabilities 0.007..0.993 at init
L2_SCALE_INIT = 1.0
L2_BIAS_INIT = 1.0  # RMS distance of unit-scale embeddings is O(1); start near the decision boundary


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _attention_mlp(channels, hidden):
    mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
    # The pooled input is a BN output whose batch mean is zero, so with a zero bias every hidden unit is active
    # for some sample at init; random negative biases left all 4 units of a narrow block without gradient.
    nn.init.zeros_(mlp[0].bias)
    return mlp


class SEBlock(nn.Module):
    """Squeeze-excitation: x * sigmoid(MLP(avg_pool(x))), one gate in (0, 1) per sample and channel."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(MIN_ATTENTION_HIDDEN, channels // reduction)
        self.mlp = _attention_mlp(channels, hidden)

    def forward(self, x):
        gate = torch.sigmoid(self.mlp(x.mean((2, 3))))  # (B, C)
        return x * gate[:, :, None, None]


class ChannelAttention(nn.Module):
    """CBAM channel gate: sigmoid(MLP(avg_pool(x)) + MLP(max_pool(x))) with one shared MLP -> (B, C, 1, 1)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(MIN_ATTENTION_HIDDEN, channels // reduction)
        self.mlp = _attention_mlp(channels, hidden)

    def forward(self, x):
        gate = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))  # (B, C)
        return torch.sigmoid(gate)[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial gate: sigmoid(conv k x k([mean over C, max over C])) -> (B, 1, H, W)."""

    def __init__(self, kernel_size=7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"spatial_kernel={kernel_size} must be odd so the gate keeps the input's H x W")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional block attention module: channel gate, then spatial gate on the channel-gated map."""

    def __init__(self, channels, reduction=16, spatial_kernel=7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, x):
        x = x * self.channel(x)
        return x * self.spatial(x)


def make_attention(kind, channels):
    _check_choice("attention", kind, ATTENTIONS)
    if kind == "se":
        return SEBlock(channels)
    if kind == "cbam":
        return CBAM(channels)
    return nn.Identity()


def conv_bn(in_ch, out_ch, kernel_size, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN -> attention, + shortcut (1x1 conv-BN when stride or width changes), ReLU."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, attention="se"):
        super().__init__()
        out = planes * self.expansion
        self.branch = nn.Sequential(
            conv_bn(in_planes, planes, 3, stride), nn.ReLU(inplace=True), conv_bn(planes, out, 3)
        )
        self.attention = make_attention(attention, out)
        self.shortcut = conv_bn(in_planes, out, 1, stride) if stride != 1 or in_planes != out else nn.Identity()

    def forward(self, x):
        return F.relu(self.attention(self.branch(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 (planes) - 3x3 (planes, stride) - 1x1 (4 * planes), BN after each, ReLU between; attention on the
    branch output; torchvision's ResNet v1.5 placement of the stride (on the 3x3)."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, attention="se"):
        super().__init__()
        out = planes * self.expansion
        self.branch = nn.Sequential(
            conv_bn(in_planes, planes, 1), nn.ReLU(inplace=True),
            conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            conv_bn(planes, out, 1),
        )
        self.attention = make_attention(attention, out)
        self.shortcut = conv_bn(in_planes, out, 1, stride) if stride != 1 or in_planes != out else nn.Identity()

    def forward(self, x):
        return F.relu(self.attention(self.branch(x)) + self.shortcut(x))


BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetEncoder(nn.Module):
    """Stem + len(layers) residual stages; forward returns every stage's map, finest first.

    With in_chans=1 and 28x28 input and three stages: (B, C1, 28, 28), (B, C2, 14, 14), (B, C3, 7, 7) with
    C_i = round(64w * 2^i) * expansion. `out_channels` lists C_i.
    """

    def __init__(self, layers=(2, 2, 2), block="basic", width_mult=1.0, attention="se", in_chans=1):
        super().__init__()
        _check_choice("block", block, BLOCKS)
        _check_choice("attention", attention, ATTENTIONS)
        layers = tuple(layers)
        if not layers or any(int(n) != n or n < 1 for n in layers):
            raise ValueError(f"layers={layers!r} must be a non-empty sequence of positive block counts per stage")
        if not width_mult > 0:
            raise ValueError(f"width_mult={width_mult!r} must be > 0")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans!r} must be >= 1")
        block_cls = BLOCK_TYPES[block]
        stem_ch = max(1, round(64 * width_mult))
        self.stem = nn.Sequential(conv_bn(in_chans, stem_ch, 3), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        self.out_channels = []
        in_planes = stem_ch
        for i, n_blocks in enumerate(layers):
            planes = max(1, round(64 * 2**i * width_mult))
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block_cls(in_planes, planes, stride if j == 0 else 1, attention))
                in_planes = planes * block_cls.expansion
            self.stages.append(nn.Sequential(*blocks))
            self.out_channels.append(in_planes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class FeaturePyramid(nn.Module):
    """FPN top-down pathway: p_top = lateral(c_top); p_i = lateral(c_i) + nearest_up(p_{i+1}); out_i = smooth(p_i).

    Convs have no bias: every level is average-pooled and goes through Linear + BatchNorm1d, which cancels any
    per-channel constant, so a bias would only ever receive a zero gradient.
    """

    def __init__(self, in_channels, channels):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, channels, 1, bias=False) for c in in_channels])
        self.smooth = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in in_channels])

    def forward(self, feats):
        p = self.lateral[-1](feats[-1])
        outs = [self.smooth[-1](p)]
        for i in range(len(feats) - 2, -1, -1):
            # size= rather than scale_factor=2 so odd maps (7 -> 4 for a fourth stage) line up
            p = self.lateral[i](feats[i]) + F.interpolate(p, size=feats[i].shape[-2:], mode="nearest")
            outs.append(self.smooth[i](p))
        return outs[::-1]  # finest first, like the encoder


class MLPHead(nn.Module):
    """Linear-BN1d-ReLU-Dropout-Linear(->1) on a fixed combination of the two embeddings."""

    def __init__(self, combine, feat_dim, hidden, dropout):
        super().__init__()
        _check_choice("combine", combine, ("diff", "concat", "product"))
        self.combine = combine
        in_dim = 2 * feat_dim if combine == "concat" else feat_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, 1),
        )

    def forward(self, fa, fb):
        if self.combine == "diff":
            x = (fa - fb).abs()
        elif self.combine == "product":
            x = fa * fb
        else:
            x = torch.cat([fa, fb], dim=1)
        return self.mlp(x).squeeze(1)


class CosineHead(nn.Module):
    """logit = s * cos(P fa, P fb) + b with its own projection P and learned s, b."""

    def __init__(self, feat_dim, hidden):
        super().__init__()
        self.proj = nn.Linear(feat_dim, hidden)
        self.scale = nn.Parameter(torch.tensor(COSINE_SCALE_INIT))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, fa, fb):
        return self.scale * F.cosine_similarity(self.proj(fa), self.proj(fb), dim=1) + self.bias


class L2Head(nn.Module):
    """logit = b - softplus(s) * d, d = RMS Euclidean distance of the projections (||P fa - P fb|| / sqrt(hidden),
    so the scale does not depend on the width). P has no bias: it would cancel in the difference."""

    def __init__(self, feat_dim, hidden):
        super().__init__()
        self.proj = nn.Linear(feat_dim, hidden, bias=False)
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.expm1(L2_SCALE_INIT))))  # softplus^-1
        self.bias = nn.Parameter(torch.tensor(L2_BIAS_INIT))

    def forward(self, fa, fb):
        # eps keeps the sqrt differentiable when a pair has identical embeddings
        dist = torch.sqrt((self.proj(fa) - self.proj(fb)).square().mean(1) + 1e-8)
        return self.bias - F.softplus(self.raw_scale) * dist


class ResidualMLPBlock(nn.Module):
    """Pre-norm residual MLP: h + Linear(Dropout(ReLU(Linear(LayerNorm(h)))))."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim, dim)
        )

    def forward(self, h):
        return h + self.mlp(h)


class ResidualHead(nn.Module):
    """Projection of [|fa - fb|, fa * fb] (both symmetric in a, b) to `hidden`, residual MLP blocks,
    LayerNorm, Linear(->1)."""

    def __init__(self, feat_dim, hidden, dropout, num_blocks=RESIDUAL_HEAD_BLOCKS):
        super().__init__()
        self.proj = nn.Linear(2 * feat_dim, hidden)
        self.blocks = nn.Sequential(*[ResidualMLPBlock(hidden, dropout) for _ in range(num_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def forward(self, fa, fb):
        h = self.proj(torch.cat([(fa - fb).abs(), fa * fb], dim=1))
        return self.out(self.blocks(h)).squeeze(1)


def make_head(name, feat_dim, dropout):
    _check_choice("head", name, HEADS)
    hidden = feat_dim
    if name in ("diff", "concat", "product"):
        return MLPHead(name, feat_dim, hidden, dropout)
    if name == "cosine":
        return CosineHead(feat_dim, hidden)
    if name == "l2":
        return L2Head(feat_dim, hidden)
    return ResidualHead(feat_dim, hidden, dropout)


def embedding_mlp(in_dim, feat_dim, dropout):
    # Linear bias would be cancelled by the BatchNorm1d that follows
    return nn.Sequential(
        nn.Linear(in_dim, feat_dim, bias=False), nn.BatchNorm1d(feat_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(feat_dim, feat_dim, bias=False), nn.BatchNorm1d(feat_dim), nn.ReLU(inplace=True),
    )


class ResNetCompareNet(nn.Module):
    """Siamese pair classifier: shared encoder -> (B, feat_dim) embeddings -> one head or a softmax fusion of six.

    With fusion=True the `head` argument is validated but not used (all of HEADS are built); `head_names` lists
    the heads that forward actually evaluates.
    """

    def __init__(self, arch="resnet", layers=(2, 2, 2), block="basic", width_mult=1.0, feat_dim=256, attention="se",
                 fusion=True, head="concat", dropout=0.3, in_chans=1, input_norm="none", digit_classes=0):
        super().__init__()
        _check_choice("arch", arch, ARCHS)
        _check_choice("head", head, HEADS)
        _check_choice("input_norm", input_norm, INPUT_NORMS)
        if int(digit_classes) != digit_classes or digit_classes < 0:
            raise ValueError(f"digit_classes={digit_classes!r} must be 0 (no digit head) or the number of classes")
        self.input_norm = input_norm
        if int(feat_dim) != feat_dim or feat_dim < 1:
            raise ValueError(f"feat_dim={feat_dim!r} must be a positive integer")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.arch = arch
        self.fusion = bool(fusion)
        self.encoder = ResNetEncoder(layers, block, width_mult, attention, in_chans)
        if arch == "fpn":
            fpn_ch = max(1, round(FPN_BASE_CHANNELS * width_mult))
            self.pyramid = FeaturePyramid(self.encoder.out_channels, fpn_ch)
            pooled_dim = fpn_ch * len(self.encoder.out_channels)
        else:
            self.pyramid = None
            pooled_dim = self.encoder.out_channels[-1]
        self.embed_mlp = embedding_mlp(pooled_dim, feat_dim, dropout)
        self.head_names = HEADS if self.fusion else (head,)
        self.heads = nn.ModuleDict({name: make_head(name, feat_dim, dropout) for name in self.head_names})
        # zeros = equal weights; softmax keeps the mixture a convex combination of head logits
        self.fusion_logits = nn.Parameter(torch.zeros(len(HEADS))) if self.fusion else None
        # Optional auxiliary head: which digit each half shows, from the same embedding the pair heads compare.
        self.digit_head = nn.Linear(feat_dim, int(digit_classes)) if digit_classes else None

    def normalize(self, x):
        """per_image: each image to zero mean and unit std over its own pixels (a low-contrast or dim digit then
        looks like a normal one); none: unchanged. (N, C, H, W) -> same."""
        if self.input_norm == "none":
            return x
        mean = x.mean((1, 2, 3), keepdim=True)
        std = x.std((1, 2, 3), keepdim=True)
        return (x - mean) / (std + PER_IMAGE_EPS)   # eps: a blank image stays finite (all zeros)

    def embed(self, x):
        """(N, in_chans, H, W) -> (N, feat_dim)."""
        feats = self.encoder(self.normalize(x))
        if self.pyramid is not None:
            pooled = torch.cat([p.mean((2, 3)) for p in self.pyramid(feats)], dim=1)
        else:
            pooled = feats[-1].mean((2, 3))
        return self.embed_mlp(pooled)

    def forward(self, a, b, return_digits=False):
        """a, b: (B, in_chans, H, W) -> logits (B,), positive = same digit. With return_digits (needs
        digit_classes > 0): (logits, digit logits of a (B, classes), of b (B, classes)). One forward for both,
        so that DDP sees every parameter used in the call it wraps."""
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if return_digits and self.digit_head is None:
            raise ValueError("return_digits=True needs a model built with digit_classes > 0")
        emb = self.embed(torch.cat([a, b]))  # one encoder call: shared BN statistics, one batch
        fa, fb = emb.chunk(2)
        if not self.fusion:
            logits = self.heads[self.head_names[0]](fa, fb)
        else:
            logits = torch.stack([self.heads[name](fa, fb) for name in HEADS], dim=1) @ torch.softmax(
                self.fusion_logits, dim=0)   # (B, 6) @ (6,)
        if not return_digits:
            return logits
        return (logits, *self.digit_head(emb).chunk(2))

    def fusion_weights(self):
        """Softmax fusion weights by head name, for logging; {} when fusion=False."""
        if not self.fusion:
            return {}
        weights = torch.softmax(self.fusion_logits.detach().float(), dim=0).tolist()
        return dict(zip(HEADS, weights))

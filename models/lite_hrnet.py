"""Lite-HRNet-18 backbone + LiteFPN + CenterNet heads for the slider-CAPTCHA task.

The backbone is the paper's network (Yu et al., "Lite-HRNet: A Lightweight High-Resolution Network", CVPR 2021,
arXiv 2104.06403): ShuffleNet-v2 stem, three stages of conditional channel weighting (CCW) blocks with
HRNet-style multi-resolution fusion, widths 40/80/160/320 at strides 4/8/16/32, 2/4/2 modules. It is NOT the
MobileNetV2-block "Lite-HRNet-18" of the original Sider_CAPTCHA_Solver repo (widths 32/64/128/256, ~3.3 M params).

Parameter counts (asserted in tests/test_lite_hrnet.py):
    LiteHRNet18(in_chans=3)                      1,054,032  (paper's 1.1 M adds its IterativeHead + 1x1 joint head)
    LiteHRNet18FPN(in_chans=4) defaults          1,256,126  (fpn_channels=64, head_channels=64, with_angle=True)
    LiteHRNet18FPN(in_chans=4, with_angle=False) 1,219,004
Compute per sample (multiply-adds): backbone at 3x256x192 is 182 M (+16 M for the pose head ~ the paper's 205 M
FLOPs); at 4x256x512: backbone 0.50 G, LiteFPN 0.09 G, the four heads 1.21 G (each 3x3 64->64 conv on the
64x128 map costs 0.30 G), total 1.80 G. head_channels is the speed knob: 32 cut fwd+bwd time by ~14% on CPU.

Input: (B, in_chans, H, W) with H, W divisible by 32; in_chans=4 = RGB/255 + letterbox padding mask.
Output heads at stride 4, cell (i, j) covers input pixels [4j, 4j+4) x [4i, 4i+4); decode as
x = (j + 0.5 + du) * 4, y = (i + 0.5 + dv) * 4. With input_scale=s the network first shrinks the canvas s
times (pool_canvas) and runs on that: the heads are then at stride 4s of the input (``model.stride``), the
compute about s^2 times smaller, and every formula above holds with 4s for 4.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Lite-HRNet-18 (configs/top_down/lite_hrnet/coco/litehrnet_18_coco_256x192.py of the official repo)
STEM_CHANNELS = 32
STAGE_WIDTHS = ((40, 80), (40, 80, 160), (40, 80, 160, 320))
STAGE_MODULES = (2, 4, 2)
BLOCKS_PER_MODULE = 2  # CCW blocks per module (each block covers all branches)
REDUCE_RATIO = 8  # cross-resolution weighting bottleneck
SE_RATIO = 4  # spatial weighting bottleneck

HEATMAP_PRIOR = 0.1  # initial sigmoid output of the heatmap heads (CenterNet / focal-loss prior)
INPUT_SCALES = (1, 2, 4)


def pool_canvas(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 4, H, W) RGB + padding mask -> (B, 4, H/factor, W/factor): RGB averaged over factor x factor
    pixels, the mask left 1 only where all of them were real (a min-pool). Under the continuous-pixel
    convention the average is the exact map x -> x / factor of every coordinate."""
    if factor == 1:
        return x
    colour = F.avg_pool2d(x[:, :3], factor)
    mask = -F.max_pool2d(-x[:, 3:], factor)
    return torch.cat([colour, mask], 1)


def conv_bn(in_ch, out_ch, kernel_size=1, stride=1, groups=1, relu=False):
    """Conv (no bias, BN follows) + BN [+ ReLU]; 'same' padding for odd kernels."""
    layers = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def dw_pw_bn(in_ch, out_ch, stride=1, relu=True):
    """Lite-HRNet's width-changing / downsampling unit: DW3x3-BN (linear) -> 1x1-BN [-> ReLU]."""
    return nn.Sequential(conv_bn(in_ch, in_ch, 3, stride, groups=in_ch), conv_bn(in_ch, out_ch, 1, relu=relu))


def channel_shuffle(x, groups):
    """ShuffleNet channel shuffle of (B, C, H, W): output channel k*groups + g = input channel g*(C/groups) + k.

    Keeps the memory format of x, so a channels_last network does not bounce through NCHW copies.
    """
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        nhwc = x.permute(0, 2, 3, 1)
        nhwc = nhwc.reshape(b, h, w, groups, c // groups).transpose(3, 4).reshape(b, h, w, c)
        return nhwc.permute(0, 3, 1, 2)
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def concat_shuffle(a, b, channels_last):
    """channel_shuffle(cat([a, b], 1), 2) in one copy: channels interleave as a0, b0, a1, b1, ...

    a, b: (B, C, H, W) each -> (B, 2C, H, W). channels_last picks the physical layout of the result; the new
    dim is stacked right after C in that layout, so the flatten is a view and the stack is the only copy
    (cat + shuffle is two, and in channels_last the generic shuffle would hand back an NCHW tensor).
    """
    if channels_last:
        out = torch.stack((a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)), dim=4)
        return out.flatten(3).permute(0, 3, 1, 2)
    return torch.stack((a, b), dim=2).flatten(1, 2)


class SpatialWeighting(nn.Module):
    """Per-branch SE (the paper's function F): GAP -> 1x1 ReLU -> 1x1 sigmoid -> channel gate. No BN, convs have bias."""

    def __init__(self, channels, ratio=SE_RATIO):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, int(channels / ratio), 1)
        self.conv2 = nn.Conv2d(int(channels / ratio), channels, 1)

    def forward(self, x):
        gate = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(gate), inplace=True)))
        return x * gate


class CrossResolutionWeighting(nn.Module):
    """The paper's function H: one gate per channel and per pixel of the coarsest grid, computed from all branches.

    Every branch is average-pooled to the coarsest resolution (stride 2^(n-1) relative to branch 0), the
    concatenation goes through a 1x1 bottleneck (total/ratio channels, ReLU) and back (sigmoid), and each branch
    is multiplied by its slice of the gates, nearest-upsampled to its own resolution.
    """

    def __init__(self, channels, ratio=REDUCE_RATIO):
        super().__init__()
        self.channels = list(channels)
        total = sum(channels)
        self.conv1 = conv_bn(total, int(total / ratio), 1, relu=True)
        self.conv2 = conv_bn(int(total / ratio), total, 1)

    def forward(self, xs):
        coarse = xs[-1].shape[-2:]
        pooled = [F.adaptive_avg_pool2d(x, coarse) for x in xs[:-1]] + [xs[-1]]
        gates = torch.sigmoid(self.conv2(self.conv1(torch.cat(pooled, dim=1))))
        gates = torch.split(gates, self.channels, dim=1)
        out = [x * F.interpolate(g, size=x.shape[-2:], mode="nearest") for x, g in zip(xs[:-1], gates[:-1])]
        out.append(xs[-1] * gates[-1])
        return out


class ConditionalChannelWeighting(nn.Module):
    """CCW block over all branches: half of each branch's channels pass through untouched, the other half gets
    H (cross-resolution weights) -> DW3x3-BN (linear) -> F (SE), then the halves are concatenated and shuffled
    (groups=2). Replaces the 1x1 convs of a ShuffleNet-v2 unit, so the cost is linear in channels."""

    def __init__(self, channels, reduce_ratio=REDUCE_RATIO):
        super().__init__()
        half = [c // 2 for c in channels]
        self.cross_resolution_weighting = CrossResolutionWeighting(half, reduce_ratio)
        self.depthwise_convs = nn.ModuleList([conv_bn(c, c, 3, groups=c) for c in half])
        self.spatial_weighting = nn.ModuleList([SpatialWeighting(c) for c in half])

    def forward(self, xs):
        channels_last = xs[0].is_contiguous(memory_format=torch.channels_last)
        splits = [x.chunk(2, dim=1) for x in xs]
        kept = [s[0] for s in splits]
        weighted = self.cross_resolution_weighting([s[1] for s in splits])
        weighted = [sw(dw(x)) for x, dw, sw in zip(weighted, self.depthwise_convs, self.spatial_weighting)]
        return [concat_shuffle(k, w, channels_last) for k, w in zip(kept, weighted)]


class Stem(nn.Module):
    """Conv3x3 s2 (in_chans -> 32) BN ReLU, then a ShuffleNet-v2 stride-2 unit on the two 16-channel halves:
    branch 1 = DW3x3 s2-BN -> 1x1-BN-ReLU (16 -> 16); branch 2 = 1x1 expand (16 -> 32, i.e. stem_channels *
    expand_ratio 1 as in the official code) -> DW3x3 s2-BN -> 1x1-BN-ReLU (32 -> 16). Output 32 ch at stride 4."""

    def __init__(self, in_chans, channels=STEM_CHANNELS):
        super().__init__()
        half = channels // 2
        self.conv1 = conv_bn(in_chans, channels, 3, stride=2, relu=True)
        self.branch1 = dw_pw_bn(half, half, stride=2)
        self.branch2 = nn.Sequential(conv_bn(half, channels, 1, relu=True), dw_pw_bn(channels, half, stride=2))

    def forward(self, x):
        x = self.conv1(x)
        x1, x2 = x.chunk(2, dim=1)
        return concat_shuffle(self.branch1(x1), self.branch2(x2), x.is_contiguous(memory_format=torch.channels_last))


class LiteHRModule(nn.Module):
    """BLOCKS_PER_MODULE CCW blocks, then HRNet fusion: out_i = ReLU(sum_j f_ij(x_j)) with f_ii = identity,
    f_ij (j > i) = 1x1-BN + nearest upsample, f_ij (j < i) = (i - j) x [DW3x3 s2-BN, 1x1-BN], ReLU between steps.

    The official forward starts its sum at j = 0 with `y = out[0]; y += out[0]` in place, which counts branch 0
    twice and makes the lower branches downsample the already fused map; we compute the plain sum the paper's
    figure and HRNet describe (no parameter difference).
    """

    def __init__(self, channels, num_blocks=BLOCKS_PER_MODULE, reduce_ratio=REDUCE_RATIO):
        super().__init__()
        self.channels = list(channels)
        self.blocks = nn.Sequential(*[ConditionalChannelWeighting(channels, reduce_ratio) for _ in range(num_blocks)])
        n = len(channels)
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(conv_bn(channels[j], channels[i], 1))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = [dw_pw_bn(channels[j], channels[j], stride=2) for _ in range(i - j - 1)]
                    steps.append(dw_pw_bn(channels[j], channels[i], stride=2, relu=False))
                    row.append(nn.Sequential(*steps))
            self.fuse_layers.append(row)

    def forward(self, xs):
        xs = self.blocks(xs)
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = None
            for j, f in enumerate(row):
                if j == i:
                    continue
                t = f(xs[j])
                if j > i:
                    t = F.interpolate(t, size=xs[i].shape[-2:], mode="nearest")
                # t is a fresh BN / interpolate output that autograd does not keep, so accumulate in place
                y = t if y is None else y.add_(t)
            out.append(y.add_(xs[i]).relu_())
        return out


class LiteHRNet18(nn.Module):
    """Paper-faithful Lite-HRNet-18 backbone without the pose IterativeHead.

    forward: x (B, in_chans, H, W) -> [ (B, 40, H/4, W/4), (B, 80, H/8, W/8), (B, 160, H/16, W/16), (B, 320, H/32, W/32) ]
    """

    def __init__(self, in_chans=3):
        super().__init__()
        self.stem = Stem(in_chans)
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev = [STEM_CHANNELS]
        for widths, num_modules in zip(STAGE_WIDTHS, STAGE_MODULES):
            self.transitions.append(self._transition(prev, widths))
            self.stages.append(nn.Sequential(*[LiteHRModule(widths) for _ in range(num_modules)]))
            prev = list(widths)
        self.out_channels = list(STAGE_WIDTHS[-1])

    @staticmethod
    def _transition(prev, cur):
        """Existing branches: DW3x3-BN-1x1-BN-ReLU if the width changes, else identity. Each new branch is
        one stride-2 DW3x3-BN-1x1-BN-ReLU from the previous coarsest branch (each stage adds exactly one)."""
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(prev):
                layers.append(dw_pw_bn(prev[i], c) if prev[i] != c else nn.Identity())
            else:
                layers.append(dw_pw_bn(prev[-1], c, stride=2))
        return layers

    def forward(self, x):
        xs = [self.stem(x)]
        for transition, stage in zip(self.transitions, self.stages):
            xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = stage(xs)
        return xs


class LiteFPN(nn.Module):
    """1x1 Conv-BN laterals to `channels`, then a top-down path from stride 32 to stride 4:
    p_i = SepConv(BN, ReLU)((w_a * lat_i + w_b * up2(p_{i+1})) / (w_a + w_b + eps)), w = softplus(raw) > 0
    (BiFPN "fast normalised fusion"; softplus instead of ReLU so a weight can never die at 0)."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.laterals = nn.ModuleList([conv_bn(c, channels, 1) for c in in_channels])
        n = len(in_channels) - 1
        # softplus(log(e - 1)) = 1: both inputs start with equal weight
        self.fusion_weights = nn.Parameter(torch.full((n, 2), math.log(math.e - 1.0)))
        self.smooth = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for _ in range(n)
        ])
        self.eps = 1e-4

    def forward(self, xs):
        w = F.softplus(self.fusion_weights)
        w = w / (w.sum(dim=1, keepdim=True) + self.eps)  # (n, 2), rows sum to ~1
        p = self.laterals[-1](xs[-1])
        for i in range(len(xs) - 2, -1, -1):
            lat = self.laterals[i](xs[i])
            up = F.interpolate(p, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            p = self.smooth[i](w[i, 0] * lat + w[i, 1] * up)
        return p  # (B, channels, H/4, W/4)


def _head(in_ch, mid_ch, out_ch):
    return nn.Sequential(conv_bn(in_ch, mid_ch, 3, relu=True), nn.Conv2d(mid_ch, out_ch, 1))


class LiteHRNet18FPN(nn.Module):
    """Lite-HRNet-18 + LiteFPN + CenterNet heads at stride s = 4 x input_scale (``self.stride``).

    forward: x (B, in_chans, H, W), H and W divisible by 32 x input_scale ->
        "gap":    (B, 1, H/s, W/s) heatmap logits (sigmoid for probabilities)
        "slider": (B, 1, H/s, W/s) heatmap logits
        "offset": (B, 4, H/s, W/s) (du_gap, dv_gap, du_slider, dv_slider) in (-0.5, 0.5) cells
        "angle":  (B, 2, H/s, W/s) (sin, cos) unit vectors, only when with_angle
    input_scale > 1 first shrinks the RGB + mask canvas that many times (pool_canvas).
    """

    def __init__(self, in_chans: int = 4, fpn_channels: int = 64, head_channels: int = 64, with_angle: bool = True,
                 input_scale: int = 1):
        super().__init__()
        if type(input_scale) is not int or input_scale not in INPUT_SCALES:   # not 2.0, not True
            raise ValueError(f"input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
        if input_scale > 1 and in_chans != 4:
            raise ValueError("input_scale > 1 pools an RGB + padding-mask canvas: it needs in_chans=4")
        self.with_angle, self.input_scale = with_angle, input_scale
        self.stride = 4 * input_scale   # input px per output cell
        self.backbone = LiteHRNet18(in_chans)
        self.fpn = LiteFPN(self.backbone.out_channels, fpn_channels)
        self.gap_head = _head(fpn_channels, head_channels, 1)
        self.slider_head = _head(fpn_channels, head_channels, 1)
        self.offset_head = _head(fpn_channels, head_channels, 4)
        self.angle_head = _head(fpn_channels, head_channels, 2) if with_angle else None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Must stay after the generic loop (the original repo ran it the other way round and lost the bias:
        # first focal loss ~8,000). sigmoid(-2.19) = 0.1 keeps the focal loss of ~8k background cells small.
        for head in (self.gap_head, self.slider_head):
            nn.init.normal_(head[-1].weight, std=0.001)
            nn.init.constant_(head[-1].bias, -math.log((1.0 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        # Kaiming on a 4-output 1x1 conv gives logits of std ~4 and a saturated tanh; start at the cell centre.
        nn.init.normal_(self.offset_head[-1].weight, std=0.001)
        nn.init.zeros_(self.offset_head[-1].bias)

    def forward(self, x):
        multiple = 32 * self.input_scale
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"input H, W must be divisible by {multiple}, got {tuple(x.shape[-2:])}")
        feat = self.fpn(self.backbone(pool_canvas(x, self.input_scale)))
        out = {
            "gap": self.gap_head(feat),
            "slider": self.slider_head(feat),
            "offset": 0.5 * torch.tanh(self.offset_head(feat)),
        }
        if self.angle_head is not None:
            out["angle"] = F.normalize(self.angle_head(feat), dim=1)
        return out

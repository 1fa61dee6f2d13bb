"""DECODE's SigmaMUNet (smlm.md §2): a shared per-frame U-Net, a union U-Net and four output heads.

Input (B, T, H, W): T consecutive camera frames (T = 3 by default: t-1, t, t+1; T = 1 also works), already
scaled as (frames - input_offset) / input_scale (smlm.md §1.6). Output (B, 10, H, W) in the channel layout
defined here (P_CH, MU_CH, SIGMA_CH, BG_CH, N_CHANNELS), already activated, ready for `losses.smlm.gmm_loss`;
models/sigma_munet_post.py turns it into detections.

Structure (features F = initial_features, I = inter_features):

    unet_shared = UNet2d(1 -> I, depth_shared)     run on each of the T frames with the same weights
    concat over frames, frame-major                 (B, T*I, H, W); frame k owns channels [k*I, (k+1)*I)
    unet_union  = UNet2d(T*I -> I, depth_union)
    heads       = 4 x [conv3x3(I -> I) + act, conv1x1(I -> k)], k = 1, 4, 4, 1 (p, mu, sigma, bg)

UNet2d(c_in -> c_out, depth d): level l (0..d) has F * 2^l features and is conv3x3 -> act -> conv3x3 -> act
(zero padding 1, so H, W are kept); going down, a 2x2 stride-2 conv with the same channels ("StrideConv",
DECODE's default) or a 2x2 max-pool; going up, nearest x2 interpolation, conv1x1 halving the channels,
concatenation with the skip of that level, then the level's double conv; finally conv1x1 to c_out. The
final conv1x1 is followed by the activation (smlm.md does not say; without it the 1x1 out-conv and the next
conv3x3 would compose into one linear map), so the union net and the heads see activated features.
Default activation ELU (reference.yaml; template.yaml uses ReLU); no normalisation, no dropout.

Size rule: every down step halves H and W and the up path must land exactly on the skip's size, so H and W
must be multiples of 2^max(depth_shared, depth_union) (4 at the defaults; DECODE crops frames to multiples
of 8 at inference). Other sizes raise ValueError; odd sizes are therefore only accepted at depth 0.

Output channels and activations (smlm.md §2.2; units are the scaled targets of §1.6):
    P_CH      p = sigmoid(clamp(logit, -8, 8))          in [3.4e-4, 0.99966]
    MU_CH     photons / phot_max = sigmoid              in (0, 1)
              x, y offsets from the pixel centre = tanh in (-1, 1) px  (pixel (i, j) centre at (x, y) = (j, i))
              z / z_max = tanh                          in (-1, 1)
    SIGMA_CH  sigma of the four above = 3 sigmoid + sigma_eps, sigma_eps = 0.001 (a fixed buffer, not trained),
              in (0.001, 3.001), same units as the means
    BG_CH     bg / bg_max = sigmoid                     in (0, 1)
Note the logit clamp has zero gradient outside [-8, 8], as in the reference.

Initialisation (smlm.md §2.2, `init_custom`): Kaiming-normal (fan_in, gain for ReLU) on every conv weight,
biases 0, except the p head's output bias = -6 so p starts near sigmoid(-6) = 0.0025; unlike DECODE, the
weights of the mu, sigma and bg heads' output convs start at 0, so those outputs start at their neutral
value on every pixel (offsets and z 0, photons and bg half their scale, sigmas 1.5) instead of saturated
(`reset_parameters` says why).

Parameters (trainable; sigma_eps is a buffer), I = F:
    F = I = 48, depth 2/2 (defaults)   2,199,418  (shared 1,027,008, union 1,088,784, heads 83,626;
                                                   smlm.md §2.1 quotes ~2.20 M, 1.027 M, 1.089 M, 0.084 M)
    F = I = 16, depth 2/2                245,210
    F = I = 8,  depth 2/2 (CPU tests)     61,618
    F = I = 8,  depth 1/1                 16,818
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Output channel layout (module docstring), owned here; losses/smlm.py and models/sigma_munet_post.py read it.
P_CH = 0
MU_CH = slice(1, 5)
SIGMA_CH = slice(5, 9)
BG_CH = 9
N_CHANNELS = 10

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU}
POOL_MODES = ("stride_conv", "max")
P_LOGIT_CLAMP = 8.0
P_BIAS_INIT = -6.0
SIGMA_SCALE = 3.0
SIGMA_EPS = 1e-3

# (first output channel, number of channels) per head, in output-channel order; a two-colour variant would
# add heads here and in `_activate`.
HEAD_CHANNELS = {
    "p": (P_CH, 1),
    "mu": (MU_CH.start, MU_CH.stop - MU_CH.start),
    "sigma": (SIGMA_CH.start, SIGMA_CH.stop - SIGMA_CH.start),
    "bg": (BG_CH, 1),
}


def _check_head_channels() -> None:
    start = 0
    for name, (first, n) in HEAD_CHANNELS.items():
        if first != start:
            raise RuntimeError(f"head {name!r} starts at channel {first}, expected {start}: HEAD_CHANNELS must tile "
                               f"the output channels P_CH .. BG_CH in order")
        start = first + n
    if start != N_CHANNELS:
        raise RuntimeError(f"HEAD_CHANNELS cover {start} channels, the layout has {N_CHANNELS}")


_check_head_channels()

def _double_conv(c_in: int, c_out: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), act(), nn.Conv2d(c_out, c_out, 3, padding=1), act())


class UNet2d(nn.Module):
    """(N, in_channels, H, W) -> (N, out_channels, H, W); H and W multiples of 2^depth (see module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2, initial_features: int = 48,
                 activation: str = "elu", pool_mode: str = "stride_conv"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")
        if depth < 0 or initial_features < 1:
            raise ValueError(f"depth must be >= 0 and initial_features >= 1, got {depth}, {initial_features}")
        act = ACTIVATIONS[activation]
        feats = [initial_features * 2 ** level for level in range(depth + 1)]
        self.depth = depth
        self.encoder, self.down = nn.ModuleList(), nn.ModuleList()
        c = in_channels
        for level in range(depth):
            self.encoder.append(_double_conv(c, feats[level], act))
            self.down.append(nn.Conv2d(feats[level], feats[level], 2, stride=2) if pool_mode == "stride_conv"
                             else nn.MaxPool2d(2))
            c = feats[level]
        self.base = _double_conv(c, feats[depth], act)
        # Decoder modules are stored deepest level first, the order in which forward uses them.
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.Conv2d(feats[level + 1], feats[level], 1))
            self.decoder.append(_double_conv(2 * feats[level], feats[level], act))
        self.out_conv = nn.Conv2d(feats[0], out_channels, 1)
        self.out_act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(x.shape[-2], x.shape[-1], self.depth)
        skips = []
        for enc, down in zip(self.encoder, self.down):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.base(x)
        for up, dec, skip in zip(self.up, self.decoder, reversed(skips)):
            x = up(F.interpolate(x, scale_factor=2, mode="nearest"))
            x = dec(torch.cat([x, skip], dim=1))
        return self.out_act(self.out_conv(x))


def check_size(height: int, width: int, depth: int) -> None:
    multiple = 2 ** depth
    if height % multiple or width % multiple:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {multiple} = 2^depth (depth {depth}); "
                         f"crop or pad frames to a multiple of {multiple}")


class SigmaMUNet(nn.Module):
    """(B, n_frames, H, W) scaled frames -> (B, 10, H, W) activated maps for `losses.smlm.gmm_loss`."""

    def __init__(self, n_frames: int = 3, depth_shared: int = 2, depth_union: int = 2, initial_features: int = 48,
                 inter_features: int = 48, activation: str = "elu", pool_mode: str = "stride_conv"):
        super().__init__()
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        self.n_frames = n_frames
        self.inter_features = inter_features
        self.depth = max(depth_shared, depth_union)
        self.unet_shared = UNet2d(1, inter_features, depth_shared, initial_features, activation, pool_mode)
        self.unet_union = UNet2d(n_frames * inter_features, inter_features, depth_union, initial_features,
                                 activation, pool_mode)
        act = ACTIVATIONS[activation]
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Conv2d(inter_features, inter_features, 3, padding=1), act(),
                                nn.Conv2d(inter_features, n_out, 1))
            for name, (_, n_out) in HEAD_CHANNELS.items()})
        self.register_buffer("sigma_eps", torch.tensor(SIGMA_EPS))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # The output convs of the mu, sigma and bg heads start at zero, so those outputs start at their neutral
        # value on every pixel: offsets and z at 0 (the pixel centre), not at the +-1 limit of the tanh. With
        # Kaiming weights they start saturated (|offset| ~ 0.9 on every pixel); the p map then learns to sit
        # one pixel off each emitter, where the saturated offset can reach it, and the vanishing tanh gradient
        # keeps it there (docs/smlm.md, "Where the error came from"). The p head keeps DECODE's init, so the
        # first update already reaches the U-Nets through it.
        for name in ("mu", "sigma", "bg"):
            nn.init.zeros_(self.heads[name][-1].weight)
        nn.init.constant_(self.heads["p"][-1].bias, P_BIAS_INIT)

    def _activate(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        mu = raw["mu"]    # (B, 4, H, W): photons, x, y, z before activation
        acts = {
            "p": torch.sigmoid(raw["p"].clamp(-P_LOGIT_CLAMP, P_LOGIT_CLAMP)),
            "mu": torch.cat([torch.sigmoid(mu[:, :1]), torch.tanh(mu[:, 1:])], dim=1),
            "sigma": torch.sigmoid(raw["sigma"]) * SIGMA_SCALE + self.sigma_eps,
            "bg": torch.sigmoid(raw["bg"]),
        }
        return torch.cat([acts[name] for name in HEAD_CHANNELS], dim=1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_frames, H, W) scaled frames -> (B, inter_features, H, W) union features (what the heads read)."""
        if x.ndim != 4 or x.shape[1] != self.n_frames:
            raise ValueError(f"SigmaMUNet expects (B, {self.n_frames}, H, W) frames, got {tuple(x.shape)}")
        b, t, h, w = x.shape
        check_size(h, w, self.depth)
        # All frames in one call: (B*T, 1, H, W) -> (B*T, I, H, W) -> (B, T*I, H, W), frame-major channels.
        feats = self.unet_shared(x.reshape(b * t, 1, h, w)).reshape(b, t * self.inter_features, h, w)
        return self.unet_union(feats)

    def head_output(self, z: torch.Tensor) -> torch.Tensor:
        """Union features (B, inter_features, H, W) -> the activated (B, 10, H, W) maps."""
        return self._activate({name: head(z) for name, head in self.heads.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_output(self.trunk(x))

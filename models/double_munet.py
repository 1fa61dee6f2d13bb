"""Two-colour ratiometric SMLM network (the design notes' `DoubleMUNet`, smlm.md §11): one SigmaMUNet per
spectral channel and a ratio head on the union of their features.

Input (B, 2, T, H, W): T consecutive frames of each channel, scaled per channel as the single-colour input
(`data.smlm.scale_frames` with that channel's config) and already registered onto channel 1's pixel grid
(`data.smlm.colour` undoes the channel-2 transform before the network), so that one pixel is the same place
in both channels and the ratio head can compare them.

Output (B, 22, H, W), activated:

    CH1_SLICE   0-9     channel 1, SigmaMUNet layout (models/sigma_munet.py: p, 4 mu, 4 sigma, bg): photons
                        are channel 1's share, positions in channel 1's pixels
    CH2_SLICE   10-19   channel 2, same layout, same pixel grid (after registration)
    RATIO_CH    20      ratio mean r = ch1 photons / (ch1 + ch2) = sigmoid           in (0, 1)
    LOGVAR_CH   21      ratio log-variance = LOGVAR_MIN + (LOGVAR_MAX - LOGVAR_MIN) sigmoid, so the ratio
                        sigma stays within [exp(LOGVAR_MIN / 2), exp(LOGVAR_MAX / 2)] = [0.0025, 1.65]

A localisation's ratio is read at the pixel that reports it (its p-map peak), as its photons and offsets are.

Weights: `shared_weights=False` (default) gives each channel its own SigmaMUNet, as cy2311's multi-channel
network (two PSFs and cameras rarely look alike); True runs one SigmaMUNet on both channels (half the
parameters). The ratio head is conv3x3(2I -> I) + act + conv1x1(I -> 2) on the two channels' union features
(I = inter_features); its output conv starts at zero weights (ratio 0.5, log-variance at mid-range), as the
SigmaMUNet's regression heads do.

Parameters (trainable), F = I, depth 2/2, separate weights:
    F = 16    495,078        F = 8    124,414        F = 8, shared weights    62,796
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .sigma_munet import ACTIVATIONS, N_CHANNELS, SigmaMUNet

CH1_SLICE = slice(0, N_CHANNELS)
CH2_SLICE = slice(N_CHANNELS, 2 * N_CHANNELS)
CHANNEL_SLICES = (CH1_SLICE, CH2_SLICE)
RATIO_CH = 2 * N_CHANNELS
LOGVAR_CH = 2 * N_CHANNELS + 1
N_CHANNELS_2C = 2 * N_CHANNELS + 2
LOGVAR_MIN = -12.0
LOGVAR_MAX = 1.0


class DoubleMUNet(nn.Module):
    """(B, 2, n_frames, H, W) registered, scaled frames -> (B, 22, H, W) activated maps (module docstring)."""

    def __init__(self, n_frames: int = 3, depth_shared: int = 2, depth_union: int = 2, initial_features: int = 48,
                 inter_features: int = 48, activation: str = "elu", pool_mode: str = "stride_conv",
                 shared_weights: bool = False):
        super().__init__()
        kwargs = dict(n_frames=n_frames, depth_shared=depth_shared, depth_union=depth_union,
                      initial_features=initial_features, inter_features=inter_features, activation=activation,
                      pool_mode=pool_mode)
        self.n_frames, self.shared_weights = n_frames, shared_weights
        self.depth = max(depth_shared, depth_union)
        self.channels = nn.ModuleList([SigmaMUNet(**kwargs) for _ in range(1 if shared_weights else 2)])
        act = ACTIVATIONS[activation]
        self.ratio_head = nn.Sequential(nn.Conv2d(2 * inter_features, inter_features, 3, padding=1), act(),
                                        nn.Conv2d(inter_features, 2, 1))
        nn.init.kaiming_normal_(self.ratio_head[0].weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.ratio_head[0].bias)
        nn.init.zeros_(self.ratio_head[-1].weight)
        nn.init.zeros_(self.ratio_head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 2 or x.shape[2] != self.n_frames:
            raise ValueError(f"DoubleMUNet expects (B, 2, {self.n_frames}, H, W) frames, got {tuple(x.shape)}")
        b = x.shape[0]
        if self.shared_weights:
            # Both channels in one batch through the one network: (2B, T, H, W), channel-major.
            net = self.channels[0]
            z = net.trunk(x.transpose(0, 1).flatten(0, 1))
            out = net.head_output(z)
            z1, z2, out1, out2 = z[:b], z[b:], out[:b], out[b:]
        else:
            z1, z2 = self.channels[0].trunk(x[:, 0]), self.channels[1].trunk(x[:, 1])
            out1, out2 = self.channels[0].head_output(z1), self.channels[1].head_output(z2)
        raw = self.ratio_head(torch.cat([z1, z2], dim=1))
        ratio = torch.sigmoid(raw[:, :1])
        logvar = LOGVAR_MIN + (LOGVAR_MAX - LOGVAR_MIN) * torch.sigmoid(raw[:, 1:])
        return torch.cat([out1, out2, ratio, logvar], dim=1)

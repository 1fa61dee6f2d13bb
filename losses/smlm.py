"""Gaussian-mixture-model loss of DECODE (smlm.md §3.1) for the 10-channel SigmaMUNet output.

Output (B, 10, H, W) in the channel layout of models/sigma_munet.py (P_CH, MU_CH, SIGMA_CH, BG_CH),
already activated by the model (smlm.md §2.2); the loss takes probabilities, not logits:

    ch 0     p      detection probability in (0, 1) (the model clamps the logit to [-8, 8])
    ch 1-4   mu     photons / phot_max, x offset (px), y offset (px), z / z_max
    ch 5-8   sigma  standard deviations of the same four quantities, same units, > 0
    ch 9     bg     background photons per px / bg_max  (the last channel; DECODE's `bg_ch_ix = [10]`
                    is a bug, smlm.md §10 #1)

Pixel convention: x runs along the last (W) axis and y along H. Pixel (row i, col j) covers
x in [j - 1/2, j + 1/2) and y in [i - 1/2, i + 1/2) px, so its centre is (x, y) = (j, i): the frame
extent is [-0.5, W - 0.5] x [-0.5, H - 0.5] as DECODE's `psf_extent`, and the emitter predicted by that
pixel sits at (j + dx, i + dy), dx, dy being the tanh offsets of channels 2 and 3 (|offset| <= 1 px).

Targets are in the output's scaled units (smlm.md §1.6, `ParameterListRescale`):
    target_emitters (B, E, 4): (photons / phot_max, x px, y px, z / z_max), padded to any E
    target_mask     (B, E) bool: True for real emitters, in any order; padded rows may hold anything
    target_bg       (B, H, W): background photons per px / bg_max, or None for no background term

Per frame b, with E_b = sum_e mask_be the number of true emitters and k running over the K = H*W pixels:

    count_b = log Normal(E_b; mean = sum_k p_k, var = sum_k p_k (1 - p_k))
              (Gaussian approximation of the Poisson-binomial distribution of the number of detections)
    mix_b   = sum_e mask_be log sum_k pi_k prod_d Normal(u_bed; mu_kd, sigma_kd^2),   pi_k = p_k / sum_j p_j
              mu_k = (phot_k, j_k + dx_k, i_k + dy_k, z_k); u_be the target row; d over the 4 dimensions
    bg_b    = sum_hw (bg_pred - bg_target)^2        (a sum of squared errors, not a mean)

    loss = mean_b [ w_count * (-c_b count_b) + w_gmm * (-mix_b) + w_bg * bg_b ]

with c_b = 1 (the paper's likelihood, the default) or c_b = E_b when `count_times_num_emitters` (what
DECODE's code does, smlm.md §3.1 step 1 and §10 #2; §12 recommends this form for DECODE-faithful
training, so the training config should turn it on). With the flag, a frame without emitters has no
count term at all (E_b = 0), so nothing pushes its p map down; without it, the count term of an empty
frame still penalises sum_k p_k. The mixture term of an empty frame is 0 (an empty sum), never NaN.

With all weights 1 and the flag on, `loss` equals DECODE's `loss.mean()` over its (B, 2) matrix
2 * [gmm_b, bg_b] * chweight_stat, chweight_stat = [1, 1]: the factor 2 cancels the mean over the two
columns. Each term is a per-frame sum averaged over the batch, so gradient accumulation over k equal
micro-batches of size b gives the gradient of one batch of size k*b.

The returned parts are unweighted batch means: "loss/count" = mean_b(-c_b count_b), "loss/gmm" =
mean_b(-mix_b), "loss/bg" = mean_b(bg_b). DECODE logs the sum of the first two as its "gmm" component.
"""
from __future__ import annotations

import math

import torch

from models.sigma_munet import BG_CH, MU_CH, N_CHANNELS, P_CH, SIGMA_CH

# Floors that only matter for degenerate inputs (p exactly 0 or 1 everywhere); the model's logit clamp to
# [-8, 8] keeps p >= 3.4e-4, far above them, so they never change a trained model's loss.
_P_MIN = 1e-12
_VAR_MIN = 1e-12
_LOG_2PI = math.log(2.0 * math.pi)


def _check_shapes(output: torch.Tensor, target_emitters: torch.Tensor, target_mask: torch.Tensor,
                  target_bg: torch.Tensor | None) -> None:
    if output.ndim != 4 or output.shape[1] != N_CHANNELS:
        raise ValueError(f"output must be (B, {N_CHANNELS}, H, W), got {tuple(output.shape)}")
    b = output.shape[0]
    if target_emitters.ndim != 3 or target_emitters.shape[0] != b or target_emitters.shape[2] != 4:
        raise ValueError(f"target_emitters must be (B={b}, E, 4), got {tuple(target_emitters.shape)}")
    if tuple(target_mask.shape) != tuple(target_emitters.shape[:2]):
        raise ValueError(f"target_mask must be {tuple(target_emitters.shape[:2])}, got {tuple(target_mask.shape)}")
    if target_bg is not None and tuple(target_bg.shape) != (b, *output.shape[2:]):
        raise ValueError(f"target_bg must be {(b, *output.shape[2:])}, got {tuple(target_bg.shape)}")


def gmm_terms(output: torch.Tensor, target_emitters: torch.Tensor, target_mask: torch.Tensor,
              target_bg: torch.Tensor | None = None):
    """Per-frame log-likelihoods and background SSE, before weighting and batch averaging.

    Shapes and units as in the module docstring. Returns (count_ll, mix_ll, bg_sse, n_emitters), each (B,);
    count_ll is the plain log-likelihood (not multiplied by E). Low-precision inputs are promoted to
    float32 so the loss is computed in at least float32 under autocast. Memory is dominated by the
    (B, E, H*W, 4) standardised residuals, so pad E to the batch's largest count rather than to a fixed
    cap such as DECODE's 250.
    """
    _check_shapes(output, target_emitters, target_mask, target_bg)
    dtype = torch.promote_types(output.dtype, torch.float32)
    out = output.to(dtype)
    batch, _, height, width = out.shape

    p = out[:, P_CH].flatten(1)                                              # (B, K)
    mask = target_mask.to(torch.bool)
    n_emitters = mask.sum(1).to(dtype)                                       # (B,)
    p_sum = p.sum(1)
    p_var = (p * (1 - p)).sum(1).clamp_min(_VAR_MIN)
    count_ll = -0.5 * (_LOG_2PI + p_var.log()) - (n_emitters - p_sum) ** 2 / (2 * p_var)

    rows = torch.arange(height, device=out.device, dtype=dtype)
    cols = torch.arange(width, device=out.device, dtype=dtype)
    # Component means (B, K, 4): the x, y channels are offsets (px) from the pixel centre (j, i).
    mu_map = out[:, MU_CH]
    mu = torch.stack([mu_map[:, 0], mu_map[:, 1] + cols, mu_map[:, 2] + rows[:, None], mu_map[:, 3]],
                     dim=-1).flatten(1, 2)                                   # (B, K, 4), k = i * W + j
    sigma = out[:, SIGMA_CH].flatten(2).transpose(1, 2)                      # (B, K, 4)
    log_pi = p.clamp_min(_P_MIN).log() - p_sum.clamp_min(_P_MIN).log()[:, None]   # (B, K)

    # Padded rows are replaced by 0 before use so that garbage (even NaN) in them cannot reach the
    # loss or its gradient; they are dropped again by the mask below.
    u = torch.where(mask[..., None], target_emitters.to(dtype), torch.zeros((), dtype=dtype, device=out.device))
    z = (u[:, :, None, :] - mu[:, None, :, :]) / sigma[:, None, :, :]      # (B, E, K, 4)
    log_comp = (-0.5 * z.square() - sigma.log()[:, None]).sum(-1) - 2.0 * _LOG_2PI   # (B, E, K)
    log_mix = torch.logsumexp(log_pi[:, None, :] + log_comp, dim=2)         # (B, E)
    mix_ll = torch.where(mask, log_mix, torch.zeros_like(log_mix)).sum(1)

    if target_bg is None:
        bg_sse = torch.zeros(batch, dtype=dtype, device=out.device)
    else:
        bg_sse = (out[:, BG_CH] - target_bg.to(dtype)).square().flatten(1).sum(1)
    return count_ll, mix_ll, bg_sse, n_emitters


def gmm_loss(output: torch.Tensor, target_emitters: torch.Tensor, target_mask: torch.Tensor,
             target_bg: torch.Tensor | None = None, *, count_weight: float | torch.Tensor = 1.0,
             gmm_weight: float | torch.Tensor = 1.0, bg_weight: float | torch.Tensor = 1.0,
             count_times_num_emitters: bool = False):
    """DECODE's mixture-model loss: (scalar loss, {"loss/count", "loss/gmm", "loss/bg"}).

    output (B, 10, H, W) activated SigmaMUNet maps; target_emitters (B, E, 4) as (photons/phot_max, x px,
    y px, z/z_max); target_mask (B, E) bool; target_bg (B, H, W) bg/bg_max or None. The weights multiply
    the three per-frame terms (a training script computes them from global_step); the parts are
    unweighted. `count_times_num_emitters=True` reproduces DECODE's code (count log-likelihood times the
    frame's number of emitters); False is the paper's form. See the module docstring for the formulas.
    """
    count_ll, mix_ll, bg_sse, n_emitters = gmm_terms(output, target_emitters, target_mask, target_bg)
    count_nll = -(count_ll * n_emitters if count_times_num_emitters else count_ll)
    mix_nll = -mix_ll
    loss = (count_weight * count_nll + gmm_weight * mix_nll + bg_weight * bg_sse).mean()
    parts = {"loss/count": count_nll.mean().detach(), "loss/gmm": mix_nll.mean().detach(),
             "loss/bg": bg_sse.mean().detach()}
    return loss, parts

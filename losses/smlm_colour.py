"""Two-colour ratiometric SMLM loss terms, loss-weight schedules and distillation terms for DoubleMUNet maps.

Output (B, 22, H, W): the activated DoubleMUNet maps (models/double_munet.py): CH1_SLICE and CH2_SLICE are two
SigmaMUNet layouts (models/sigma_munet.py: p, 4 mu, 4 sigma, bg), RATIO_CH the ratio mean in (0, 1) and
LOGVAR_CH its log-variance.

Targets, as the simulator's collate gives them, in channel 1's pixel grid:
    target_emitters (B, E, 6)  (phot1 / phot_max, phot2 / phot_max, x px, y px, z / z_max, ratio),
                               ratio = phot1 / (phot1 + phot2) in [0, 1]; padded rows may hold anything (NaN)
    target_mask     (B, E) bool, the real rows
    channel_mask    (B, 2, E) bool, the rows that are targets of channel c (a subset of target_mask; it is
                    intersected with target_mask here, so a padded row can never become a target)
    target_bg       (B, 2, H, W) each channel's bg / its bg_max, or None

Pixel convention of losses/smlm.py: pixel (row i, col j) covers x in [j - 1/2, j + 1/2), y in [i - 1/2, i + 1/2).
An emitter's own pixel is therefore (floor(y + 1/2), floor(x + 1/2)), clamped into the frame (rounding half up,
not Python's half-to-even, so that x = 0.5 falls in column 1 as the half-open pixel says).

Terms of `colour_loss_terms`, each a per-frame sum averaged over the batch (gradient accumulation over equal
micro-batches stays exact), unweighted; m, logvar, ph1_hat, ph2_hat are read at the emitter's own pixel:
    ch1, ch2       losses.smlm.gmm_loss (weights 1) of that channel's 10 maps against its rows
                   (phot_c, x, y, z) masked by channel_mask[:, c], with its target_bg
    ratio          sum_rows 0.5 (logvar + (r - m)^2 / exp(logvar) + log 2 pi)     Gaussian NLL of the ratio
    conservation   sum_rows (ph1_hat + ph2_hat - (phot1 + phot2))^2               phot_max units
    consistency    sum_rows (m - ph1_hat / max(ph1_hat + ph2_hat, floor))^2       ratio head vs. photon heads
ph_c_hat is channel c's photon mu map (its channel MU_CH.start). "consistency" sends gradient to both the ratio
head and the photon heads. `weighted_sum` turns the terms into one loss; the weights come from the training
script's step via `schedule_value` (smlm.md §10 #9: a pure loss, no LossScheduler object).

Distillation (smlm.md §10 #8, not a softmax over channels), `distillation_terms(student, teacher)`:
    distill/p      sum_{c, pixels} BCE(p_s, p_t) = -(p_t log p_s + (1 - p_t) log(1 - p_s))
    distill/gauss  sum_{c, pixels} p_t,c sum_{d=1..4} KL(N(mu_t, s_t^2) || N(mu_s, s_s^2))
                   + sum_pixels max(p_t,1, p_t,2) KL(ratio_t || ratio_s)   (variances exp(logvar))
both averaged over the batch; KL(N(a, s^2) || N(b, u^2)) = log(u / s) + (s^2 + (a - b)^2) / (2 u^2) - 1/2.
"""
from __future__ import annotations

import math

import torch

from losses.smlm import gmm_loss
from models.double_munet import CHANNEL_SLICES, LOGVAR_CH, N_CHANNELS_2C, RATIO_CH
from models.sigma_munet import MU_CH, P_CH, SIGMA_CH

TERM_NAMES = ("ch1", "ch2", "ratio", "conservation", "consistency")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")
_LOG_2PI = math.log(2.0 * math.pi)
# The photon maps are sigmoids, so ph1 + ph2 > 0 for any model output; the floor only guards hand-made maps.
_PHOT_SUM_MIN = 1e-6
# log(p) of a student p map; SigmaMUNet's logit clamp keeps p in [3.4e-4, 0.99966], far inside this.
_P_EPS = 1e-6


def _check_shapes(output: torch.Tensor, target_emitters: torch.Tensor, target_mask: torch.Tensor,
                  channel_mask: torch.Tensor, target_bg: torch.Tensor | None) -> None:
    if output.ndim != 4 or output.shape[1] != N_CHANNELS_2C:
        raise ValueError(f"output must be (B, {N_CHANNELS_2C}, H, W), got {tuple(output.shape)}")
    b, _, h, w = output.shape
    if target_emitters.ndim != 3 or target_emitters.shape[0] != b or target_emitters.shape[2] != 6:
        raise ValueError(f"target_emitters must be (B={b}, E, 6), got {tuple(target_emitters.shape)}")
    e = target_emitters.shape[1]
    if tuple(target_mask.shape) != (b, e):
        raise ValueError(f"target_mask must be {(b, e)}, got {tuple(target_mask.shape)}")
    if tuple(channel_mask.shape) != (b, 2, e):
        raise ValueError(f"channel_mask must be {(b, 2, e)}, got {tuple(channel_mask.shape)}")
    if target_bg is not None and tuple(target_bg.shape) != (b, 2, h, w):
        raise ValueError(f"target_bg must be {(b, 2, h, w)}, got {tuple(target_bg.shape)}")


def _at_own_pixel(maps: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """maps (B, C, H, W), xy (B, E, 2) finite positions in px -> (B, C, E) values at each row's own pixel."""
    b, c, h, w = maps.shape
    col = torch.floor(xy[..., 0] + 0.5).clamp(0, w - 1).long()
    row = torch.floor(xy[..., 1] + 0.5).clamp(0, h - 1).long()
    k = (row * w + col)[:, None, :].expand(b, c, -1)                          # (B, C, E), k = i * W + j
    return torch.gather(maps.flatten(2), 2, k)


def colour_loss_terms(output: torch.Tensor, target_emitters: torch.Tensor, target_mask: torch.Tensor,
                      channel_mask: torch.Tensor, target_bg: torch.Tensor | None = None, *,
                      count_times_num_emitters: bool = True) -> dict[str, torch.Tensor]:
    """(B, 22, H, W) activated maps and the collate's targets -> {name: scalar} for the names in TERM_NAMES.

    Shapes, units and formulas in the module docstring. Every term is a batch mean of per-frame sums, unweighted
    (combine them with `weighted_sum`). `count_times_num_emitters` is passed to each channel's gmm_loss
    (DECODE's code form, the training default). Computed in at least float32; padded rows (even NaN) reach
    neither the value nor the gradient.
    """
    _check_shapes(output, target_emitters, target_mask, channel_mask, target_bg)
    dtype = torch.promote_types(output.dtype, torch.float32)
    out = output.to(dtype)
    mask = target_mask.to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=out.device)
    # Padded rows become 0 before any use, so NaN in them cannot reach the loss or its gradient.
    rows = torch.where(mask[..., None], target_emitters.to(dtype), zero)      # (B, E, 6)

    terms = {}
    for c, (name, ch_slice) in enumerate(zip(("ch1", "ch2"), CHANNEL_SLICES)):
        bg = None if target_bg is None else target_bg[:, c]
        ch_rows = rows[..., [c, 2, 3, 4]]                                     # (phot_c, x, y, z)
        terms[name], _ = gmm_loss(out[:, ch_slice], ch_rows, channel_mask[:, c].to(torch.bool) & mask, bg,
                                  count_times_num_emitters=count_times_num_emitters)

    phot_chs = [s.start + MU_CH.start for s in CHANNEL_SLICES]
    picked = _at_own_pixel(out[:, [RATIO_CH, LOGVAR_CH, *phot_chs]], rows[..., 2:4])   # (B, 4, E)
    mean, logvar, ph1_hat, ph2_hat = picked.unbind(1)                         # each (B, E)
    phot1, phot2, ratio = rows[..., 0], rows[..., 1], rows[..., 5]
    per_row = {
        "ratio": 0.5 * (logvar + (ratio - mean).square() * torch.exp(-logvar) + _LOG_2PI),
        "conservation": (ph1_hat + ph2_hat - (phot1 + phot2)).square(),
        "consistency": (mean - ph1_hat / (ph1_hat + ph2_hat).clamp_min(_PHOT_SUM_MIN)).square(),
    }
    for name, value in per_row.items():
        terms[name] = torch.where(mask, value, zero).sum(1).mean()
    return terms


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float | torch.Tensor]):
    """(loss, parts): loss = sum over the names of `weights` of weight * term (a name without a term raises
    ValueError); parts = {"loss/<name>": detached term} for every term, weighted or not, for logging."""
    if not weights:
        raise ValueError(f"weights is empty; expected weights for some of {sorted(terms)}")
    missing = [name for name in weights if name not in terms]
    if missing:
        raise ValueError(f"loss weight for {missing[0]!r} has no term; terms are {sorted(terms)}")
    loss = sum(weights[name] * terms[name] for name in weights)
    parts = {f"loss/{name}": term.detach() for name, term in terms.items()}
    return loss, parts


def schedule_value(step: int, kind: str, start: float, end: float, start_step: int = 0, end_step: int = 0) -> float:
    """Loss weight at update `step` (a pure function of the update count, no state).

    t = clamp((step - start_step) / (end_step - start_step), 0, 1); when end_step <= start_step, t = 1 from
    start_step on and 0 before. constant: start; linear: start + (end - start) t; cosine: end + (start - end)
    (1 + cos(pi t)) / 2; exponential: start (end / start)^t (start and end must be > 0).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
    if kind == "exponential" and not (start > 0 and end > 0):
        raise ValueError(f"exponential schedule needs start > 0 and end > 0, got start {start}, end {end}")
    if end_step <= start_step:
        t = 1.0 if step >= start_step else 0.0
    else:
        t = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    if kind == "constant":
        return float(start)
    if kind == "linear":
        return float(start + (end - start) * t)
    if kind == "cosine":
        return float(end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0)
    return float(start * (end / start) ** t)


def parse_schedule(spec: str | float) -> dict:
    """A command-line schedule -> keyword arguments of `schedule_value` (all but step).

    Accepted: a number (constant), "constant:VALUE", or "KIND:START:END:START_STEP:END_STEP" with KIND in
    SCHEDULE_KINDS, e.g. "linear:0:1:0:2000" (weight 0 -> 1 over the first 2000 updates). Anything else raises
    ValueError with one line saying what was expected.
    """
    expected = (f"expected a number, 'constant:VALUE' or 'KIND:START:END:START_STEP:END_STEP' with KIND in "
                f"{SCHEDULE_KINDS}, got {spec!r}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
        return {"kind": "constant", "start": value, "end": value, "start_step": 0, "end_step": 0}
    if not isinstance(spec, str):
        raise ValueError(f"loss schedule: {expected}")
    fields = [f.strip() for f in spec.split(":")]
    try:
        if len(fields) == 1:
            value = float(fields[0])
            sched = {"kind": "constant", "start": value, "end": value, "start_step": 0, "end_step": 0}
        elif len(fields) == 2 and fields[0] == "constant":
            value = float(fields[1])
            sched = {"kind": "constant", "start": value, "end": value, "start_step": 0, "end_step": 0}
        elif len(fields) == 5 and fields[0] in SCHEDULE_KINDS:
            sched = {"kind": fields[0], "start": float(fields[1]), "end": float(fields[2]),
                     "start_step": int(fields[3]), "end_step": int(fields[4])}
        else:
            raise ValueError(expected)
    except ValueError:
        raise ValueError(f"loss schedule: {expected}") from None
    if not all(math.isfinite(sched[k]) for k in ("start", "end")) or min(sched["start_step"], sched["end_step"]) < 0:
        raise ValueError(f"loss schedule: {expected} (finite values, steps >= 0)")
    schedule_value(sched["start_step"], **sched)                               # exponential's sign check
    return sched


def gaussian_kl(mu_t: torch.Tensor, sigma_t: torch.Tensor, mu_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_t, sigma_t^2) || N(mu_s, sigma_s^2)) = log(sigma_s / sigma_t)
    + (sigma_t^2 + (mu_t - mu_s)^2) / (2 sigma_s^2) - 1/2, in nats; any broadcastable shapes, sigmas > 0."""
    var_ratio = (sigma_t / sigma_s).square()
    return 0.5 * (var_ratio + ((mu_t - mu_s) / sigma_s).square() - 1.0 - torch.log(var_ratio))


def distillation_terms(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """Student and teacher (B, 22, H, W) activated DoubleMUNet maps -> {"distill/p", "distill/gauss"} scalars.

    The teacher is detached here. Both terms are per-frame sums averaged over the batch (module docstring);
    "distill/p" equals the teacher's binary entropy, its minimum, when the student copies the teacher, and
    "distill/gauss" is then 0.
    """
    if student.ndim != 4 or student.shape[1] != N_CHANNELS_2C or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must both be (B, {N_CHANNELS_2C}, H, W), "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    bce = s.new_zeros(s.shape[0])
    gauss = s.new_zeros(s.shape[0])
    p_teacher = []
    for ch_slice in CHANNEL_SLICES:
        o = ch_slice.start
        p_s, p_t = s[:, o + P_CH].clamp(_P_EPS, 1.0 - _P_EPS), t[:, o + P_CH]
        p_teacher.append(p_t)
        bce = bce - (p_t * torch.log(p_s) + (1.0 - p_t) * torch.log1p(-p_s)).flatten(1).sum(1)
        mu = slice(o + MU_CH.start, o + MU_CH.stop)
        sig = slice(o + SIGMA_CH.start, o + SIGMA_CH.stop)
        kl = gaussian_kl(t[:, mu], t[:, sig], s[:, mu], s[:, sig]).sum(1)        # (B, H, W), summed over dims
        gauss = gauss + (p_t * kl).flatten(1).sum(1)
    kl_ratio = gaussian_kl(t[:, RATIO_CH], torch.exp(0.5 * t[:, LOGVAR_CH]),
                           s[:, RATIO_CH], torch.exp(0.5 * s[:, LOGVAR_CH]))
    gauss = gauss + (torch.maximum(*p_teacher) * kl_ratio).flatten(1).sum(1)
    return {"distill/p": bce.mean(), "distill/gauss": gauss.mean()}

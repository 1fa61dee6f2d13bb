"""Focal loss and BCE against their formulas; pair metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losses.pair import bce_loss, focal_loss, smooth_targets
from metrics.pair import pair_metrics


def focal_by_hand(z: float, y: int, alpha: float, gamma: float, eps: float) -> float:
    t = y * (1 - eps) + 0.5 * eps
    p = 1 / (1 + math.exp(-z))
    bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    return alpha * (1 - math.exp(-bce)) ** gamma * bce


@pytest.mark.parametrize("alpha,gamma,eps", [(1.0, 2.0, 0.1), (0.25, 2.0, 0.0), (2.0, 0.5, 0.2), (1.0, 0.0, 0.0)])
def test_focal_loss_matches_formula(alpha, gamma, eps):
    z = torch.tensor([-3.0, -0.4, 0.0, 0.7, 2.5, 6.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    loss, parts = focal_loss(z, y, alpha=alpha, gamma=gamma, label_smoothing=eps)
    expected = np.mean([focal_by_hand(float(a), int(b), alpha, gamma, eps) for a, b in zip(z, y)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert set(parts) == {"loss/focal", "loss/bce"}


def test_focal_with_gamma_zero_is_bce_and_down_weights_easy_examples():
    z = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    y = (torch.rand(64, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    focal0, _ = focal_loss(z, y, alpha=1.0, gamma=0.0, label_smoothing=0.1)
    bce, _ = bce_loss(z, y, label_smoothing=0.1)
    assert focal0.item() == pytest.approx(bce.item(), rel=1e-6)
    easy, hard = torch.tensor([4.0]), torch.tensor([-1.0])  # both with target 1
    ratio_easy = focal_loss(easy, torch.ones(1), gamma=2.0, label_smoothing=0)[0] / bce_loss(easy, torch.ones(1))[0]
    ratio_hard = focal_loss(hard, torch.ones(1), gamma=2.0, label_smoothing=0)[0] / bce_loss(hard, torch.ones(1))[0]
    assert ratio_easy < 0.001 < 0.3 < ratio_hard


def test_label_smoothing_targets_and_gradient():
    assert smooth_targets(torch.tensor([0, 1]), 0.1).tolist() == pytest.approx([0.05, 0.95])
    z = torch.zeros(3, requires_grad=True)
    loss, _ = focal_loss(z, torch.tensor([1, 0, 1]))
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad[0] < 0 < z.grad[1]


def test_bce_matches_torch_formula():
    z = torch.tensor([0.3, -2.0, 1.5])
    y = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(z)
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert bce_loss(z, y)[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_pair_metrics_hand_computed():
    prob = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.1])
    label = np.array([1, 1, 1, 0, 0, 0])
    m = pair_metrics(prob, label)
    # predictions 1 1 0 0 1 0: tp 2, fn 1, fp 1, tn 2
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    # positives outrank negatives in 8 of 9 (pos, neg) pairs
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert math.isnan(pair_metrics(prob, np.ones(6))["roc_auc"])
    with pytest.raises(ValueError, match="lengths"):
        pair_metrics(prob, label[:3])


def test_lr_schedules_of_train_pair():
    from train_pair import Args, build_scheduler

    def lrs(args, steps, metrics=None):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
        scheduler = build_scheduler(optimizer, args, max_steps=steps)
        out = []
        for k in range(steps):
            optimizer.step()
            scheduler.step(metrics[k]) if metrics is not None else scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    plateau = Args(lr=1e-3, lr_schedule="plateau", plateau_factor=0.5, plateau_patience=2)
    # accuracy improves twice, then stalls: the lr halves after the 3rd stalled evaluation (patience 2)
    assert lrs(plateau, 6, [50, 60, 60, 60, 59, 60]) == pytest.approx([1e-3] * 4 + [5e-4] * 2)
    cosine = lrs(Args(lr=1e-3, lr_schedule="cosine", min_lr=1e-5), 10)
    assert cosine[-1] == pytest.approx(1e-5) and all(a > b for a, b in zip(cosine, cosine[1:]))


def test_digit_loss_is_the_mean_cross_entropy_over_both_halves():
    from losses.pair import digit_loss

    torch.manual_seed(0)
    da, db = torch.randn(4, 10), torch.randn(4, 10)
    ya, yb = torch.tensor([0, 3, 9, 3]), torch.tensor([1, 3, 2, 7])
    loss, parts = digit_loss(da, db, ya, yb)
    by_hand = -np.mean([torch.log_softmax(logits, 0)[label].item()
                        for logits, label in zip([*da, *db], [*ya.tolist(), *yb.tolist()])])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6) and parts["loss/digit"].item() == loss.item()


def test_mean_corruption_accuracy_needs_every_corruption_set():
    from metrics.pair import CORRUPTION_SETS, mean_corruption_accuracy

    acc = {name: 60.0 + 5 * k for k, name in enumerate(CORRUPTION_SETS)}
    assert mean_corruption_accuracy({**acc, "robust_clean": 99.0, "test": 80.0}) == pytest.approx(70.0)
    assert np.isnan(mean_corruption_accuracy({k: v for k, v in acc.items() if k != "robust_noise"}))

"""Metrics of the pair classifier: arrays in, dict of floats out (scikit-learn).

``prob`` are sigmoid probabilities (N,), ``label`` 0/1 (N,); a pair is predicted "same"
when prob >= threshold. Accuracy, precision, recall and F1 are percentages; ROC AUC is in
[0, 1] and NaN when only one class is present.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score, roc_auc_score


def pair_metrics(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if prob.shape != label.shape:
        raise ValueError(f"prob and label lengths differ: {prob.shape} vs {label.shape}")
    pred = (prob >= threshold).astype(np.int64)
    two_classes = len(np.unique(label)) == 2
    return {
        "accuracy": 100.0 * accuracy_score(label, pred),
        "f1": 100.0 * f1_score(label, pred, zero_division=0),
        "precision": 100.0 * precision_score(label, pred, zero_division=0),
        "recall": 100.0 * recall_score(label, pred, zero_division=0),
        "roc_auc": float(roc_auc_score(label, prob)) if two_classes else float("nan"),
        "log_loss": float(log_loss(label, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


# The corruption sets of `python -m data.pair build` (data.pair.ROBUST_SETS without the clean reference and
# the second digit source): their mean accuracy is the one-number robustness score, as ImageNet-C's mean
# corruption error is for ImageNet classifiers.
CORRUPTION_SETS = ("robust_blur", "robust_occlusion", "robust_contrast", "robust_noise", "robust_harsh")


def mean_corruption_accuracy(accuracy: dict[str, float]) -> float:
    """Mean of accuracy[name] over CORRUPTION_SETS (%); NaN unless every one of them is present."""
    if not all(name in accuracy for name in CORRUPTION_SETS):
        return float("nan")
    return float(np.mean([accuracy[name] for name in CORRUPTION_SETS]))

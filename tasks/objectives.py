"""Losses and metrics of the pooled heads, by head kind (habit 8: heads own them, not the model).

classification: cross-entropy over class indices; metrics accuracy, macro F1, per-class F1, the
    confusion matrix, and ROC-AUC / PR-AUC (binary: of the positive class, the second label;
    multi-class: macro one-vs-rest over the classes present in the test set).
regression: mean squared error over the known targets only (NaN = not measured, masked: multi-task
    sets such as Tox21 leave most cells empty); metrics per target RMSE, Spearman, concordance index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kiban.tasks import metrics as M

__all__ = ["head_loss", "head_metrics", "multilabel_loss", "multilabel_metrics"]


def head_loss(kind: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Outputs [B, K]; targets [B] class indices (classification) or [B, K] floats with NaN gaps."""
    if kind == "classification":
        return F.cross_entropy(outputs, targets.long())
    known = ~torch.isnan(targets)
    if not known.any():
        return outputs.sum() * 0.0
    return F.mse_loss(outputs[known], targets[known])


def head_metrics(
    kind: str, outputs: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Metrics of raw head outputs [N, K] against targets; plain floats, lists and dicts (JSON-ready)."""
    outputs, targets = np.asarray(outputs, dtype=float), np.asarray(targets)
    if kind == "classification":
        return _classification(outputs, targets.astype(int), list(labels))
    return {label: _regression(outputs[:, k], targets[:, k].astype(float)) for k, label in enumerate(labels)}


def _classification(logits: np.ndarray, y: np.ndarray, labels: list[str]) -> dict[str, Any]:
    n = len(labels)
    predicted = logits.argmax(1)
    probabilities = torch.from_numpy(logits).softmax(-1).numpy()
    f1 = M.per_class_f1(y, predicted, n_classes=n)
    present = np.unique(y)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": M.accuracy(y, predicted),
        "macro_f1": float(f1[present].mean()),
        "per_class_f1": {labels[k]: float(f1[k]) for k in range(n)},
        "confusion_matrix": {
            "labels": labels,
            "rows_true_columns_predicted": M.confusion_matrix(y, predicted, n_classes=n).tolist(),
        },
    }
    if n == 2 and len(present) == 2:
        out["roc_auc"] = M.roc_auc(y, probabilities[:, 1])
        out["pr_auc"] = M.pr_auc(y, probabilities[:, 1])
    elif len(present) > 2:
        aucs = [M.roc_auc(y == k, probabilities[:, k]) for k in present]
        out["roc_auc_macro_ovr"] = float(np.mean(aucs))
    return out


def _regression(predicted: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    known = ~np.isnan(y)
    predicted, y = predicted[known], y[known]
    out: dict[str, Any] = {
        "n": int(len(y)),
        "rmse": M.rmse(y, predicted),
        "spearman": M.spearman(y, predicted),
    }
    out["concordance_index"] = M.concordance_index(y, predicted) if len(np.unique(y)) > 1 else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# Multi-task binary classification (architecture "multilabel"): several 0/1 labels, NaN = not measured


def multilabel_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy over measured entries only: outputs [B, K] logits, targets [B, K] 1/0/NaN."""
    known = ~torch.isnan(targets)
    if not known.any():
        return outputs.sum() * 0.0
    return F.binary_cross_entropy_with_logits(outputs[known], targets[known].float())


def multilabel_metrics(outputs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Per task (measured rows only): n, positives, ROC-AUC, PR-AUC (None when a side has one class);
    plus their means over the tasks where they are defined.
    """
    outputs, targets = np.asarray(outputs, dtype=float), np.asarray(targets, dtype=float)
    per_task: dict[str, Any] = {}
    for k, label in enumerate(labels):
        known = ~np.isnan(targets[:, k])
        y, score = targets[known, k].astype(int), outputs[known, k]
        entry: dict[str, Any] = {"n": int(known.sum()), "positives": int(y.sum())}
        if len(np.unique(y)) == 2:
            entry["roc_auc"] = M.roc_auc(y, score)
            entry["pr_auc"] = M.pr_auc(y, score)
        else:
            entry["roc_auc"] = entry["pr_auc"] = None
        per_task[label] = entry
    defined = [e for e in per_task.values() if e["roc_auc"] is not None]
    return {
        "n": len(targets),
        "measured_fraction": float((~np.isnan(targets)).mean()) if targets.size else 0.0,
        "tasks_scored": len(defined),
        "mean_roc_auc": float(np.mean([e["roc_auc"] for e in defined])) if defined else None,
        "mean_pr_auc": float(np.mean([e["pr_auc"] for e in defined])) if defined else None,
        "per_task": per_task,
    }

"""Metrics for the task heads, in plain NumPy, each checked against scikit-learn or by hand.

Every function takes 1-D arrays (or [L, L] maps for contacts) and returns a float (or a small
dict/array); NaN labels are the caller's to mask. Names follow the papers that report them:
precision@L by sequence-separation range (ESM-2, Rao et al. 2021), ROC-AUC, PR-AUC (average
precision, as scikit-learn computes it), RMSE, Spearman's rho, the concordance index of
DeepDTA (Öztürk et al. 2018), per-class F1 and the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "CONTACT_RANGES",
    "accuracy",
    "concordance_index",
    "confusion_matrix",
    "per_class_f1",
    "pr_auc",
    "precision_at_l",
    "rmse",
    "roc_auc",
    "spearman",
]

# Sequence separation |i - j| of a residue pair: short 6-11, medium 12-23, long >= 24 (ESM-2 / CASP).
CONTACT_RANGES = {"short": (6, 12), "medium": (12, 24), "long": (24, None), "all": (6, None)}


def _binary(y_true: Sequence, y_score: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(y_true, dtype=float).ravel(), np.asarray(y_score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError("ROC-AUC / PR-AUC need both classes among the labels")
    return y, s


def roc_auc(y_true: Sequence, y_score: Sequence) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2."""
    y, s = _binary(y_true, y_score)
    ranks = rankdata(s)  # average ranks handle ties exactly as the trapezoid rule does
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(y_true: Sequence, y_score: Sequence) -> float:
    """Average precision: sum over thresholds of (recall step) x precision (scikit-learn's definition)."""
    y, s = _binary(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]  # one threshold per distinct score
    tp = np.cumsum(y)[last_of_tie]
    predicted = (np.arange(1, len(y) + 1))[last_of_tie]
    precision, recall = tp / predicted, tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def rmse(y_true: Sequence, y_pred: Sequence) -> float:
    """Root mean squared error."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    return float(np.sqrt(np.mean((y - p) ** 2)))


def spearman(x: Sequence, y: Sequence) -> float:
    """Spearman's rho: Pearson correlation of average ranks (NaN when either side is constant)."""
    rx, ry = rankdata(np.asarray(x, dtype=float)), rankdata(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def concordance_index(y_true: Sequence, y_pred: Sequence) -> float:
    """DeepDTA's CI: over pairs with y_i > y_j, the fraction predicted in the same order (ties 1/2)."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    concordant, pairs = 0.0, 0
    for i in range(len(y)):  # O(n^2) in chunks of one row: fine for test sets of thousands
        higher = y[i] > y
        pairs += int(higher.sum())
        d = p[i] - p[higher]
        concordant += float((d > 0).sum() + 0.5 * (d == 0).sum())
    if not pairs:
        raise ValueError("the concordance index needs at least two different true values")
    return concordant / pairs


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """The fraction of exact matches."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], *, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] counts; row = true class, column = predicted class (scikit-learn's layout)."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def per_class_f1(y_true: Sequence[int], y_pred: Sequence[int], *, n_classes: int) -> np.ndarray:
    """F1 of each class; 0 where a class is neither present nor predicted (scikit-learn, zero_division=0)."""
    matrix = confusion_matrix(y_true, y_pred, n_classes=n_classes)
    tp = np.diag(matrix).astype(float)
    denominator = matrix.sum(0) + matrix.sum(1)  # predicted + true = 2tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def precision_at_l(
    scores: np.ndarray,
    contacts: np.ndarray,
    *,
    fraction: float = 1.0,
    separation: str = "long",
    valid: np.ndarray | None = None,
) -> float:
    """Precision of the top ``L * fraction`` pairs (i < j) in a separation range.

    scores, contacts: [L, L] (contacts boolean / 0-1). fraction: 1 for P@L, 0.5 for P@L/2, 0.2 for
    P@L/5. separation: a key of ``CONTACT_RANGES``. valid: optional [L, L] mask of pairs with known
    labels (e.g. both residues resolved). The count is ``int(L * fraction)``, at least 1, or all
    candidate pairs when there are fewer.
    """
    scores, contacts = np.asarray(scores, dtype=float), np.asarray(contacts).astype(bool)
    length = scores.shape[0]
    low, high = CONTACT_RANGES[separation]
    i, j = np.triu_indices(length, k=low)
    keep = (j - i < high) if high is not None else np.ones_like(i, dtype=bool)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool)[i, j]
    i, j = i[keep], j[keep]
    if not len(i):
        return float("nan")
    top = max(1, int(length * fraction))
    order = np.argsort(-scores[i, j], kind="stable")[:top]
    return float(contacts[i[order], j[order]].mean())  # fewer candidates than L*fraction: precision of those

"""PNG plots of a head's test-set outputs (matplotlib, Agg backend: no display needed).

parity.png (regression, one panel per target), roc.png (binary classification),
confusion.png (classification, rows true, columns predicted), contact_map.png (structure).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["contact_map_plot", "pyplot", "write_plots"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    folder: Path, *, kind: str, labels: Sequence[str], targets: np.ndarray, outputs: np.ndarray
) -> list[Path]:
    """Write the plots of one head's test outputs into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "regression":
        return [_parity(folder / "parity.png", labels, targets, outputs)]
    if kind == "multilabel":
        return [_roc_per_task(folder / "roc.png", labels, targets, outputs)]
    paths = [_confusion(folder / "confusion.png", labels, targets, outputs.argmax(1))]
    if len(labels) == 2 and len(np.unique(targets)) == 2:
        paths.append(_roc(folder / "roc.png", targets, outputs))
    return paths


def _parity(path: Path, labels: Sequence[str], targets: np.ndarray, outputs: np.ndarray) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), squeeze=False)
    for k, (axis, label) in enumerate(zip(axes[0], labels)):
        known = ~np.isnan(targets[:, k])
        y, p = targets[known, k], outputs[known, k]
        axis.scatter(y, p, s=8, alpha=0.6)
        low, high = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        axis.plot([low, high], [low, high], color="grey", linewidth=1)
        axis.set(xlabel=f"measured {label}", ylabel="predicted", title=label[:40])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _roc(path: Path, targets: np.ndarray, logits: np.ndarray) -> Path:
    from kiban.tasks.metrics import roc_auc

    plt = pyplot()
    score = logits[:, 1] - logits[:, 0]
    order = np.argsort(-score, kind="mergesort")
    y = np.asarray(targets)[order]
    tpr = np.r_[0, np.cumsum(y) / y.sum()]
    fpr = np.r_[0, np.cumsum(1 - y) / (1 - y).sum()]
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(fpr, tpr, label=f"ROC-AUC {roc_auc(y, score[order]):.3f}")
    axis.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _roc_per_task(path: Path, labels: Sequence[str], targets: np.ndarray, logits: np.ndarray) -> Path:
    """One ROC curve per task over its measured test rows (tasks with one class there are skipped)."""
    from kiban.tasks.metrics import roc_auc

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    for k, label in enumerate(labels):
        known = ~np.isnan(targets[:, k])
        y, score = targets[known, k].astype(int), logits[known, k]
        if len(np.unique(y)) < 2:
            continue
        order = np.argsort(-score, kind="mergesort")
        ys = y[order]
        tpr = np.r_[0, np.cumsum(ys) / ys.sum()]
        fpr = np.r_[0, np.cumsum(1 - ys) / (1 - ys).sum()]
        axis.plot(fpr, tpr, linewidth=1, label=f"{str(label)[:18]} {roc_auc(y, score):.2f}")
    axis.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC per task")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right", fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _confusion(path: Path, labels: Sequence[str], targets: np.ndarray, predicted: np.ndarray) -> Path:
    from kiban.tasks.metrics import confusion_matrix

    plt = pyplot()
    matrix = confusion_matrix(targets, predicted, n_classes=len(labels))
    size = 3 + 0.4 * len(labels)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(labels)), [str(name)[:20] for name in labels], rotation=90)
    axis.set_yticks(range(len(labels)), [str(name)[:20] for name in labels])
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", fontsize=7)
    axis.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def contact_map_plot(path: Path, predicted: np.ndarray, true: np.ndarray, *, title: str = "") -> Path:
    """Predicted contact probabilities (upper triangle) beside the true contacts (lower triangle)."""
    plt = pyplot()
    length = len(true)
    upper = np.triu(np.ones((length, length), bool), 1)
    picture = np.where(upper, predicted, np.where(upper.T, true.astype(float), np.nan))
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(picture, cmap="Greys", vmin=0, vmax=1)
    axis.set(title=title or "contacts: predicted (upper) / true (lower)", xlabel="residue", ylabel="residue")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

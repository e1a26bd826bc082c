"""Fitting a pooled head on frozen features (the "probe" and "head" modes of ``kiban finetune``).

Features are standardised and regression targets scaled to unit variance while training (AdamW
converges in a few hundred steps on any backbone's scale); both affine maps are then folded into
the head's first and last linear layers, so the saved head takes raw pooled states and returns
values in the labels' own units — the server and ``kiban predict`` need no extra statistics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiban.tasks.heads import PooledHead

__all__ = ["FitSettings", "embed_items", "fit_head", "fold_scaling", "scaling"]


@dataclass
class FitSettings:
    """epochs: passes over the training rows; the head with the lowest validation loss is kept."""

    epochs: int = 200
    lr: float = 1e-2
    weight_decay: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    progress: bool = True


def scaling(
    features: Tensor, targets: Tensor, *, regression: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(feature mean, feature std, target mean, target std) of the training rows; the target
    statistics are None unless ``regression`` (NaN targets, i.e. not measured, are ignored).
    """
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    if not regression:
        return mean, std, None, None
    t_mean = torch.nan_to_num(torch.nanmean(targets, 0), 0.0)
    t_std = torch.tensor(np.nanstd(targets.numpy(), 0), dtype=torch.float32).nan_to_num(1.0).clamp(min=1e-6)
    return mean, std, t_mean, t_std


def fit_head(
    head: PooledHead,
    features: Tensor,
    targets: Tensor,
    *,
    valid: tuple[Tensor, Tensor] | None = None,
    settings: FitSettings | None = None,
) -> dict[str, list[float]]:
    """Train ``head`` in place on features [N, H] and targets; returns the loss history.

    targets: [N] class indices (classification) or [N, K] floats, NaN where not measured.
    """
    settings = settings or FitSettings()
    kind = head.config.kind
    generator = torch.Generator().manual_seed(settings.seed)
    features = features.float()
    mean, std, t_mean, t_std = scaling(features, targets, regression=kind == "regression")

    def scaled(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x.float() - mean) / std, ((y - t_mean) / t_std if t_mean is not None else y)

    x, y = scaled(features, targets)
    valid_xy = scaled(*valid) if valid is not None and len(valid[0]) else None
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    history: dict[str, list[float]] = {"train": [], "valid": []}
    best, best_state = float("inf"), None
    epochs = range(settings.epochs)
    if settings.progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="training head", unit="epoch", leave=False)
    for _ in epochs:
        head.train()
        total = 0.0
        for rows in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            loss = head.loss(head(x[rows]), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        history["train"].append(total / len(x))
        if valid_xy is not None:
            head.eval()
            with torch.no_grad():
                current = float(head.loss(head(valid_xy[0]), valid_xy[1]))
            history["valid"].append(current)
            if current < best:
                best, best_state = current, copy.deepcopy(head.state_dict())
        if settings.progress:
            epochs.set_postfix(loss=f"{history['train'][-1]:.3f}")
    if best_state is not None:
        head.load_state_dict(best_state)
    fold_scaling(head, mean, std, t_mean, t_std)
    return history


@torch.no_grad()
def fold_scaling(
    head: PooledHead, mean: Tensor, std: Tensor, t_mean: Tensor | None, t_std: Tensor | None
) -> None:
    """Rewrite the first layer for raw inputs and the last for target units: same function, plain head."""
    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    first, last = linears[0], linears[-1]
    # W((x - m) / s) + b = (W / s) x + (b - W (m / s))
    first.bias -= first.weight @ (mean / std)
    first.weight /= std
    if t_mean is not None:
        # y = t_std * (W h + b) + t_mean
        last.weight *= t_std.unsqueeze(1)
        last.bias.mul_(t_std).add_(t_mean)
    head.eval()


def embed_items(
    model: Any,
    modality: str,
    items: list[Any],
    *,
    batch_size: int = 64,
    layer: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled fused states [N, H] of the frozen model, in batches (with a progress bar); ``layer``
    as ``KibanModel.embed``'s.
    """
    batches = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"embedding {len(items)} {modality} inputs", unit="batch", leave=False)
    with torch.no_grad():
        return torch.cat(
            [
                model.embed([(modality, item) for item in items[i : i + batch_size]], layer=layer).float().cpu()
                for i in batches
            ]
        )

"""Training task heads: the one loop (``train_loop``) every head kind trains with, and fitting a
pooled head on frozen features (the "probe" and "head" modes of ``kiban finetune``).

Features are standardised and regression targets scaled to unit variance while training (AdamW
converges in a few hundred steps on any backbone's scale; a linear probe is fitted to convergence
by L-BFGS, as scikit-learn fits logistic regression); both affine maps are then folded into
the head's first and last linear layers, so the saved head takes raw pooled states and returns
values in the labels' own units — the server and ``kiban predict`` need no extra statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiban.tasks.heads import PooledHead

__all__ = ["FitSettings", "fit_head", "fold_scaling", "scaling", "train_loop"]


@dataclass
class FitSettings:
    """How ``fit_head`` trains.

    A head with a hidden layer trains ``epochs`` passes of AdamW (``lr``, ``weight_decay``,
    ``batch_size``); the state with the lowest validation loss is kept. A linear head (the probe) is
    fitted to convergence instead, as scikit-learn fits logistic / ridge regression: full-batch
    L-BFGS on the mean loss plus ``l2 / 2 * ||W||^2`` (bias not penalised), for each strength in
    ``l2_grid``, keeping the one with the lowest validation loss (``1 / n_train``, scikit-learn's
    ``C=1``, when there are no validation rows).
    """

    epochs: int = 200
    lr: float = 1e-2
    weight_decay: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    progress: bool = True
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    lbfgs_iterations: int = 500


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


def train_loop(
    modules: Sequence[nn.Module],
    optimiser: torch.optim.Optimizer,
    *,
    batches: Callable[[torch.Generator], Iterable[tuple[Any, int]]],
    loss: Callable[[Any], Tensor],
    epochs: int,
    seed: int = 0,
    valid_loss: Callable[[], float] | None = None,
    keep_best: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    progress: bool = False,
    desc: str = "training head",
) -> dict[str, list[float]]:
    """The one head-training loop (pooled, per-residue, pairwise, pair and LoRA heads).

    Each epoch draws ``batches(generator)`` — (batch, weight) pairs, the weight being how many
    examples the batch holds — and takes one AdamW step per batch on ``loss(batch)``. With
    ``valid_loss``, the state with the lowest validation loss is kept: ``keep_best`` is a
    (snapshot, restore) pair of callables. ``modules`` are put in train mode while stepping and in
    eval mode for validation and at the end. Returns {"train": mean loss per example per epoch,
    "valid": validation loss per epoch (empty without ``valid_loss``)}.
    """
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train": [], "valid": []}
    best, best_state = float("inf"), None
    rounds: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=desc, unit="epoch", leave=False)
    for _ in rounds:
        for module in modules:
            module.train()
        total, count = 0.0, 0
        for batch, weight in batches(generator):
            value = loss(batch)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            total += float(value.detach()) * weight
            count += weight
        history["train"].append(total / max(count, 1))
        if valid_loss is not None:
            for module in modules:
                module.eval()
            with torch.no_grad():
                current = float(valid_loss())
            history["valid"].append(current)
            if keep_best is not None and current < best:
                best, best_state = current, keep_best[0]()
        if progress:
            rounds.set_postfix(loss=f"{history['train'][-1]:.3f}")
    if keep_best is not None and best_state is not None:
        keep_best[1](best_state)
    for module in modules:
        module.eval()
    return history


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
    features = features.float()
    mean, std, t_mean, t_std = scaling(features, targets, regression=kind == "regression")

    def scaled(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x.float() - mean) / std, ((y - t_mean) / t_std if t_mean is not None else y)

    x, y = scaled(features, targets)
    valid_xy = scaled(*valid) if valid is not None and len(valid[0]) else None
    if not head.config.hidden_dim:
        history = _fit_linear(head, x, y, valid_xy, settings)
        fold_scaling(head, mean, std, t_mean, t_std)
        return history
    history = train_loop(
        [head],
        torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay),
        batches=lambda g: ((rows, len(rows)) for rows in torch.randperm(len(x), generator=g).split(settings.batch_size)),
        loss=lambda rows: head.loss(head(x[rows]), y[rows]),
        epochs=settings.epochs,
        seed=settings.seed,
        valid_loss=(lambda: head.loss(head(valid_xy[0]), valid_xy[1])) if valid_xy is not None else None,
        keep_best=(lambda: copy.deepcopy(head.state_dict()), head.load_state_dict),
        progress=settings.progress,
    )
    fold_scaling(head, mean, std, t_mean, t_std)
    return history


def _fit_linear(
    head: PooledHead, x: Tensor, y: Tensor, valid_xy: tuple[Tensor, Tensor] | None, settings: FitSettings
) -> dict[str, list[float]]:
    """Fit a linear head by L-BFGS for each L2 strength; keep the best on the validation rows.

    Why not AdamW as for the MLP: a few hundred stochastic steps stop short of the optimum of a
    convex problem, and on the states of a frozen LLM (a few dimensions far larger than the rest,
    even standardised) it stopped 0.08 accuracy short of logistic regression on the same features
    (0.807 vs 0.886: pbmc68k cell types, layer-2 states of cell_fusion_variants.py's
    profile/linear-orth256, 2026-12-03). Returns {"train": final training loss per strength,
    "valid": validation loss per strength (empty without validation rows), "l2": the strengths}.
    """
    (linear,) = [m for m in head.net if isinstance(m, nn.Linear)]
    # float64 while fitting: L-BFGS's line search stalls in float32 before scikit-learn's optimum
    head.double()
    x, y = x.double(), (y.double() if y.is_floating_point() else y)
    if valid_xy is not None:
        valid_xy = (valid_xy[0].double(), valid_xy[1].double() if valid_xy[1].is_floating_point() else valid_xy[1])
    start = copy.deepcopy(head.state_dict())
    grid = tuple(settings.l2_grid) if valid_xy is not None else (1.0 / max(len(x), 1),)
    history: dict[str, list[float]] = {"train": [], "valid": [], "l2": list(grid)}
    best, best_state = float("inf"), None
    head.train()
    for l2 in grid:
        head.load_state_dict(start)
        optimiser = torch.optim.LBFGS(
            head.parameters(), lr=1.0, max_iter=settings.lbfgs_iterations, history_size=20,
            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe",
        )

        def objective(l2: float = l2) -> Tensor:
            optimiser.zero_grad()
            value = head.loss(head(x), y) + 0.5 * l2 * linear.weight.pow(2).sum()
            value.backward()
            return value

        optimiser.step(objective)
        with torch.no_grad():
            history["train"].append(float(head.loss(head(x), y)))
            if valid_xy is None:
                best_state = copy.deepcopy(head.state_dict())
                continue
            current = float(head.loss(head(valid_xy[0]), valid_xy[1]))
        history["valid"].append(current)
        if current < best:
            best, best_state = current, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.float().eval()
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

"""``kiban finetune --mode lora``: LoRA adapters on the backbone trained together with the head.

``KibanModel.embed`` runs under ``torch.no_grad`` (it serves inference); ``pooled_states`` is the
same computation with gradients on: it calls the undecorated function behind ``embed`` so both
paths stay one piece of code. Only the adapters (``lora_`` parameters) and the head train; the
encoders, projectors and backbone weights stay frozen. The adapted model is saved with
``save_pretrained`` (its ``lora/`` folder holds peft's adapter files) beside the head, whose
``extra["model"]`` points at it, so ``kiban predict``/``kiban serve`` on the run folder reload the
adapters and predict exactly as at the end of training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kiban.tasks.heads import PooledHead

__all__ = ["LoraFitSettings", "add_lora", "fit_lora", "lora_parameters", "pooled_states"]


def pooled_states(model: Any, modality: str, items: Sequence[Any], *, layer: int | None = None) -> Tensor:
    """Pooled fused states [B, H] of raw inputs at ``layer`` (as ``KibanModel.embed``), with gradients."""
    embed = getattr(type(model).embed, "__wrapped__", None)
    if embed is None:  # pragma: no cover - torch's no_grad decorator keeps __wrapped__
        raise RuntimeError("KibanModel.embed has no undecorated function to call with gradients")
    return embed(model, [(modality, item) for item in items], layer=layer)


def add_lora(model: Any, settings: Any = None) -> Any:
    """Give ``model`` LoRA adapters (``LoraSettings``; default r=8 on q/v projections) unless it has
    some already, and record them in its config so ``save_pretrained``/``from_pretrained`` keep them.
    """
    from kiban.fusion.backbone import LoraSettings, apply_lora

    if model.has_lora:
        return model
    settings = settings or LoraSettings()
    model.llm = apply_lora(model.llm, settings)
    model.config.backbone = dataclasses.replace(model.config.backbone, lora=settings)
    return model


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Freeze everything but the adapters; return the adapters."""
    params = []
    for name, param in model.named_parameters():
        trainable = "lora_" in name
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    if not params:
        raise ValueError("the model has no LoRA parameters to train")
    return params


@dataclass
class LoraFitSettings:
    """epochs over the training rows; the (adapters, head) state with the lowest validation loss is kept."""

    epochs: int = 10
    lr_head: float = 1e-2
    lr_lora: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    progress: bool = True


def fit_lora(
    model: Any,
    head: PooledHead,
    modality: str,
    items: Sequence[Any],
    targets: Tensor,
    train: Sequence[int],
    valid: Sequence[int] = (),
    *,
    settings: LoraFitSettings | None = None,
) -> dict[str, list[float]]:
    """Train the adapters and ``head`` together; the head ends up reading raw pooled states.

    Pooled states are standardised with the statistics of the *initial* (pre-adaptation) training
    states while training; the map is folded into the head at the end (as ``fit_head`` does), so the
    saved head needs no extra statistics. Regression targets are scaled likewise.
    """
    from kiban.tasks.training import fold_scaling, scaling, train_loop

    settings = settings or LoraFitSettings()
    torch.manual_seed(settings.seed)
    train = torch.as_tensor(list(train), dtype=torch.long)
    valid = [int(v) for v in valid]
    adapters = lora_parameters(model)
    with torch.no_grad():
        model.eval()
        initial = torch.cat(
            [
                pooled_states(model, modality, [items[i] for i in rows.tolist()], layer=head.config.layer)
                .float()
                .cpu()
                for rows in train.split(64)
            ]
        )
    regression = head.config.kind == "regression"
    mean, std, t_mean, t_std = scaling(initial, targets[train], regression=regression)
    if regression:
        targets = (targets - t_mean) / t_std

    def forward(rows: list[int]) -> Tensor:
        states = pooled_states(model, modality, [items[i] for i in rows], layer=head.config.layer)
        # the head trains on the CPU beside its targets; .cpu() keeps the gradient to the adapters
        return head((states.float().cpu() - mean) / std)

    optimiser = torch.optim.AdamW(
        [{"params": head.parameters(), "lr": settings.lr_head}, {"params": adapters, "lr": settings.lr_lora}],
        weight_decay=1e-3,
    )

    def snapshot() -> tuple[dict, dict]:
        return (
            copy.deepcopy(head.state_dict()),
            {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
        )

    @torch.no_grad()
    def restore(state: tuple[dict, dict]) -> None:
        head.load_state_dict(state[0])
        parameters = dict(model.named_parameters())
        for name, value in state[1].items():
            parameters[name].copy_(value)

    def valid_loss() -> Tensor:
        outputs = torch.cat([forward(valid[i : i + 64]) for i in range(0, len(valid), 64)])
        return head.loss(outputs, targets[valid])

    history = train_loop(
        [model, head],
        optimiser,
        batches=lambda g: (
            (rows.tolist(), len(rows)) for rows in train[torch.randperm(len(train), generator=g)].split(settings.batch_size)
        ),
        loss=lambda rows: head.loss(forward(rows), targets[rows]),
        epochs=settings.epochs,
        seed=settings.seed,
        valid_loss=valid_loss if valid else None,
        keep_best=(snapshot, restore),
        progress=settings.progress,
        desc="training LoRA + head",
    )
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    fold_scaling(head, mean, std, t_mean, t_std)
    return history

"""Optimizer and learning-rate schedule from the YAML's ``optim`` and ``schedule`` sections.

Only parameters with ``requires_grad`` (after the stage's freeze policy) are optimized. Weight
decay skips biases and norm weights (1-D tensors), as in GPT-2/LLaMA training. The schedule is
a per-step multiplier: linear warmup, then constant, linear or cosine decay to ``min_lr_ratio``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kiban.train.config import OptimSection, ScheduleSection

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier"]


def build_optimizer(
    parameters: Iterable[tuple[str, nn.Parameter]], settings: OptimSection, *, cpu_adam: bool = False
) -> torch.optim.Optimizer:
    """``parameters``: (name, parameter) pairs; frozen ones are left out. ``cpu_adam`` picks
    DeepSpeed's CPU Adam, which ZeRO-Offload needs for optimizer states in host memory.
    """
    trainable = [(n, p) for n, p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: the stage's freeze policy left no parameter trainable")
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    if settings.name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, adamw_mode=True
        )
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)


def lr_multiplier(step: int, settings: ScheduleSection, *, total_steps: int) -> float:
    """The factor on the base lr for optimizer step ``step`` (0-based)."""
    warmup = settings.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if settings.name == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = settings.min_lr_ratio
    if settings.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: ScheduleSection, *, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step ``LambdaLR`` for ``settings`` (over ``total_steps``, else ``max_steps``)."""
    total = settings.total_steps or max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, settings, total_steps=total)
    )

"""Downstream task heads (structure, disease, drug) over the fused model's states."""

from kiban.tasks.heads import (
    HeadConfig,
    PooledHead,
    create_head,
    list_head_architectures,
    load_head,
    load_heads,
    register_head,
)

__all__ = [
    "HeadConfig",
    "PooledHead",
    "create_head",
    "list_head_architectures",
    "load_head",
    "load_heads",
    "register_head",
]

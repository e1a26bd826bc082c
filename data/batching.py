"""Length-bucketed batching: group items of similar length so that padding stays small.

The usual recipe (fairseq, ESM training): shuffle, cut into pools of ``batch_size * pool_batches``
items, sort each pool by length, cut the pool into batches, shuffle the batches. Every index
appears exactly once per epoch; the last batch may be short (never padded by repetition).
"""

from __future__ import annotations

import random
from typing import Sequence

__all__ = ["length_bucketed_batches", "padding_efficiency"]


def length_bucketed_batches(
    lengths: Sequence[int], *, batch_size: int, pool_batches: int = 50, seed: int = 0, shuffle: bool = True
) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Useful tokens / padded tokens when each batch is padded to its longest item (1.0 = no waste)."""
    useful = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return useful / padded if padded else 1.0

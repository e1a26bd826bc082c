"""Batch plans: lists of index batches covering every item exactly once per epoch.

``length_bucketed_batches`` groups items of similar length so that padding stays small;
``chunk_shuffled_batches`` shuffles in contiguous chunks so that row-chunked files stream fast.

Length bucketing follows the usual recipe (fairseq, ESM training): shuffle, cut into pools of
``batch_size * pool_batches`` items, sort each pool by length, cut the pool into batches, shuffle
the batches. In both plans every index appears exactly once per epoch; the last batch may be
short (never padded by repetition).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["chunk_shuffled_batches", "length_bucketed_batches", "padding_efficiency"]


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


def chunk_shuffled_batches(
    n: int,
    *,
    batch_size: int,
    chunk_size: int = 256,
    pool_chunks: int = 16,
    seed: int = 0,
    shuffle: bool = True,
) -> list[list[int]]:
    """Batches of ``range(n)`` for files read fastest in contiguous runs (h5ad rows).

    The recipe of scDataset / annbatch: cut the rows into chunks of ``chunk_size``, shuffle the
    chunks, take ``pool_chunks`` chunks at a time, shuffle their rows together and cut them into
    batches. Each batch mixes rows from up to ``pool_chunks`` places in the file, while a reader
    that takes a pool's batches together reads only ``pool_chunks`` contiguous runs. Every index
    appears exactly once; without ``shuffle`` the batches are the rows in order.
    """
    if batch_size < 1 or chunk_size < 1 or pool_chunks < 1:
        raise ValueError(
            "batch_size, chunk_size and pool_chunks must be at least 1, "
            f"got {batch_size}, {chunk_size}, {pool_chunks}"
        )
    rng = random.Random(seed)
    chunks = [list(range(start, min(start + chunk_size, n))) for start in range(0, n, chunk_size)]
    if shuffle:
        rng.shuffle(chunks)
    batches = []
    for start in range(0, len(chunks), pool_chunks):
        pool = [i for chunk in chunks[start : start + pool_chunks] for i in chunk]
        if shuffle:
            rng.shuffle(pool)
        batches += [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    return batches

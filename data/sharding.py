"""Deterministic sharding of an epoch's batches over (rank, DataLoader worker) pairs.

Every process computes the same global batch plan (from the seed and the epoch), then takes its
own slice: rank r gets the r-th of ``world_size`` contiguous, equal-count blocks of batches, and
worker w of that rank the w-th contiguous block of those. So every record is read exactly once
per epoch, for any world size and worker count, and nothing is padded by repetition (as
``torch.utils.data.DistributedSampler`` does) or dropped.

Equal step counts. Data-parallel training needs every rank to take the same number of steps, or
the collectives hang. ``split_evenly`` gets there without repeating a record: while the number of
batches is not a multiple of the world size it halves the largest batch. Only when there are fewer
records than that needs (fewer than ranks, roughly) is it impossible; an error says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Shard", "balanced_ranges", "current_shard", "shard_batches", "split_evenly"]


@dataclass(frozen=True)
class Shard:
    """The part of the data one process reads: ``rank`` of ``world_size``, ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.worker < self.num_workers):
            raise ValueError(
                f"invalid shard {self}: need 0 <= rank < world_size and 0 <= worker < num_workers"
            )

    @property
    def name(self) -> str:
        """The shard's name in file names: ``r<rank>-w<worker>``."""
        return f"r{self.rank}-w{self.worker}"


def balanced_ranges(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous ranges whose sizes differ by at most one."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def split_evenly(batches: Sequence[Sequence[int]], parts: int) -> list[list[int]]:
    """The batches, with the largest halved until their count is a multiple of ``parts``.

    Halving keeps a batch's items together in two neighbouring batches (so length buckets stay
    buckets). Raises ``ValueError`` when that cannot work: fewer items than the next multiple of
    ``parts`` above the number of batches.
    """
    out = [list(batch) for batch in batches if len(batch)]
    total = sum(len(batch) for batch in out)
    target = -(-len(out) // parts) * parts  # the next multiple of parts
    if target > total:
        raise ValueError(
            f"{total} records in {len(out)} batches cannot give each of {parts} ranks the same number of "
            "batches without repeating a record; use fewer ranks or even_batches=False"
        )
    while len(out) < target:
        largest = max(range(len(out)), key=lambda i: len(out[i]))
        batch = out[largest]
        out[largest : largest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    return out


def shard_batches(batches: Sequence[Sequence[int]], shard: Shard, *, even: bool = True) -> list[list[int]]:
    """This shard's batches of a global plan. With ``even`` every rank gets the same number."""
    plan = split_evenly(batches, shard.world_size) if even else [list(b) for b in batches if len(b)]
    mine = [plan[i] for i in balanced_ranges(len(plan), shard.world_size)[shard.rank]]
    return [mine[i] for i in balanced_ranges(len(mine), shard.num_workers)[shard.worker]]


def current_shard(*, rank: int | None = None, world_size: int | None = None) -> Shard:
    """The shard of the calling process.

    rank / world_size: as given, else from ``torch.distributed`` when it is initialised, else from
    the ``RANK`` / ``WORLD_SIZE`` environment (torchrun, Slurm via Lightning), else 0 / 1. The
    worker comes from ``torch.utils.data.get_worker_info()`` (0 of 1 outside a worker).
    """
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Shard(rank=rank, world_size=world_size, worker=worker, num_workers=num_workers)

"""Resumable batches: a seeded, length-bucketed, rank-sharded plan that can start mid-epoch.

The Lightning-free half of ``KibanDataModule`` (``kiban.data.datamodule``)::

    TrainBatch          a collated batch plus its record ids and its place in the epoch (epoch, index)
    ResumableBatches    the batch sampler: per epoch, length-bucketed batches (seeded by seed+epoch)
                        dealt round-robin to ranks; it counts epochs and can start mid-epoch
    SeededRecords       a map-style dataset: each record through a ``Transform`` (featurize, then
                        ``collate``) under its own RNG seed; rejects are logged with their id
    open_source         a split's records: an instruction JSONL, ``tiny``, or any ``Source``

Exact resume rests on two rules. (1) The data order is a pure function of (seed, epoch, rank,
world size), so a resumed run only needs the position. (2) Every record is featurized under its
own RNG seed, derived from (seed, epoch, record index), with the global RNGs saved and restored
around it (``seeded``): augmentation (e.g. DNA reverse-complement) is the same whichever worker,
and however many workers, process a record, and data loading never draws from the training RNG.

What a batch holds is the transform's business: ``ProcessorTransform`` gives a ``FusedBatch``
(instruction records), ``FeaturizerTransform`` one encoder's padded batch (pretraining on FASTA,
h5ad, SMILES or images); anything with ``__call__(record)`` and ``collate(values)`` will do.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kiban.data.batching import length_bucketed_batches
from kiban.data.datasets import RecordList, Source, Transform
from kiban.data.instructions import InstructionSource
from kiban.data.rejects import DataError, Record, Reject
from kiban.encoders.base import InvalidInput

__all__ = ["ResumableBatches", "SeededRecords", "TrainBatch", "open_source", "record_seed", "seeded"]

log = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One micro-batch: the collated inputs, the ids of its records, and where it sits in the epoch.

    inputs: what the transform's ``collate`` made (a ``FusedBatch``, an encoder's batch dict).
    ids: the records in it, in order. epoch / index: the batch's place in this rank's plan.
    """

    inputs: Any
    ids: list[str]
    epoch: int
    index: int  # batch number within this rank's epoch

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with its inputs on ``device`` (Lightning moves batches with ``.to``)."""
        return TrainBatch(_to(self.inputs, device), self.ids, self.epoch, self.index)

    def __len__(self) -> int:
        return len(self.ids)


def _to(value: Any, device: torch.device | str) -> Any:
    if hasattr(value, "to"):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def open_source(
    source: Any, *, modalities: Sequence[str] = (), tiny_records: int = 8, root: Any = None
) -> Any:
    """Random access to a split's records (a ``Source``: ``len``, ``read_many``, optionally ``lengths``).

    source: an instruction JSONL path (read through ``InstructionSource``: file references resolved
        under ``root``, bad lines rejected with their location); ``"tiny"``: the built-in example
        records over ``modalities``; or any object that is already a ``Source`` (``H5adReader``,
        ``RecordList`` of any reader's records), returned as it is.
    """
    if not isinstance(source, (str, Path)):
        return source
    if str(source) == "tiny":
        from kiban.tiny import example_records

        records = example_records(list(modalities), n=tiny_records)
        return RecordList([Record(f"tiny-{i}", "instruction", r, f"tiny:{i}") for i, r in enumerate(records)])
    return InstructionSource(source, root=root)


def source_lengths(source: Source) -> list[int]:
    """Per-record sizes for bucketing: ``source.lengths()`` where it has one, else all equal."""
    lengths = getattr(source, "lengths", None)
    return [int(n) for n in lengths()] if lengths is not None else [1] * len(source)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``seed`` for python, numpy and torch RNGs, restoring them afterwards."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # the CPU generator only (what featurizers draw from, and what is saved above): torch.manual_seed
    # also queues a lazy seed for every accelerator, with a formatted stack trace each time, which
    # costs up to a second per record under a deep call stack and grows a queue without bound
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def record_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of record ``index`` in ``epoch``: the same on every rank and worker."""
    # a fixed mix (not hash(), which is salted per process) so every rank and worker agrees
    return (seed * 1_000_003 + epoch * 97_007 + index) % 2**63


Item = tuple[tuple[int, int], Record | Reject, Any]


class SeededRecords(Dataset):
    """Keys are (epoch, batch index, record index); items are transformed records or rejects.

    source: a ``Source``. transform: record -> value, and ``collate(values)`` -> batch inputs.
    A record whose transform raises ``InvalidInput`` becomes a ``Reject``, logged with its id,
    location and reason by ``collate``.
    """

    def __init__(self, source: Source, transform: Transform, *, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]) -> Item:
        epoch, batch_index, index = key
        (record,) = self.source.read_many([index])
        if isinstance(record, Reject):
            return (epoch, batch_index), record, None
        try:
            with seeded(record_seed(self.seed, epoch, index)):
                return (epoch, batch_index), record, self.transform(record)
        except InvalidInput as error:
            reason = "invalid prompt" if error.modality == "prompt" else f"invalid {error.modality} input"
            return (epoch, batch_index), Reject(record.id, record.location, reason, str(error)), None

    def collate(self, items: list[Item]) -> TrainBatch:
        """A batch of the usable records; each reject is logged with its id, location and reason.

        The batch keeps its place in the plan, so every rank takes the same number of steps. A
        batch with no usable record at all stops the run with ``DataError`` naming its records
        (skipping it would leave this rank one step behind the others, and a DDP run would hang
        on the next collective): clean the data (``kiban data check``).
        """
        (epoch, batch_index), _, _ = items[0]
        kept = [(r, v) for _, r, v in items if not isinstance(r, Reject)]
        for _, reject, _ in items:
            if isinstance(reject, Reject):
                log.warning(
                    "rejected record %s (%s): %s: %s",
                    reject.id,
                    reject.location,
                    reject.reason,
                    reject.detail,
                )
        if not kept:
            rejected = ", ".join(f"{r.id} ({r.location})" for _, r, _ in items)
            raise DataError(
                Reject(
                    None, rejected, "no usable record in a batch", f"every record was rejected: {rejected}"
                )
            )
        return TrainBatch(
            self.transform.collate([v for _, v in kept]), [r.id for r, _ in kept], epoch, batch_index
        )


class ResumableBatches(Sampler):
    """Batches of dataset keys for one rank; ``start_at(epoch, index)`` resumes mid-epoch.

    even: every rank gets the same number of batches (the remainder of an epoch that does not
    divide by the world size is dropped), so no rank waits for a collective the others never
    reach. ``even=False`` (inference) deals every batch to some rank, so no record is lost.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pool_batches: int = 50,
        even: bool = True,
    ) -> None:
        self.lengths, self.batch_size, self.rank, self.world_size = (
            list(lengths),
            batch_size,
            rank,
            world_size,
        )
        self.seed, self.shuffle, self.pool_batches, self.even = seed, shuffle, pool_batches, even
        self.epoch, self._start = 0, 0
        total = self._batches_per_epoch()
        if even and total < world_size:
            raise ValueError(
                f"{len(self.lengths)} records make {total} batch(es) of {batch_size}, fewer than the "
                f"{world_size} ranks: lower data.batch_size or add records"
            )

    def start_at(self, epoch: int, index: int) -> None:
        """The next iteration yields ``epoch`` from batch ``index`` (0-based) on."""
        if index >= len(self):
            epoch, index = epoch + 1, 0
        self.epoch, self._start = epoch, index

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (record indices) of ``epoch``."""
        batches = length_bucketed_batches(
            self.lengths,
            batch_size=self.batch_size,
            pool_batches=self.pool_batches,
            seed=self.seed + epoch,
            shuffle=self.shuffle,
        )
        mine = batches[self.rank :: self.world_size]
        return mine[: len(batches) // self.world_size] if self.even else mine

    def _batches_per_epoch(self) -> int:
        # length_bucketed_batches cuts each pool separately, so a short last pool adds a batch
        pool = self.batch_size * self.pool_batches
        n = len(self.lengths)
        return (n // pool) * self.pool_batches + -(-(n % pool) // self.batch_size)

    def __len__(self) -> int:
        total = self._batches_per_epoch()
        if self.even:
            return total // self.world_size
        return len(range(self.rank, total, self.world_size))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # The sampler counts epochs itself (Lightning's set_epoch reaches only a batch sampler's
        # inner .sampler). It moves on when it hands out an epoch's last batch, not after: a
        # loader that stops at len() never asks for the batch past the end.
        epoch, start = self.epoch, self._start
        self._start = 0
        batches = self.epoch_batches(epoch)
        for index in range(start, len(batches)):
            if index == len(batches) - 1:
                self.epoch = epoch + 1
            yield [(epoch, index, i) for i in batches[index]]

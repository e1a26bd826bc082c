"""Training data: chat records -> length-bucketed, rank-sharded, resumable batches of FusedBatch.

The trainer needs little from the data layer, and this file is that little:

    TrainBatch          a FusedBatch plus its record ids and its place in the epoch (epoch, index)
    ResumableBatches    the batch sampler: per epoch, length-bucketed batches (seeded by seed+epoch)
                        dealt round-robin to ranks; it counts epochs and can start mid-epoch
    RecordsDataModule   a LightningDataModule over instruction records (the data layer's JSONL
                        format, read through ``kiban.data.InstructionSource``: file references
                        resolved, bad records rejected by id and location) or the tiny examples;
                        its state_dict is the position of the last batch the model consumed

Exact resume rests on two rules. (1) The data order is a pure function of (seed, epoch, rank,
world size), so a resumed run only needs the position. (2) Every record is featurized under its
own RNG seed, derived from (seed, epoch, record index), with the global RNGs saved and restored
around it: augmentation (e.g. DNA reverse-complement) is the same whichever worker, and however
many workers, process a record, and data loading never draws from the training RNG. The DataLoader
gets its own torch.Generator for the same reason.

The position is "consumed", not "fetched": DataLoader workers and Lightning prefetch ahead, so the
checkpoint callback records each batch as the optimizer step that used it completes
(``batch_consumed``).
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kiban.data.batching import length_bucketed_batches
from kiban.data.datasets import RecordList
from kiban.data.instructions import InstructionSource
from kiban.data.rejects import DataError, Record, Reject
from kiban.encoders.base import InvalidInput
from kiban.fusion.prompt import FusedBatch, KibanProcessor

__all__ = ["RecordsDataModule", "ResumableBatches", "TrainBatch", "open_source", "seeded"]

log = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One micro-batch: the model input, the ids of its records, and where it sits in the epoch."""

    fused: FusedBatch
    ids: list[str]
    epoch: int
    index: int  # batch number within this rank's epoch

    def to(self, device: torch.device | str) -> "TrainBatch":  # Lightning moves batches with .to
        return TrainBatch(self.fused.to(device), self.ids, self.epoch, self.index)

    def __len__(self) -> int:
        return len(self.ids)


def open_source(source: str, *, modalities: Sequence[str], tiny_records: int = 8) -> Any:
    """Random access to a split's records (the data layer's ``Source``: ``len``, ``read_many``,
    ``lengths``): an instruction JSONL through ``kiban.data.InstructionSource`` (file references
    resolved, bad lines rejected with their location), or ``tiny``: the built-in example records."""
    if source == "tiny":
        from kiban.tiny import example_records

        records = example_records(list(modalities), n=tiny_records)
        return RecordList([Record(f"tiny-{i}", "instruction", r, f"tiny:{i}") for i, r in enumerate(records)])
    return InstructionSource(source)


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


def _record_seed(seed: int, epoch: int, index: int) -> int:
    # a fixed mix (not hash(), which is salted per process) so every rank and worker agrees
    return (seed * 1_000_003 + epoch * 97_007 + index) % 2**63


class _Records(Dataset):
    """Keys are (epoch, batch index, record index); items are featurized records or rejects."""

    def __init__(self, source: Any, processor: KibanProcessor, *, seed: int) -> None:
        self.source, self.processor, self.seed = source, processor, seed

    def __len__(self) -> int:
        return len(self.source)

    def lengths(self) -> Sequence[int]:
        return self.source.lengths()

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[tuple[int, int], Record | Reject, Any]:
        epoch, batch_index, index = key
        (record,) = self.source.read_many([index])
        if isinstance(record, Reject):
            return (epoch, batch_index), record, None
        try:
            with seeded(_record_seed(self.seed, epoch, index)):
                return (epoch, batch_index), record, self.processor.process(record.item, record_id=record.id)
        except InvalidInput as error:
            return (
                (epoch, batch_index),
                Reject(record.id, record.location, f"invalid {error.modality} input", str(error)),
                None,
            )

    def collate(self, items: list[tuple[tuple[int, int], Record | Reject, Any]]) -> TrainBatch:
        """A batch of the usable records; each reject is logged with its id, location and reason.

        The batch keeps its place in the plan (every rank still takes the same number of steps);
        a batch with no usable record at all stops the run, naming its records: clean the data.
        """
        (epoch, batch_index), _, _ = items[0]
        kept = [(r, p) for _, r, p in items if not isinstance(r, Reject)]
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
            self.processor.collate([p for _, p in kept]), [r.id for r, _ in kept], epoch, batch_index
        )


class ResumableBatches(Sampler):
    """Batches of dataset keys for one rank; ``start_at(epoch, index)`` resumes mid-epoch.

    Every rank gets the same number of batches (the remainder of an epoch that does not divide by
    the world size is dropped), so no rank waits for a collective the others never reach.
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
    ) -> None:
        self.lengths, self.batch_size, self.rank, self.world_size = (
            list(lengths),
            batch_size,
            rank,
            world_size,
        )
        self.seed, self.shuffle, self.pool_batches = seed, shuffle, pool_batches
        self.epoch, self._start = 0, 0
        total = self._batches_per_epoch()
        if total < world_size:
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
        batches = length_bucketed_batches(
            self.lengths,
            batch_size=self.batch_size,
            pool_batches=self.pool_batches,
            seed=self.seed + epoch,
            shuffle=self.shuffle,
        )
        per_rank = len(batches) // self.world_size
        return batches[self.rank :: self.world_size][:per_rank]

    def _batches_per_epoch(self) -> int:
        # length_bucketed_batches cuts each pool separately, so a short last pool adds a batch
        pool = self.batch_size * self.pool_batches
        n = len(self.lengths)
        return (n // pool) * self.pool_batches + -(-(n % pool) // self.batch_size)

    def __len__(self) -> int:
        return self._batches_per_epoch() // self.world_size

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


class RecordsDataModule(pl.LightningDataModule):
    """Records -> TrainBatch loaders for train/val/test, resumable at the last consumed batch.

    The processor (tokenizer + featurizers) belongs to the model, which Lightning builds in
    ``configure_model``; the loaders take it from the LightningModule, or from ``attach`` on the
    raw-DeepSpeed path. Rank and world size come from the trainer (or ``attach``).
    """

    def __init__(
        self,
        *,
        splits: Mapping[str, str | None],
        modalities: Sequence[str],
        batch_size: int,
        num_workers: int = 0,
        shuffle: bool = True,
        bucket_pool: int = 50,
        tiny_records: int = 8,
        seed: int = 0,
        datasets: Callable[[str, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        # ``datasets(split, lightning_module)``: a ready dataset for the split (``len``, ``lengths()``,
        # ``dataset[(epoch, batch, index)]``, ``collate``) instead of instruction records (pretraining)
        self.datasets = datasets
        self.splits, self.modalities = dict(splits), list(modalities)
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.bucket_pool, self.tiny_records, self.seed = bucket_pool, tiny_records, seed
        self.position = {"epoch": 0, "next_index": 0}  # of the train loader
        self._processor: KibanProcessor | None = None
        self._rank: tuple[int, int] | None = None
        self._sources: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Any, *, splits: Sequence[str]) -> "RecordsDataModule":
        """The data module a TrainConfig's ``data`` section describes, for the named splits."""
        d = config.data
        return cls(
            splits={name: getattr(d, name) for name in splits},
            modalities=list(config.model["encoders"]),
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            shuffle=d.shuffle,
            bucket_pool=d.bucket_pool,
            tiny_records=d.tiny_records,
            seed=config.seed,
        )

    def attach(self, processor: KibanProcessor, *, rank: int, world_size: int) -> None:
        self._processor, self._rank = processor, (rank, world_size)

    # -- loaders ---------------------------------------------------------------------------------

    def loader(self, split: str) -> DataLoader:
        source = self.splits.get(split)
        if source is None:
            raise ValueError(f"data.{split} is not set")
        rank, world = self._rank or (self.trainer.global_rank, self.trainer.world_size)
        if self.datasets is not None:
            dataset = self.datasets(split, self.trainer.lightning_module)
        else:
            processor = self._processor or self.trainer.lightning_module.processor
            if split not in self._sources:  # indexing a large JSONL once is enough
                self._sources[split] = open_source(
                    source, modalities=self.modalities, tiny_records=self.tiny_records
                )
            dataset = _Records(self._sources[split], processor, seed=self.seed)
        train = split == "train"
        sampler = ResumableBatches(
            [int(n) for n in dataset.lengths()],
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            shuffle=self.shuffle and train,
            pool_batches=self.bucket_pool,
        )
        if train:
            sampler.start_at(self.position["epoch"], self.position["next_index"])
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            # its own generator: creating an iterator must not draw from the training RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self.loader("val") if self.splits.get("val") else []

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    # -- position --------------------------------------------------------------------------------

    def batch_consumed(self, batch: TrainBatch) -> None:
        """The optimizer step that used ``batch`` is done: a resume starts after it."""
        self.position = {"epoch": batch.epoch, "next_index": batch.index + 1}

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position = {"epoch": int(state["epoch"]), "next_index": int(state["next_index"])}

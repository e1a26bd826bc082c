"""Datasets over record sources: map-style for any sampler, streaming and sharded for scale.

A *source* is anything with ``len(source)`` and ``source.read_many(indices) -> [Record | Reject]``:
``InstructionSource`` (instruction JSONL), ``H5adReader`` (cells), or ``RecordList`` around the
records of any reader. A *transform* turns one record into model input and batches them:

    ProcessorTransform(model.processor)   instruction record -> ProcessedRecord -> FusedBatch
    FeaturizerTransform(featurizer)       one item -> feature dict -> the featurizer's padded batch

``RecordDataset`` is map-style (``dataset[i]`` is a ``Sample`` or a ``Reject``; ``collate_samples``
drops the rejects). ``ShardedStream`` is an ``IterableDataset`` that plans each epoch's batches
(length-bucketed, or chunk-shuffled for row-chunked files), keeps the batches of its (rank,
worker) shard (``kiban.data.sharding``), reads each pool of batches in one ``read_many`` and yields
collated batches. Records that fail go to a per-shard rejects file (``rejects-<split>-e<epoch>-
r<rank>-w<worker>.jsonl`` + ``counts-...json``) that ``merge_rejects`` joins after the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset, IterableDataset

from kiban.data.batching import chunk_shuffled_batches, length_bucketed_batches
from kiban.data.rejects import DataError, Record, Reject, Rejects
from kiban.data.sharding import Shard, current_shard, shard_batches
from kiban.encoders.base import InvalidInput

__all__ = [
    "FeaturizerTransform",
    "ProcessorTransform",
    "RecordDataset",
    "RecordList",
    "Sample",
    "ShardedStream",
    "collate_samples",
    "register_batch_featurizer",
]

logger = logging.getLogger(__name__)


class Source(Protocol):
    def __len__(self) -> int: ...

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]: ...


class Transform(Protocol):
    def __call__(self, record: Record) -> Any: ...

    def collate(self, values: Sequence[Any]) -> Any: ...


class RecordList:
    """A source over records already in memory (the output of any reader)."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]:
        """The records at ``indices``, in that order."""
        return [self.records[int(i)] for i in indices]

    def lengths(self) -> np.ndarray:
        """A cheap size per record, for length bucketing."""
        return np.asarray([_item_length(record.item) for record in self.records])


def _item_length(item: Any) -> int:
    """A cheap size of one raw item, for bucketing: residues, atoms-ish characters, genes, pixels."""
    if isinstance(item, dict) and "genes" in item:
        return len(item["genes"])
    if hasattr(item, "seq"):
        return len(item.seq)
    if hasattr(item, "size"):
        return int(item.size)
    return len(item) if hasattr(item, "__len__") else 1


class ProcessorTransform:
    """Instruction records through a ``KibanProcessor``: the text with slots, the featurized inputs."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, record: Record) -> Any:
        """The processed record (text with slots, featurized inputs)."""
        return self.processor.process(record.item, record_id=record.id)

    def collate(self, values: Sequence[Any]) -> Any:
        """A ``FusedBatch`` of processed records."""
        return self.processor.collate(values)


# modality -> a factory of a featurizer's batch form: featurizer -> (batch of the source -> (ids, batch,
# rejects)); filled by the data modules that have one (``kiban.data.cell_batches`` for cells)
BATCH_FEATURIZERS: dict[str, Callable[[Any], Callable[[Any], tuple[list[str], Any, list[Reject]]]]] = {}


def register_batch_featurizer(modality: str) -> Callable[[Any], Any]:
    """Decorator: ``factory(featurizer)`` featurizes a whole ``source.read_batch(indices)`` at once."""

    def add(factory: Any) -> Any:
        BATCH_FEATURIZERS[modality] = factory
        return factory

    return add


def featurize_pool(
    batched: Any, source: Any, pool: Sequence[Sequence[int]]
) -> Iterator[tuple[list[str], Any, list[Reject]]]:
    """(ids, collated batch or None, rejects) of each batch of ``pool``: the pool's rows read at once
    (``source.read_batch``), then each batch featurized whole by ``batched``.
    """
    rows = source.read_batch([i for batch in pool for i in batch])
    start = 0
    for batch in pool:
        yield batched(rows.take(start, start + len(batch)))
        start += len(batch)


class FeaturizerTransform:
    """Single-modality records through their encoder's featurizer.

    Where the modality has a batch featurizer (``register_batch_featurizer``) and the source reads
    whole batches (``read_batch``, e.g. ``H5adReader``), ``ShardedStream`` takes that path: the
    same batch, computed over the batch instead of one record at a time. ``vectorised=False``
    keeps the per-record path.
    """

    def __init__(self, featurizer: Any, *, vectorised: bool = True) -> None:
        self.featurizer = featurizer
        factory = BATCH_FEATURIZERS.get(getattr(featurizer, "modality", "")) if vectorised else None
        self.batched = factory(featurizer) if factory is not None else None

    def batch_reader(
        self, source: Any
    ) -> Callable[[Sequence[Sequence[int]]], Iterator[tuple[list[str], Any, list[Reject]]]] | None:
        """``pool -> (ids, collated batch or None, rejects) per batch`` over ``source``; None: no batch path.

        The pool's rows are read at once (a shuffled pool lies in a few chunks of the file), then
        each batch is featurized whole.
        """
        if self.batched is None or not hasattr(source, "read_batch"):
            return None
        batched = self.batched
        if hasattr(batched, "read_pool"):  # reads and featurizes a pool its own way (a compiled path)
            return lambda pool: batched.read_pool(source, pool)
        return lambda pool: featurize_pool(batched, source, pool)

    def __call__(self, record: Record) -> Any:
        """The item's feature dict."""
        return self.featurizer(record.item, item_id=record.id)

    def collate(self, values: Sequence[Any]) -> Any:
        """The featurizer's padded batch of feature dicts."""
        return self.featurizer.collate(values)


@dataclass(frozen=True)
class Sample:
    """One usable record after its transform (``value``; the record's item without one)."""

    id: str
    location: str
    value: Any


def _apply(record: Record | Reject, transform: Transform | None) -> Sample | Reject:
    if isinstance(record, Reject):
        return record
    if transform is None:
        return Sample(record.id, record.location, record.item)
    try:
        return Sample(record.id, record.location, transform(record))
    except InvalidInput as error:
        reason = "invalid prompt" if error.modality == "prompt" else f"invalid {error.modality} input"
        return Reject(record.id, record.location, reason, str(error))


class RecordDataset(Dataset):
    """Map-style: ``dataset[i]`` is record i after ``transform`` as a ``Sample``, or its ``Reject``."""

    def __init__(self, source: Source, *, transform: Transform | None = None) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Sample | Reject:
        return _apply(self.source.read_many([index])[0], self.transform)


def collate_samples(
    results: Sequence[Sample | Reject], *, transform: Transform | None = None, rejects: Rejects | None = None
) -> tuple[list[str], Any] | None:
    """(ids, collated batch) of the samples; rejects go to ``rejects``. None when all were rejected."""
    samples = []
    for result in results:
        if isinstance(result, Reject):
            if rejects is not None:
                rejects.reject(
                    id=result.id, location=result.location, reason=result.reason, detail=result.detail
                )
            else:
                logger.warning("rejected %s at %s: %s", result.id, result.location, result.detail)
        else:
            samples.append(result)
            if rejects is not None:
                rejects.accept()
    if not samples:
        return None
    values = [s.value for s in samples]
    return [s.id for s in samples], (transform.collate(values) if transform is not None else values)


class ShardedStream(IterableDataset):
    """Streams collated batches of this process's shard of a source, epoch by epoch.

    batch_size: records per batch (the last batch of a pool, and halved batches, are smaller).
    plan: "bucket" groups records of similar ``lengths`` (default: ``source.lengths()``);
        "chunks" shuffles in contiguous chunks of ``chunk_size`` rows (row-chunked files);
        "sequential" keeps file order (inference).
    pool_batches: batches planned, read and bucketed together.
    even_batches: every rank yields the same number of batches (training), so a batch whose
        records are all rejected raises ``DataError`` rather than leave this rank a step behind;
        False for inference, which reads each record exactly once and skips such a batch.
    with_ids: yield (ids, batch) instead of batch.
    rejects_dir / split: where this shard writes its rejects and counts (None: logged only).
    rank / world_size: fixed, or None to ask ``current_shard`` at iteration time.

    Call ``set_epoch(e)`` before each epoch (``KibanDataModule`` does) to reshuffle.
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        transform: Transform | None = None,
        plan: str = "bucket",
        lengths: Sequence[int] | None = None,
        chunk_size: int = 256,
        pool_batches: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        even_batches: bool = True,
        with_ids: bool = False,
        rejects_dir: str | Path | None = None,
        split: str = "data",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if plan not in ("bucket", "chunks", "sequential"):
            raise ValueError(f"plan must be 'bucket', 'chunks' or 'sequential', got {plan!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.source, self.transform, self.batch_size = source, transform, batch_size
        self.plan_kind, self.chunk_size, self.pool_batches = plan, chunk_size, pool_batches
        self.shuffle, self.seed, self.even_batches, self.with_ids = shuffle, seed, even_batches, with_ids
        self.rejects_dir = Path(rejects_dir) if rejects_dir is not None else None
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None
        self._lengths = None
        if plan == "bucket":
            self._lengths = np.asarray(lengths if lengths is not None else source.lengths())  # type: ignore[attr-defined]
            if len(self._lengths) != len(source):
                raise ValueError(f"{len(self._lengths)} lengths for {len(source)} records")

    def set_epoch(self, epoch: int) -> None:
        """Plan the given epoch next (a new order per epoch)."""
        self.epoch = epoch

    def set_distributed(self, *, rank: int, world_size: int) -> None:
        """Fix this process's rank and the world size."""
        self.rank, self.world_size = rank, world_size

    def plan(self) -> list[list[int]]:
        """This epoch's global batch plan: every record index exactly once."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_plan())
        return self._plan[1]

    def _make_plan(self) -> list[list[int]]:
        seed = self.seed * 1_000_003 + self.epoch  # a different, reproducible order every epoch
        n = len(self.source)
        if self.plan_kind == "sequential" or (not self.shuffle and self.plan_kind == "chunks"):
            return [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        if self.plan_kind == "chunks":
            pool_chunks = max(1, self.pool_batches * self.batch_size // self.chunk_size)
            return chunk_shuffled_batches(
                n, batch_size=self.batch_size, chunk_size=self.chunk_size, pool_chunks=pool_chunks, seed=seed
            )
        return length_bucketed_batches(
            self._lengths,
            batch_size=self.batch_size,
            pool_batches=self.pool_batches,
            seed=seed,
            shuffle=self.shuffle,
        )

    def shard(self) -> Shard:
        """This process's (rank, worker) shard."""
        return current_shard(rank=self.rank, world_size=self.world_size)

    def my_batches(self, shard: Shard | None = None) -> list[list[int]]:
        """The batches of this epoch's plan that ``shard`` reads."""
        return shard_batches(self.plan(), shard or self.shard(), even=self.even_batches)

    def __len__(self) -> int:
        """Batches this rank yields in an epoch (all its workers together), before any rejects."""
        shard = current_shard(rank=self.rank, world_size=self.world_size)
        return len(
            shard_batches(
                self.plan(), Shard(rank=shard.rank, world_size=shard.world_size), even=self.even_batches
            )
        )

    def __iter__(self) -> Iterator[Any]:
        shard = self.shard()
        batches = self.my_batches(shard)
        part = f"{self.split}-e{self.epoch}-{shard.name}"
        counts = None if self.rejects_dir is None else self.rejects_dir / f"counts-{part}.json"
        sink = None if self.rejects_dir is None else self.rejects_dir / f"rejects-{part}.jsonl"
        if sink is not None:
            sink.unlink(missing_ok=True)  # a rerun of the same epoch replaces, never appends
        rejects = Rejects(sink=sink)
        where = {"split": self.split, "epoch": self.epoch, "rank": shard.rank, "worker": shard.worker}
        try:
            for start in range(0, len(batches), self.pool_batches):
                pool = batches[start : start + self.pool_batches]
                for number, (batch, chunk, collated) in enumerate(self._pool(pool, rejects), start=start + 1):
                    if counts is not None:
                        # written before the yield: a consumer may stop at any batch (max_steps, a
                        # known length) and never resume this generator
                        rejects.write_counts(counts, complete=number == len(batches), **where)
                    if collated is None:
                        if self.even_batches:
                            # skipping would leave this rank one step behind the others: a DDP
                            # run would wait forever on the collective this rank never reaches
                            where_ = ", ".join(f"{r.id} ({r.location})" for r in chunk)
                            raise DataError(
                                Reject(
                                    None,
                                    where_,
                                    "no usable record in a batch",
                                    f"every record of a {self.split} batch was rejected: {where_}",
                                )
                            )
                        logger.warning("all %d records of a batch were rejected; skipped", len(batch))
                        continue
                    yield collated if self.with_ids else collated[1]
            if counts is not None and not batches:
                rejects.write_counts(counts, complete=True, **where)
        finally:
            rejects.close()

    def _pool(
        self, pool: list[list[int]], rejects: Rejects
    ) -> Iterator[tuple[list[int], list[Sample | Reject], tuple[list[str], Any] | None]]:
        """(batch, its rejects or results, (ids, collated) or None) of each batch of a pool, rejects counted.

        A transform with a batch path (``FeaturizerTransform.batch_reader``) reads and featurizes each
        batch whole; otherwise the pool is read in one ``read_many`` and each record transformed.
        """
        batch_reader = getattr(self.transform, "batch_reader", None)
        read_batch = batch_reader(self.source) if batch_reader is not None else None
        if read_batch is not None:
            for batch, (ids, collated, refused) in zip(pool, read_batch(pool), strict=True):
                for reject in refused:
                    rejects.reject(
                        id=reject.id, location=reject.location, reason=reject.reason, detail=reject.detail
                    )
                rejects.accept(len(ids))
                yield batch, list(refused), ((ids, collated) if ids else None)
            return
        results = self.source.read_many([i for batch in pool for i in batch])
        offset = 0
        for batch in pool:
            chunk = [_apply(r, self.transform) for r in results[offset : offset + len(batch)]]
            offset += len(batch)
            yield batch, chunk, collate_samples(chunk, transform=self.transform, rejects=rejects)

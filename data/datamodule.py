"""``KibanDataModule``: instruction JSONL in, ``FusedBatch``es out, for a Lightning ``Trainer``.

    model = KibanModel.from_config(config)
    data = KibanDataModule(processor=model.processor, train="data/train.jsonl", val="data/val.jsonl",
                           batch_size=8, num_workers=4, output_dir="runs/exp1")
    trainer.fit(lit_module, datamodule=data)      # rejects: runs/exp1/rejects.jsonl, counts.json

Each split is an ``InstructionSource`` streamed by a ``ShardedStream``: batches bucketed by length,
sharded over (rank, worker), the same number of batches on every rank for train and val, every
record exactly once per epoch. ``predict_dataloader`` yields ``(ids, FusedBatch)`` with no
equal-count constraint, so inference over many ranks neither drops nor duplicates a record.

The epoch and the rank are read from the trainer when each epoch's iteration starts, so workers
are best not persistent (the default here): a persistent worker would keep the first epoch's
order. Lightning is imported here only; the readers and datasets do not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from kiban.data.datasets import ProcessorTransform, ShardedStream
from kiban.data.instructions import InstructionSource
from kiban.data.rejects import merge_rejects

__all__ = ["KibanDataModule"]


class _EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch and the rank before every pass over it.

    Lightning calls ``set_epoch`` only on samplers, which an ``IterableDataset`` has none of.
    """

    def __init__(
        self, dataset: ShardedStream, *, where: Callable[[], tuple[int, int, int]], **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._where = where

    def __iter__(self) -> Any:
        epoch, rank, world_size = self._where()
        self.dataset.set_epoch(epoch)
        self.dataset.set_distributed(rank=rank, world_size=world_size)
        return super().__iter__()


class KibanDataModule(pl.LightningDataModule):
    """Train / val / predict dataloaders of ``FusedBatch`` from instruction JSONL files.

    processor: the model's ``KibanProcessor`` (``model.processor``).
    train / val / predict: JSONL paths (any may be None). root: the folder no input may leave
        (default: each file's folder).
    batch_size, num_workers, seed, pool_batches: batching; shuffle: the train split only.
    output_dir: where ``rejects.jsonl`` and ``counts.json`` go (shards under ``output_dir/rejects``).
    """

    def __init__(
        self,
        *,
        processor: Any,
        train: str | Path | None = None,
        val: str | Path | None = None,
        predict: str | Path | None = None,
        root: str | Path | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pool_batches: int = 16,
        shuffle: bool = True,
        output_dir: str | Path = "runs/data",
    ) -> None:
        super().__init__()
        self.processor = processor
        self.paths = {"train": train, "val": val, "predict": predict}
        self.root = root
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pool_batches, self.shuffle = pool_batches, shuffle
        self.output_dir = Path(output_dir)
        self.streams: dict[str, ShardedStream] = {}

    @property
    def shards_dir(self) -> Path:
        return self.output_dir / "rejects"

    def setup(self, stage: str | None = None) -> None:
        for split, path in self.paths.items():
            if path is None or split in self.streams:
                continue
            self.streams[split] = ShardedStream(
                InstructionSource(path, root=self.root),
                transform=ProcessorTransform(self.processor),
                batch_size=self.batch_size,
                plan="bucket",
                pool_batches=self.pool_batches,
                shuffle=self.shuffle and split == "train",
                seed=self.seed,
                even_batches=split != "predict",
                with_ids=split == "predict",
                rejects_dir=self.shards_dir,
                split=split,
            )

    def _loader(self, split: str) -> DataLoader:
        if split not in self.streams:
            self.setup()
        if split not in self.streams:
            raise ValueError(f"KibanDataModule was given no {split} file")
        return _EpochLoader(self.streams[split], where=self._where, num_workers=self.num_workers)

    def _where(self) -> tuple[int, int, int]:
        """(epoch, rank, world size) from the trainer when attached, else from the environment."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.current_epoch, trainer.global_rank, trainer.world_size
        shard = next(iter(self.streams.values())).shard() if self.streams else None
        return 0, (shard.rank if shard else 0), (shard.world_size if shard else 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def write_reports(self) -> None:
        """Join every shard's rejects and counts into ``output_dir/rejects.jsonl`` and ``counts.json``."""
        if self.shards_dir.is_dir():
            merge_rejects(self.shards_dir, into=self.output_dir)

    def teardown(self, stage: str | None = None) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shards are written before rank 0 joins them
            if dist.get_rank() != 0:
                return
        self.write_reports()

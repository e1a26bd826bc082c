"""``KibanDataModule``: records in, resumable ``TrainBatch``es out, for a Lightning ``Trainer``.

    model = KibanModel.from_config(config)
    data = KibanDataModule(splits={"train": "data/train.jsonl", "val": "data/val.jsonl"},
                           batch_size=8, num_workers=4)
    data.attach(model.processor, rank=0, world_size=1)   # or let the trainer's module supply it
    trainer.fit(lit_module, datamodule=data)

This is the one data module: ``kiban fit``, the raw DeepSpeed loop (``kiban.train.deepspeed_cpu``)
and ``kiban quickstart`` all train on it. Each split is a ``Source`` (an instruction JSONL, the
``tiny`` examples, or any source object such as ``H5adReader``); each record goes through a
``Transform`` (default: ``ProcessorTransform`` over the model's processor, giving ``FusedBatch``;
``FeaturizerTransform(featurizer)`` gives one encoder's batch, for pretraining). Batches are
length-bucketed, dealt round-robin to ranks, the same number on every rank for train/val/test.

Its ``state_dict`` is the position of the last batch the model *consumed*, not fetched: workers and
Lightning prefetch ahead, so the checkpoint callback calls ``batch_consumed`` as each optimizer
step completes, and a resumed run starts at the next batch of the same epoch (mechanics in
``kiban.data.resumable``). Lightning is imported here only; ``import kiban.data`` does not load it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from kiban.data.datasets import ProcessorTransform, Transform
from kiban.data.resumable import ResumableBatches, SeededRecords, TrainBatch, open_source, source_lengths

__all__ = ["KibanDataModule"]


class KibanDataModule(pl.LightningDataModule):
    """Train / val / test / predict loaders of ``TrainBatch``, resumable at the last consumed batch.

    splits: split name -> an instruction JSONL path, ``"tiny"``, a ``Source`` object, or None.
    transform: record -> value and ``collate``; None: ``ProcessorTransform`` over the processor
        given to ``attach`` or, under a trainer, the LightningModule's ``processor`` (the model is
        built in ``configure_model``, after the data module).
    modalities / tiny_records: what the ``tiny`` source makes. root: the folder no file reference
        of an instruction JSONL may leave (default: each file's folder).
    batch_size, num_workers, seed, bucket_pool: batching; shuffle: the train split only.
    Rank and world size come from the trainer, or from ``attach`` outside one.
    """

    def __init__(
        self,
        *,
        splits: Mapping[str, Any],
        batch_size: int,
        transform: Transform | None = None,
        modalities: Sequence[str] = (),
        num_workers: int = 0,
        shuffle: bool = True,
        bucket_pool: int = 50,
        tiny_records: int = 8,
        seed: int = 0,
        root: Any = None,
    ) -> None:
        super().__init__()
        self.splits, self.modalities = dict(splits), list(modalities)
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.bucket_pool, self.tiny_records, self.seed, self.root = bucket_pool, tiny_records, seed, root
        self.transform = transform
        self.position = {"epoch": 0, "next_index": 0}  # of the train loader
        self._processor: Any = None
        self._rank: tuple[int, int] | None = None
        self._sources: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Any, *, splits: Sequence[str]) -> KibanDataModule:
        """The data module a TrainConfig's ``data`` section describes, for the named splits."""
        d = config.data
        return cls(
            splits={name: getattr(d, name) for name in splits},
            modalities=list(config.model.encoders),
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            shuffle=d.shuffle,
            bucket_pool=d.bucket_pool,
            tiny_records=d.tiny_records,
            seed=config.seed,
        )

    def attach(self, processor: Any = None, *, rank: int, world_size: int) -> None:
        """Set the processor and the rank where no trainer supplies them (the raw DeepSpeed loop)."""
        self._processor, self._rank = processor, (rank, world_size)

    # -- loaders ---------------------------------------------------------------------------------

    def source(self, split: str) -> Any:
        """The split's ``Source``, opened once (indexing a large JSONL once is enough)."""
        if self.splits.get(split) is None:
            raise ValueError(f"data.{split} is not set")
        if split not in self._sources:
            self._sources[split] = open_source(
                self.splits[split], modalities=self.modalities, tiny_records=self.tiny_records, root=self.root
            )
        return self._sources[split]

    def loader(self, split: str) -> DataLoader:
        """A DataLoader of ``TrainBatch`` over ``split``; the train split starts at the saved position."""
        records = self.source(split)
        rank, world = self._rank or (self.trainer.global_rank, self.trainer.world_size)
        train = split == "train"
        sampler = ResumableBatches(
            source_lengths(records),
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            shuffle=self.shuffle and train,
            pool_batches=self.bucket_pool,
            even=split != "predict",  # inference reads every record; no collective waits on it
        )
        if train:
            sampler.start_at(self.position["epoch"], self.position["next_index"])
        dataset = SeededRecords(records, self._transform(), seed=self.seed)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            # its own generator: creating an iterator must not draw from the training RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _transform(self) -> Transform:
        if self.transform is not None:
            return self.transform
        processor = self._processor or self.trainer.lightning_module.processor
        return ProcessorTransform(processor)

    def train_dataloader(self) -> DataLoader:
        """The train loader, from the last consumed batch on."""
        return self.loader("train")

    def val_dataloader(self) -> DataLoader | list:
        """The val loader, or none when no val split is set."""
        return self.loader("val") if self.splits.get("val") else []

    def test_dataloader(self) -> DataLoader:
        """The test loader."""
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The predict loader: every record once over all ranks, ranks may differ by one batch."""
        return self.loader("predict")

    # -- position --------------------------------------------------------------------------------

    def batch_consumed(self, batch: TrainBatch) -> None:
        """The optimizer step that used ``batch`` is done: a resume starts after it."""
        self.position = {"epoch": batch.epoch, "next_index": batch.index + 1}

    def state_dict(self) -> dict[str, int]:
        """The position of the next train batch: ``{"epoch", "next_index"}``."""
        return dict(self.position)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a position that ``state_dict`` gave."""
        self.position = {"epoch": int(state["epoch"]), "next_index": int(state["next_index"])}

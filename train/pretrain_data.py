"""Pretraining data: files read by the data layer, checked once, then featurized and masked per record.

    PretrainSplits(config.pretrain, seed=..., rejects_dir=run_dir)     the data of ``stage: pretrain``
        (split, lightning module) -> PretrainDataset                    what the data module asks for

A split's files are read through ``kiban.data`` readers (FASTA, GenBank, sequence and SMILES
tables, image folders, h5ad), each kind detected from the file or forced by ``pretrain.kind``.
h5ad files are opened one at a time with the encoder's gene vocabulary, so each file's genes are
matched once (matched / unmatched counts go into ``counts.json`` notes, per file); cells stay in
the file and are read by row when a batch needs them. Every other record is held in memory.

Every record is featurized once up front: one that the encoder's featurizer refuses (too long,
unknown letters, no gene in the vocabulary) goes to ``rejects.jsonl`` with its id, location and
reason, like a record the reader refused, and is never drawn for training. ``counts.json`` holds
``read == accepted + rejected`` for the whole split and the notes of each file.

``PretrainDataset`` is the random-access dataset the training loop draws from: its keys are
``(epoch, batch index, record index)`` (``ResumableBatches``), and each record is cropped,
featurized and masked under its own seed (``kiban.train.data.seeded``), so a masked position
depends on (seed, epoch, record) alone, whichever worker reads it and however often the run is
resumed. ``collate`` pads through the objective's masker into a ``PretrainBatch``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord
from kiban.data.datasets import RecordList
from kiban.data.readers import detect_kind, read
from kiban.data.rejects import COUNTS_FILE, REJECTS_FILE, DataError, Record, Reject, Rejects
from kiban.encoders.base import InvalidInput
from kiban.train.config import PretrainSection
from kiban.train.data import _record_seed, seeded
from torch.utils.data import Dataset

__all__ = [
    "PretrainBatch",
    "PretrainDataset",
    "PretrainSplits",
    "crop_item",
    "evaluate_objective",
    "masked_batches",
    "read_pretrain_source",
]

log = logging.getLogger(__name__)

_SEQUENCE_KINDS = ("fasta", "genbank", "sequence-table")


@dataclass
class PretrainBatch:
    """One micro-batch of masked features, with its record ids and its place in the epoch."""

    features: dict[str, torch.Tensor]
    ids: list[str]
    epoch: int
    index: int  # batch number within this rank's epoch

    def to(self, device: torch.device | str) -> PretrainBatch:  # Lightning moves batches with .to
        """The batch with its tensors on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.features.items()}
        return PretrainBatch(moved, self.ids, self.epoch, self.index)

    def __len__(self) -> int:
        """The number of records in the batch."""
        return len(self.ids)


def crop_item(item: Any, crop: int | None) -> Any:
    """A sequence item cut to a random window of ``crop`` letters (global torch RNG); others as given."""
    if crop is None:
        return item
    if isinstance(item, SeqRecord):
        if len(item.seq) <= crop:
            return item
        start = int(torch.randint(len(item.seq) - crop + 1, ()))
        return SeqRecord(Seq(str(item.seq)[start : start + crop]), id=item.id, description="")
    if isinstance(item, str) and len(item) > crop:
        start = int(torch.randint(len(item) - crop + 1, ()))
        return item[start : start + crop]
    return item


class _Rows:
    """The accepted rows of one random-access file source (an ``H5adReader``)."""

    def __init__(self, source: Any, rows: np.ndarray) -> None:
        """Rows ``rows`` of ``source``."""
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]:
        return self.source.read_many([int(self.rows[i]) for i in indices])

    def lengths(self) -> np.ndarray:
        return np.asarray(self.source.row_lengths())[self.rows]


class _Concat:
    """Several sources as one: index i of the whole is index i - offset of the part it falls in."""

    def __init__(self, parts: Sequence[Any]) -> None:
        """The non-empty ``parts``, in order."""
        self.parts = [part for part in parts if len(part)]
        self.offsets = np.cumsum([0, *(len(part) for part in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]:
        out: list[Record | Reject] = []
        for index in indices:
            part = int(np.searchsorted(self.offsets, index, side="right")) - 1
            out += self.parts[part].read_many([int(index) - int(self.offsets[part])])
        return out

    def lengths(self) -> np.ndarray:
        if not self.parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(part.lengths()) for part in self.parts])


def _check(record: Record, featurizer: Any, crop: int | None, rejects: Rejects) -> bool:
    """Featurize ``record`` once (its first window under ``crop``); a refusal becomes a reject."""
    item = record.item
    if crop is not None and isinstance(item, SeqRecord) and len(item.seq) > crop:
        item = SeqRecord(Seq(str(item.seq)[:crop]), id=item.id, description="")
    try:
        featurizer(item, item_id=record.id)
    except InvalidInput as error:
        rejects.reject(
            id=record.id,
            location=record.location,
            reason=f"invalid {error.modality} input",
            detail=str(error),
        )
        return False
    return True


def read_pretrain_source(
    paths: Sequence[str],
    *,
    modality: str,
    featurizer: Any,
    rejects: Rejects,
    kind: str | None = None,
    crop: int | None = None,
    max_records: int | None = None,
) -> Any:
    """The accepted records of ``paths`` as one random-access source (``len``, ``read_many``, ``lengths``).

    Records the reader or the featurizer refuses go to ``rejects``; ``rejects.notes["files"]``
    gets each file's reader notes (gene matching for h5ad) and its accepted count.
    """
    parts: list[Any] = []
    files: dict[str, Any] = {}
    for path in paths:
        file_kind = kind or detect_kind(path)
        file_rejects = Rejects(sink=rejects.sink, keep=0)  # shares the sink; counted into ``rejects``
        if file_kind == "h5ad":
            part = _h5ad_rows(path, featurizer, file_rejects, max_records)
        else:
            options = {"modality": modality} if file_kind in _SEQUENCE_KINDS else {}
            accepted = []
            for record in read(path, kind=file_kind, rejects=file_rejects, **options):
                if max_records is not None and len(accepted) >= max_records:
                    break
                if _check(record, featurizer, crop, file_rejects):
                    accepted.append(record)
            # the reader counted every record it yielded as accepted; featurizer refusals are not
            file_rejects.accepted = len(accepted)
            part = _CroppedLengths(accepted, crop)
        file_rejects.close()
        rejects.accepted += file_rejects.accepted
        rejects.by_reason.update(file_rejects.by_reason)
        files[str(path)] = {
            "kind": file_kind,
            "read": file_rejects.read,
            "accepted": file_rejects.accepted,
            "rejected": file_rejects.rejected,
            **file_rejects.notes,
        }
        parts.append(part)
    rejects.note("files", files)
    return _Concat(parts)


class _CroppedLengths(RecordList):
    """In-memory records whose bucketing length is capped at ``crop`` (what a batch will hold)."""

    def __init__(self, records: Sequence[Record], crop: int | None) -> None:
        """``records`` with lengths capped at ``crop``."""
        super().__init__(records)
        self.crop = crop

    def lengths(self) -> np.ndarray:
        lengths = super().lengths()
        return lengths if self.crop is None else np.minimum(lengths, self.crop)


def _h5ad_rows(path: str, featurizer: Any, rejects: Rejects, max_records: int | None) -> _Rows:
    """The usable cells of one h5ad file, its genes matched to the encoder's vocabulary once."""
    from kiban.data.cells import H5adReader

    vocab = getattr(featurizer, "vocab", None)  # the cell featurizer's gene vocabulary
    reader = H5adReader(path, vocab=list(vocab) if vocab is not None else None)
    for key, value in reader.notes.items():
        rejects.note(key, value)
    rows: list[int] = []
    for start in range(0, len(reader), reader.chunk_size):
        if max_records is not None and len(rows) >= max_records:
            break
        stop = min(start + reader.chunk_size, len(reader))
        for row, record in zip(range(start, stop), reader.read_block(start, stop), strict=True):
            if max_records is not None and len(rows) >= max_records:
                break
            if isinstance(record, Reject):
                rejects.reject(
                    id=record.id, location=record.location, reason=record.reason, detail=record.detail
                )
            elif _check(record, featurizer, None, rejects):
                rejects.accept()
                rows.append(row)
    return _Rows(reader, np.asarray(rows, dtype=np.int64))


class PretrainDataset(Dataset):
    """Random access to masked features: ``dataset[(epoch, batch_index, i)]`` (or ``dataset[i]``).

    Each record is cropped (``crop``), featurized and masked under the seed of (seed, epoch, i),
    with the global RNGs restored afterwards: data loading never draws from the training RNG.
    """

    def __init__(
        self, source: Any, *, featurizer: Any, masker: Any, seed: int, crop: int | None = None
    ) -> None:
        """Over ``source`` (``len``, ``read_many``, ``lengths``), through ``featurizer`` and ``masker``."""
        self.source, self.featurizer, self.masker = source, featurizer, masker
        self.seed, self.crop = seed, crop

    def __len__(self) -> int:
        """The number of usable records."""
        return len(self.source)

    def lengths(self) -> np.ndarray:
        """A size per record for length bucketing."""
        return np.asarray(self.source.lengths())

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[tuple[int, int], str, Any]:
        """((epoch, batch index), record id, masked features or the record's Reject)."""
        epoch, batch_index, index = key if isinstance(key, tuple) else (0, 0, key)
        (record,) = self.source.read_many([index])
        if isinstance(record, Reject):  # a file changed under the run: skipped in collate, logged
            return (epoch, batch_index), record.id or record.location, record
        try:
            with seeded(_record_seed(self.seed, epoch, index)):
                features = self.masker(self.featurizer(crop_item(record.item, self.crop), item_id=record.id))
        except InvalidInput as error:
            return (
                (epoch, batch_index),
                record.id,
                Reject(record.id, record.location, f"invalid {error.modality} input", str(error)),
            )
        return (epoch, batch_index), record.id, features

    def collate(self, items: Sequence[tuple[tuple[int, int], str, Any]]) -> PretrainBatch:
        """The masker's padded batch of the usable items; a batch with none stops the run."""
        (epoch, batch_index), _, _ = items[0]
        kept = [(record_id, f) for _, record_id, f in items if not isinstance(f, Reject)]
        for _, _, value in items:
            if isinstance(value, Reject):
                log.warning("skipped record %s (%s): %s", value.id, value.location, value.detail)
        if not kept:
            names = ", ".join(record_id for _, record_id, _ in items)
            raise DataError(
                Reject(None, names, "no usable record in a batch", f"every record failed: {names}")
            )
        return PretrainBatch(
            self.masker.collate([f for _, f in kept]), [r for r, _ in kept], epoch, batch_index
        )


class PretrainSplits:
    """The ``pretrain`` section's splits, read once each when the data module first asks.

    Called as ``splits(split, lightning_module)`` (the module owns the encoder's featurizer and the
    objective's masker, built in ``configure_model``). Rank 0 writes ``rejects.jsonl`` and
    ``counts.json`` (train) and ``rejects-val.jsonl`` / ``counts-val.json`` (val) into ``rejects_dir``.
    """

    def __init__(
        self, section: PretrainSection, *, seed: int, rejects_dir: str | Path | None, rank: int = 0
    ) -> None:
        """The section's files; rank ``rank`` writes rejects into ``rejects_dir`` when it is 0."""
        self.section, self.seed, self.rank = section, seed, rank
        self.rejects_dir = Path(rejects_dir) if rejects_dir is not None else None
        self._datasets: dict[str, PretrainDataset] = {}

    def paths(self, split: str) -> list[str]:
        """The files of ``split`` (``train`` or ``val``)."""
        return list(getattr(self.section, split)) if split in ("train", "val") else []

    def __call__(self, split: str, module: Any) -> PretrainDataset:
        """The dataset of ``split`` for the objective of ``module`` (read on first use)."""
        if split not in self._datasets:
            self._datasets[split] = self._read(split, module)
        return self._datasets[split]

    def _read(self, split: str, module: Any) -> PretrainDataset:
        s = self.section
        featurizer, masker = module.objective.encoder.featurizer, module.objective.masker
        suffix = "" if split == "train" else f"-{split}"
        writes = self.rejects_dir is not None and self.rank == 0
        sink = None
        if writes:
            sink = self.rejects_dir / REJECTS_FILE.replace(".jsonl", f"{suffix}.jsonl")
            sink.parent.mkdir(parents=True, exist_ok=True)
            sink.unlink(missing_ok=True)  # this read's rejects (a resumed run reads the same again)
        rejects = Rejects(sink=sink)
        try:
            source = read_pretrain_source(
                self.paths(split),
                modality=s.modality,
                featurizer=featurizer,
                rejects=rejects,
                kind=s.kind,
                crop=s.crop,
                max_records=s.max_records,
            )
        finally:
            rejects.close()
        if writes:
            rejects.write_counts(
                self.rejects_dir / COUNTS_FILE.replace(".json", f"{suffix}.json"), split=split
            )
        report = rejects.report()
        log.info(
            "pretrain %s data: %d records read, %d accepted, %d rejected %s",
            split,
            report.read,
            report.accepted,
            report.rejected,
            dict(report.by_reason),
        )
        if len(source) == 0:
            files = ", ".join(self.paths(split))
            raise DataError(
                Reject(
                    None, files, "no usable record", f"none of the {report.read} records of {files} is usable"
                )
            )
        return PretrainDataset(source, featurizer=featurizer, masker=masker, seed=self.seed, crop=s.crop)


def masked_batches(
    objective: Any, records: Sequence[Record], *, batch_size: int, seed: int, crop: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Fixed masked batches of ``records``, record i masked under (``seed``, i).

    The same held-out positions for every model compared on them.
    """
    featurizer, masker = objective.encoder.featurizer, objective.masker
    items = []
    for i, record in enumerate(records):
        with seeded(_record_seed(seed, 0, i)):
            items.append(masker(featurizer(crop_item(record.item, crop), item_id=record.id)))
    return [masker.collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def evaluate_objective(objective: Any, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean loss over ``batches``, its exp and the masked accuracy, in eval mode.

    Weighted by ``n_masked`` when the objective reports it; the exp of a masked-LM loss is its
    ``perplexity``.
    """
    was_training = objective.training
    objective.eval()
    total = weight = correct = 0.0
    try:
        for batch in batches:
            out = objective(batch)
            n = float(out.metrics.get("n_masked", 1.0))
            total += float(out.loss) * n
            correct += float(out.metrics.get("masked_accuracy", 0.0)) * n
            weight += n
    finally:
        objective.train(was_training)
    loss = total / max(weight, 1e-12)
    return {"loss": loss, "perplexity": float(np.exp(loss)), "masked_accuracy": correct / max(weight, 1e-12)}

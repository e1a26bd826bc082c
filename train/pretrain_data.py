"""Pretraining data: files read by the data layer, checked once, then featurized and masked per record.

The ``pretrain`` section's files feed the one data module (``kiban.data.datamodule.KibanDataModule``)
through two small parts:

    PretrainSource      a split's accepted records (``len``, ``read_many``, ``lengths``), read when
                        the loader first asks, with the encoder's featurizer (built by the module in
                        ``configure_model``)
    PretrainProcessor   the module's ``processor``: crop, featurize and mask one record; collate
                        through the objective's masker (the data module runs it under the record's
                        seed, ``kiban.data.resumable.seeded``)

A split's files are read through ``kiban.data`` readers (FASTA, GenBank, sequence and SMILES
tables, image folders, h5ad), each kind detected from the file or forced by ``pretrain.kind``.
h5ad files are opened one at a time with the encoder's gene vocabulary, so each file's genes are
matched once (matched / unmatched counts go into ``counts.json`` notes, per file); cells stay in
the file and are read by row when a batch needs them. Every other record is held in memory.

Every record is featurized once up front: one that the encoder's featurizer refuses (too long,
unknown letters, no gene in the vocabulary) goes to ``rejects.jsonl`` with its id, location and
reason, like a record the reader refused, and is never drawn for training. ``counts.json`` holds
``read == accepted + rejected`` for the whole split and the notes of each file.

A masked position depends on (seed, epoch, record) alone, whichever worker reads it and however
often the run is resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from kiban.data.datasets import RecordList
from kiban.data.readers import detect_kind, read
from kiban.data.rejects import COUNTS_FILE, REJECTS_FILE, DataError, Record, Reject, Rejects
from kiban.data.resumable import record_seed, seeded
from kiban.encoders.base import InvalidInput
from kiban.train.config import PretrainSection

__all__ = [
    "PretrainProcessor",
    "PretrainSource",
    "crop_item",
    "evaluate_objective",
    "masked_batches",
    "read_pretrain_source",
]

log = logging.getLogger(__name__)

_SEQUENCE_KINDS = ("fasta", "genbank", "sequence-table")


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
    use_raw: bool = False,
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
            part = _h5ad_rows(path, featurizer, file_rejects, max_records, use_raw=use_raw)
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


def gene_vocab_of(paths: Sequence[str], *, use_raw: bool = False) -> tuple[str, ...]:
    """The gene names of the h5ad files among ``paths`` (files, or folders holding them), in first-seen order.

    ``kiban pretrain cell`` uses them as the encoder's vocabulary when its config names none, so
    a cell encoder is pretrained over the genes its data measures (unused names cost nothing).
    """
    import anndata

    from kiban.encoders.cell import vocab_from_adata

    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.h5ad")) if path.is_dir() else [path] if path.suffix == ".h5ad" else []
    names: dict[str, None] = {}
    for file in files:
        adata = anndata.read_h5ad(file, backed="r")
        try:
            names.update(dict.fromkeys(vocab_from_adata(adata.raw if use_raw else adata)))
        finally:
            adata.file.close()
    return tuple(names)


class _CroppedLengths(RecordList):
    """In-memory records whose bucketing length is capped at ``crop`` (what a batch will hold)."""

    def __init__(self, records: Sequence[Record], crop: int | None) -> None:
        """``records`` with lengths capped at ``crop``."""
        super().__init__(records)
        self.crop = crop

    def lengths(self) -> np.ndarray:
        lengths = super().lengths()
        return lengths if self.crop is None else np.minimum(lengths, self.crop)


def _h5ad_rows(
    path: str, featurizer: Any, rejects: Rejects, max_records: int | None, *, use_raw: bool = False
) -> _Rows:
    """The usable cells of one h5ad file, its genes matched to the encoder's vocabulary once."""
    from kiban.data.cells import H5adReader

    vocab = getattr(featurizer, "vocab", None)  # the cell featurizer's gene vocabulary
    reader = H5adReader(path, vocab=list(vocab) if vocab is not None else None, use_raw=use_raw)
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


class PretrainProcessor:
    """One record's item -> masked features (crop, featurize, mask); a list of them -> one batch.

    What the data module's ``ProcessorTransform`` calls (``process``, ``collate``); weight-free and
    picklable (a featurizer and a masker), so it runs in DataLoader workers.
    """

    def __init__(self, featurizer: Any, masker: Any, *, crop: int | None = None) -> None:
        """The encoder's featurizer and the objective's masker; ``crop`` as in the pretrain section."""
        self.featurizer, self.masker, self.crop = featurizer, masker, crop

    def process(self, item: Any, *, record_id: Any = None) -> dict[str, torch.Tensor]:
        """Crop (random window), featurize and mask one item, drawing from the global RNGs."""
        return self.masker(self.featurizer(crop_item(item, self.crop), item_id=record_id))

    def collate(self, values: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The masker's padded batch."""
        return self.masker.collate(values)


class PretrainSource:
    """The accepted records of one split of a ``pretrain`` section, read on first use.

    ``module`` is the pretraining LightningModule: its objective (built in ``configure_model``,
    before the data module asks for loaders) brings the featurizer that checks each record. Rank 0
    writes ``rejects.jsonl`` / ``counts.json`` (train) or ``rejects-val.jsonl`` / ``counts-val.json``
    into ``rejects_dir``. Once read, it pickles without the module (DataLoader workers).
    """

    def __init__(
        self,
        section: PretrainSection,
        *,
        split: str,
        module: Any,
        rejects_dir: str | Path | None,
        rank: int = 0,
    ) -> None:
        """The files of ``section.<split>``, checked with ``module``'s featurizer when first read."""
        if split not in ("train", "val"):
            raise ValueError(f"a pretrain split is train or val, got {split!r}")
        self.section, self.split, self.module, self.rank = section, split, module, rank
        self.rejects_dir = Path(rejects_dir) if rejects_dir is not None else None
        self._source: Any = None

    def __len__(self) -> int:
        """The number of accepted records."""
        return len(self._read())

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]:
        """The records at ``indices``."""
        return self._read().read_many(indices)

    def lengths(self) -> np.ndarray:
        """A size per record for length bucketing (capped at ``crop``)."""
        return self._read().lengths()

    def __getstate__(self) -> dict[str, Any]:
        self._read()
        return {**self.__dict__, "module": None}

    def _read(self) -> Any:
        if self._source is not None:
            return self._source
        s = self.section
        featurizer = self.module.objective.encoder.featurizer
        paths = list(getattr(s, self.split))
        suffix = "" if self.split == "train" else f"-{self.split}"
        writes = self.rejects_dir is not None and self.rank == 0
        sink = None
        if writes:
            sink = self.rejects_dir / REJECTS_FILE.replace(".jsonl", f"{suffix}.jsonl")
            sink.parent.mkdir(parents=True, exist_ok=True)
            sink.unlink(missing_ok=True)  # this read's rejects (a resumed run reads the same again)
        rejects = Rejects(sink=sink)
        try:
            source = read_pretrain_source(
                paths,
                modality=s.modality,
                featurizer=featurizer,
                rejects=rejects,
                kind=s.kind,
                crop=s.crop,
                max_records=s.max_records,
                use_raw=s.use_raw,
            )
        finally:
            rejects.close()
        if writes:
            rejects.write_counts(
                self.rejects_dir / COUNTS_FILE.replace(".json", f"{suffix}.json"), split=self.split
            )
        report = rejects.report()
        log.info(
            "pretrain %s data: %d records read, %d accepted, %d rejected %s",
            self.split,
            report.read,
            report.accepted,
            report.rejected,
            dict(report.by_reason),
        )
        if len(source) == 0:
            files = ", ".join(paths)
            raise DataError(
                Reject(
                    None, files, "no usable record", f"none of the {report.read} records of {files} is usable"
                )
            )
        self._source = source
        return source


def masked_batches(
    objective: Any, records: Sequence[Record], *, batch_size: int, seed: int, crop: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Fixed masked batches of ``records``, record i masked under (``seed``, i).

    The same held-out positions for every model compared on them.
    """
    featurizer, masker = objective.encoder.featurizer, objective.masker
    items = []
    for i, record in enumerate(records):
        with seeded(record_seed(seed, 0, i)):
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

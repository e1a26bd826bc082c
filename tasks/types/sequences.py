"""Labelled protein or DNA sequences, read for the ``protein`` and ``dna`` task types.

FASTA: labels live in the header as ``KEY=VALUE`` words (``>P12345 ec_class=3 fitness=0.8``) and
``--labels KEY`` names them; a sequence table (CSV/TSV with a ``sequence`` column) names label
columns. Unreadable records, letters outside the alphabet, sequences over ``--max-length`` and
rows without a label go to rejects.jsonl. ``--groups COL`` reads a group column (tables only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiban.tasks.labels import header, parse_targets, resolve_labels
from kiban.tasks.pipeline import FinetuneOptions, LabelledData, require_rows

__all__ = ["load_sequences", "sequence_text"]


def sequence_text(item: Any) -> str:
    """The letters of a sequence item (a Biopython SeqRecord or a string)."""
    return str(getattr(item, "seq", item))


def load_sequences(options: FinetuneOptions, rejects: Any, *, modality: str, max_length: int | None) -> LabelledData:
    """The labelled sequences of ``options.data`` (FASTA or table) as ``modality`` inputs."""
    from kiban.data import detect_kind, read_fasta, read_sequence_table

    path = Path(options.data)
    kind = detect_kind(path)
    if kind == "fasta":
        records = list(read_fasta(path, modality=modality, rejects=rejects))
        fields = [_header_fields(r.item.description) for r in records]
        columns = sorted({key for f in fields for key in f})
        if options.groups is not None:
            raise ValueError(f"{path}: --groups reads a table column; a FASTA file has none")
    else:
        columns = header(path)
        if not columns:
            raise ValueError(f"{path}: the file is empty")
        if not any(c.lower() in ("sequence", "seq") for c in columns):
            raise ValueError(f"{path}: no sequence column (looked for 'sequence', 'seq'); columns: {', '.join(columns)}")
        records = list(read_sequence_table(path, modality=modality, rejects=rejects))
        fields = [r.fields for r in records]
    if not options.labels:
        raise ValueError(f"{path}: name the label column(s) with --labels COL; columns: {', '.join(columns)}")
    label_columns = resolve_labels(options.labels, columns, missing=f"{path}: no label column")
    if options.groups is not None and options.groups not in columns:
        raise ValueError(f"{path}: no group column {options.groups!r}; columns: {', '.join(columns)}")
    kept, kept_fields = [], []
    for record, values in zip(records, fields):
        length = len(sequence_text(record.item))
        missing = [c for c in label_columns if not str(values.get(c, "")).strip()]
        if max_length is not None and length > max_length:
            reason, detail = "too long", f"{length} residues, over --max-length {max_length}"
        elif missing:
            reason, detail = "no label", f"no value for {', '.join(missing)}"
        else:
            kept.append(record)
            kept_fields.append(values)
            continue
        rejects.accepted -= 1  # the reader counted it as accepted
        rejects.reject(id=record.id, location=record.location, reason=reason, detail=detail)
    require_rows(len(kept), 10, path, rejects, what=f"{modality} sequence(s)")
    raw = [[str(f.get(c, "")).strip() for c in label_columns] for f in kept_fields]
    kind_, labels, targets, keep = parse_targets(raw, label_columns, path)
    kept = [r for r, k in zip(kept, keep) if k]
    groups = None
    if options.groups is not None:
        groups = np.array([str(f[options.groups]) for f, k in zip(kept_fields, keep) if k], dtype=object)
    return LabelledData(
        modality,
        [r.id for r in kept],
        [r.item for r in kept],
        kind_,
        labels,
        targets,
        groups,
        extra={"label_columns": label_columns, "max_length": max_length},
    )


def _header_fields(description: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in description.split()[1:] if "=" in word)

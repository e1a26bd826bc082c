"""Predicting with a saved head on a file: the Python side of ``kiban predict``.

The model comes from ``--model``, else from the head's ``extra["model"]``: a model folder, or
``"run:model"`` for the tiny model ``kiban finetune --model tiny`` saved beside ``heads/`` in its
run folder (so a smoke-test run is self-contained and ``kiban serve RUN`` loads it too).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

from kiban.tasks.heads import PooledHead, load_head

__all__ = ["RUN_MODEL", "model_for_head", "predict_file", "read_inputs"]

RUN_MODEL = "run:model"


def model_for_head(head_dir: Path, head: PooledHead, model: str | None = None) -> Any:
    from kiban.fusion import KibanModel

    spec = model or head.config.extra.get("model")
    if not spec:
        raise ValueError(f"{head_dir}/head.json names no model; pass --model")
    if spec == RUN_MODEL:
        spec = str(Path(head_dir).resolve().parents[1] / "model")
    return KibanModel.from_pretrained(spec).eval()


def read_inputs(
    path: Path, modality: str, model: Any, *, use_raw: bool = False, rejects: Any = None
) -> list[Any]:
    """Records of a file for a head of ``modality`` (SMILES table / .smi, or h5ad matched to the
    vocabulary; ``use_raw`` reads ``raw.X``, as the head was trained when its extra says so)."""
    from kiban.data import read, read_h5ad

    if modality == "cell":
        vocab = model.encoders["cell"].featurizer.vocab
        return list(read_h5ad(path, vocab=vocab, use_raw=use_raw, rejects=rejects))
    return [r for r in read(path, rejects=rejects) if r.modality == modality]


def predict_file(
    head_dir: str | Path, data: str | Path, *, model: str | None = None, out: str | Path | None = None
) -> int:
    """Write id + prediction rows as CSV (to ``out`` or stdout); returns the number of rows."""
    from kiban.data import Rejects
    from kiban.tasks.finetune import embed_items

    head_dir = Path(head_dir)
    head = load_head(head_dir)
    fused = model_for_head(head_dir, head, model)
    rejects = Rejects()
    use_raw = bool(head.config.extra.get("use_raw", False))
    records = read_inputs(Path(data), head.config.modality, fused, use_raw=use_raw, rejects=rejects)
    if not records:
        raise ValueError(
            f"{data}: no usable {head.config.modality} input ({rejects.rejected} rejected: {dict(rejects.by_reason)})"
        )
    rows = head.outputs(embed_items(fused, head.config.modality, [r.item for r in records], progress=False))
    handle = open(out, "w", newline="") if out else sys.stdout
    try:
        writer = csv.writer(handle)
        if head.config.architecture == "multilabel":
            writer.writerow(["id", *(f"p:{label}" for label in head.config.labels)])
            for record, row in zip(records, rows):
                writer.writerow(
                    [record.id, *(f"{row['probabilities'][name]:.6g}" for name in head.config.labels)]
                )
        elif head.config.kind == "classification":
            writer.writerow(["id", "label", *(f"p:{label}" for label in head.config.labels)])
            for record, row in zip(records, rows):
                writer.writerow(
                    [
                        record.id,
                        row["label"],
                        *(f"{row['probabilities'][name]:.6g}" for name in head.config.labels),
                    ]
                )
        else:
            writer.writerow(["id", *head.config.labels])
            for record, row in zip(records, rows):
                writer.writerow([record.id, *(f"{row['values'][t]:.6g}" for t in head.config.labels)])
    finally:
        if out:
            handle.close()
    if rejects.rejected:
        print(
            f"kiban predict: {rejects.rejected} input(s) rejected: {dict(rejects.by_reason)}", file=sys.stderr
        )
    return len(records)

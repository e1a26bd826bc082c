"""``--type molecules``: a SMILES table (CSV/TSV; ``--labels`` names one or more label columns).

Split by Bemis–Murcko scaffold; baselines: logistic regression (classification) or a random
forest (regression) on Morgan fingerprints, and the trivial predictor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiban.tasks.labels import parse_targets, resolve_labels
from kiban.tasks.pipeline import FinetuneOptions, LabelledData, register_task_type
from kiban.tasks.pooled import pooled_type, side_outputs

__all__ = ["load_molecules"]


def load_molecules(options: FinetuneOptions, model: Any, rejects: Any) -> LabelledData:
    """Molecules and their labels; unparseable SMILES go to ``rejects``."""
    import pandas as pd

    from kiban.data import read_smiles

    path = Path(options.data)
    if not options.labels:
        raise ValueError(f"{path}: name the label column(s) with --labels COL (repeatable) or --labels-file")
    columns = [c.strip() for c in pd.read_csv(path, nrows=0, sep="\t" if path.suffix == ".tsv" else ",").columns]
    label_columns = resolve_labels(options.labels, columns, missing=f"{path}: no label column")
    records = list(read_smiles(path, rejects=rejects))
    if not records:
        report = rejects.report()
        example = (
            f" (e.g. {report.first_rejects[0].location}: {report.first_rejects[0].detail})"
            if report.first_rejects
            else ""
        )
        raise ValueError(f"{path}: no valid molecule: {report.rejected} row(s) rejected{example}")
    raw = [[r.fields.get(c, "").strip() for c in label_columns] for r in records]
    kind, labels, targets, keep = parse_targets(raw, label_columns, path)
    records = [r for r, k in zip(records, keep) if k]
    return LabelledData(
        "molecule",
        [r.id for r in records],
        [r.item for r in records],
        kind,
        labels,
        targets,
        extra={"label_columns": label_columns},
    )


def _split(data: LabelledData, options: FinetuneOptions) -> Any:
    from kiban.tasks.splits import scaffold_split

    return scaffold_split(data.items, seed=options.seed)


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    from kiban.tasks import baselines as B

    fingerprints = B.morgan_fingerprints(data.items)
    name = (
        "logistic regression on Morgan fingerprints"
        if data.kind in ("classification", "multilabel")
        else "random forest on Morgan fingerprints"
    )
    both = np.concatenate([split.valid, split.test])
    predicted = B.fingerprint_model(
        data.kind,
        fingerprints[split.train],
        data.targets[split.train],
        fingerprints[both],
        n_classes=len(data.labels) if data.kind == "classification" else 0,
        seed=seed,
    )
    return {name: side_outputs(predicted, split)}


register_task_type(
    pooled_type(
        "molecules",
        modality="molecule",
        load=load_molecules,
        split=_split,
        baselines=_baselines,
        description="a SMILES table (CSV/TSV) with label column(s)",
        detect=lambda path, columns, options: path.is_file(),  # the fallback: any other table
    )
)

"""``--type text``: sentence, passage or relation classification (or regression) from a table.

The table (CSV/TSV) has a text column (``text``, ``abstract``, ``passage`` or ``context``; read by
``kiban.data.read_text_table``) and label column(s); the backbone reads the text itself, so no
encoder is needed. Split: whole groups of ``--groups COL`` (e.g. the abstract a relation comes
from), else random. Baseline: TF-IDF (word 1-2-grams, sublinear tf) + logistic regression (ridge
for regression), and the trivial predictor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiban.tasks.labels import header, parse_targets, resolve_labels
from kiban.tasks.pipeline import FinetuneOptions, LabelledData, register_task_type, require_rows
from kiban.tasks.pooled import pooled_type, side_outputs
from kiban.tasks.types.protein import linear_baseline

__all__ = ["tfidf"]


def tfidf(train: list[str], others: list[str]) -> tuple[Any, Any]:
    """Sparse TF-IDF matrices (vocabulary from ``train``) of ``train`` and ``others``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectoriser = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    return vectoriser.fit_transform(train), vectoriser.transform(others)


def _load(options: FinetuneOptions, model: Any, rejects: Any) -> LabelledData:
    from kiban.data import read_text_table

    path = Path(options.data)
    columns = header(path)
    if not options.labels:
        raise ValueError(f"{path}: name the label column(s) with --labels COL; columns: {', '.join(columns)}")
    label_columns = resolve_labels(options.labels, columns, missing=f"{path}: no label column")
    if options.groups is not None and options.groups not in columns:
        raise ValueError(f"{path}: no group column {options.groups!r}; columns: {', '.join(columns)}")
    records = list(read_text_table(path, rejects=rejects))
    kept = []
    for record in records:
        missing = [c for c in label_columns if not record.fields.get(c, "").strip()]
        if missing:
            rejects.accepted -= 1  # the reader counted it as accepted
            rejects.reject(
                id=record.id, location=record.location, reason="no label", detail=f"no value for {', '.join(missing)}"
            )
        else:
            kept.append(record)
    require_rows(len(kept), 10, path, rejects, what="passage(s)")
    raw = [[r.fields[c].strip() for c in label_columns] for r in kept]
    kind, labels, targets, keep = parse_targets(raw, label_columns, path)
    kept = [r for r, k in zip(kept, keep) if k]
    groups = np.array([r.fields[options.groups] for r in kept], dtype=object) if options.groups else None
    return LabelledData(
        "text",
        [r.id for r in kept],
        [r.item for r in kept],
        kind,
        labels,
        targets,
        groups,
        extra={"label_columns": label_columns},
    )


def _split(data: LabelledData, options: FinetuneOptions) -> Any:
    from kiban.tasks.splits import group_split, random_split

    if data.groups is not None:
        return group_split(data.groups, seed=options.seed)
    return random_split(len(data.ids), seed=options.seed)


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    both = np.concatenate([split.valid, split.test])
    x_train, x_other = tfidf([data.items[i] for i in split.train], [data.items[i] for i in both])
    predicted = linear_baseline(
        data.kind, x_train, data.targets[split.train], x_other, n_classes=len(data.labels), seed=seed
    )
    model = "ridge regression" if data.kind == "regression" else "logistic regression"
    return {f"TF-IDF + {model}": side_outputs(predicted, split)}


register_task_type(
    pooled_type(
        "text",
        modality="text",
        load=_load,
        split=_split,
        baselines=_baselines,
        description="a table with a text column and label column(s)",
    )
)

"""``--type cells``: an ``.h5ad`` (labels from ``adata.obs``, default ``cell_type``; ``--groups`` a
donor / batch column held out whole, else a random split); baselines: logistic regression on
log-normalised expression, and the majority class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiban.tasks.labels import parse_targets, resolve_labels
from kiban.tasks.pipeline import FinetuneOptions, LabelledData, register_task_type, require_rows
from kiban.tasks.pooled import pooled_type, side_outputs

__all__ = ["expression_matrix", "load_cells"]


def load_cells(options: FinetuneOptions, model: Any, rejects: Any) -> LabelledData:
    """Cells matched to the model's gene vocabulary, and their labels."""
    import anndata

    from kiban.data import read_h5ad

    path = Path(options.data)
    adata = anndata.read_h5ad(path, backed="r")
    obs = adata.obs.copy()
    adata.file.close()
    names = resolve_labels(
        options.labels or ["cell_type"],
        [str(c) for c in obs.columns],
        missing=f"{path}: adata.obs has no label column",
    )
    if len(names) > 1:
        raise ValueError("an h5ad fine-tune takes one label column (cell type / state / disease)")
    label = names[0]
    if options.groups is not None and options.groups not in obs.columns:
        raise ValueError(
            f"{path}: adata.obs has no group column {options.groups!r}; columns: {', '.join(map(str, obs.columns))}"
        )
    vocab = model.encoders["cell"].featurizer.vocab
    records = list(read_h5ad(path, vocab=vocab, use_raw=options.use_raw, rejects=rejects))
    match = rejects.notes.get("gene_match", {})
    if match.get("matched", 1) == 0:
        raise ValueError(
            f"{path}: no gene overlaps the model's vocabulary of {len(vocab)} genes: {match.get('summary', '')}"
        )
    require_rows(len(records), 1, path, rejects, what="cell(s)")
    obs = obs.loc[[r.id for r in records]]
    raw = [[str(v) if v == v else ""] for v in obs[label].tolist()]  # NaN -> missing
    kind, labels, targets, keep = parse_targets(raw, [label], path, force_classes=True)
    records = [r for r, k in zip(records, keep) if k]
    groups = obs[options.groups].astype(str).to_numpy()[keep] if options.groups else None
    return LabelledData(
        "cell",
        [r.id for r in records],
        [r.item for r in records],
        kind,
        labels,
        targets,
        groups,
        extra={"label_columns": [label], "gene_match": match, "use_raw": options.use_raw},
    )


def _split(data: LabelledData, options: FinetuneOptions) -> Any:
    from kiban.tasks.splits import group_split, random_split

    if data.groups is not None:
        return group_split(data.groups, seed=options.seed)
    return random_split(len(data.ids), seed=options.seed)


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    from kiban.tasks.baselines import expression_logreg

    matrix, _ = expression_matrix(data.items)
    both = np.concatenate([split.valid, split.test])
    predicted = expression_logreg(
        matrix[split.train], data.targets[split.train], matrix[both], n_classes=len(data.labels), seed=seed
    )
    return {"logistic regression on log-normalised expression": side_outputs(predicted, split)}


def expression_matrix(items: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """Dense [N, G] of the cells' genes; counts are log-normalised, already-normalised values kept."""
    from kiban.tasks.baselines import log_normalise

    genes = sorted({g for item in items for g in item["genes"]})
    index = {g: k for k, g in enumerate(genes)}
    matrix = np.zeros((len(items), len(genes)))
    for row, item in enumerate(items):
        matrix[row, [index[g] for g in item["genes"]]] = item["values"]
    counts = np.allclose(matrix, np.round(matrix))
    return log_normalise(matrix, already_log=not counts), genes


register_task_type(
    pooled_type(
        "cells",
        modality="cell",
        load=load_cells,
        split=_split,
        baselines=_baselines,
        description="an .h5ad with a label column in adata.obs (default cell_type)",
        detect=lambda path, columns, options: path.suffix == ".h5ad",
    )
)

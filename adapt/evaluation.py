"""``kiban evaluate``: a model's perplexity on general text and instructions, and each head's metric.

A head is scored on a labelled file of the kind it was trained on (a SMILES table or an h5ad),
read with the label columns its ``head.json`` records, through the same reader ``kiban finetune``
uses; the classes in the file are matched to the head's by name (rows of a class the head does not
know are counted and left out). Heads over other states (per-residue, contacts, pairs) are listed
as not scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.adapt.forgetting import GENERAL_TEXT, language_figures, read_instructions, read_texts

__all__ = ["evaluate_model", "head_metrics"]


def head_metrics(model: Any, head: Any, data: str | Path) -> dict[str, Any]:
    """``head.metrics`` of a pooled head on a labelled file, with the counts read and used."""
    from kiban.data import Rejects
    from kiban.tasks.finetune import FinetuneOptions
    from kiban.tasks.models import embed_items
    from kiban.tasks.types.cells import load_cells
    from kiban.tasks.types.molecules import load_molecules

    config = head.config
    if config.architecture not in ("pooled", "multilabel") or config.modality not in ("molecule", "cell"):
        return {"scored": False, "why": f"{config.architecture} {config.modality} heads are not scored here"}
    extra = config.extra
    options = FinetuneOptions(
        task=config.task,
        data=Path(data),
        out=Path("."),
        labels=list(extra.get("label_columns", [])),
        use_raw=bool(extra.get("use_raw", False)),
    )
    rejects = Rejects()
    labelled = {"molecule": load_molecules, "cell": load_cells}[config.modality](options, model, rejects)
    if labelled.modality != config.modality:
        raise ValueError(f"{data}: holds {labelled.modality} inputs; head {config.task!r} reads {config.modality}")
    targets, rows = labelled.targets, np.arange(len(labelled.ids))
    unknown = 0
    if config.kind == "classification":
        index = {name: k for k, name in enumerate(config.labels)}
        names = [labelled.labels[t] for t in targets]
        known = np.array([n in index for n in names])
        unknown = int((~known).sum())
        rows = rows[known]
        targets = np.array([index[n] for n, k in zip(names, known) if k])
    features = embed_items(model, labelled.modality, [labelled.items[i] for i in rows], progress=False, layer=config.layer)
    with torch.no_grad():
        outputs = head(features.to(next(head.parameters()).dtype)).float().numpy()
    return {
        "scored": True,
        "data": str(data),
        "read": rejects.accepted + rejects.rejected,
        "rejected": rejects.rejected,
        "unknown_class": unknown,
        "used": len(rows),
        "metrics": head.metrics(outputs, targets),
    }


def evaluate_model(
    model: Any,
    heads: dict[str, Any],
    *,
    lm_data: str | Path | None = None,
    instructions: str | Path | None = None,
    head_data: dict[str, str | Path] | None = None,
    max_texts: int = 200,
) -> dict[str, Any]:
    """Perplexities (general text: ``lm_data`` or the shipped sample; instructions when given) and
    each head's metric on its file in ``head_data`` (task -> file).
    """
    head_data = dict(head_data or {})
    unknown = sorted(set(head_data) - set(heads))
    if unknown:
        raise ValueError(f"no head for task(s) {', '.join(unknown)} (the model has: {', '.join(heads) or 'none'})")
    texts = read_texts(lm_data or GENERAL_TEXT, limit=max_texts)
    records = read_instructions(instructions, limit=max_texts) if instructions else None
    report: dict[str, Any] = {
        "lm_data": str(lm_data or GENERAL_TEXT.name),
        "instructions": str(instructions) if instructions else None,
        **language_figures(model, texts=texts, instructions=records),
        "heads": {},
    }
    for task, head in heads.items():
        if task in head_data:
            report["heads"][task] = head_metrics(model, head, head_data[task])
        else:
            report["heads"][task] = {"scored": False, "why": "no labelled file given (--head-data TASK=FILE)"}
    return report

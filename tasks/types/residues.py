"""``--type secondary``: a table with ``sequence`` and a per-residue state column (``ss3``, or
``ss8``, or ``--labels COL``) -> the per-residue head (architecture "residue") vs. amino-acid
propensity and the majority state, split by protein (length-stratified).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.tasks.heads import HeadConfig
from kiban.tasks.labels import header, one_label
from kiban.tasks.pipeline import (
    FinetuneOptions,
    TaskType,
    bar,
    register_task_type,
    require_rows,
    sample,
    save_head,
    score_entry,
    write_metrics,
)

__all__ = ["SS_COLUMNS", "run_secondary"]

SS_COLUMNS = ("ss3", "ss8")


def run_secondary(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    """A per-residue state table -> the residue head (conv window 7 over protein tokens), saved,
    beside the amino-acid propensity table and the majority state, split by protein.
    """
    from kiban.data import rejects_log
    from kiban.tasks import plots
    from kiban.tasks.secondary import (
        ResidueClassifierHead,
        propensity_baseline,
        q3_metrics,
        read_residue_table,
    )
    from kiban.tasks.splits import length_stratified_split
    from kiban.tasks.structure import protein_tokens

    path = Path(options.data)
    columns = header(path)
    if options.labels:
        label = one_label(options.labels, columns, path, what="per-residue state")
    else:
        label = next((c for c in SS_COLUMNS if c in columns), None)
        if label is None:
            raise ValueError(
                f"{path}: no per-residue state column ({' / '.join(SS_COLUMNS)}); name it with --labels. "
                f"Columns: {', '.join(columns)}"
            )
    max_length = options.max_length_for("secondary")
    with rejects_log(work) as rejects:
        ids, sequences, states = read_residue_table(
            path, label_column=label, max_length=max_length, rejects=rejects
        )
    rows = sample(len(ids), options.max_rows, options.seed)
    ids, sequences, states = [ids[i] for i in rows], [sequences[i] for i in rows], [states[i] for i in rows]
    require_rows(len(ids), 5, path, rejects, what="protein(s)")
    classes = sorted(set("".join(states)))
    if len(classes) < 2:
        raise ValueError(f"{path}: column {label!r} has a single state ({classes[0]}); nothing to learn")
    index = {c: k for k, c in enumerate(classes)}
    targets = [np.array([index[c] for c in s]) for s in states]
    split = length_stratified_split([len(s) for s in sequences], valid=0.1, test=0.2, seed=options.seed)
    model = options.model_for(("protein",))
    encoder = model.encoders["protein"]
    tokens = [
        protein_tokens(encoder, s)
        for s in bar(
            sequences, progress=options.progress, desc=f"encoding {len(sequences)} proteins", unit="protein"
        )
    ]
    config = HeadConfig(
        task=options.task,
        modality="protein",
        kind="residue_classification",
        architecture="residue",
        labels=classes,
        input_dim=encoder.output_dim,
        hidden_dim=64,
        extra={
            "window": 7,
            "label_column": label,
            "trained_on": str(options.data),
            "seed": options.seed,
            "max_length": max_length,
        },
    )
    torch.manual_seed(options.seed)
    head = ResidueClassifierHead(config)
    history = head.net.fit(
        [(tokens[i], torch.as_tensor(targets[i])) for i in split.train],
        epochs=options.epochs_for("secondary"),
        seed=options.seed,
        progress=options.progress,
    )
    majority, table = propensity_baseline(
        [sequences[i] for i in split.train], [targets[i] for i in split.train], n_classes=len(classes)
    )
    results, test_outputs = [], None
    for side, side_rows in (("valid", split.valid), ("test", split.test)):
        if not len(side_rows):
            continue
        true = np.concatenate([targets[i] for i in side_rows])
        with torch.no_grad():
            logits = torch.cat([head(tokens[i]) for i in side_rows]).numpy()
        propensity = np.concatenate([[table.get(r, majority) for r in sequences[i]] for i in side_rows])
        for name, predicted in (
            ("residue head (conv window 7) on protein tokens", logits.argmax(1)),
            ("amino-acid propensity (most frequent state per residue type)", propensity),
            ("trivial (majority state)", np.full(len(true), majority)),
        ):
            results.append(score_entry(name, split, side, q3_metrics(true, predicted, states=classes)))
        if side == "test":
            test_outputs = (true, logits)
    metrics = {
        "task": options.task,
        "type": "secondary",
        "kind": "residue_classification",
        "labels": classes,
        "label_column": label,
        "data": str(options.data),
        "modality": "protein",
        "model": options.model,
        "n": len(ids),
        "max_length": max_length,
        "seed": options.seed,
        "split": split.describe(),
        "train_loss": history,
        "results": results,
    }
    write_metrics(work / "metrics.json", metrics)
    with (work / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sequence", "true", "predicted"])
        for i in split.test:
            with torch.no_grad():
                predicted = head(tokens[i]).argmax(-1).tolist()
            writer.writerow([ids[i], sequences[i], states[i], "".join(classes[k] for k in predicted)])
    true, logits = test_outputs
    plots.write_plots(work / "plots", kind="classification", labels=classes, targets=true, outputs=logits)
    save_head(head, options, model, work)
    return metrics


register_task_type(
    TaskType(
        name="secondary",
        run=run_secondary,
        description="a table with sequence and a per-residue state column (ss3 / ss8)",
        modalities=("protein",),
        default_epochs=10,
        default_max_length=400,
        detect=lambda path, columns, options: "sequence" in columns and any(c in columns for c in SS_COLUMNS),
        groups=False,
    )
)

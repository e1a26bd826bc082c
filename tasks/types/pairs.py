"""``--type dti``: a table of (drug, target) pairs with a numeric label (``--labels``): SMILES and
sequence columns, or ``drug_id`` / ``target_id`` with ``--drugs`` / ``--targets`` id tables (Davis
/ KIBA) -> the pair head over pooled protein ‖ molecule states vs. a random forest on drug Morgan
FP + target one-hot + composition and the mean; random split, or ``--groups drug_id`` /
``target_id`` for cold drugs / targets.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.tasks.dti import SEQUENCE_COLUMNS, SMILES_COLUMNS
from kiban.tasks.heads import HeadConfig, create_head
from kiban.tasks.labels import header, one_label
from kiban.tasks.pipeline import (
    FinetuneOptions,
    TaskType,
    register_task_type,
    require_rows,
    sample,
    save_head,
    score_entry,
    write_metrics,
)
from kiban.tasks.training import FitSettings, fit_head

__all__ = ["run_dti"]


def run_dti(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    """A pairs table -> the pair head over pooled protein ‖ molecule states, saved, beside a random
    forest (100 trees, 30 % of features per split) on drug Morgan FP + target one-hot + amino-acid
    composition, and the training mean.
    """
    from kiban.data import rejects_log
    from kiban.tasks import plots
    from kiban.tasks.baselines import trivial
    from kiban.tasks.dti import PAIR_MODALITIES, pair_features, read_pairs, target_fingerprint_baseline
    from kiban.tasks.splits import group_split, random_split

    path = Path(options.data)
    label = one_label(options.labels, header(path), path, what="affinity label")
    max_length = options.max_length_for("dti")
    with rejects_log(work) as rejects:
        table = read_pairs(
            path,
            label=label,
            rejects=rejects,
            drugs=options.drugs,
            targets=options.targets,
            max_length=max_length,
        )
    if options.groups is not None and options.groups not in table.columns:
        raise ValueError(
            f"{path}: no group column {options.groups!r}; columns: {', '.join(c for c in table.columns)}"
        )
    table = table.iloc[sample(len(table), options.max_rows, options.seed)].reset_index(drop=True)
    require_rows(len(table), 10, path, rejects, what="pair(s)")
    y = table[label].to_numpy(dtype=float)
    if len(np.unique(y)) < 2:
        raise ValueError(f"{path}: label column {label!r} has a single value; nothing to learn")
    if options.groups is not None:
        split = group_split(table[options.groups].astype(str).to_numpy(), seed=options.seed)
    else:
        split = random_split(len(table), seed=options.seed)
    model = options.model_for(PAIR_MODALITIES)
    features = pair_features(model, list(table["sequence"]), list(table["smiles"]), progress=options.progress)
    width = features.shape[1]
    config = HeadConfig(
        task=options.task,
        modality="+".join(PAIR_MODALITIES),
        kind="regression",
        architecture="pair",
        labels=[label],
        input_dim=width,
        hidden_dim=width if options.mode == "head" else 0,
        extra={
            "trained_on": str(options.data),
            "mode": options.mode,
            "seed": options.seed,
            "max_length": max_length,
            "groups": options.groups,
        },
    )
    torch.manual_seed(options.seed)
    head = create_head(config)
    targets = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    fit_head(
        head,
        features[split.train],
        targets[split.train],
        valid=(features[split.valid], targets[split.valid]) if len(split.valid) else None,
        settings=FitSettings(epochs=options.epochs_for("dti"), seed=options.seed, progress=options.progress),
    )
    sides = [(side, rows) for side, rows in (("valid", split.valid), ("test", split.test)) if len(rows)]
    both = np.concatenate([rows for _, rows in sides])
    forest = target_fingerprint_baseline(
        list(table["target_id"]),
        list(table["smiles"]),
        y,
        split,
        seed=options.seed,
        rows=both,
        sequences=list(table["sequence"]),
        n_estimators=100,
        max_features=0.3,
    )
    results, start, outputs = [], 0, {}
    for side, rows in sides:
        with torch.no_grad():
            outputs[side] = head(features[rows]).numpy()
        truth = y[rows][:, None]
        for name, predicted in (
            (f"pair head ({options.mode}, {options.model})", outputs[side]),
            (
                "random forest on drug Morgan FP + target one-hot + composition",
                forest[start : start + len(rows), None],
            ),
            ("trivial (training mean)", trivial("regression", y[split.train][:, None], len(rows))),
        ):
            results.append(score_entry(name, split, side, head.metrics(predicted, truth)))
        start += len(rows)
    metrics = {
        "task": options.task,
        "type": "dti",
        "kind": "regression",
        "labels": [label],
        "data": str(options.data),
        "modality": config.modality,
        "n": len(table),
        "drugs": int(table["drug_id"].nunique()),
        "targets": int(table["target_id"].nunique()),
        "max_length": max_length,
        "seed": options.seed,
        "split": split.describe(),
        "results": results,
    }
    write_metrics(work / "metrics.json", metrics)
    with (work / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "drug_id", "target_id", f"true:{label}", f"predicted:{label}"])
        for row, value in zip(split.test, outputs["test"][:, 0]):
            writer.writerow([table["id"][row], table["drug_id"][row], table["target_id"][row], y[row], value])
    plots.write_plots(
        work / "plots",
        kind="regression",
        labels=[label],
        targets=y[split.test][:, None],
        outputs=outputs["test"],
    )
    save_head(head, options, model, work)
    return metrics


def _detect(path: Path, columns: list[str], options: FinetuneOptions) -> bool:
    if options.drugs is not None or options.targets is not None:
        return True
    return any(c in columns for c in SMILES_COLUMNS) and any(c in columns for c in SEQUENCE_COLUMNS)


register_task_type(
    TaskType(
        name="dti",
        run=run_dti,
        description="a drug–target pairs table with a numeric label",
        modalities=("protein", "molecule"),
        default_epochs=200,
        default_max_length=1000,
        detect=_detect,
    )
)

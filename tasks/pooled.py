"""The pooled-head pipeline shared by every type whose head reads one pooled state per input
(molecules, cells, protein, dna, image, text):

    load (the type's data check; rejects.jsonl + counts.json) -> row cap -> the type's split
    -> pooled states of the frozen model (or LoRA adapters trained with the head) -> head fitted
    -> valid and test sides scored for the head, the type's baselines and the trivial predictor
    -> metrics.json, predictions.csv, plots, the saved head

A type gives ``pooled_type`` three functions: ``load(options, model, rejects) -> LabelledData``,
``split(data, options) -> Split`` and ``baselines(data, split, seed) -> {name: {"valid": outputs,
"test": outputs}}`` (outputs in the head's own form: logits, or values).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.tasks.heads import HeadConfig, create_head, model_reference
from kiban.tasks.models import embed_items
from kiban.tasks.pipeline import (
    FinetuneOptions,
    LabelledData,
    TaskType,
    sample,
    save_head,
    score_entry,
    write_metrics,
)
from kiban.tasks.training import FitSettings, fit_head

__all__ = ["pooled_type", "run_pooled", "side_outputs", "subsample", "write_predictions", "write_split"]

Loader = Callable[[FinetuneOptions, Any, Any], LabelledData]
Splitter = Callable[[LabelledData, FinetuneOptions], Any]
Baselines = Callable[[LabelledData, Any, int], dict[str, dict[str, np.ndarray]]]


def pooled_type(
    name: str,
    *,
    modality: str,
    load: Loader,
    split: Splitter,
    baselines: Baselines,
    description: str,
    detect: Callable | None = None,
    default_epochs: int = 200,
    default_max_length: int | None = None,
) -> TaskType:
    """A ``TaskType`` running the pooled pipeline with the type's loader, split and baselines."""

    def run(options: FinetuneOptions, work: Path) -> dict[str, Any]:
        return run_pooled(options, work, name=name, modality=modality, load=load, split=split, baselines=baselines)

    return TaskType(
        name=name,
        run=run,
        description=description,
        modalities=(modality,),
        default_epochs=default_epochs,
        default_max_length=default_max_length,
        detect=detect,
        lora=True,
    )


def run_pooled(
    options: FinetuneOptions,
    work: Path,
    *,
    name: str,
    modality: str,
    load: Loader,
    split: Splitter,
    baselines: Baselines,
) -> dict[str, Any]:
    """The pooled pipeline (module docstring) for one type; returns metrics.json's content."""
    from kiban.data import rejects_log
    from kiban.tasks import plots
    from kiban.tasks.baselines import trivial

    lora = options.mode == "lora"
    model = options.model_for((modality,), lora=lora)
    with rejects_log(work) as rejects:
        data = load(options, model, rejects)
    data = subsample(data, options.max_rows, options.seed)
    chosen = split(data, options)
    epochs = options.epochs_for(name)
    if lora:
        from kiban.tasks.lora import add_lora

        add_lora(model)  # a no-op for the tiny model (built with adapters) or a model that has some
        with torch.no_grad():
            width = model.embed([(data.modality, data.items[0])], layer=options.layer).shape[1]
    else:
        features = embed_items(model, data.modality, data.items, progress=options.progress, layer=options.layer)
        width = features.shape[1]
    config = HeadConfig(
        task=options.task,
        modality=data.modality,
        kind=data.kind,
        architecture="multilabel" if data.kind == "multilabel" else "pooled",
        labels=data.labels,
        input_dim=width,
        hidden_dim=2 * width if options.mode == "head" else 0,
        layer=options.layer,
        extra={
            # lora: the adapted model is saved in the run folder beside the head
            "model": model_reference(
                Path(options.out) / "model" if options.model == "tiny" or lora else options.model,
                Path(options.out) / "heads" / options.task,
            ),
            "trained_on": str(options.data),
            "type": name,
            "mode": options.mode,
            "seed": options.seed,
            **data.extra,
        },
    )
    torch.manual_seed(options.seed)
    head = create_head(config)
    targets = torch.as_tensor(data.targets, dtype=torch.long if data.kind == "classification" else torch.float32)
    if lora:
        from kiban.tasks.lora import LoraFitSettings, fit_lora

        fit_lora(
            model,
            head,
            data.modality,
            data.items,
            targets,
            chosen.train,
            chosen.valid,
            settings=LoraFitSettings(epochs=epochs, seed=options.seed, progress=options.progress),
        )
        features = embed_items(model, data.modality, data.items, progress=options.progress, layer=options.layer)
        # forgetting: perplexity on general text with the adapters off (before) and on (after)
        from kiban.adapt.forgetting import lora_forgetting

        forgetting = lora_forgetting(model, lm_data=options.lm_data)
    else:
        fit_head(
            head,
            features[chosen.train],
            targets[chosen.train],
            valid=(features[chosen.valid], targets[chosen.valid]) if len(chosen.valid) else None,
            settings=FitSettings(epochs=epochs, seed=options.seed, progress=options.progress),
        )
    with torch.no_grad():
        outputs = {side: head(features[rows]).numpy() for side, rows in (("valid", chosen.valid), ("test", chosen.test))}
    n_classes = len(data.labels) if data.kind == "classification" else 0
    trivial_name = {
        "classification": "trivial (majority class)",
        "multilabel": "trivial (training positive rate)",
    }.get(data.kind, "trivial (training mean)")
    compared = {
        trivial_name: {
            side: trivial(data.kind, data.targets[chosen.train], len(rows), n_classes=n_classes)
            for side, rows in (("valid", chosen.valid), ("test", chosen.test))
        },
        **baselines(data, chosen, options.seed),
    }
    head_name = f"head ({options.mode}, {options.model}" + (
        f", layer {options.layer})" if options.layer is not None else ")"
    )
    results = []
    for side, rows in (("valid", chosen.valid), ("test", chosen.test)):
        if not len(rows):
            continue
        truth = data.targets[rows]
        results.append(score_entry(head_name, chosen, side, head.metrics(outputs[side], truth)))
        for baseline, predicted in compared.items():
            results.append(score_entry(baseline, chosen, side, head.metrics(predicted[side], truth)))
    metrics = {
        "task": options.task,
        "type": name,
        "kind": data.kind,
        "labels": data.labels,
        "data": str(options.data),
        "modality": data.modality,
        "n": len(data.ids),
        "seed": options.seed,
        "split": chosen.describe(),
        "results": results,
    }
    if lora:
        metrics["forgetting"] = forgetting  # kiban.adapt.forgetting.lora_forgetting
    write_metrics(work / "metrics.json", metrics)
    write_predictions(work / "predictions.csv", data, chosen.test, outputs["test"])
    write_split(work / "split.csv", data.ids, chosen)
    if options.save_features:
        np.savez(work / "features.npz", ids=np.array(data.ids), features=features.numpy())
    plots.write_plots(
        work / "plots",
        kind=data.kind,
        labels=data.labels,
        targets=data.targets[chosen.test],
        outputs=outputs["test"],
    )
    # tiny: a few hundred kB, the run folder predicts on its own; lora: the adapters (model/lora/)
    # belong to this head, so the adapted model is saved beside it
    save_head(head, options, model, work, own_model=lora)
    return metrics


def side_outputs(predicted: np.ndarray, split: Any) -> dict[str, np.ndarray]:
    """A baseline's outputs over ``concat(split.valid, split.test)`` cut into its two sides."""
    return {"valid": predicted[: len(split.valid)], "test": predicted[len(split.valid) :]}


def subsample(data: LabelledData, max_rows: int | None, seed: int) -> LabelledData:
    """``data`` with at most ``max_rows`` rows (a seeded sample, kept in file order)."""
    rows = sample(len(data.ids), max_rows, seed)
    if len(rows) == len(data.ids):
        return data
    return LabelledData(
        data.modality,
        [data.ids[i] for i in rows],
        [data.items[i] for i in rows],
        data.kind,
        data.labels,
        data.targets[rows],
        data.groups[rows] if data.groups is not None else None,
        {**data.extra, "max_rows": max_rows},
    )


def write_split(path: Path, ids: list[str], split: Any) -> None:
    """split.csv: id, side of every row, so a user can check or reuse the split."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "side"])
        for side in ("train", "valid", "test"):
            writer.writerows([ids[row], side] for row in getattr(split, side))


def write_predictions(path: Path, data: LabelledData, rows: np.ndarray, outputs: np.ndarray) -> None:
    """predictions.csv of the test rows: id, true and predicted values (p:TASK for multilabel)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if data.kind == "multilabel":
            writer.writerow(["id", *(f"true:{t}" for t in data.labels), *(f"p:{t}" for t in data.labels)])
            for row, logits in zip(rows, outputs):
                truth = ["" if np.isnan(v) else int(v) for v in data.targets[row]]
                probabilities = (1 / (1 + np.exp(-logits))).tolist()
                writer.writerow([data.ids[row], *truth, *(f"{p:.6g}" for p in probabilities)])
        elif data.kind == "classification":
            writer.writerow(["id", "true", "predicted"])
            for row, logits in zip(rows, outputs):
                writer.writerow([data.ids[row], data.labels[data.targets[row]], data.labels[int(logits.argmax())]])
        else:
            writer.writerow(["id", *(f"true:{t}" for t in data.labels), *(f"predicted:{t}" for t in data.labels)])
            for row, values in zip(rows, outputs):
                writer.writerow([data.ids[row], *data.targets[row].tolist(), *values.tolist()])

"""``kiban finetune``: from a user's labelled file to a trained, evaluated and saved head.

    data check (kiban.data readers; rejects.jsonl + counts.json) -> labels -> honest split
    -> states of the frozen model -> head fitted (progress bar) -> the same split scored
    for the head, a specialist's baseline and the trivial predictor -> metrics.json, plots, head

Everything is written into a hidden temporary folder beside ``out`` and renamed to ``out`` only
when the run succeeds, so a failed run (a missing label column, a single class, a file where
nothing parses) leaves nothing behind. Output folder::

    metrics.json         task, type, kind, labels, split (method, seed, sizes), results: one entry
                         per (model, split side), each naming its side, split method and seed
    predictions.csv      test rows: id, true and predicted values (not for contacts)
    plots/*.png          parity (regression), ROC (binary), confusion matrix (classification,
                         per-residue states), contact_map.png (contacts)
    heads/<task>/        head.json + head.safetensors (``load_heads(out)`` / ``kiban serve`` layout)
    model/               with ``--model tiny`` or ``--mode lora``: the model the head reads (lora: its
                         adapters in model/lora/, peft's files)
    rejects.jsonl, counts.json   what the data check rejected, and why

Data types (``--type``; ``auto`` tells them apart as listed, first match wins):

    contacts    a folder of PDB / mmCIF files, or its ``manifest.csv`` -> the supervised pairwise
                contact head (saved; architecture "contact") vs. ESM-2's attention logistic
                regression and the sequence-separation prior, split by structure
    cells       an ``.h5ad`` (labels from ``adata.obs``; ``--groups`` a donor / batch column)
    dti         a table of (drug, target) pairs with a numeric label (``--labels``): SMILES and
                sequence columns, or ``drug_id`` / ``target_id`` with ``--drugs`` / ``--targets``
                id tables (Davis / KIBA); pair head vs. a random forest on drug Morgan FP + target
                one-hot + composition and the mean; random split, or ``--groups drug_id`` /
                ``target_id`` for cold drugs / targets
    secondary   a table with ``sequence`` and a per-residue state column (``ss3``, or ``ss8``, or
                ``--labels COL``) -> per-residue head (architecture "residue") vs. amino-acid
                propensity and the majority state, split by protein (length-stratified)
    molecules   a SMILES table (CSV/TSV; ``--labels`` names one or more label columns)

Labels (molecules, cells): one column of classes or 0/1 -> classification; several columns all
0/1 (blanks = not measured, Tox21 style) -> a multi-task head of kind "multilabel", blanks masked
in loss and metrics; numeric columns -> regression (blanks masked too). Each ``--labels`` value
is one column name; a value that is no column is read as a comma-separated list of columns (the
older form), so names with commas (SIDER's) are given one per ``--labels`` or in a labels file.

``--max-rows`` samples that many rows (proteins, pairs, structures, molecules, cells; seeded) and
``--max-length`` drops proteins longer than that (defaults: 400 residues for secondary structure
and contacts, 1000 for pairs), so a first run stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.atomic import staged_folder, write_json
from kiban.tasks.heads import HeadConfig, create_head, model_reference
from kiban.tasks.training import FitSettings, embed_items, fit_head

__all__ = [
    "DATA_TYPES",
    "FinetuneOptions",
    "LabelledData",
    "build_model",
    "data_type",
    "finetune",
    "load_labelled",
    "resolve_labels",
]

MODES = ("probe", "head", "lora")
DATA_TYPES = ("molecules", "cells", "contacts", "secondary", "dti")
# passes over the training data when --epochs is not given (contacts: the pairwise head's passes)
DEFAULT_EPOCHS = {"molecules": 200, "cells": 200, "contacts": 30, "secondary": 10, "dti": 200}
LORA_EPOCHS = 10
DEFAULT_MAX_LENGTH = {"contacts": 400, "secondary": 400, "dti": 1000}
SS_COLUMNS = ("ss3", "ss8")


@dataclass
class FinetuneOptions:
    """labels: label column names (required for tables; h5ad default "cell_type"; secondary
    default ss3); see ``resolve_labels``. model: "tiny" (a tiny random model, for smoke tests) or
    a ``save_pretrained`` folder. groups: a column of groups held out whole (h5ad obs: donors /
    batches; pairs: drug_id / target_id). mode: probe (linear head on frozen states), head (one
    hidden layer), lora (LoRA adapters on the backbone trained with a linear head;
    ``kiban.tasks.lora``; molecules and cells only); per-residue and contact heads have their own
    architecture. type: one of ``DATA_TYPES`` or "auto". epochs: None for the type's default.
    drugs / targets: id tables of a pairs file. max_rows / max_length: caps (see the module doc).
    layer: which backbone layer's states a pooled head reads (``KibanModel.embed``; None = the final
    states; a small k stops the forward after layer k, far faster). loaded_model: the model
    ``model`` names, already loaded (saves loading it again; ``model`` still names it in the
    outputs). save_features: also write ``features.npz`` (ids and the pooled states the head read).
    """

    task: str
    data: Path
    out: Path
    labels: list[str] = field(default_factory=list)
    mode: str = "probe"
    model: str = "tiny"
    groups: str | None = None
    seed: int = 0
    epochs: int | None = None
    use_raw: bool = False
    progress: bool = True
    type: str = "auto"
    drugs: Path | None = None
    targets: Path | None = None
    max_rows: int | None = None
    max_length: int | None = None
    layer: int | None = None
    loaded_model: Any = None
    save_features: bool = False
    placement: Any = None  # kiban.device.Placement: where the model runs (None: as loaded, the CPU)

    def epochs_for(self, data_type: str) -> int:
        """The number of epochs for ``data_type`` (``epochs``, else the type's default)."""
        if self.epochs is not None:
            return self.epochs
        return LORA_EPOCHS if self.mode == "lora" else DEFAULT_EPOCHS[data_type]


@dataclass
class LabelledData:
    """What the data check accepted: ids, raw items for the model, targets, and the baseline's features."""

    modality: str
    ids: list[str]
    items: list[Any]
    kind: str
    labels: list[str]  # class names or target names
    targets: np.ndarray  # [N] class indices or [N, K] floats (NaN = missing)
    groups: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------


def finetune(options: FinetuneOptions) -> dict[str, Any]:
    """Run the whole pipeline; returns metrics.json's content. Bad input raises ValueError."""
    if options.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    for flag, value in (
        ("--max-rows", options.max_rows),
        ("--max-length", options.max_length),
        ("--epochs", options.epochs),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    HeadConfig(
        task=options.task, modality="x", kind="regression", labels=["y"], input_dim=1
    )  # checks the name
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already exists and is not empty; choose another --out")
    source = data_type(options)
    if options.mode == "lora" and source not in ("molecules", "cells"):
        raise ValueError(f"--mode lora fine-tunes on SMILES tables and h5ad files, not on {source} data")
    if options.groups is not None and source in ("contacts", "secondary"):
        raise ValueError(
            f"--groups does not apply to {source} data (it is split by protein, length-stratified)"
        )
    if (options.drugs or options.targets) and source != "dti":
        raise ValueError(f"--drugs / --targets apply to drug–target pair tables, not to {source} data")
    with staged_folder(out, replace=False) as work:  # an existing OUT was checked to be empty
        return _RUNNERS[source](options, work)


def data_type(options: FinetuneOptions) -> str:
    """The data type of ``options.data``: ``options.type`` when given, else told from the path and
    a table's header (see the module docstring). A missing path is a FileNotFoundError.
    """
    data = Path(options.data)
    if options.type not in ("auto", *DATA_TYPES):
        raise ValueError(f"--type must be auto or one of {', '.join(DATA_TYPES)}, got {options.type!r}")
    folder_ok = options.type in ("auto", "contacts")
    if not data.is_file() and not (folder_ok and data.is_dir()):
        raise FileNotFoundError(f"no such {'file or folder' if folder_ok else 'file'}: {data}")
    if options.type != "auto":
        return options.type
    if data.is_dir() or data.name == "manifest.csv":
        return "contacts"
    if data.suffix == ".h5ad":
        return "cells"
    if options.drugs is not None or options.targets is not None:
        return "dti"
    columns = _header(data) if data.suffix in (".csv", ".tsv") else []
    from kiban.tasks.dti import SEQUENCE_COLUMNS, SMILES_COLUMNS

    if "sequence" in columns and any(c in columns for c in SS_COLUMNS):
        return "secondary"
    if any(c in columns for c in SMILES_COLUMNS) and any(c in columns for c in SEQUENCE_COLUMNS):
        return "dti"
    return "molecules"


def _header(path: Path) -> list[str]:
    import csv

    with path.open(newline="") as handle:
        row = next(csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ","), [])
    return [c.strip() for c in row]


def resolve_labels(requested: list[str], columns: list[str], *, missing: str) -> list[str]:
    """The label columns ``requested`` names, in order, without repeats.

    Each value is a column name; a value that is no column is read as a comma-separated list of
    columns (``--labels a,b``). Unknown names raise ValueError ``"{missing} 'x'; columns: ..."``:
    the pieces that are no column, or the whole value when none of its pieces is one (a
    mistyped name that contains commas).
    """
    chosen, unknown = [], []
    for value in requested:
        if value in columns:
            chosen.append(value)
            continue
        pieces = [p.strip() for p in value.split(",") if p.strip()]
        absent = [p for p in pieces if p not in columns]
        if not absent:
            chosen.extend(pieces)
        else:
            unknown.extend(absent if len(absent) < len(pieces) else [value])
    if unknown:
        raise ValueError(
            f"{missing} {', '.join(map(repr, unknown))}; columns: {', '.join(map(str, columns))}"
        )
    return list(dict.fromkeys(chosen))


def _one_label(options: FinetuneOptions, columns: list[str], path: Path, *, what: str) -> str:
    labels = resolve_labels(options.labels, columns, missing=f"{path}: no label column")
    if len(labels) != 1:
        raise ValueError(f"{path}: name exactly one {what} column with --labels (got {len(labels)})")
    return labels[0]


def _sample(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Row indices: all, or ``max_rows`` of them drawn with ``seed`` (kept in file order)."""
    if max_rows is None or max_rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def _write_json(path: Path, values: dict[str, Any]) -> None:
    # an undefined metric (Spearman of a constant prediction) is null: strict JSON has no NaN
    write_json(path, _finite(values), default=_json_value)


def _bar(items: Any, *, progress: bool, desc: str, unit: str) -> Any:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


# ----------------------------------------------------------------------------------------------
# Molecules and cells: pooled heads


def _run(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    from kiban.data import rejects_log
    from kiban.tasks import plots
    from kiban.tasks.splits import group_split, random_split, scaffold_split

    model = _model(options)
    with rejects_log(work) as rejects:
        data = load_labelled(options, model=model, rejects=rejects)
    data = _subsample(data, options.max_rows, options.seed)
    if data.modality == "molecule":
        split = scaffold_split(data.items, seed=options.seed)
    elif data.groups is not None:
        split = group_split(data.groups, seed=options.seed)
    else:
        split = random_split(len(data.ids), seed=options.seed)
    lora = options.mode == "lora"
    epochs = options.epochs_for("cells" if data.modality == "cell" else "molecules")
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
            "mode": options.mode,
            "seed": options.seed,
            **data.extra,
        },
    )
    torch.manual_seed(options.seed)
    head = create_head(config)
    targets = torch.as_tensor(
        data.targets, dtype=torch.long if data.kind == "classification" else torch.float32
    )
    if lora:
        from kiban.tasks.lora import LoraFitSettings, fit_lora

        fit_lora(
            model,
            head,
            data.modality,
            data.items,
            targets,
            split.train,
            split.valid,
            settings=LoraFitSettings(epochs=epochs, seed=options.seed, progress=options.progress),
        )
        features = embed_items(model, data.modality, data.items, progress=options.progress, layer=options.layer)
    else:
        fit_head(
            head,
            features[split.train],
            targets[split.train],
            valid=(features[split.valid], targets[split.valid]) if len(split.valid) else None,
            settings=FitSettings(epochs=epochs, seed=options.seed, progress=options.progress),
        )
    with torch.no_grad():
        outputs = {
            side: head(features[rows]).numpy()
            for side, rows in (("valid", split.valid), ("test", split.test))
        }
    baselines = _baselines(data, split, options.seed)
    results = []
    for side, rows in (("valid", split.valid), ("test", split.test)):
        if not len(rows):
            continue
        # every entry names its side, the split method and the seed, so a number never travels alone
        where = {"split": side, "split_method": split.method, "seed": split.seed}
        results.append(
            {
                "model": f"head ({options.mode}, {options.model}"
                + (f", layer {options.layer})" if options.layer is not None else ")"),
                **where,
                "metrics": head.metrics(outputs[side], data.targets[rows]),
            }
        )
        for name, predicted in baselines.items():
            results.append(
                {"model": name, **where, "metrics": head.metrics(predicted[side], data.targets[rows])}
            )
    metrics = {
        "task": options.task,
        "type": "cells" if data.modality == "cell" else "molecules",
        "kind": data.kind,
        "labels": data.labels,
        "data": str(options.data),
        "modality": data.modality,
        "n": len(data.ids),
        "seed": options.seed,
        "split": split.describe(),
        "results": results,
    }
    _write_json(work / "metrics.json", metrics)
    _write_predictions(work / "predictions.csv", data, split.test, outputs["test"])
    if options.save_features:
        np.savez(work / "features.npz", ids=np.array(data.ids), features=features.numpy())
    plots.write_plots(
        work / "plots",
        kind=data.kind,
        labels=data.labels,
        targets=data.targets[split.test],
        outputs=outputs["test"],
    )
    head.save(work / "heads" / options.task)
    if options.model == "tiny" or lora:
        # tiny: a few hundred kB, the run folder predicts on its own; lora: the adapters (model/lora/)
        # belong to this head, so the adapted model is saved beside it
        model.save_pretrained(work / "model")
    return metrics


def _subsample(data: LabelledData, max_rows: int | None, seed: int) -> LabelledData:
    rows = _sample(len(data.ids), max_rows, seed)
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


# ----------------------------------------------------------------------------------------------
# Proteins: contacts and per-residue states


def _saved_model(options: FinetuneOptions, model: Any, work: Path) -> str:
    """The head's ``extra["model"]``: the run's own tiny model (saved here), or the model folder."""
    if options.model == "tiny":
        model.save_pretrained(work / "model")
    saved = Path(options.out) / "model" if options.model == "tiny" else options.model
    return model_reference(saved, Path(options.out) / "heads" / options.task)


def _protein_model(options: FinetuneOptions, modalities: tuple[str, ...] = ("protein",)) -> Any:
    model = _placed(
        build_model(options.model, Path(options.data), seed=options.seed, modalities=modalities), options
    )
    missing = [m for m in modalities if m not in model.encoders]
    if missing:
        raise ValueError(f"{options.model} has no {' or '.join(missing)} encoder")
    return model


def structure_files(data: Path) -> list[Path]:
    """The PDB / mmCIF files of a folder, or those a ``manifest.csv`` (column ``file``) names beside it."""
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in (".pdb", ".cif", ".mmcif"))
    elif data.is_file():
        import pandas as pd

        frame = pd.read_csv(data)
        if "file" not in frame.columns:
            raise ValueError(f"{data}: a structure manifest needs a 'file' column")
        files = [data.parent / name for name in frame["file"].astype(str)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{data}: {len(missing)} listed structure file(s) missing, e.g. {missing[0]}")
    else:
        raise FileNotFoundError(f"no such folder or manifest: {data}")
    if not files:
        raise ValueError(f"{data}: no .pdb / .cif structure files")
    return files


def _run_contacts(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    """Structures -> the supervised pairwise contact head, saved, beside ESM-2's attention logistic
    regression and the separation prior (``structure.fit_contact_heads``); metrics.json and a
    contact-map plot of the first test chain.
    """
    from kiban.data import rejects_log
    from kiban.tasks.structure import ContactMapHead, fit_contact_heads

    files = structure_files(Path(options.data))
    files = [files[i] for i in _sample(len(files), options.max_rows, options.seed)]
    max_length = options.max_length or DEFAULT_MAX_LENGTH["contacts"]
    model = _protein_model(options)
    encoder = model.encoders["protein"]
    with rejects_log(work) as rejects:
        report, pairwise = fit_contact_heads(
            encoder,
            files,
            seed=options.seed,
            max_length=max_length,
            pairwise_epochs=options.epochs_for("contacts"),
            plot=work / "plots" / "contact_map.png",
            progress=options.progress,
            rejects=rejects,
        )
    head = ContactMapHead(
        HeadConfig(
            task=options.task,
            modality="protein",
            kind="contact",
            architecture="contact",
            labels=["contact"],
            input_dim=encoder.output_dim,
            hidden_dim=pairwise.mlp[0].out_features,
            extra={
                "project": pairwise.project[1].out_features,
                "min_separation": 6,
                "contact_distance": 8.0,
                "trained_on": str(options.data),
                "seed": options.seed,
                "max_length": max_length,
            },
        )
    )
    head.net.load_state_dict(pairwise.state_dict())
    head.config.extra["model"] = _saved_model(options, model, work)
    head.save(work / "heads" / options.task)
    metrics = {
        "task": options.task,
        "type": "contacts",
        "kind": "contact",
        "data": str(options.data),
        "model": options.model,
        "n": len(files),
        "max_length": max_length,
        **report,
    }
    _write_json(work / "metrics.json", metrics)
    return metrics


def _run_secondary(options: FinetuneOptions, work: Path) -> dict[str, Any]:
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
    columns = _header(path)
    if options.labels:
        label = _one_label(options, columns, path, what="per-residue state")
    else:
        label = next((c for c in SS_COLUMNS if c in columns), None)
        if label is None:
            raise ValueError(
                f"{path}: no per-residue state column ({' / '.join(SS_COLUMNS)}); name it with --labels. "
                f"Columns: {', '.join(columns)}"
            )
    max_length = options.max_length or DEFAULT_MAX_LENGTH["secondary"]
    with rejects_log(work) as rejects:
        ids, sequences, states = read_residue_table(
            path, label_column=label, max_length=max_length, rejects=rejects
        )
    rows = _sample(len(ids), options.max_rows, options.seed)
    ids, sequences, states = [ids[i] for i in rows], [sequences[i] for i in rows], [states[i] for i in rows]
    if len(ids) < 5:
        report = rejects.report()
        raise ValueError(
            f"{path}: {len(ids)} usable protein(s), need at least 5 ({report.rejected} rejected: "
            f"{', '.join(f'{k}: {v}' for k, v in report.by_reason.items()) or 'none'})"
        )
    classes = sorted(set("".join(states)))
    if len(classes) < 2:
        raise ValueError(f"{path}: column {label!r} has a single state ({classes[0]}); nothing to learn")
    index = {c: k for k, c in enumerate(classes)}
    targets = [np.array([index[c] for c in s]) for s in states]
    split = length_stratified_split([len(s) for s in sequences], valid=0.1, test=0.2, seed=options.seed)
    model = _protein_model(options)
    encoder = model.encoders["protein"]
    tokens = [
        protein_tokens(encoder, s)
        for s in _bar(
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
        where = {"split": side, "split_method": split.method, "seed": split.seed}
        true = np.concatenate([targets[i] for i in side_rows])
        with torch.no_grad():
            logits = torch.cat([head(tokens[i]) for i in side_rows]).numpy()
        propensity = np.concatenate([[table.get(r, majority) for r in sequences[i]] for i in side_rows])
        for name, predicted in (
            ("residue head (conv window 7) on protein tokens", logits.argmax(1)),
            ("amino-acid propensity (most frequent state per residue type)", propensity),
            ("trivial (majority state)", np.full(len(true), majority)),
        ):
            results.append({"model": name, **where, "metrics": q3_metrics(true, predicted, states=classes)})
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
    _write_json(work / "metrics.json", metrics)
    import csv

    with (work / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sequence", "true", "predicted"])
        for i in split.test:
            with torch.no_grad():
                predicted = head(tokens[i]).argmax(-1).tolist()
            writer.writerow([ids[i], sequences[i], states[i], "".join(classes[k] for k in predicted)])
    true, logits = test_outputs
    plots.write_plots(work / "plots", kind="classification", labels=classes, targets=true, outputs=logits)
    head.config.extra["model"] = _saved_model(options, model, work)
    head.save(work / "heads" / options.task)
    return metrics


# ----------------------------------------------------------------------------------------------
# Drug–target pairs


def _run_dti(options: FinetuneOptions, work: Path) -> dict[str, Any]:
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
    label = _one_label(options, _header(path), path, what="affinity label")
    max_length = options.max_length or DEFAULT_MAX_LENGTH["dti"]
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
    table = table.iloc[_sample(len(table), options.max_rows, options.seed)].reset_index(drop=True)
    if len(table) < 10:
        report = rejects.report()
        raise ValueError(
            f"{path}: {len(table)} usable pair(s), need at least 10 ({report.rejected} rejected: "
            f"{', '.join(f'{k}: {v}' for k, v in report.by_reason.items()) or 'none'})"
        )
    y = table[label].to_numpy(dtype=float)
    if len(np.unique(y)) < 2:
        raise ValueError(f"{path}: label column {label!r} has a single value; nothing to learn")
    if options.groups is not None:
        split = group_split(table[options.groups].astype(str).to_numpy(), seed=options.seed)
    else:
        split = random_split(len(table), seed=options.seed)
    model = _protein_model(options, PAIR_MODALITIES)
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
        where = {"split": side, "split_method": split.method, "seed": split.seed}
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
            results.append({"model": name, **where, "metrics": head.metrics(predicted, truth)})
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
    _write_json(work / "metrics.json", metrics)
    import csv

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
    head.config.extra["model"] = _saved_model(options, model, work)
    head.save(work / "heads" / options.task)
    return metrics


_RUNNERS: dict[str, Callable[[FinetuneOptions, Path], dict[str, Any]]] = {
    "molecules": _run,
    "cells": _run,
    "contacts": _run_contacts,
    "secondary": _run_secondary,
    "dti": _run_dti,
}


# ----------------------------------------------------------------------------------------------
# Data


def load_labelled(options: FinetuneOptions, *, model: Any, rejects: Any) -> LabelledData:
    """The labelled inputs of ``options.data`` for ``model``; bad rows go to ``rejects``."""
    path = Path(options.data)
    if path.suffix == ".h5ad":
        return _load_cells(options, model=model, rejects=rejects)
    return _load_molecules(options, rejects=rejects)


def _load_molecules(options: FinetuneOptions, *, rejects: Any) -> LabelledData:
    import pandas as pd

    from kiban.data import read_smiles

    path = Path(options.data)
    if not options.labels:
        raise ValueError(f"{path}: name the label column(s) with --labels COL (repeatable) or --labels-file")
    columns = [
        c.strip() for c in pd.read_csv(path, nrows=0, sep="\t" if path.suffix == ".tsv" else ",").columns
    ]
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
    kind, labels, targets, keep = _targets(raw, label_columns, path)
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


def _load_cells(options: FinetuneOptions, *, model: Any, rejects: Any) -> LabelledData:
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
    if not records:
        report = rejects.report()
        raise ValueError(
            f"{path}: no usable cell: {report.rejected} rejected ({', '.join(f'{k}: {v}' for k, v in report.by_reason.items())})"
        )
    obs = obs.loc[[r.id for r in records]]
    raw = [[str(v) if v == v else ""] for v in obs[label].tolist()]  # NaN -> missing
    kind, labels, targets, keep = _targets(raw, [label], path, force_classes=True)
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


def _targets(raw: list[list[str]], columns: list[str], path: Path, *, force_classes: bool = False) -> tuple:
    """(kind, labels, targets, rows kept) from label strings; '' = missing. One column of 0/1 or of
    non-numeric values is a classification; numeric columns are regression targets.
    """
    values = np.array(raw, dtype=object)
    numeric = not force_classes and all(_is_number(v) for v in values.ravel() if v != "")
    if len(columns) == 1 and (not numeric or set(v for v in values[:, 0] if v) <= {"0", "1", "0.0", "1.0"}):
        keep = values[:, 0] != ""
        names = values[keep, 0]
        if numeric:
            names = np.array([str(int(float(v))) for v in names], dtype=object)
        classes = sorted(set(names))
        if len(classes) < 2:
            raise ValueError(
                f"{path}: label column {columns[0]!r} has a single class ({classes[0] if classes else 'none'}); a classifier needs at least two"
            )
        index = {c: k for k, c in enumerate(classes)}
        return "classification", classes, np.array([index[n] for n in names]), keep
    if not numeric:
        raise ValueError(
            f"{path}: several label columns must all be numeric (0/1: multi-task classification; else regression)"
        )
    targets = np.array([[float(v) if v != "" else np.nan for v in row] for row in raw])
    keep = ~np.isnan(targets).all(1)
    known_values = set(np.unique(targets[~np.isnan(targets)]).tolist())
    if known_values <= {0.0, 1.0}:
        # Tox21 / SIDER style: one binary task per column, a blank = not measured (masked in loss and metrics)
        for k, column in enumerate(columns):
            known = targets[keep, k][~np.isnan(targets[keep, k])]
            if len(np.unique(known)) < 2:
                raise ValueError(
                    f"{path}: label column {column!r} has a single class; every task needs both 0 and 1"
                )
        return "multilabel", list(columns), targets[keep], keep
    for k, column in enumerate(columns):
        known = targets[keep, k][~np.isnan(targets[keep, k])]
        if len(np.unique(known)) < 2:
            raise ValueError(f"{path}: label column {column!r} has a single value; nothing to learn")
    return "regression", list(columns), targets[keep], keep


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Model and features


def _model(options: FinetuneOptions) -> Any:
    if options.loaded_model is not None:
        return options.loaded_model
    model = build_model(
        options.model,
        Path(options.data),
        use_raw=options.use_raw,
        seed=options.seed,
        lora=options.mode == "lora",
    )
    return _placed(model, options)


def _placed(model: Any, options: FinetuneOptions) -> Any:
    from kiban.device import place_model

    return place_model(model, options.placement) if options.placement is not None else model


def build_model(
    spec: str,
    data: Path,
    *,
    use_raw: bool = False,
    seed: int = 0,
    lora: bool = False,
    modalities: tuple[str, ...] = ("molecule",),
) -> Any:
    """A saved model folder, or "tiny": a tiny random model with the encoder ``data`` needs (an
    h5ad: a cell encoder over the file's genes; else the tiny encoders of ``modalities``).
    """
    from kiban.fusion import KibanModel

    if spec != "tiny":
        return KibanModel.from_pretrained(spec).eval()
    from kiban.fusion.model import KibanConfig
    from kiban.tiny import tiny_backbone_config

    if data.suffix == ".h5ad":
        # A tiny random model knows no genes: give it the file's own (smoke tests only).
        import anndata

        from kiban.encoders.cell import vocab_from_adata

        adata = anndata.read_h5ad(data, backed="r")
        vocab = vocab_from_adata(adata.raw if use_raw else adata)  # Raw has var_names too (backed-safe)
        adata.file.close()
        encoders = {"cell": {"preset": "tiny", "gene_vocab": tuple(vocab)}}
    else:
        encoders = {m: {"preset": "tiny"} for m in modalities}
    torch.manual_seed(seed)
    config = KibanConfig(
        encoders=encoders,
        backbone=tiny_backbone_config(lora=lora),
        default_projector={"kind": "mlp2", "num_tokens": 4, "depth": 1, "num_heads": 4},
    )
    return KibanModel.from_config(config).eval()


# ----------------------------------------------------------------------------------------------
# Baselines and outputs


def _baselines(data: LabelledData, split: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    from kiban.tasks import baselines as B

    n_classes = len(data.labels) if data.kind == "classification" else 0
    y_train = data.targets[split.train]
    sides = {"valid": split.valid, "test": split.test}
    trivial_name = {
        "classification": "trivial (majority class)",
        "multilabel": "trivial (training positive rate)",
    }.get(data.kind, "trivial (training mean)")
    out = {
        trivial_name: {
            side: B.trivial(data.kind, y_train, len(rows), n_classes=n_classes)
            for side, rows in sides.items()
        }
    }
    if data.modality == "molecule":
        fingerprints = B.morgan_fingerprints(data.items)
        name = (
            "logistic regression on Morgan fingerprints"
            if data.kind in ("classification", "multilabel")
            else "random forest on Morgan fingerprints"
        )
        both = np.concatenate([split.valid, split.test])
        predicted = B.fingerprint_model(
            data.kind, fingerprints[split.train], y_train, fingerprints[both], n_classes=n_classes, seed=seed
        )
        out[name] = {"valid": predicted[: len(split.valid)], "test": predicted[len(split.valid) :]}
    elif data.modality == "cell":
        matrix, _ = _expression_matrix(data.items)
        both = np.concatenate([split.valid, split.test])
        predicted = B.expression_logreg(
            matrix[split.train], y_train, matrix[both], n_classes=n_classes, seed=seed
        )
        out["logistic regression on log-normalised expression"] = {
            "valid": predicted[: len(split.valid)],
            "test": predicted[len(split.valid) :],
        }
    return out


def _expression_matrix(items: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """Dense [N, G] of the cells' genes; counts are log-normalised, already-normalised values kept."""
    from kiban.tasks.baselines import log_normalise

    genes = sorted({g for item in items for g in item["genes"]})
    index = {g: k for k, g in enumerate(genes)}
    matrix = np.zeros((len(items), len(genes)))
    for row, item in enumerate(items):
        matrix[row, [index[g] for g in item["genes"]]] = item["values"]
    counts = np.allclose(matrix, np.round(matrix))
    return log_normalise(matrix, already_log=not counts), genes


def _write_predictions(path: Path, data: LabelledData, rows: np.ndarray, outputs: np.ndarray) -> None:
    import csv

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
                writer.writerow(
                    [data.ids[row], data.labels[data.targets[row]], data.labels[int(logits.argmax())]]
                )
        else:
            writer.writerow(
                ["id", *(f"true:{t}" for t in data.labels), *(f"predicted:{t}" for t in data.labels)]
            )
            for row, values in zip(rows, outputs):
                writer.writerow([data.ids[row], *data.targets[row].tolist(), *values.tolist()])


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")

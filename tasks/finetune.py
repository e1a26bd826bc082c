"""``kiban finetune``: from a user's labelled file to a trained, evaluated and saved head.

    data check (kiban.data readers; rejects.jsonl + counts.json) -> labels -> honest split
    -> pooled states of the frozen model -> head fitted (progress bar) -> the same split scored
    for the head, a specialist's baseline and the trivial predictor -> metrics.json, plots, head

Everything is written into a hidden temporary folder beside ``out`` and renamed to ``out`` only
when the run succeeds, so a failed run (a missing label column, a single class, a file where
nothing parses) leaves nothing behind. Output folder::

    metrics.json         task, kind, labels, split (method, seed, sizes), results: one entry per
                         (model, split side), each naming its side, split method and seed
    predictions.csv      test rows: id, true and predicted values
    plots/*.png          parity (regression), ROC (binary), confusion matrix (classification)
    heads/<task>/        head.json + head.safetensors (``load_heads(out)`` / ``kiban serve`` layout)
    model/               with ``--model tiny`` or ``--mode lora``: the model the head reads (lora: its
                         adapters in model/lora/, peft's files)
    rejects.jsonl, counts.json   what the data check rejected, and why

Labels: one column of classes or 0/1 -> classification; several columns all 0/1 (blanks = not
measured, Tox21 style) -> a multi-task "multilabel" head, blanks masked in loss and metrics;
numeric columns -> regression (blanks masked too).

``kiban finetune contacts --data DIR_OR_MANIFEST``: a folder of PDB/mmCIF files (or its
``manifest.csv``) -> the contact heads vs. the separation prior (``structure.evaluate_contacts``),
metrics.json and plots/contact_map.png; no head is saved.

Inputs: a SMILES table (CSV/TSV; ``--labels`` names one or more label columns) or an ``.h5ad``
(labels from ``adata.obs``; ``--groups`` names a donor / batch column to hold out whole).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kiban.tasks.heads import HeadConfig, create_head
from kiban.tasks.predict import RUN_MODEL
from kiban.tasks.training import FitSettings, fit_head

__all__ = ["FinetuneOptions", "LabelledData", "build_model", "embed_items", "finetune", "load_labelled"]

MODES = ("probe", "head", "lora")


@dataclass
class FinetuneOptions:
    """labels: label column(s) (required for tables; h5ad default "cell_type"). model: "tiny" (a tiny
    random model, for smoke tests) or a ``save_pretrained`` folder. groups: h5ad obs column of
    donors / batches held out whole. mode: probe (linear head on frozen states), head (one hidden
    layer), lora (LoRA adapters on the backbone trained with a linear head; ``kiban.tasks.lora``)."""

    task: str
    data: Path
    out: Path
    labels: list[str] = field(default_factory=list)
    mode: str = "probe"
    model: str = "tiny"
    groups: str | None = None
    seed: int = 0
    epochs: int = 200
    use_raw: bool = False
    progress: bool = True


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
    HeadConfig(
        task=options.task, modality="x", kind="regression", labels=["y"], input_dim=1
    )  # checks the name
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already exists and is not empty; choose another --out")
    contacts = options.task == "contacts" and (
        Path(options.data).is_dir() or Path(options.data).name == "manifest.csv"
    )
    if not contacts and not Path(options.data).is_file():
        raise FileNotFoundError(f"no such file: {options.data}")
    files = structure_files(Path(options.data)) if contacts else []
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        result = _run_contacts(options, files, work) if contacts else _run(options, work)
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


def _run(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    from kiban.data import rejects_log
    from kiban.tasks import plots
    from kiban.tasks.splits import group_split, random_split, scaffold_split

    model = _model(options)
    with rejects_log(work) as rejects:
        data = load_labelled(options, model=model, rejects=rejects)
    if data.modality == "molecule":
        split = scaffold_split(data.items, seed=options.seed)
    elif data.groups is not None:
        split = group_split(data.groups, seed=options.seed)
    else:
        split = random_split(len(data.ids), seed=options.seed)
    lora = options.mode == "lora"
    if lora:
        from kiban.tasks.lora import add_lora

        add_lora(model)  # a no-op for the tiny model (built with adapters) or a model that has some
        with torch.no_grad():
            width = model.embed([(data.modality, data.items[0])]).shape[1]
    else:
        features = embed_items(model, data.modality, data.items, progress=options.progress)
        width = features.shape[1]
    config = HeadConfig(
        task=options.task,
        modality=data.modality,
        # several 0/1 columns: a "multilabel" head, reported to the server as classification
        kind="classification" if data.kind == "multilabel" else data.kind,
        architecture="multilabel" if data.kind == "multilabel" else "pooled",
        labels=data.labels,
        input_dim=width,
        hidden_dim=2 * width if options.mode == "head" else 0,
        extra={
            # lora: the adapted model is saved in the run folder beside the head
            "model": RUN_MODEL if options.model == "tiny" or lora else str(Path(options.model).resolve()),
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
            settings=LoraFitSettings(epochs=options.epochs, seed=options.seed, progress=options.progress),
        )
        features = embed_items(model, data.modality, data.items, progress=options.progress)
    else:
        fit_head(
            head,
            features[split.train],
            targets[split.train],
            valid=(features[split.valid], targets[split.valid]) if len(split.valid) else None,
            settings=FitSettings(epochs=options.epochs, seed=options.seed, progress=options.progress),
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
                "model": f"head ({options.mode}, {options.model})",
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
        "kind": data.kind,
        "labels": data.labels,
        "data": str(options.data),
        "modality": data.modality,
        "n": len(data.ids),
        "seed": options.seed,
        "split": split.describe(),
        "results": results,
    }
    # strict JSON: an undefined metric (Spearman of a constant prediction) is null, not NaN
    (work / "metrics.json").write_text(
        json.dumps(_finite(metrics), indent=2, default=_json_value, allow_nan=False) + "\n"
    )
    _write_predictions(work / "predictions.csv", data, split.test, outputs["test"])
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


def _run_contacts(options: FinetuneOptions, files: list[Path], work: Path) -> dict[str, Any]:
    """``kiban finetune contacts --data DIR_OR_MANIFEST``: the contact heads vs. the separation prior
    (``structure.evaluate_contacts``), metrics.json and a contact-map plot; no head is saved."""
    from kiban.tasks.structure import evaluate_contacts

    if options.model == "tiny":
        from kiban.encoders import create_encoder

        torch.manual_seed(options.seed)
        encoder = create_encoder("protein", preset="tiny").eval()
    else:
        from kiban.fusion import KibanModel

        model = KibanModel.from_pretrained(options.model).eval()
        if "protein" not in model.encoders:
            raise ValueError(f"{options.model} has no protein encoder")
        encoder = model.encoders["protein"]
    report = evaluate_contacts(
        encoder, files, seed=options.seed, epochs=options.epochs, plot=work / "plots" / "contact_map.png"
    )
    metrics = {
        "task": "contacts",
        "data": str(options.data),
        "model": options.model,
        "n": len(files),
        **report,
    }
    (work / "metrics.json").write_text(
        json.dumps(_finite(metrics), indent=2, default=_json_value, allow_nan=False) + "\n"
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# Data


def load_labelled(options: FinetuneOptions, *, model: Any, rejects: Any) -> LabelledData:
    path = Path(options.data)
    if path.suffix == ".h5ad":
        return _load_cells(options, model=model, rejects=rejects)
    return _load_molecules(options, rejects=rejects)


def _load_molecules(options: FinetuneOptions, *, rejects: Any) -> LabelledData:
    import pandas as pd
    from kiban.data import read_smiles

    path = Path(options.data)
    if not options.labels:
        raise ValueError(f"{path}: name the label column(s) with --labels COL[,COL...]")
    columns = [
        c.strip() for c in pd.read_csv(path, nrows=0, sep="\t" if path.suffix == ".tsv" else ",").columns
    ]
    missing = [c for c in options.labels if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: no label column {', '.join(map(repr, missing))}; columns: {', '.join(columns)}"
        )
    records = list(read_smiles(path, rejects=rejects))
    if not records:
        report = rejects.report()
        example = (
            f" (e.g. {report.first_rejects[0].location}: {report.first_rejects[0].detail})"
            if report.first_rejects
            else ""
        )
        raise ValueError(f"{path}: no valid molecule: {report.rejected} row(s) rejected{example}")
    raw = [[r.fields.get(c, "").strip() for c in options.labels] for r in records]
    kind, labels, targets, keep = _targets(raw, options.labels, path)
    records = [r for r, k in zip(records, keep) if k]
    return LabelledData(
        "molecule",
        [r.id for r in records],
        [r.item for r in records],
        kind,
        labels,
        targets,
        extra={"label_columns": options.labels},
    )


def _load_cells(options: FinetuneOptions, *, model: Any, rejects: Any) -> LabelledData:
    import anndata
    from kiban.data import read_h5ad

    path = Path(options.data)
    label = options.labels[0] if options.labels else "cell_type"
    if len(options.labels) > 1:
        raise ValueError("an h5ad fine-tune takes one label column (cell type / state / disease)")
    adata = anndata.read_h5ad(path, backed="r")
    obs = adata.obs.copy()
    adata.file.close()
    if label not in obs.columns:
        raise ValueError(
            f"{path}: adata.obs has no label column {label!r}; columns: {', '.join(map(str, obs.columns))}"
        )
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
    non-numeric values is a classification; numeric columns are regression targets."""
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
    return build_model(
        options.model,
        Path(options.data),
        use_raw=options.use_raw,
        seed=options.seed,
        lora=options.mode == "lora",
    )


def build_model(spec: str, data: Path, *, use_raw: bool = False, seed: int = 0, lora: bool = False) -> Any:
    """A saved model folder, or "tiny": a tiny random model with the encoder ``data`` needs."""
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
        encoders = {"molecule": {"preset": "tiny"}}
    torch.manual_seed(seed)
    config = KibanConfig(
        encoders=encoders,
        backbone=tiny_backbone_config(lora=lora),
        default_projector={"kind": "mlp2", "num_tokens": 4, "depth": 1, "num_heads": 4},
    )
    return KibanModel.from_config(config).eval()


def embed_items(
    model: Any, modality: str, items: list[Any], *, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Pooled fused states [N, H] of the frozen model, in batches (with a progress bar)."""
    batches = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"embedding {len(items)} {modality} inputs", unit="batch", leave=False)
    with torch.no_grad():
        return torch.cat(
            [model.embed([(modality, item) for item in items[i : i + batch_size]]).float() for i in batches]
        )


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

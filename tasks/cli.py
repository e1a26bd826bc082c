"""``kiban finetune`` and ``kiban predict``: a user's labelled file to a saved head, and back.

See ``kiban.tasks.finetune`` for the data types and ``kiban.tasks.predict`` for what each head writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiban.cli import arguments, command
from kiban.device import add_device_argument

__all__ = ["embed_command", "finetune_command", "predict_command"]

# the registered task types (kiban.tasks.types), listed here so that `kiban --help` imports no torch;
# tests/tasks/test_tasks_modalities.py checks the two lists agree
TYPES = ("auto", "contacts", "cells", "dti", "secondary", "molecules", "protein", "dna", "image", "text-tags", "text")


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="the task's name (the head's folder and its /v1/predict/TASK route)")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a SMILES CSV/TSV, an .h5ad, a folder of PDB/mmCIF files (or its manifest.csv), a per-residue "
        "state table (sequence + ss3), a drug-target pairs table, a protein / DNA FASTA or sequence table, a "
        "table of image files, or a table of passages",
    )
    parser.add_argument(
        "--type",
        default="auto",
        choices=TYPES,
        help="what --data holds (kiban.tasks.types); auto: a folder or manifest.csv -> contacts, .h5ad -> cells, "
        "--drugs/--targets or SMILES + sequence columns -> dti, sequence + ss3/ss8 columns -> secondary, else a "
        "SMILES table; protein, dna, image, text and text-tags are named",
    )
    parser.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a label column; repeat for several (a value that is no column is split on commas: a,b,c). "
        "h5ad: an obs column (default cell_type); secondary: the state column (default ss3); dti: the affinity",
    )
    parser.add_argument(
        "--labels-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="label columns, one name per line (for many columns, or names with commas)",
    )
    parser.add_argument(
        "--mode",
        default="probe",
        choices=("probe", "head", "lora"),
        help="probe: linear head on frozen states; head: one hidden layer; lora: LoRA adapters on the backbone "
        "trained with a linear head (pooled types: molecules, cells, protein, dna, image, text). Per-residue, "
        "contact and pair heads have their own architecture",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/finetune/TASK); must not exist"
    )
    parser.add_argument(
        "--model", default="tiny", help="a saved kiban model folder, or 'tiny' (random, for smoke tests)"
    )
    parser.add_argument(
        "--groups",
        default=None,
        help="a column of groups held out whole: h5ad obs donors / batches; dti drug_id or target_id (cold split); "
        "image: the source image (default source_image); protein / dna: instead of k-mer similarity clusters",
    )
    parser.add_argument("--use-raw", action="store_true", help="h5ad: read adata.raw.X instead of X")
    parser.add_argument("--drugs", type=Path, default=None, help="dti: a table of drug_id, smiles")
    parser.add_argument("--targets", type=Path, default=None, help="dti: a table of target_id, sequence")
    parser.add_argument(
        "--max-rows", type=int, default=None, help="use at most this many rows (seeded sample)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="drop proteins longer than this (default 400 residues for secondary and contacts, 1000 for dti and "
        "protein); dna: drop longer sequences",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="pooled heads: read the backbone's states after this decoder layer (default: the final "
        "states); a small layer stops the forward early (see benchmarks/README.md)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training data (default 200; lora: 10; secondary: 10; contacts: 30)",
    )
    parser.add_argument(
        "--lm-data",
        type=Path,
        default=None,
        help="lora: held-out general text for the before/after perplexity in metrics.json (default: a "
        "short general-English sample shipped with kiban); see kiban evaluate",
    )
    add_device_argument(parser)


@command(
    "finetune", help="fine-tune a task head on a labelled file: split, train, evaluate vs. baselines, save"
)
@arguments(_finetune_arguments)
def finetune_command(args: argparse.Namespace) -> int:
    """``kiban finetune``: fit a head on a labelled file and save it with its metrics."""
    from kiban.device import resolve_device
    from kiban.tasks.finetune import FinetuneOptions, finetune

    out = args.out or Path("runs") / "finetune" / args.task
    labels = list(args.labels)
    if args.labels_file is not None:
        if not args.labels_file.is_file():
            raise FileNotFoundError(f"no such labels file: {args.labels_file}")
        # one exact column name per line: commas inside a name are part of it
        labels += [line.strip() for line in args.labels_file.read_text().splitlines() if line.strip()]
    placement = resolve_device(args.device)  # a missing GPU fails before any data is read
    options = FinetuneOptions(
        placement=placement,
        task=args.task,
        data=args.data,
        out=out,
        labels=labels,
        mode=args.mode,
        model=args.model,
        groups=args.groups,
        seed=args.seed,
        epochs=args.epochs,
        use_raw=args.use_raw,
        progress=sys.stderr.isatty(),
        type=args.type,
        drugs=args.drugs,
        targets=args.targets,
        max_rows=args.max_rows,
        max_length=args.max_length,
        layer=args.layer,
        lm_data=args.lm_data,
    )
    metrics = finetune(options)
    for result in metrics["results"]:
        if result["split"] == "test":
            print(f"{result['model']:55s} {_HEADLINES[metrics['kind']](result['metrics'])}")
    written = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()))
    print(f"wrote {out} ({written}); head in heads/{args.task}/", file=sys.stderr)
    return 0


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _multilabel(metrics: dict) -> str:
    return (
        f"mean ROC-AUC {_number(metrics['mean_roc_auc'])} mean PR-AUC {_number(metrics['mean_pr_auc'])}"
        f" over {metrics['tasks_scored']} task(s)"
    )


def _classification(metrics: dict) -> str:
    extra = f" ROC-AUC {metrics['roc_auc']:.3f}" if "roc_auc" in metrics else ""
    return f"accuracy {metrics['accuracy']:.3f} macro-F1 {metrics['macro_f1']:.3f}{extra}"


def _regression(metrics: dict) -> str:
    return "; ".join(
        f"{t[:20]}: RMSE {m['rmse']:.3f} Spearman {_number(m['spearman'])} CI {_number(m['concordance_index'])}"
        for t, m in metrics.items()
    )


def _residues(metrics: dict) -> str:
    return f"per-residue accuracy {metrics['accuracy']:.3f} macro-F1 {metrics['macro_f1']:.3f}"


def _contacts(metrics: dict) -> str:
    return " ".join(f"{r} P@L {_number(metrics[f'{r}_P@L'])}" for r in ("short", "medium", "long"))


def _entities(metrics: dict) -> str:
    return (
        f"entity F1 {metrics['f1']:.3f} (precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f})"
    )


# metrics.json "kind" -> the one-line summary of a test result
_HEADLINES = {
    "multilabel": _multilabel,
    "classification": _classification,
    "regression": _regression,
    "residue_classification": _residues,
    "contact": _contacts,
    "token_classification": _entities,
}


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("head", type=Path, help="a saved head folder (head.json + head.safetensors)")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="inputs of the head's modality: a SMILES CSV/.smi, a FASTA or sequence table (protein and DNA "
        "heads, per-residue and contact heads too), an .h5ad, a pairs table (pair heads), an image, a folder "
        "of images or a table of image files (image heads), or a table with a text column (text heads)",
    )
    parser.add_argument(
        "--model", default=None, help="the model the head was trained on (default: the one in head.json)"
    )
    parser.add_argument("--out", type=Path, default=None, help="CSV of predictions (default: stdout)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="contact heads: pairs per protein (default: its length)"
    )
    parser.add_argument("--drugs", type=Path, default=None, help="pair heads: a table of drug_id, smiles")
    parser.add_argument(
        "--targets", type=Path, default=None, help="pair heads: a table of target_id, sequence"
    )
    parser.add_argument(
        "--quantize", choices=("int8", "int4"), default=None, help="weight-only quantised backbone (kiban.adapt.quantize)"
    )
    add_device_argument(parser)


@command("predict", help="predict with a saved head on a file of inputs")
@arguments(_predict_arguments)
def predict_command(args: argparse.Namespace) -> int:
    """``kiban predict``: predict with a saved head on a file."""
    from kiban.device import resolve_device
    from kiban.tasks.predict import predict_file

    placement = resolve_device(args.device)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    predict_file(
        args.head,
        args.data,
        model=args.model,
        out=args.out,
        top_k=args.top_k,
        drugs=args.drugs,
        targets=args.targets,
        quantize=args.quantize,
        placement=placement,
    )
    return 0


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", type=Path, help="an .h5ad (written back with obsm['X_kiban']), or a FASTA / SMILES file"
    )
    parser.add_argument(
        "--model", default="tiny", help="a saved kiban model folder, or 'tiny' (random, for smoke tests)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file (default NAME.kiban.h5ad / NAME.kiban.npz beside the input)",
    )
    parser.add_argument("--use-raw", action="store_true", help="h5ad: read adata.raw.X instead of X")
    add_device_argument(parser)
    parser.add_argument(
        "--quantize", choices=("int8", "int4"), default=None, help="weight-only quantised backbone (kiban.adapt.quantize)"
    )


@command("embed", help="write the model's pooled embeddings of a file (h5ad: obsm['X_kiban'] + uns['kiban'])")
@arguments(_embed_arguments)
def embed_command(args: argparse.Namespace) -> int:
    """``kiban embed``: pooled embeddings of a file's inputs."""
    from kiban.device import resolve_device
    from kiban.tasks.embed import embed_file

    out = embed_file(
        args.data,
        model=args.model,
        out=args.out,
        use_raw=args.use_raw,
        progress=sys.stderr.isatty(),
        placement=resolve_device(args.device),
        quantize=args.quantize,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0

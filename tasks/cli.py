"""``kiban finetune`` and ``kiban predict``: a user's labelled file to a saved head, and back."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiban.cli import command

__all__ = ["embed_command", "finetune_command", "predict_command"]


def _options(setup):
    """Attach an argument-adding function before ``@command`` registers the subcommand."""

    def wrap(fn):
        fn.arguments = setup
        return fn

    return wrap


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="the task's name (the head's folder and its /v1/predict/TASK route)")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a SMILES CSV/TSV or an .h5ad with labels; for the task 'contacts', a folder of PDB/mmCIF files or a manifest.csv",
    )
    parser.add_argument(
        "--labels",
        default="",
        help="label column(s), comma-separated (h5ad: an obs column; default cell_type)",
    )
    parser.add_argument(
        "--mode",
        default="probe",
        choices=("probe", "head", "lora"),
        help="probe: linear head on frozen states; head: one hidden layer; lora: LoRA adapters on the backbone trained with a linear head",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/finetune/TASK); must not exist"
    )
    parser.add_argument(
        "--model", default="tiny", help="a saved kiban model folder, or 'tiny' (random, for smoke tests)"
    )
    parser.add_argument(
        "--groups", default=None, help="h5ad obs column of donors / batches to hold out whole"
    )
    parser.add_argument("--use-raw", action="store_true", help="h5ad: read adata.raw.X instead of X")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=None, help="passes over the training rows (default 200; lora: 10)"
    )


@command(
    "finetune", help="fine-tune a task head on a labelled file: split, train, evaluate vs. baselines, save"
)
@_options(_finetune_arguments)
def finetune_command(args: argparse.Namespace) -> int:
    from kiban.tasks.finetune import FinetuneOptions, finetune

    out = args.out or Path("runs") / "finetune" / args.task
    options = FinetuneOptions(
        task=args.task,
        data=args.data,
        out=out,
        labels=[c.strip() for c in args.labels.split(",") if c.strip()],
        mode=args.mode,
        model=args.model,
        groups=args.groups,
        seed=args.seed,
        epochs=args.epochs if args.epochs is not None else (10 if args.mode == "lora" else 200),
        use_raw=args.use_raw,
        progress=sys.stderr.isatty(),
    )
    metrics = finetune(options)
    if "kind" not in metrics:  # contacts: heads vs. the separation prior, nothing saved to load
        for result in metrics["results"]:
            m = result["metrics"]
            print(
                f"{result['model']:55s} "
                + " ".join(f"{r} P@L {m[f'{r}_P@L']:.3f}" for r in ("short", "medium", "long"))
            )
        print(f"wrote {out} (metrics.json, plots/contact_map.png)", file=sys.stderr)
        return 0
    for result in metrics["results"]:
        if result["split"] == "test":
            print(f"{result['model']:55s} {_headline(metrics['kind'], result['metrics'])}")
    print(f"wrote {out} (metrics.json, predictions.csv, plots/, heads/{args.task}/)", file=sys.stderr)
    return 0


def _headline(kind: str, metrics: dict) -> str:
    if kind == "multilabel":

        def number(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        return (
            f"mean ROC-AUC {number(metrics['mean_roc_auc'])} mean PR-AUC {number(metrics['mean_pr_auc'])}"
            f" over {metrics['tasks_scored']} task(s)"
        )
    if kind == "classification":
        extra = f" ROC-AUC {metrics['roc_auc']:.3f}" if "roc_auc" in metrics else ""
        return f"accuracy {metrics['accuracy']:.3f} macro-F1 {metrics['macro_f1']:.3f}{extra}"
    return "; ".join(
        f"{t[:20]}: RMSE {m['rmse']:.3f} Spearman {m['spearman']:.3f}" for t, m in metrics.items()
    )


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("head", type=Path, help="a saved head folder (head.json + head.safetensors)")
    parser.add_argument(
        "--data", required=True, type=Path, help="a SMILES CSV/.smi or an .h5ad of the head's modality"
    )
    parser.add_argument(
        "--model", default=None, help="the model the head was trained on (default: the one in head.json)"
    )
    parser.add_argument("--out", type=Path, default=None, help="CSV of predictions (default: stdout)")


@command("predict", help="predict with a saved head on a file of inputs")
@_options(_predict_arguments)
def predict_command(args: argparse.Namespace) -> int:
    from kiban.tasks.predict import predict_file

    predict_file(args.head, args.data, model=args.model, out=args.out)
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


@command("embed", help="write the model's pooled embeddings of a file (h5ad: obsm['X_kiban'] + uns['kiban'])")
@_options(_embed_arguments)
def embed_command(args: argparse.Namespace) -> int:
    from kiban.tasks.embed import embed_file

    out = embed_file(
        args.data, model=args.model, out=args.out, use_raw=args.use_raw, progress=sys.stderr.isatty()
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0

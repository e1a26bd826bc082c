"""``kiban variants``: zero-shot masked-marginal scores for a table of protein or DNA mutations.

    kiban variants --wild-type P62593.fasta --variants dms.csv --effects fitness --model esm2_t33_650M_UR50D.pt
    kiban variants --wild-type ACGTTGACA... --variants snvs.csv --modality dna --model nt_dir/

Every row of the table comes out, in order, in a new CSV: its own columns, ``kiban_score`` (the
masked-marginal log-likelihood ratio, ``kiban.tasks.variants``; higher = predicted fitter) and
``kiban_reject_reason`` (why a row could not be scored; empty when it was). stderr says
``read N = scored S + rejected R`` with the rejects by reason; with ``--effects`` the Spearman
correlation between scores and measured effects is printed. The output is written atomically
(a temporary file renamed into place), and an existing file is never overwritten.

``--model``: ``tiny`` (random weights: checks the plumbing, the scores mean nothing), a fair-esm
``.pt`` file or Hugging Face ESM-2 directory (protein), a Hugging Face masked-LM directory such as
a Nucleotide Transformer checkpoint (DNA), or a saved kiban model folder (its encoder of the
modality; a DNA encoder must have been built with ``mlm_head=True``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from kiban.atomic import write_atomic
from kiban.cli import arguments, command
from kiban.device import add_device_argument, resolve_device

__all__ = ["load_scoring_encoder", "read_wild_type", "score_variants_file", "variants_command"]

SCORE_COLUMN = "kiban_score"
REASON_COLUMN = "kiban_reject_reason"
_DNA_LETTERS = set("ACGTUN")


def read_wild_type(value: str, *, modality: str | None = None) -> tuple[str, str]:
    """(sequence, modality) from a FASTA file holding one record, or from the sequence itself.

    The modality is ``modality`` or, when None, "dna" if the letters are all A, C, G, T, U, N
    and "protein" otherwise.
    """
    path = Path(value).expanduser()
    if path.is_file():
        from kiban.data.sequences import read_fasta

        records = list(read_fasta(path, modality=modality))
        if len(records) != 1:
            raise ValueError(f"--wild-type {path} holds {len(records)} FASTA records; give the one wild type")
        sequence = str(records[0].item.seq)
    elif value.strip().isalpha():
        sequence = value.strip()
    else:
        raise FileNotFoundError(f"--wild-type {value!r} is neither a FASTA file nor a sequence of letters")
    if modality is None:
        modality = "dna" if set(sequence.upper()) <= _DNA_LETTERS else "protein"
    return sequence, modality


def load_scoring_encoder(model: str, modality: str, *, length: int) -> Any:
    """The encoder to score with (see the module docstring for what ``model`` may be)."""
    import torch

    from kiban.encoders import create_encoder

    if model == "tiny":
        with torch.random.fork_rng():  # the same random model every run, without reseeding the caller
            torch.manual_seed(0)
            if modality == "dna":
                return create_encoder("dna", preset="tiny", mlm_head=True, max_length=max(128, length))
            return create_encoder("protein", preset="tiny")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--model {model!r}: no such file or folder (give 'tiny', a saved kiban model folder, "
            "a fair-esm .pt file, or a Hugging Face model directory)"
        )
    config = path / "config.json"
    if path.is_dir() and config.is_file() and "encoders" in json.loads(config.read_text()):
        from kiban.fusion import KibanModel

        fused = KibanModel.from_pretrained(path)
        if modality not in fused.encoders:
            raise ValueError(f"the kiban model {path} has no {modality} encoder ({', '.join(fused.encoders)})")
        return fused.encoders[modality]
    if modality == "protein":
        return create_encoder("protein", weights_path=str(path))
    if not path.is_dir():
        raise ValueError(f"--model {path}: DNA models are Hugging Face masked-LM directories, not files")
    return create_encoder("dna", hf_path=str(path), mlm_head=True)


def score_variants_file(
    *,
    wild_type: str,
    variants: str | Path,
    out: str | Path | None = None,
    column: str = "mutation",
    effects: str | None = None,
    modality: str | None = None,
    model: str = "tiny",
    offset: int = 1,
    strand: str | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every row of ``variants`` and write the output CSV; returns the counts, the rejects
    by reason, the Spearman correlation (None without ``effects``) and the output path.
    """
    import numpy as np
    import pandas as pd
    import torch

    from kiban.tasks.metrics import spearman
    from kiban.tasks.variants import score_variants

    variants = Path(variants)
    if not variants.is_file():
        raise FileNotFoundError(f"no such file: {variants}")
    out = Path(out) if out else variants.with_name(f"{variants.name.split('.')[0]}.kiban_scores.csv")
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out")
    sep = "\t" if variants.name.removesuffix(".gz").endswith((".tsv", ".tab")) else ","
    table = pd.read_csv(variants, sep=sep, dtype=str, keep_default_na=False)
    for name, role in ((column, "--column"), (effects, "--effects")):
        if name is not None and name not in table.columns:
            raise ValueError(f"{variants}: no column {name!r} ({role}); columns: {', '.join(table.columns)}")
    for name in (SCORE_COLUMN, REASON_COLUMN):
        if name in table.columns:
            raise ValueError(f"{variants} already has a {name!r} column (is it an output of kiban variants?)")
    if table.empty:
        raise ValueError(f"{variants} has no rows")

    sequence, modality = read_wild_type(wild_type, modality=modality)
    encoder = load_scoring_encoder(model, modality, length=len(sequence))
    encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scores, problems = score_variants(
        encoder,
        sequence,
        table[column].tolist(),
        offset=offset,
        strand=strand,
        batch_size=batch_size,
        progress=progress,
    )

    table[SCORE_COLUMN] = [f"{s:.6g}" if problem is None else "" for s, problem in zip(scores, problems)]
    table[REASON_COLUMN] = ["" if problem is None else str(problem) for problem in problems]
    write_atomic(out, table.to_csv(index=False))

    scored = np.array([problem is None for problem in problems])
    report: dict[str, Any] = {
        "modality": modality,
        "read": len(table),
        "scored": int(scored.sum()),
        "rejected": int((~scored).sum()),
        "rejected_by_reason": dict(Counter(p.reason for p in problems if p is not None).most_common()),
        "spearman": None,
        "n_spearman": 0,
        "out": out,
    }
    if effects is not None:
        measured = pd.to_numeric(table[effects], errors="coerce").to_numpy(dtype=float)
        usable = scored & np.isfinite(measured)
        report["n_spearman"] = int(usable.sum())
        if usable.sum() >= 3:
            report["spearman"] = spearman(measured[usable], scores[usable])
    if report["scored"] == 0:
        first = next(p for p in problems if p is not None)
        raise ValueError(
            f"no variant could be scored (wrote the reasons to {out}); the first: {first}. "
            "Check --wild-type, --column and --offset"
        )
    return report


# ----------------------------------------------------------------------------------------------


def _variants_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wild-type", required=True, metavar="FASTA_OR_SEQUENCE", help="the wild type: a one-record FASTA file or the sequence"
    )
    parser.add_argument(
        "--variants", required=True, type=Path, metavar="CSV", help="a CSV/TSV with one variant a row"
    )
    parser.add_argument(
        "--column", default="mutation", help="the column of mutations like A23V or A23V:G40S (default: mutation)"
    )
    parser.add_argument("--effects", default=None, help="a column of measured effects: prints the Spearman correlation")
    parser.add_argument(
        "--modality",
        choices=("protein", "dna"),
        default=None,
        help="default: dna if the wild type is all A, C, G, T, U, N, else protein",
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (random, for smoke tests), a fair-esm .pt file or Hugging Face ESM-2 directory (protein), "
        "a Hugging Face masked-LM directory (dna), or a saved kiban model folder",
    )
    parser.add_argument(
        "--offset", type=int, default=1, help="the number of the wild type's first position in the mutations (default 1)"
    )
    parser.add_argument(
        "--strand",
        choices=("forward", "both"),
        default=None,
        help="dna: also score the reverse complement and average (default: the encoder's strand setting)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="masked copies of the wild type per forward pass")
    add_device_argument(parser)
    parser.add_argument(
        "--out", type=Path, default=None, help="output CSV (default NAME.kiban_scores.csv beside --variants); must not exist"
    )


@command("variants", help="zero-shot masked-marginal scores of protein or DNA mutations (ESM-1v style)")
@arguments(_variants_arguments)
def variants_command(args: argparse.Namespace) -> int:
    """``kiban variants``: zero-shot scores of mutations in a table."""
    report = score_variants_file(
        wild_type=args.wild_type,
        variants=args.variants,
        out=args.out,
        column=args.column,
        effects=args.effects,
        modality=args.modality,
        model=args.model,
        offset=args.offset,
        strand=args.strand,
        batch_size=args.batch_size,
        device=str(resolve_device(args.device).device),
        progress=sys.stderr.isatty(),
    )
    line = f"read {report['read']} = scored {report['scored']} + rejected {report['rejected']}"
    if report["rejected_by_reason"]:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in report["rejected_by_reason"].items()) + ")"
    print(line, file=sys.stderr)
    if report["rejected_by_reason"].get("wild type differs", 0) > report["read"] / 2:
        print("note: most mutations disagree with the wild type; check --offset and --wild-type", file=sys.stderr)
    if args.model == "tiny":
        print("note: --model tiny has random weights; its scores test the plumbing and mean nothing", file=sys.stderr)
    if args.effects is not None:
        rho = report["spearman"]
        if rho is None:
            print(f"Spearman: n/a (only {report['n_spearman']} scored variant(s) with a numeric {args.effects!r})")
        else:
            print(f"Spearman {rho:.4f} between {SCORE_COLUMN} and {args.effects} over {report['n_spearman']} variants")
    print(f"wrote {report['out']}", file=sys.stderr)
    return 0

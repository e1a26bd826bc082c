r"""``kiban design molecules | proteins | records``: generative design from the command line.

    kiban design records --molecules ../shared/data/molecules/*.csv --dti ../shared/data/dti --out runs/design-data
    kiban fit --config configs/instruct_design.yaml
    kiban design molecules --model runs/design/model --n 100 --condition "logP 1-3, MW < 450, QED > 0.6" \\
        --reference runs/design-data/train.smi --out designs.csv
    kiban design proteins --model esm2_t6_8M_UR50D.pt --template MKT... --fixed 1-20,45 --n 10 --out designs.fasta

Outputs are written atomically and never overwrite a file. stderr ends with the counts: for
molecules ``sampled = valid + invalid``, duplicates, training-set copies and how many met the
conditions; for proteins the designs' pseudo-log-likelihood beside random mutants with as many
changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from kiban.atomic import write_atomic
from kiban.cli import arguments, command

__all__ = ["design_command", "molecule_table"]

_PROPERTY_COLUMNS = ("logP", "MW", "QED", "TPSA", "HBD", "HBA", "RotB")


def _molecule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved kiban model folder (save_pretrained / kiban fit's run/model)")
    parser.add_argument("--n", type=int, default=10, help="distinct molecules meeting the conditions wanted (default 10)")
    parser.add_argument("--condition", help="property ranges, e.g. \"logP 1-3, MW < 450, QED > 0.6\"")
    parser.add_argument("--target", help="protein the molecules should bind: an amino-acid sequence or a one-record FASTA")
    parser.add_argument("--reference", help="training-set SMILES (.smi or CSV): novelty, copies, and refusing unreachable conditions")
    parser.add_argument("--budget", type=int, help="the most molecules sampled (default 20 x --n); sampling never runs past it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-symbols", type=int, default=100, help="SELFIES symbols per molecule at most (default 100)")
    parser.add_argument("--max-tokens", type=int, help="backbone tokens per molecule at most (default: enough for --max-symbols)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: none; above 1 follows conditions harder)")
    parser.add_argument("--out", required=True, help="output CSV (every sampled molecule, with its flags)")


def _protein_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'tiny' (random, plumbing only), a fair-esm .pt, an HF ESM-2 folder or a saved kiban model folder")
    parser.add_argument("--template", required=True, help="the scaffold: an amino-acid sequence or a one-record FASTA")
    parser.add_argument("--fixed", help="1-based positions that never change, e.g. 1-20,45")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--steps", type=int, help="masked draws per design (default: one per free position)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output FASTA (designs with their scores in the headers)")


def _records_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--molecules", nargs="+", required=True, help="CSV files with a 'smiles' (or 'mol') column")
    parser.add_argument("--dti", help="folder with davis_/kiba_ pairs, drugs and targets CSVs (target-conditioned records)")
    parser.add_argument("--out", required=True, help="new folder for train.jsonl, val.jsonl, train.smi, test.smi")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-molecules", type=int)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--max-target-records", type=int, default=2000)
    parser.add_argument("--conditioned", type=int, default=1, help="records with conditions per molecule, each its own draw (default 1)")
    parser.add_argument(
        "--properties-per-record",
        type=int,
        default=3,
        help="the most properties one conditioned record asks about, 1-6 (each asks about 1 to this many; default 3)",
    )
    parser.add_argument(
        "--no-properties-input",
        dest="properties",
        action="store_false",
        help="write conditions as text only, without the <properties> input (for a model without the properties encoder)",
    )


def _design_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="design_command", required=True, metavar="WHAT")
    for name, (_, setup, text) in sorted(_ACTIONS.items()):
        setup(sub.add_parser(name, help=text, description=text))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _new_file(value: str, what: str = "--out") -> Path:
    path = Path(value).expanduser()
    if path.exists():
        raise ValueError(f"{what} {path} already exists; choose another")
    return path


def _protein(value: str, what: str) -> str:
    """An amino-acid sequence given inline or as a one-record FASTA file; errors name ``what``."""
    from kiban.tasks.variants_cli import read_wild_type

    try:
        return read_wild_type(value, modality="protein")[0]
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(str(error).replace("--wild-type", what)) from None


def molecule_table(report: Any) -> str:
    """CSV text of every sampled molecule: its SMILES, SELFIES, flags and properties."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "smiles", "selfies", "meets_conditions", "duplicate", "in_training_set", "finish_reason", *_PROPERTY_COLUMNS])
    for d in report.designs:
        in_reference = "" if d.in_reference is None else int(d.in_reference)
        values = [f"{d.properties[c]:.4g}" if c in d.properties else "" for c in _PROPERTY_COLUMNS]
        writer.writerow([d.index, d.smiles or "", d.selfies, int(d.meets), int(d.duplicate), in_reference, d.finish_reason, *values])
    return buffer.getvalue()


def _molecules(args: argparse.Namespace) -> int:
    import torch

    from kiban.design.conditions import parse_conditions
    from kiban.design.molecules import Reference, design_molecules, read_smiles_file
    from kiban.fusion import KibanModel
    from kiban.fusion.generation import check_guidance_scale

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    out = _new_file(args.out)
    conditions = parse_conditions(args.condition)  # a typo costs a second, not a model load
    check_guidance_scale(args.guidance, what="--guidance")  # before the model load, as the conditions
    target = _protein(args.target, "--target") if args.target else None
    reference = Reference.from_smiles(read_smiles_file(args.reference)) if args.reference else None
    model_dir = Path(args.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: not a saved kiban model folder (no config.json)")
    model = KibanModel.from_pretrained(model_dir).eval()
    report = design_molecules(
        model,
        n=args.n,
        conditions=conditions,
        target=target,
        reference=reference,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        max_symbols=args.max_symbols,
        max_tokens=args.max_tokens,
        budget=args.budget,
        batch_size=args.batch_size,
        guidance=args.guidance,
    )
    write_atomic(out, molecule_table(report))
    s = report.summary()
    copies = "unknown (no --reference)" if reference is None else str(s["in_training_set"])
    _say(
        f"sampled {s['sampled']} (budget {s['budget']}) = valid {s['valid']} + invalid {s['invalid']}; "
        f"unique {s['unique']}, duplicates {s['duplicates']}, training-set copies {copies}"
    )
    if conditions:
        _say(f"met {', '.join(s['conditions'])}: {s['met_conditions']} of {s['unique']} distinct ({100 * s['met_fraction']:.1f}%)")
    if s["met_conditions"] < args.n:
        _say(f"only {s['met_conditions']} of the {args.n} asked for within the budget of {s['budget']} samples")
    _say(f"wrote {out}")
    return 0


def _proteins(args: argparse.Namespace) -> int:
    import statistics

    from kiban.design.proteins import (
        design_proteins,
        identity,
        parse_positions,
        pseudo_log_likelihood,
        random_mutants,
        write_fasta,
    )
    from kiban.tasks.variants_cli import load_scoring_encoder

    out = _new_file(args.out)
    template = _protein(args.template, "--template")
    fixed = parse_positions(args.fixed, len(template))
    encoder = load_scoring_encoder(args.model, "protein", length=len(template))
    designs = design_proteins(
        encoder, template, n=args.n, fixed=fixed, steps=args.steps, temperature=args.temperature, seed=args.seed
    )
    template = template.upper()
    write_atomic(out, write_fasta(designs, template))
    mutants = random_mutants(template, [len(d.mutations) for d in designs], fixed=fixed, seed=args.seed)
    mutant_pll = pseudo_log_likelihood(encoder, mutants)
    template_pll = pseudo_log_likelihood(encoder, [template])[0]
    length = len(template)
    _say(
        f"{len(designs)} designs: mean PLL/residue {statistics.mean(d.pll_per_residue for d in designs):.4f}, "
        f"identity to template {statistics.mean(identity(d.sequence, template) for d in designs):.3f}, "
        f"{statistics.mean(len(d.mutations) for d in designs):.1f} changes; random mutants with as many changes: "
        f"PLL/residue {statistics.mean(mutant_pll) / length:.4f}; template {template_pll / length:.4f}"
    )
    _say(f"wrote {out}")
    return 0


def _records(args: argparse.Namespace) -> int:
    from kiban.design.records import write_design_records

    counts = write_design_records(
        molecule_files=args.molecules,
        dti_dir=args.dti,
        out=args.out,
        seed=args.seed,
        max_molecules=args.max_molecules,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        max_target_records=args.max_target_records,
        conditioned=args.conditioned,
        properties_per_record=args.properties_per_record,
        properties=args.properties,
    )
    _say(counts.line())
    _say("wrote " + ", ".join(f"{name} ({k})" for name, k in counts.records.items()) + f" in {args.out}")
    return 0


_ACTIONS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {
    "molecules": (_molecules, _molecule_arguments, "sample molecules from a fused model, valid by construction (SELFIES)"),
    "proteins": (_proteins, _protein_arguments, "Gibbs-sample variants of a protein template from ESM-2's masked-LM head"),
    "records": (_records, _records_arguments, "write the instruct records that teach a model molecule design"),
}


@command("design", help="design molecules or protein sequences with the model")
@arguments(_design_arguments)
def design_command(args: argparse.Namespace) -> int:
    """``kiban design WHAT``: run the chosen design action."""
    from kiban.design.conditions import ConditionError

    try:
        return _ACTIONS[args.design_command][0](args)
    except ConditionError as error:
        print(f"kiban design {args.design_command}: error: {error}", file=sys.stderr)
        return 2

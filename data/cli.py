"""``kiban data check PATH ...``: validate data files of any supported kind and say what was rejected;
``kiban data fit-profile``: start a cell encoder's profile token from training files (``cell_profiles``).

    kiban data check proteins.fa.gz cells.h5ad --vocab genes.txt
    kiban data check train.jsonl --json > report.json
    kiban data check mols.csv --allow-rejects --rejects-dir runs/check

Prints, per file, records read / accepted / rejected, rejects by reason and the first few rejects
with their location (``--json`` gives the same as one JSON object). A progress bar goes to stderr
for inputs over a few MB when stderr is a terminal. Exit code: 0 when nothing was rejected, 1 when
something was (0 with ``--allow-rejects``), 2 for bad usage (an unknown kind, a missing file).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from kiban.cli import command

__all__ = ["check_file"]

_LARGE = 4 * 1024 * 1024  # bytes: above this a progress bar is worth showing

# CLI option -> reader keyword; each is passed only to readers that take it.
_READER_OPTIONS = {
    "modality": "modality",
    "unknown": "unknown",
    "smiles_column": "smiles_column",
    "sequence_column": "sequence_column",
    "text_column": "text_column",
    "id_column": "id_column",
    "id_property": "id_property",
    "gene_key": "gene_key",
    "layer": "layer",
    "use_raw": "use_raw",
    "root": "root",
}


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="validate data files and report what would be rejected")
    check.add_argument("paths", nargs="+", metavar="PATH", help="files (or a folder of images)")
    check.add_argument("--kind", help="reader kind instead of guessing from the name (see --list-kinds)")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    check.add_argument("--allow-rejects", action="store_true", help="exit 0 even when records were rejected")
    check.add_argument(
        "--show", type=int, default=5, metavar="N", help="how many rejects to list per file (default 5)"
    )
    check.add_argument("--rejects-dir", metavar="DIR", help="also write rejects.jsonl and counts.json there")
    check.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: for large inputs on a terminal)",
    )
    group = check.add_argument_group("reader options (each applies to the kinds that take it)")
    group.add_argument(
        "--modality", choices=("protein", "dna"), help="sequence files: protein or DNA (default: guess)"
    )
    group.add_argument(
        "--unknown", choices=("reject", "mask"), help="sequences: reject or mask non-standard letters"
    )
    group.add_argument("--smiles-column", help="SMILES tables: the SMILES column")
    group.add_argument("--sequence-column", help="sequence tables: the sequence column")
    group.add_argument("--text-column", help="text tables: the text column")
    group.add_argument("--id-column", help="tables: the id column")
    group.add_argument("--id-property", help="SDF: the data field holding the id")
    group.add_argument(
        "--vocab", metavar="FILE", help="h5ad: gene vocabulary, one gene a line (reports unmatched genes)"
    )
    group.add_argument("--gene-key", help="h5ad: 'auto', 'var_names' or a var column with gene ids")
    group.add_argument("--layer", help="h5ad: read this layer instead of X")
    group.add_argument("--use-raw", action="store_true", default=None, help="h5ad: read raw.X")
    group.add_argument("--normalize-total", action="store_true", help="h5ad: declare sc.pp.normalize_total")
    group.add_argument(
        "--target-sum", type=float, help="h5ad: normalize_total target (default: median total)"
    )
    group.add_argument("--log1p", action="store_true", help="h5ad: declare sc.pp.log1p")
    group.add_argument(
        "--hvg", type=int, metavar="N", help="h5ad: keep the N highly variable genes (seurat flavour)"
    )
    group.add_argument(
        "--root", help="instruction JSONL: the folder no input may leave (default: the file's folder)"
    )
    fit = actions.add_parser(
        "fit-profile",
        help="fit a training config's cell profile token to h5ad files (training cells only)",
        description="Write CONFIG again with model.encoders.cell.profile_mean / profile_std computed from "
        "every cell of the --data files, so the profile token starts as the z-scores of the most dispersed "
        "genes (kiban.encoders.cell_profile). Give training cells only.",
    )
    fit.add_argument("config", metavar="CONFIG", help="training YAML (what `kiban fit` reads)")
    fit.add_argument("--data", nargs="+", required=True, metavar="H5AD", help="training cells")
    fit.add_argument("--out", required=True, metavar="YAML", help="where the fitted config goes")
    fit.add_argument("--layer", help="read this layer instead of X")
    fit.add_argument("--use-raw", action="store_true", help="read raw.X")
    fit.add_argument(
        "--rejects-dir",
        metavar="DIR",
        help="rejects.jsonl and counts.json go here (default: OUT.rejects/ beside OUT)",
    )


def check_file(
    path: str | Path,
    *,
    kind: str | None = None,
    progress: bool | None = None,
    rejects: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Read one file through its reader and return the report as a dict (what ``--json`` prints)."""
    from kiban.data.readers import detect_kind, reader_spec
    from kiban.data.rejects import Rejects

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    kind = kind or detect_kind(path)
    spec = reader_spec(kind)
    accepted = inspect.signature(spec.read).parameters
    unused = sorted(name for name, value in options.items() if value is not None and name not in accepted)
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise ValueError(f"{flags} do(es) not apply to {kind} files ({path})")
    rejects = rejects if rejects is not None else Rejects()
    records = spec.read(path, rejects=rejects, **{k: v for k, v in options.items() if v is not None})
    with _progress(path, kind, progress) as bar:
        for _ in records:
            bar.update(rejects.read - bar.n)
        bar.update(rejects.read - bar.n)
    report = rejects.report()
    return {
        "path": str(path),
        "kind": kind,
        **report.to_dict(),
        "first_rejects": [vars(r) for r in report.first_rejects],
    }


def _progress(path: Path, kind: str, wanted: bool | None) -> Any:
    from tqdm import tqdm

    size = (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )
    show = wanted if wanted is not None else (size > _LARGE and sys.stderr.isatty())
    total = None
    if kind == "h5ad" and show:
        try:
            import h5py

            with h5py.File(path, "r") as handle:
                total = len(handle["obs"][handle["obs"].attrs["_index"]])
        except (OSError, KeyError):
            total = None  # the reader will report an unreadable file; the bar just has no total
    return tqdm(total=total, desc=path.name, unit=" records", file=sys.stderr, disable=not show, leave=False)


def _reader_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {key: getattr(args, attribute) for attribute, key in _READER_OPTIONS.items()}
    if args.vocab is not None:
        vocab_path = Path(args.vocab)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"no such vocabulary file: {vocab_path}")
        options["vocab"] = [line.strip() for line in vocab_path.read_text().splitlines() if line.strip()]
    if args.normalize_total or args.log1p or args.hvg is not None or args.target_sum is not None:
        from kiban.data.cells import CellPreprocessing

        options["preprocessing"] = CellPreprocessing(
            normalize_total=args.normalize_total or args.target_sum is not None,
            target_sum=args.target_sum,
            log1p=args.log1p,
            highly_variable=args.hvg,
        )
    return options


def _print_table(report: dict[str, Any], *, show: int) -> None:
    print(f"{report['path']} ({report['kind']})")
    width = max([len("accepted")] + [len(reason) + 2 for reason in report["by_reason"]])
    print(f"  {'read':<{width}}  {report['read']:>9,}")
    print(f"  {'accepted':<{width}}  {report['accepted']:>9,}")
    print(f"  {'rejected':<{width}}  {report['rejected']:>9,}")
    for reason, count in sorted(report["by_reason"].items(), key=lambda pair: (-pair[1], pair[0])):
        print(f"    {reason:<{width - 2}}  {count:>9,}")
    for key, value in report["notes"].items():
        print(
            f"  {key}: {value if not isinstance(value, dict) or 'summary' not in value else value['summary']}"
        )
    if report["first_rejects"] and show > 0:
        print("  first rejects:")
        for reject in report["first_rejects"][:show]:
            name = f" [{reject['id']}]" if reject["id"] is not None else ""
            print(f"    {reject['location']}{name}: {reject['reason']}: {reject['detail']}")


def fit_profile(args: argparse.Namespace) -> int:
    """``kiban data fit-profile``: the config with its fitted profile statistics, and a summary."""
    import yaml

    from kiban.atomic import write_atomic
    from kiban.data.cell_profiles import config_featurizer, fit_profile_config
    from kiban.data.rejects import rejects_log

    source, out = Path(args.config), Path(args.out)
    if not source.is_file():
        raise FileNotFoundError(f"no such config: {source}")
    config = yaml.safe_load(source.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a YAML mapping (a training config)")
    config_featurizer(config)  # refuses a config it cannot fit before anything is written
    target = Path(args.rejects_dir) if args.rejects_dir else out.with_name(out.stem + ".rejects")
    with rejects_log(target) as rejects:
        fitted, stats, kept = fit_profile_config(
            config, args.data, use_raw=args.use_raw, layer=args.layer, rejects=rejects
        )
    write_atomic(out, yaml.safe_dump(fitted, sort_keys=False))
    read = stats.n_cells + stats.n_rejected
    print(
        f"{out}: profile token fitted on {stats.n_cells:,} cells of {len(args.data)} file(s) "
        f"(read {read:,} = accepted {stats.n_cells:,} + rejected {stats.n_rejected:,}"
        + (f", rejects in {target}/" if stats.n_rejected else "")
        + f"); it keeps {kept:,} of {len(stats.mean):,} vocabulary genes"
    )
    return 0


def data(args: argparse.Namespace) -> int:
    if args.action == "fit-profile":
        return fit_profile(args)
    from kiban.data.rejects import Rejects, rejects_log

    options = _reader_options(args)
    reports = []
    for path in args.paths:
        if args.rejects_dir is not None:
            target = (
                Path(args.rejects_dir) / Path(path).name if len(args.paths) > 1 else Path(args.rejects_dir)
            )
            with rejects_log(target) as rejects:
                reports.append(
                    check_file(path, kind=args.kind, progress=args.progress, rejects=rejects, **options)
                )
        else:
            reports.append(
                check_file(path, kind=args.kind, progress=args.progress, rejects=Rejects(), **options)
            )
    rejected = sum(report["rejected"] for report in reports)
    if args.json:
        print(json.dumps({"ok": rejected == 0, "files": reports}, indent=2, default=str))
    else:
        for report in reports:
            _print_table(report, show=args.show)
    return 0 if rejected == 0 or args.allow_rejects else 1


data.arguments = _check_arguments  # type: ignore[attr-defined]  # read by kiban.cli.command
command("data", help="work with data files: `kiban data check PATH` validates them")(data)

"""``kiban quickstart``: the README's main job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiban.cli import arguments, command
from kiban.device import add_device_argument, resolve_device


def _quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="size of the run, calibrated on a 2-core CPU (default 10; about 1.5 are fixed costs); "
        "it sets steps and data sizes, not a clock, so a seed always gives the same run",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proteins", type=Path, default=None, help="a protein FASTA to add to the corpus")
    parser.add_argument("--dna", type=Path, default=None, help="a DNA FASTA to add to the corpus")
    parser.add_argument(
        "--model",
        default="default",
        choices=("default", "tiny"),
        help="default: six encoders + SmolLM2-135M-Instruct; tiny: a tiny random model (smoke tests, seconds)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_device_argument(parser)


@command("quickstart", help="train, evaluate, report and serve on bundled real data (the README's main job)")
@arguments(_quickstart_arguments)
def quickstart_command(args: argparse.Namespace) -> int:
    """``kiban quickstart``: run (or resume) the whole quickstart into ``--out``."""
    from kiban.quickstart import QuickstartOptions, run_quickstart
    from kiban.quickstart.report import display_name

    out = args.out
    options = QuickstartOptions(
        out=out,
        minutes=args.minutes,
        seed=args.seed,
        model=args.model,
        proteins=args.proteins,
        dna=args.dna,
        progress=not args.quiet,
        device=args.device,
    )
    resolve_device(args.device)  # a GPU that is not there: one line, before any work
    try:
        metrics = run_quickstart(options)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume from {out}", file=sys.stderr)
        return 130
    for task, result in metrics["tasks"].items():
        print(f"{task}:")
        for entry in result["results"]:
            if entry["split"] == "test":
                m = entry["metrics"]
                if result["kind"] == "regression":
                    m = m[result["labels"][0]]
                keys = (
                    ("accuracy", "macro_f1") if result["kind"] == "classification" else ("rmse", "spearman")
                )
                shown = "  ".join(f"{k} {m[k]:.3f}" if m.get(k) is not None else f"{k} –" for k in keys)
                print(f"  {display_name(entry['model']):52s} {shown}")
    model_dir = out / "model"
    print(
        f"\nreport:  {out / 'report.html'}   (open it in a browser)\n"
        f"metrics: {out / 'metrics.json'}\n\n"
        "serve the model (bearer-token keys, 127.0.0.1 only):\n"
        "  .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' > api-keys.txt\n"
        f"  .venv/bin/kiban serve {model_dir} --api-keys-file api-keys.txt --port 8000\n\n"
        "then, from another shell:\n"
        '  curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $(head -1 api-keys.txt)" \\\n'
        '    -H \'Content-Type: application/json\' -d \'{"model": "kiban", "max_tokens": 20, "messages": '
        '[{"role": "user", "content": [{"type": "text", "text": "What does this molecule do?"}, '
        '{"type": "molecule", "molecule": {"smiles": "CC(=O)Oc1ccccc1C(=O)O"}}]}]}\'\n'
        f'  curl -s http://127.0.0.1:8000/v1/predict/logp -H "Authorization: Bearer $(head -1 api-keys.txt)" \\\n'
        '    -H \'Content-Type: application/json\' -d \'{"inputs": ["CCO", "c1ccccc1O"]}\'',
        file=sys.stdout,
    )
    return 0

"""The one ``kiban`` command. Each subcommand is a small function registered with ``@command``.

Bad user input (an invalid SMILES, a missing file) ends with one clear line on stderr and exit
code 2, never a traceback; ``--debug`` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable

__all__ = ["arguments", "command", "main"]

_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, *, help: str) -> Callable:
    """Register ``fn(args) -> exit code`` as ``kiban NAME``; ``fn.arguments(parser)`` adds its options."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS[name] = (fn, getattr(fn, "arguments", lambda parser: None), help)
        return fn

    return wrap


def arguments(setup: Callable[[argparse.ArgumentParser], None]) -> Callable:
    """Attach ``setup(parser)`` (adds the subcommand's options) to a function, below ``@command``."""

    def wrap(fn: Callable) -> Callable:
        fn.arguments = setup
        return fn

    return wrap


# ----------------------------------------------------------------------------------------------


DEMO_PROTEIN = "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL"
DEMO_SMILES = "CC(=O)Oc1ccccc1C(=O)O"


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protein", default=DEMO_PROTEIN, help="amino-acid sequence (default: human haemoglobin α, 1-91)")
    parser.add_argument("--smiles", default=DEMO_SMILES, help="molecule as SMILES (default: aspirin)")
    parser.add_argument(
        "--question",
        default="The molecule <molecule> has SMILES {smiles}. The protein <protein> starts with {start}. "
        "In two sentences: what is this molecule used for, and what does this protein do?",
        help="question; <molecule> and <protein> mark where the inputs go",
    )
    parser.add_argument("--max-new-tokens", type=int, default=80)


@command("demo", help="build the default model and answer a question about a molecule and a protein")
@arguments(_demo_arguments)
def demo(args: argparse.Namespace) -> int:
    import torch

    from kiban.encoders import create_encoder
    from kiban.fusion import KibanModel, default_config

    # Check the inputs before the slow part, so a typo costs a second, not a model load.
    create_encoder("protein").featurizer(args.protein)
    create_encoder("molecule").featurizer(args.smiles)
    torch.manual_seed(0)
    started = time.perf_counter()
    _say("building the default model: six encoders + SmolLM2-135M-Instruct (offline) ...")
    model = KibanModel.from_config(default_config()).eval()
    sizes = {m: sum(p.numel() for p in e.parameters()) for m, e in model.encoders.items()}
    llm_size = sum(p.numel() for p in model.llm.parameters())
    _say(f"built in {time.perf_counter() - started:.1f}s; backbone {llm_size / 1e6:.1f}M parameters; encoders: "
         + ", ".join(f"{m} {n / 1e6:.1f}M" for m, n in sizes.items()))
    _say("note: the projectors are untrained until you run the align stage, so the model reads the "
         "sequence and SMILES from the text here; the <protein>/<molecule> tokens carry no meaning yet.")
    question = args.question.format(smiles=args.smiles, start=args.protein[:12])
    _say(f"\nQ: {question}")
    started = time.perf_counter()
    answer = model.chat(
        question,
        protein=args.protein,
        molecule=args.smiles,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=1.3,  # a 135M model loops without it
    )
    print(f"A: {answer}")
    _say(f"\n(answered in {time.perf_counter() - started:.1f}s on {model.device})")
    return 0


def _encoders_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", action="store_true", help="also list each encoder's presets")


@command("encoders", help="list the registered encoders (and their presets)")
@arguments(_encoders_arguments)
def encoders(args: argparse.Namespace) -> int:
    from kiban.encoders import encoder_spec, list_encoders, list_presets

    for name in list_encoders():
        spec = encoder_spec(name)
        line = f"{name:10s} default preset: {spec.default_preset}"
        if args.presets:
            line += f"; presets: {', '.join(list_presets(name))}"
        print(line)
    return 0


@command("version", help="print the kiban version")
def version(args: argparse.Namespace) -> int:
    from kiban.version import __version__

    print(f"kiban {__version__}")
    return 0


# ----------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Subpackages that add their own subcommands with ``@command`` when imported.
_COMMAND_MODULES = ("kiban.data.cli", "kiban.tasks.cli", "kiban.tasks.variants_cli", "kiban.train.cli", "kiban.hpc.cli", "kiban.serve.cli", "kiban.quickstart.cli", "kiban.index.cli", "kiban.adapt.cli", "kiban.design.cli")


def _load_command_modules() -> None:
    import importlib

    for module in _COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a subpackage without commands is fine; a broken import is not
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(prog="kiban", description="kiban: a multimodal life-science foundation model")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, setup, text) in sorted(_COMMANDS.items()):
        setup(sub.add_parser(name, help=text, description=text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``kiban`` with ``argv`` (default: the command line); returns the exit code."""
    # Nothing here may reach a hub: loaders take local paths only; this makes a slip fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from kiban.encoders.base import InvalidInput

    try:
        return _COMMANDS[args.command][0](args)
    except (InvalidInput, FileNotFoundError, ValueError, KeyError) as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"kiban {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as ``python -m kiban.cli``: this module is ``__main__`` then, and subcommand modules register
    # on ``kiban.cli``; dispatch through that one so that they are all found.
    from kiban.cli import main as _main

    sys.exit(_main())

"""``kiban fit | validate | test --config RUN.yaml [KEY.PATH=VALUE ...]`` (LightningCLI-style).

Overrides follow the config file: ``kiban fit --config configs/smoke.yaml trainer.max_steps=5
run.dir=/scratch/run1``; each value is read as YAML. ``--print-config`` prints the resolved config
and exits. The config is checked before any work starts; a bad field ends with one line naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from kiban.cli import arguments, command

__all__ = ["fit_command", "test_command", "validate_command"]


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (see configs/ and docs/training.md)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY.PATH=VALUE",
        help="override config values, e.g. trainer.max_steps=10 run.dir=runs/try2",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the newest in run.dir)")


def _load(args: argparse.Namespace):
    # catch the preemption signal from the first moment: its default action would kill the job
    from kiban.hpc.requeue import install_preemption_handler

    install_preemption_handler()
    logging.getLogger("kiban").setLevel(logging.DEBUG if args.debug else logging.INFO)
    # Lightning checks for a Slurm job on every fit and warns wherever srun exists but is not in use
    # (every login node); kiban picks the cluster environment itself (hpc/env.py).
    warnings.filterwarnings(
        "ignore", message="The `srun` command is available on your system but is not used"
    )
    from kiban.train.config import load_config

    return load_config(args.config, args.overrides)


@command("fit", help="train the fused model as a YAML config says (CPU, GPUs, Slurm; resumes automatically)")
@arguments(_run_arguments)
def fit_command(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from kiban.train.callbacks import NonFiniteError
    from kiban.train.checkpoint import CheckpointError
    from kiban.train.runner import fit

    try:
        result = fit(config)
    except (NonFiniteError, CheckpointError) as error:
        print(f"kiban fit: error: {error}", file=sys.stderr)
        return 3
    from kiban.hpc.env import detect_cluster

    if detect_cluster().global_rank == 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        logging.getLogger("kiban.train").info(
            "done at step %d; newest checkpoint: %s", result.global_step, result.checkpoint
        )
    return 0


@command("validate", help="evaluate a checkpoint on data.val")
@arguments(_eval_arguments)
def validate_command(args: argparse.Namespace) -> int:
    return _evaluate(args, "validate")


@command("test", help="evaluate a checkpoint on data.test")
@arguments(_eval_arguments)
def test_command(args: argparse.Namespace) -> int:
    return _evaluate(args, "test")


def _evaluate(args: argparse.Namespace, stage: str) -> int:
    import json

    config = _load(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from kiban.train import runner
    from kiban.train.checkpoint import CheckpointError

    try:
        results = (runner.validate if stage == "validate" else runner.test)(
            config, checkpoint=args.checkpoint
        )
    except CheckpointError as error:
        print(f"kiban {stage}: error: {error}", file=sys.stderr)
        return 3
    print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    return 0

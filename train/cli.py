"""``kiban fit | validate | test --config RUN.yaml [KEY.PATH=VALUE ...]`` (LightningCLI-style), and
``kiban pretrain MODALITY --data PATH... --out DIR``, the short form of a ``stage: pretrain`` run.

Overrides follow the config file: ``kiban fit --config configs/smoke.yaml trainer.max_steps=5
run.dir=/scratch/run1``; each value is read as YAML. ``--print-config`` prints the resolved config
and exits. The config is checked before any work starts; a bad field ends with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any

from kiban.cli import arguments, command

__all__ = ["export_command", "fit_command", "pretrain_command", "test_command", "validate_command"]


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
    """``kiban fit``: train as the config says; exit status 3 on a NaN/Inf stop or a bad checkpoint."""
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
    """``kiban validate``: evaluate a checkpoint on data.val and print the metrics as JSON."""
    return _evaluate(args, "validate")


@command("test", help="evaluate a checkpoint on data.test")
@arguments(_eval_arguments)
def test_command(args: argparse.Namespace) -> int:
    """``kiban test``: evaluate a checkpoint on data.test and print the metrics as JSON."""
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


# ----------------------------------------------------------------------------------------------
# kiban pretrain: the short form of a ``stage: pretrain`` run


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("modality", help="the encoder to pretrain: protein, dna, cell, molecule, image")
    parser.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help="training files or folders (FASTA, tables, h5ad, images)"
    )
    parser.add_argument("--out", required=True, help="output folder: encoder/, metrics.jsonl, rejects, checkpoints")
    parser.add_argument("--steps", type=int, help="optimizer steps in all (default: the config's trainer.max_steps)")
    parser.add_argument("--config", help="a training YAML with a pretrain section (its other sections apply too)")
    parser.add_argument("--seed", type=int, help="the run's seed (default: the config's, else 0)")
    parser.add_argument("--preset", help="the encoder preset (default: the config's, else the encoder's default)")
    parser.add_argument("--objective", help="the objective (default: the modality's first registered one)")
    parser.add_argument("--val", nargs="+", metavar="PATH", help="held-out files, evaluated at the end of each epoch")
    parser.add_argument("--use-raw", action="store_true", help="h5ad files: read adata.raw instead of X")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="any config value, e.g. --set data.batch_size=16 --set pretrain.crop=256 (repeatable)",
    )


# What a run of ``kiban pretrain`` is, for telling a resumable run from another one in --out.
_SAME_RUN_KEYS = ("modality", "encoder", "objective", "options", "train", "kind", "crop", "max_records", "use_raw")


@command("pretrain", help="pretrain one encoder on its self-supervised objective (resumes when run again)")
@arguments(_pretrain_arguments)
def pretrain_command(args: argparse.Namespace) -> int:
    """``kiban pretrain``: pretrain one encoder, writing to ``--out`` (resumes when run again)."""
    from pathlib import Path

    import yaml

    from kiban.train.config import config_from_dict, load_config

    logging.getLogger("kiban").setLevel(logging.DEBUG if args.debug else logging.INFO)
    out = Path(args.out).expanduser().resolve()
    overrides = [
        "stage=pretrain",
        f"run.dir={out}",
        f"pretrain.modality={args.modality}",
        f"pretrain.train={json.dumps([str(Path(p).expanduser().resolve()) for p in args.data])}",
    ]
    if args.val:
        overrides.append(f"pretrain.val={json.dumps([str(Path(p).expanduser().resolve()) for p in args.val])}")
    if args.steps is not None:
        overrides.append(f"trainer.max_steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.preset is not None:
        overrides.append(f"pretrain.encoder.preset={args.preset}")
    if args.objective is not None:
        overrides.append(f"pretrain.objective={args.objective}")
    if args.use_raw:
        overrides.append("pretrain.use_raw=true")
    overrides += args.set
    if args.config:
        config = load_config(args.config, overrides)
    else:
        from kiban.train.config import apply_overrides

        config = config_from_dict(apply_overrides(_PRETRAIN_DEFAULTS, overrides))
        config.run.dir = str(out)
    _default_gene_vocab(config)
    previous = _previous_run(out)
    if previous is not None:
        mine = {k: v for k, v in yaml.safe_load(config.to_yaml())["pretrain"].items() if k in _SAME_RUN_KEYS}
        theirs = {k: v for k, v in (previous.get("pretrain") or {}).items() if k in _SAME_RUN_KEYS}
        if mine != theirs:
            changed = ", ".join(k for k in _SAME_RUN_KEYS if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"{out} holds another pretraining run (its {changed} differ); use a new --out, "
                "or the same settings to resume it"
            )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no kiban pretraining run; choose another --out")
    from kiban.train.checkpoint import complete_checkpoints

    done = complete_checkpoints(out / "checkpoints")
    if done and done[-1][0] >= config.trainer.max_steps and (out / "encoder").is_dir():
        print(
            f"kiban pretrain: {out} is finished (step {done[-1][0]} of {config.trainer.max_steps}); "
            f"the encoder is in {out / 'encoder'} (raise --steps to train on)",
            file=sys.stderr,
        )
        return 0
    from kiban.hpc.requeue import install_preemption_handler
    from kiban.train.callbacks import NonFiniteError
    from kiban.train.checkpoint import CheckpointError
    from kiban.train.runner import fit

    install_preemption_handler()
    try:
        result = fit(config)
    except (NonFiniteError, CheckpointError) as error:
        print(f"kiban pretrain: error: {error}", file=sys.stderr)
        return 3
    print(
        f"kiban pretrain: step {result.global_step}; encoder: {out / 'encoder'}; "
        f"log: {out / 'metrics.jsonl'}; rejects: {out / 'rejects.jsonl'}",
        file=sys.stderr,
    )
    return 0


def _default_gene_vocab(config: Any) -> None:
    """A cell encoder configured without genes learns the genes of its training h5ad files."""
    spec = config.pretrain.encoder
    if config.pretrain.modality != "cell" or any(
        spec.get(key) for key in ("gene_vocab", "gene_vocab_path", "checkpoint_dir", "weights_path", "config")
    ):
        return
    from kiban.train.pretrain_data import gene_vocab_of

    vocab = gene_vocab_of(config.pretrain.train, use_raw=config.pretrain.use_raw)
    if vocab:
        spec["gene_vocab"] = list(vocab)
        logging.getLogger("kiban.train").info("kiban pretrain cell: the encoder's vocabulary is the %d genes of the training files", len(vocab))


# ``kiban pretrain`` without --config: small batches, AdamW with warmup, checkpoints every 100 steps.
_PRETRAIN_DEFAULTS = {
    "stage": "pretrain",
    "seed": 0,
    "pretrain": {"modality": "", "encoder": {}},
    "data": {"batch_size": 8, "num_workers": 0},
    "optim": {"name": "adamw", "lr": 4.0e-4, "weight_decay": 0.01, "betas": [0.9, 0.98]},
    "schedule": {"name": "linear", "warmup_steps": 10, "min_lr_ratio": 0.1},
    "trainer": {"max_steps": 1000, "log_every_n_steps": 10, "gradient_clip_val": 1.0},
    "callbacks": {"checkpoint": {"every_n_steps": 100, "keep_last": 2}},
}


def _previous_run(out: Any) -> dict | None:
    """The config of the pretraining run already in ``out`` (its config.yaml), or None."""
    import yaml

    path = out / "config.yaml"
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict) or values.get("stage") != "pretrain":
        return None
    return values


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoint directory (RUN/checkpoints/ckpt-N), or a run directory (its newest checkpoint); "
        "any strategy: one process, DDP, FSDP, DeepSpeed ZeRO-2/3",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="where the model goes (kiban serve OUT_DIR); a pretraining checkpoint gives the encoder folder",
    )


@command("export", help="consolidate a (sharded) checkpoint into a servable model folder")
@arguments(_export_arguments)
def export_command(args: argparse.Namespace) -> int:
    """``kiban export CHECKPOINT OUT_DIR``: whole weights of any kiban checkpoint, saved to be served."""
    from kiban.train.checkpoint import CheckpointError
    from kiban.train.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except CheckpointError as error:
        print(f"kiban export: error: {error}", file=sys.stderr)
        return 2
    print(out)
    print(f"kiban export: wrote {out} (kiban serve {out})", file=sys.stderr)
    return 0

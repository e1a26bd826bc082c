"""Training: the align and instruct stages under Lightning (DDP, FSDP, DeepSpeed), from one YAML.

    from kiban.train import load_config, fit

    config = load_config("configs/smoke.yaml", ["trainer.max_steps=50"])
    result = fit(config)            # resumes from the newest complete checkpoint in run.dir
    result.checkpoint               # runs/smoke/checkpoints/ckpt-000050

The same is ``kiban fit --config configs/smoke.yaml trainer.max_steps=50``; ``kiban validate``
and ``kiban test`` evaluate a checkpoint. docs/training.md has the YAML schema, the strategies and
presets, Slurm submission, resume and the MFU formula.

Names are imported on first use, so ``kiban --help`` does not pay for Lightning.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrainConfig": "kiban.train.config",
    "ConfigError": "kiban.train.config",
    "load_config": "kiban.train.config",
    "config_from_dict": "kiban.train.config",
    "validate_config": "kiban.train.validation",
    "fit": "kiban.train.runner",
    "validate": "kiban.train.runner",
    "test": "kiban.train.runner",
    "FitResult": "kiban.train.runner",
    "KibanLightningModule": "kiban.train.module",
    "AtomicCheckpoint": "kiban.train.checkpointing",
    "NonFiniteGuard": "kiban.train.callbacks",
    "NonFiniteError": "kiban.train.callbacks",
    "ThroughputMonitor": "kiban.train.callbacks",
    "StepLog": "kiban.train.callbacks",
    "CheckpointError": "kiban.train.checkpoint",
    "latest_checkpoint": "kiban.train.checkpoint",
    "verify_checkpoint": "kiban.train.checkpoint",
    "model_flops": "kiban.train.flops",
    "peak_flops": "kiban.train.flops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiban.train' has no attribute {name!r}")

"""Checks a TrainConfig before any work starts: registries, values, and what this device can run.

Everything here is cheap (no weights, no process groups), so a typo in a YAML costs a second, not a
queue wait plus a model load. Every failure is a ``ConfigError`` naming the field to fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiban.train.config import STRATEGIES, ConfigError, TrainConfig

__all__ = ["PRECISIONS", "TRAIN_STAGES", "resolve_accelerator", "validate_config"]

TRAIN_STAGES = ("align", "instruct", "full", "pretrain")  # "task" trains heads, which is kiban.tasks' job
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


def validate_config(config: TrainConfig, *, target: str | None = None) -> None:
    """Raise ``ConfigError`` naming the first field that cannot work.

    target: None checks against this machine; ``cpu`` or ``gpu`` checks against the nodes of a job
    about to be submitted (a login node's own devices say nothing about them).
    """
    if config.stage not in TRAIN_STAGES:
        raise ConfigError(
            "stage", f"unknown stage {config.stage!r}; training stages: {', '.join(TRAIN_STAGES)}"
        )
    if config.stage == "pretrain":
        _check_pretrain(config, target)
    else:
        _check_model(config)
    _check_values(config)
    _check_device(config, target)


def resolve_accelerator(config: TrainConfig) -> str:
    """``cpu`` or ``gpu`` for ``trainer.accelerator`` (``auto`` picks a GPU when CUDA has one)."""
    accelerator = config.trainer.accelerator
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator in ("gpu", "cuda") else accelerator


# ----------------------------------------------------------------------------------------------


def _check_model(config: TrainConfig) -> None:
    # names, presets, keys and types were checked as the YAML was read (kiban.fusion.config);
    # what is left needs the file system or the stage
    backbone = config.model.backbone
    sources = [name for name in ("path", "gguf", "hf_config") if getattr(backbone, name) is not None]
    if len(sources) != 1:
        raise ConfigError(
            "model.backbone", f"needs exactly one of path, gguf, hf_config; got {sources or 'none'}"
        )
    for name in ("path", "gguf"):
        value = getattr(backbone, name)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"model.backbone.{name}", f"{value} does not exist")
    if config.stage == "instruct" and backbone.lora is None:
        raise ConfigError(
            "model.backbone.lora", "stage 'instruct' trains LoRA adapters: set backbone.lora {r, alpha}"
        )


def _check_pretrain(config: TrainConfig, target: str | None) -> None:
    from kiban.encoders.base import list_encoders
    from kiban.encoders.pretraining import objective_spec

    p = config.pretrain
    if p is None:
        raise ConfigError("pretrain", "stage 'pretrain' needs a pretrain section: {modality, encoder, train}")
    registered = list_encoders()
    if p.modality not in registered:
        raise ConfigError(
            "pretrain.modality", f"unknown encoder {p.modality!r}; registered encoders: {', '.join(registered)}"
        )
    _check_encoder_spec(p.modality, p.encoder, where="pretrain.encoder")
    try:
        objective_spec(p.modality, p.objective)
    except KeyError as error:
        raise ConfigError("pretrain.objective", error.args[0]) from None
    if not p.train:
        raise ConfigError("pretrain.train", "needs at least one data file or folder")
    for split in ("train", "val"):
        for i, path in enumerate(getattr(p, split)):
            if not Path(path).exists():
                raise ConfigError(f"pretrain.{split}[{i}]", f"{path} does not exist")
    if p.crop is not None and p.crop < 1:
        raise ConfigError("pretrain.crop", f"must be at least 1 (or null), got {p.crop}")
    if p.max_records is not None and p.max_records < 1:
        raise ConfigError("pretrain.max_records", f"must be at least 1 (or null), got {p.max_records}")
    accelerator = target or resolve_accelerator(config)
    if config.trainer.strategy.startswith("deepspeed") and accelerator == "cpu":
        raise ConfigError(
            "trainer.strategy",
            f"{config.trainer.strategy} on the CPU runs kiban's raw-DeepSpeed loop, which trains the fused "
            "model only; pretrain an encoder on the CPU with auto or ddp (DeepSpeed runs it on GPUs)",
        )


def _check_encoder_spec(name: str, spec: dict, *, where: str) -> None:
    """``{preset: NAME, ...overrides}`` or ``{config: {...}}`` of encoder ``name``."""
    import dataclasses

    from kiban.encoders.base import config_from_dict, encoder_spec

    encoder = encoder_spec(name)
    if "config" in spec:
        try:
            config_from_dict(encoder.config_class, spec["config"])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}.config", str(error)) from None
        return
    preset = spec.get("preset", encoder.default_preset)
    if preset not in encoder.presets:
        raise ConfigError(f"{where}.preset", f"no preset {preset!r}; presets: {', '.join(sorted(encoder.presets))}")
    fields = {f.name for f in dataclasses.fields(encoder.config_class)}
    for key in spec:
        if key != "preset" and key not in fields:
            raise ConfigError(f"{where}.{key}", f"not a setting of the {name} encoder ({', '.join(sorted(fields))})")


def _check_values(config: TrainConfig) -> None:
    t, d, c = config.trainer, config.data, config.callbacks
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.num_nodes": t.num_nodes,
        "trainer.accumulate_grad_batches": t.accumulate_grad_batches,
        "trainer.log_every_n_steps": t.log_every_n_steps,
        "data.batch_size": d.batch_size,
        "data.bucket_pool": d.bucket_pool,
        "data.tiny_records": d.tiny_records,
        "callbacks.checkpoint.every_n_steps": c.checkpoint.every_n_steps,
        "callbacks.checkpoint.keep_last": c.checkpoint.keep_last,
    }
    for where, value in positive.items():
        if value < 1:
            raise ConfigError(where, f"must be at least 1, got {value}")
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", f"must be 0 or more, got {d.num_workers}")
    if t.strategy not in STRATEGIES:
        raise ConfigError(
            "trainer.strategy", f"unknown strategy {t.strategy!r}; strategies: {', '.join(STRATEGIES)}"
        )
    if t.precision not in PRECISIONS:
        raise ConfigError(
            "trainer.precision", f"unknown precision {t.precision!r}; one of {', '.join(PRECISIONS)}"
        )
    if t.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError("trainer.accelerator", f"must be auto, cpu or gpu, got {t.accelerator!r}")
    if not (t.devices == "auto" or (isinstance(t.devices, int) and t.devices >= 1)):
        raise ConfigError("trainer.devices", f"must be auto or a positive integer, got {t.devices!r}")
    if t.gradient_clip_val is not None and t.gradient_clip_val < 0:
        raise ConfigError("trainer.gradient_clip_val", f"must be positive or null, got {t.gradient_clip_val}")
    if config.optim.name not in ("adamw", "sgd"):
        raise ConfigError("optim.name", f"unknown optimizer {config.optim.name!r}; adamw or sgd")
    if config.optim.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {config.optim.lr}")
    if config.schedule.name not in ("constant", "linear", "cosine"):
        raise ConfigError(
            "schedule.name", f"unknown schedule {config.schedule.name!r}; constant, linear or cosine"
        )
    if config.schedule.warmup_steps < 0:
        raise ConfigError("schedule.warmup_steps", "must be 0 or more")
    if config.loss.contrastive_weight < 0 or config.loss.temperature <= 0:
        raise ConfigError("loss", "contrastive_weight must be >= 0 and temperature > 0")
    if c.checkpoint.mode not in ("min", "max"):
        raise ConfigError("callbacks.checkpoint.mode", f"must be min or max, got {c.checkpoint.mode!r}")
    if c.nan_guard.action not in ("stop", "skip"):
        raise ConfigError("callbacks.nan_guard.action", f"must be stop or skip, got {c.nan_guard.action!r}")
    if c.nan_guard.action == "skip" and t.strategy.startswith("deepspeed"):
        raise ConfigError(
            "callbacks.nan_guard.action",
            "skip is not available with DeepSpeed (its ZeRO gradients are not the parameters' .grad); "
            "use stop",
        )
    if config.run.resume not in ("auto", "never") and not Path(config.run.resume).is_dir():
        raise ConfigError(
            "run.resume", f"{config.run.resume} is not a checkpoint directory (or use auto / never)"
        )
    if config.run.init_from is not None and not any(
        (Path(config.run.init_from) / name).exists() for name in ("state.ckpt", "state")
    ):
        raise ConfigError(
            "run.init_from",
            f"{config.run.init_from} is not a kiban checkpoint (no state.ckpt, no DeepSpeed state/)",
        )
    for split in ("train", "val", "test"):
        value = getattr(d, split)
        if value is not None and value != "tiny" and not Path(value).is_file():
            raise ConfigError(f"data.{split}", f"{value} is not a file (a JSONL of chat records, or 'tiny')")


def _check_device(config: TrainConfig, target: str | None) -> None:
    t = config.trainer
    if target is None:
        accelerator = resolve_accelerator(config)
        if accelerator == "gpu" and not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", "asks for a GPU but CUDA sees none on this machine")
    else:
        accelerator = target
        if t.accelerator in ("gpu", "cuda") and target == "cpu":
            raise ConfigError("trainer.accelerator", "asks for a GPU but the job requests --gpus-per-node 0")
    if accelerator == "cpu":
        if t.strategy == "fsdp":
            raise ConfigError(
                "trainer.strategy", "fsdp needs CUDA GPUs (Lightning refuses FSDP on the CPU); use ddp"
            )
        if t.strategy.endswith("_offload"):
            raise ConfigError(
                "trainer.strategy",
                f"{t.strategy} offloads from GPU to host memory; on a CPU run there is nothing to offload "
                f"(use {t.strategy.removesuffix('_offload')})",
            )
        if t.precision == "16-mixed":
            raise ConfigError(
                "trainer.precision", "16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true"
            )
    elif target is None and t.precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "trainer.precision", f"{torch.cuda.get_device_name()} has no bfloat16; use 16-mixed"
        )

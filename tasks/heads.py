"""Task heads over the fused model's pooled states: the minimal interface the server loads.

A head maps ``KibanModel.embed(...)`` output [B, H] (one pooled vector per input) to a task's
outputs. It lives in its own folder, normally ``MODEL_DIR/heads/<task>/``:

    head.json           HeadConfig: task, architecture, modality, kind, labels, input_dim,
                        hidden_dim, version, layer
    head.safetensors    the weights (nothing is ever unpickled)

``kind`` is "classification" (one logit per label; ``predict`` gives the argmax label and a
probability per label) or "regression" (one output per label, i.e. per target; ``predict`` gives a
value per target); "multilabel" gives a probability per label (``MultiLabelHead``). Heads over
per-residue tokens ("residue_classification", "contact") and over (protein, molecule) pairs live in
``kiban.tasks.secondary``, ``.structure`` and ``.dti``. Architectures are registered by name
(``@register_head("pooled")``) so the task-heads work can add others without touching the loader.

``layer`` says which of the backbone's hidden states the head was fitted on, and so which ones every
caller must pool for it: ``model.embed(items, layer=head.config.layer)``. ``None`` (the default, and
what a ``head.json`` written before the field existed loads as) is the final normed states; ``k`` is
the output of decoder layer ``k`` (see ``KibanModel.embed``), where the forward stops: a head at
layer ``k`` pays for ``k`` of the backbone's layers, not all of them.

    head = PooledHead(HeadConfig(task="toxicity", modality="molecule", kind="classification",
                                 labels=["non-toxic", "toxic"], input_dim=model_width))
    head.save("runs/model/heads/toxicity")
    heads = load_heads("runs/model")                 # task -> head, every folder under heads/
    head.predict(model, ["CCO", "c1ccccc1"])         # [{"label": ..., "probabilities": {...}}, ...]
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kiban.atomic import staged_file, write_json
from kiban.config import ConfigError, from_plain, to_plain

__all__ = [
    "HEAD_KINDS",
    "HeadConfig",
    "MultiLabelHead",
    "PooledHead",
    "create_head",
    "list_head_architectures",
    "load_head",
    "load_heads",
    "model_reference",
    "register_head",
    "resolve_model_reference",
    "save_head",
]

log = logging.getLogger(__name__)

# multilabel: independent 0/1 labels; residue_classification: one class per residue of a protein;
# contact: a probability per residue pair (architectures of kiban.tasks.secondary / .structure);
# token_classification: entity spans in text (kiban.tasks.tagging)
HEAD_KINDS = ("classification", "regression", "multilabel", "residue_classification", "contact", "token_classification")
CONFIG_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
# Task names become URL path segments and folder names: keep them plain.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class HeadConfig:
    """Plain values describing a head; stored as ``head.json``.

    task: the task's name (``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 64 characters).
    modality: the input it reads: an encoder name ("protein", "molecule", ...) or "text".
    kind: one of ``HEAD_KINDS``; a legacy "classification" + architecture "multilabel" loads as "multilabel".
    labels: class names (classification) or target names (regression); one output each.
    input_dim: the width H of the pooled states (the LLM's hidden size).
    hidden_dim: 0 for a linear head, else the width of one hidden layer (an MLP with GELU).
    architecture: the registered head class that reads this config.
    version: the head's own version, reported by the server.
    layer: the backbone hidden states the head reads, as ``KibanModel.embed(..., layer=)``: None for
        the final states, k >= 1 for the output of decoder layer k (checked against the model by embed).
    """

    task: str
    modality: str
    kind: str
    labels: list[str]
    input_dim: int
    hidden_dim: int = 0
    architecture: str = "pooled"
    version: str = "1"
    extra: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        if self.kind == "classification" and self.architecture == "multilabel":
            self.kind = "multilabel"  # head.json written before the kind existed
        if not _TASK_NAME.match(self.task):
            raise ValueError(f"head task name {self.task!r} must match {_TASK_NAME.pattern}")
        if self.kind not in HEAD_KINDS:
            raise ValueError(
                f"head {self.task!r}: kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}"
            )
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"head {self.task!r}: labels must be non-empty and distinct, got {self.labels}")
        if self.kind in ("classification", "residue_classification") and len(self.labels) < 2:
            raise ValueError(f"head {self.task!r}: a classification head needs at least 2 labels")
        if self.input_dim < 1 or self.hidden_dim < 0:
            raise ValueError(f"head {self.task!r}: input_dim must be >= 1 and hidden_dim >= 0")
        layer = self.layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
            raise ValueError(f"head {self.task!r}: layer must be None or an integer >= 1, got {self.layer!r}")

    def to_dict(self) -> dict[str, Any]:
        """The head.json form (``kiban.config.to_plain``)."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, path: str = "") -> HeadConfig:
        """A head.json's values, strictly (``kiban.config.from_plain``): ``ConfigError`` names the field."""
        return from_plain(cls, values, path)


# ----------------------------------------------------------------------------------------------
# Registry

_ARCHITECTURES: dict[str, Callable[[HeadConfig], PooledHead]] = {}


def register_head(name: str) -> Callable:
    """Class decorator: ``@register_head("pooled")``; the class is built as ``cls(config)``."""

    def wrap(builder: Callable[[HeadConfig], PooledHead]) -> Callable[[HeadConfig], PooledHead]:
        if name in _ARCHITECTURES:
            raise ValueError(f"head architecture {name!r} is registered twice")
        _ARCHITECTURES[name] = builder
        return builder

    return wrap


def list_head_architectures() -> list[str]:
    """The registered head architectures, sorted."""
    return sorted(_ARCHITECTURES)


# Modules that register the heads over other states than pooled ones (per-residue, contact, pair);
# imported on first use so that ``load_head`` knows every built-in architecture.
_BUILTIN_MODULES = ("kiban.tasks.secondary", "kiban.tasks.structure", "kiban.tasks.dti", "kiban.tasks.tagging")


def create_head(config: HeadConfig) -> PooledHead:
    """Build the registered head ``config.architecture`` for ``config``."""
    if config.architecture not in _ARCHITECTURES:
        import importlib

        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    try:
        builder = _ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(
            f"head {config.task!r}: unknown architecture {config.architecture!r}; "
            f"registered: {', '.join(list_head_architectures())}"
        ) from None
    return builder(config)


# ----------------------------------------------------------------------------------------------
# The pooled head


@register_head("pooled")
class PooledHead(nn.Module):
    """A linear layer (``hidden_dim`` 0) or a one-hidden-layer MLP: pooled states [B, H] -> [B, labels]."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        outputs = len(config.labels)
        if config.hidden_dim:
            self.net = nn.Sequential(
                nn.Linear(config.input_dim, config.hidden_dim),
                nn.GELU(),
                nn.Linear(config.hidden_dim, outputs),
            )
        else:
            self.net = nn.Sequential(nn.Linear(config.input_dim, outputs))

    @property
    def task(self) -> str:
        """The head's task name."""
        return self.config.task

    def forward(self, pooled: Tensor) -> Tensor:
        """Logits (classification) or values (regression): [B, len(labels)]."""
        return self.net(pooled)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """This head's training loss: cross-entropy, or MSE with NaN targets masked (``kiban.tasks.objectives``)."""
        from kiban.tasks.objectives import head_loss

        return head_loss(self.config.kind, outputs, targets)

    def metrics(self, outputs: Any, targets: Any) -> dict[str, Any]:
        """This head's metrics of raw outputs [N, K] against targets (JSON-ready; see ``head_metrics``)."""
        from kiban.tasks.objectives import head_metrics

        return head_metrics(self.config.kind, outputs, targets, self.config.labels)

    def outputs(self, pooled: Tensor) -> list[dict[str, Any]]:
        """Readable outputs of pooled states [B, H]: one dict per row."""
        with torch.no_grad():
            raw = self(pooled.to(next(self.parameters()))).float()  # on the head's device, in its dtype
        labels = self.config.labels
        if self.config.kind == "classification":
            probabilities = raw.softmax(-1).tolist()
            return [
                {
                    "label": labels[max(range(len(row)), key=row.__getitem__)],
                    "probabilities": dict(zip(labels, row)),
                }
                for row in probabilities
            ]
        return [{"values": dict(zip(labels, row))} for row in raw.tolist()]

    def predict(self, model: Any, items: Sequence[Any]) -> list[dict[str, Any]]:
        """Run ``model.embed`` on raw inputs of this head's modality, at this head's ``layer``, then the head.

        Classification rows: ``{"label": str, "probabilities": {label: float}}``; regression rows:
        ``{"values": {target: float}}``. Bad inputs raise the model's ``InvalidInput``.
        """
        pooled = model.embed([(self.config.modality, item) for item in items], layer=self.config.layer)
        return self.outputs(pooled)

    # -- save / load -----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the head into ``directory`` (head.safetensors, then head.json)."""
        return save_head(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> PooledHead:
        """Load a head saved by ``save`` (safetensors and JSON only)."""
        return load_head(directory)


@register_head("multilabel")
class MultiLabelHead(PooledHead):
    """Multi-task binary classification (Tox21 / SIDER style): one independent logit per label.

    ``kind`` and ``architecture`` are both "multilabel" (older head.json files say kind
    "classification"; they load as "multilabel"). Targets are [B, K] floats, 1 / 0 / NaN (not
    measured); the loss is binary cross-entropy over the measured entries only; ``outputs`` gives a
    sigmoid probability per label (no single "label": the labels are not exclusive).
    """

    def __init__(self, config: HeadConfig) -> None:
        if config.kind != "multilabel":
            raise ValueError(
                f"head {config.task!r}: a multilabel head has kind 'multilabel', got {config.kind!r}"
            )
        super().__init__(config)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss of ``outputs`` against ``targets`` for the head's kind."""
        from kiban.tasks.objectives import multilabel_loss

        return multilabel_loss(outputs, targets)

    def metrics(self, outputs: Any, targets: Any) -> dict[str, Any]:
        """The evaluation metrics of the head's kind."""
        from kiban.tasks.objectives import multilabel_metrics

        return multilabel_metrics(outputs, targets, self.config.labels)

    def outputs(self, pooled: Tensor) -> list[dict[str, Any]]:
        """Per-row predictions from pooled states [N, H]: labels with probabilities, or values."""
        with torch.no_grad():
            raw = self(pooled.to(next(self.parameters()))).float().sigmoid()  # the head's device and dtype
        return [{"probabilities": dict(zip(self.config.labels, row))} for row in raw.tolist()]


def model_reference(model: str | Path, head_dir: str | Path) -> str:
    """A head's ``extra["model"]``: the model folder relative to the head's folder (POSIX form).

    Relative, so a run folder (or a project holding the run and its model) can be moved or copied
    to another machine and ``kiban predict`` still finds the model.
    """
    relative = os.path.relpath(Path(model).resolve(), Path(head_dir).resolve())
    return Path(relative).as_posix()


def resolve_model_reference(reference: str, head_dir: str | Path) -> Path:
    """The model folder a head's ``extra["model"]`` names, from the head's folder.

    Reads what heads have held over time: a path relative to the head folder (now), an absolute
    path, and ``"run:model"`` (the ``model`` folder of the run the head is in).
    """
    if reference == "run:model":
        return Path(head_dir).resolve().parents[1] / "model"
    path = Path(reference)
    return path if path.is_absolute() else Path(os.path.normpath(Path(head_dir).resolve() / path))


def save_head(head: nn.Module, directory: str | Path) -> Path:
    """Write any head with a ``config`` (HeadConfig) into ``directory``: head.json + head.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with staged_file(directory / WEIGHTS_FILE) as staged:
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, staged)
    write_json(directory / CONFIG_FILE, head.config.to_dict())  # last: a head.json vouches for its weights
    return directory


def load_head(directory: str | Path) -> PooledHead:
    """The head saved in ``directory`` (``head.json`` + ``head.safetensors``), built by its architecture."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{directory} is not a saved head (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = HeadConfig.from_dict(json.loads(config_file.read_text()))
    except ConfigError as error:
        raise ConfigError(f"{config_file}: {error.field}", error.problem) from None
    head = create_head(config)
    missing, unexpected = head.load_state_dict(load_file(weights_file), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit head {config.task!r}: missing {missing}, unexpected {unexpected}"
        )
    return head.eval()


def load_heads(model_dir: str | Path, *, width: int | None = None) -> dict[str, PooledHead]:
    """Every head under ``model_dir/heads/``: task name -> head (empty when there is no heads folder).

    ``width``: the model's pooled width; a head whose ``input_dim`` differs is an error naming it.
    A folder whose ``head.json`` names another task than the folder is an error too, so the URL a
    client calls and the head that answers always agree.
    """
    root = Path(model_dir) / "heads"
    heads: dict[str, PooledHead] = {}
    if not root.is_dir():
        return heads
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        head = load_head(folder)
        if head.task != folder.name:
            raise ValueError(
                f"head folder {folder} holds task {head.task!r}; the folder must be named after the task"
            )
        if width is not None and head.config.input_dim != width:
            raise ValueError(
                f"head {head.task!r} reads {head.config.input_dim}-wide states; the model's are {width}-wide"
            )
        heads[head.task] = head
        log.info(
            "loaded head %s (%s, %s, %d labels)",
            head.task,
            head.config.modality,
            head.config.kind,
            len(head.config.labels),
        )
    return heads

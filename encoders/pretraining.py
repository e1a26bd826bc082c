"""Self-supervised pretraining objectives, one or more per encoder, kept beside the encoders.

An objective is two parts, split the way the encoder contract splits featurizer and encoder:

    Masker (CPU, picklable, weight-free, runs in DataLoader workers):
        one item's features (the featurizer's dict)  -> corrupted features + targets   (``__call__``)
        list of those dicts                          -> one padded batch dict           (``collate``)
    PretrainObjective (nn.Module, holds the encoder as ``.encoder`` and its own prediction heads):
        batch dict -> ObjectiveOutput(loss: scalar Tensor, metrics: dict[str, float Tensor])

The masker draws its randomness from the global torch / numpy RNGs. The training data layer runs
every record under its own seed derived from (seed, epoch, record index) (``kiban.data.resumable.seeded``),
so the same record is masked the same way however many workers there are, and an interrupted run
resumes exactly. A masker never touches the training RNG.

Objectives are plain torch (no Lightning): ``train/`` runs them as ``stage: pretrain``. They are
registered per modality with ``@register_objective("protein", "mlm")`` in ``encoders/<modality>_objectives.py``
(listed in ``_BUILTINS`` below); the first one registered for a modality is its default, so
``create_objective("protein", encoder)`` picks it.
What is saved after pretraining is the encoder alone (``objective.encoder``) in the format its
``weights_path`` reads; the objective's heads travel only in training checkpoints, unless the
encoder owns them (ESM-2's LM head, the DNA encoder's masked-LM head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

from torch import Tensor, nn

from kiban.encoders.base import Encoder

__all__ = [
    "Masker",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "PretrainObjective",
    "create_objective",
    "list_objectives",
    "objective_spec",
    "register_objective",
]


@dataclass
class ObjectiveOutput:
    """One batch's loss (a scalar to minimise) and figures to log, e.g. ``masked_accuracy``, ``n_masked``."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Masker(Protocol):
    """Corrupts one item's features for an objective; picklable and weight-free, like a featurizer."""

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mask one featurized item; the returned dict holds the masked input and its targets."""
        ...

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pad masked items into one batch."""
        ...


class PretrainObjective(nn.Module):
    """Base class: ``self.encoder`` (the encoder being pretrained), ``self.masker``, ``forward(batch)``.

    Subclasses are built as ``cls(encoder, **options)`` and set ``masker``; they keep their heads as
    submodules so that checkpoints (and resume) carry them.
    """

    modality: ClassVar[str] = ""
    name: ClassVar[str] = ""
    masker: Masker

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:  # pragma: no cover - abstract
        """The objective's loss (and what it reports) on one masked batch."""
        raise NotImplementedError


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its modality, its name and the class built as ``cls(encoder, **options)``."""

    modality: str
    name: str
    builder: Callable[..., PretrainObjective]


_REGISTRY: dict[str, dict[str, ObjectiveSpec]] = {}
# Modules ``kiban.encoders.<name>`` that register the built-in objectives (one per modality).
_BUILTINS: tuple[str, ...] = ()


def _import_builtin_objectives() -> None:
    import importlib

    for module in _BUILTINS:
        importlib.import_module(f"kiban.encoders.{module}")


def register_objective(modality: str, name: str) -> Callable:
    """Class decorator: ``@register_objective("cell", "masked_expression")``; the first per modality is its default."""

    def wrap(cls: type[PretrainObjective]) -> type[PretrainObjective]:
        specs = _REGISTRY.setdefault(modality, {})
        if name in specs:
            raise ValueError(f"pretraining objective {modality}/{name} is registered twice")
        cls.modality, cls.name = modality, name
        specs[name] = ObjectiveSpec(modality, name, cls)
        return cls

    return wrap


def objective_spec(modality: str, name: str | None = None) -> ObjectiveSpec:
    """The objective ``name`` of ``modality`` (its default when ``name`` is None); KeyError lists the choices."""
    _import_builtin_objectives()
    specs = _REGISTRY.get(modality)
    if not specs:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"no pretraining objective for modality {modality!r}; modalities with one: {known}")
    if name is None:
        return next(iter(specs.values()))
    if name not in specs:
        raise KeyError(f"modality {modality!r} has no objective {name!r}; objectives: {', '.join(specs)}")
    return specs[name]


def list_objectives() -> dict[str, list[str]]:
    """Every registered objective by modality, the default first: ``{"protein": ["mlm"], ...}``."""
    _import_builtin_objectives()
    return {modality: list(specs) for modality, specs in sorted(_REGISTRY.items())}


def create_objective(modality: str, encoder: Encoder, *, name: str | None = None, **options: Any) -> PretrainObjective:
    """Build the objective (default or ``name``) for ``encoder``; ``options`` go to its constructor."""
    if encoder.modality != modality:
        raise ValueError(f"a {modality} objective needs a {modality} encoder, got a {encoder.modality} encoder")
    return objective_spec(modality, name).builder(encoder, **options)

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
registered per modality with ``@register_objective("protein", "mlm")`` in
``encoders/<modality>_objectives.py`` (listed in ``_BUILTINS`` below); the first one registered
for a modality is its default, so ``create_objective("protein", encoder)`` picks it.
What is saved after pretraining is the encoder alone (``objective.encoder``) in the format its
``weights_path`` reads; the objective's heads travel only in training checkpoints, unless the
encoder owns them (ESM-2's LM head, the DNA encoder's masked-LM head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch
from torch import Tensor, nn

from kiban.encoders.base import Encoder, config_to_dict, create_encoder, pad_stack

__all__ = [
    "ENCODER_CONFIG",
    "ENCODER_WEIGHTS",
    "IGNORE_INDEX",
    "Masker",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "PretrainObjective",
    "TokenMasker",
    "create_objective",
    "list_objectives",
    "load_encoder",
    "masked_lm_output",
    "objective_spec",
    "read_encoder_dir",
    "register_objective",
    "save_encoder",
]

#: The target of a position that carries no loss (PyTorch's ``cross_entropy`` default ignore_index).
IGNORE_INDEX = -100
#: The two files of a pretrained encoder directory (``save_encoder`` / ``load_encoder``).
ENCODER_CONFIG = "config.json"
ENCODER_WEIGHTS = "model.safetensors"


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
    # Overrides of the modality's ``tiny`` preset giving the smallest encoder this objective runs on
    # (e.g. rank tokens and a <mask> id for Geneformer's masked LM); the registry-wide tests use it.
    tiny_overrides: ClassVar[dict[str, Any]] = {}
    masker: Masker

    def __init__(self, encoder: Encoder) -> None:
        """Hold ``encoder``; subclasses add their heads and set ``masker``."""
        super().__init__()
        self.encoder = encoder

    def init_for_training(self) -> None:
        """Re-initialise a *randomly built* encoder (and heads) the way its pretraining starts.

        Called by ``stage: pretrain`` only when the encoder loads no weights; an encoder's build-time
        random init is not always a training init (fair-esm's is not). Default: keep it.
        """

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
_BUILTINS: tuple[str, ...] = (
    "protein_objectives",
    "dna_objectives",
    "cell_objectives",
    "molecule_objectives",
    "image_objectives",
)


def _import_builtin_objectives() -> None:
    import importlib

    for module in _BUILTINS:
        importlib.import_module(f"kiban.encoders.{module}")


def register_objective(modality: str, name: str) -> Callable:
    """Class decorator ``@register_objective("cell", "masked_expression")``; the first is the default."""

    def wrap(cls: type[PretrainObjective]) -> type[PretrainObjective]:
        specs = _REGISTRY.setdefault(modality, {})
        if name in specs:
            raise ValueError(f"pretraining objective {modality}/{name} is registered twice")
        cls.modality, cls.name = modality, name
        specs[name] = ObjectiveSpec(modality, name, cls)
        return cls

    return wrap


def objective_spec(modality: str, name: str | None = None) -> ObjectiveSpec:
    """The objective ``name`` of ``modality`` (its default when None); a KeyError lists the choices."""
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


def create_objective(
    modality: str, encoder: Encoder, *, name: str | None = None, **options: Any
) -> PretrainObjective:
    """Build the objective (default or ``name``) for ``encoder``; ``options`` go to its constructor."""
    if encoder.modality != modality:
        raise ValueError(
            f"a {modality} objective needs a {modality} encoder, got a {encoder.modality} encoder"
        )
    return objective_spec(modality, name).builder(encoder, **options)


# ----------------------------------------------------------------------------------------------
# Masked-token LM (BERT, ESM-2): the masker and the loss shared by the token objectives


class TokenMasker:
    """BERT / ESM-2 masking of one item's ``tokens`` [T]: select, then corrupt 80/10/10.

    Each maskable position (not a special token) is selected with probability ``rate`` (at least
    one per item, so that every item carries loss); of the selected, ``mask_fraction`` become
    ``mask_id``, ``random_fraction`` a token drawn uniformly from ``random_ids`` and the rest stay
    as they are. The item gains ``targets`` [T]: the original token where selected, else
    ``IGNORE_INDEX``. Devlin et al. 2019 (BERT) and Lin et al. 2023 (ESM-2) both use 15%, 80/10/10.

    Picklable and weight-free: it holds ids only and draws from the global torch RNG, which the
    training data layer seeds per record.
    """

    def __init__(
        self,
        *,
        mask_id: int,
        pad_id: int,
        special_ids: Sequence[int],
        random_ids: Sequence[int],
        rate: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        """Masking ids and shares; see the class docstring."""
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"mask rate must be in (0, 1], got {rate}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
            raise ValueError(
                f"mask_fraction {mask_fraction} and random_fraction {random_fraction} must be >= 0 "
                "and sum to at most 1 (the rest stays unchanged)"
            )
        if not random_ids:
            raise ValueError("random_ids is empty: no token to draw random replacements from")
        self.mask_id, self.pad_id = int(mask_id), int(pad_id)
        self.special_ids = torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long)
        self.random_ids = torch.tensor([int(i) for i in random_ids], dtype=torch.long)
        self.rate, self.mask_fraction, self.random_fraction = rate, mask_fraction, random_fraction

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"tokens": [T]}`` -> ``{"tokens": corrupted [T], "targets": [T]}`` (other keys kept)."""
        tokens = features["tokens"]
        maskable = ~torch.isin(tokens, self.special_ids)
        selected = (torch.rand(tokens.shape) < self.rate) & maskable
        if maskable.any() and not selected.any():
            candidates = maskable.nonzero().flatten()
            selected[candidates[torch.randint(len(candidates), ())]] = True
        # one draw per position decides mask / random / keep, so the three shares are exact in expectation
        draw = torch.rand(tokens.shape)
        to_mask = selected & (draw < self.mask_fraction)
        to_random = (
            selected & (draw >= self.mask_fraction) & (draw < self.mask_fraction + self.random_fraction)
        )
        corrupted = tokens.clone()
        corrupted[to_mask] = self.mask_id
        replacements = self.random_ids[torch.randint(len(self.random_ids), tokens.shape)]
        corrupted[to_random] = replacements[to_random]
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[selected] = tokens[selected]
        return {**features, "tokens": corrupted, "targets": targets}

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-pad ``tokens`` with the pad id and ``targets`` with ``IGNORE_INDEX``: [B, T] each."""
        tokens, _ = pad_stack([item["tokens"] for item in items], pad_value=self.pad_id)
        targets, _ = pad_stack([item["targets"] for item in items], pad_value=IGNORE_INDEX)
        return {"tokens": tokens, "targets": targets}


def masked_lm_output(logits: Tensor, targets: Tensor) -> ObjectiveOutput:
    """Cross-entropy over the selected positions only (``targets != IGNORE_INDEX``), with its figures.

    logits [B, T, V], targets [B, T]. Metrics: ``masked_accuracy``, ``perplexity`` (exp of the
    loss, per selected token) and ``n_masked``.
    """
    selected = targets.ne(IGNORE_INDEX)
    picked = logits[selected].float()
    wanted = targets[selected]
    loss = nn.functional.cross_entropy(picked, wanted)
    with torch.no_grad():
        accuracy = picked.argmax(-1).eq(wanted).float().mean()
        metrics = {
            "masked_accuracy": accuracy,
            "perplexity": loss.detach().exp(),
            "n_masked": selected.sum().float(),
        }
    return ObjectiveOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------
# The pretrained encoder's directory: config.json + model.safetensors


def save_encoder(encoder: Encoder, directory: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``encoder`` as ``config.json`` + ``model.safetensors`` in ``directory``.

    ``config.json``: the modality and the portable config; ``model.safetensors``: the whole state
    dict, the heads the encoder owns included.

    ``load_encoder(directory)`` rebuilds it; the protein and DNA encoders also read the directory
    through their ``weights_path``. ``extra`` (objective, step, ...) is stored beside the config.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "kiban-encoder",
        "modality": encoder.modality,
        "config": config_to_dict(encoder.portable_config()),
        **(extra or {}),
    }
    # save_model (not save_file) stores tied tensors (ESM-2's LM head and embedding) once
    save_model(encoder, str(directory / ENCODER_WEIGHTS), metadata={"format": "pt"})
    (directory / ENCODER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_encoder_dir(directory: str | Path, *, modality: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config values, state dict) of a ``save_encoder`` directory, checked to be of ``modality``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ENCODER_CONFIG, directory / ENCODER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a kiban encoder directory (needs {ENCODER_CONFIG} and {ENCODER_WEIGHTS}, "
            "as kiban pretrain writes them)"
        )
    meta = json.loads(config_path.read_text())
    if meta.get("format") != "kiban-encoder" or meta.get("modality") != modality:
        raise ValueError(
            f"{directory} holds a {meta.get('modality')!r} encoder ({meta.get('format')!r}), "
            f"not a {modality} one"
        )
    return dict(meta["config"]), load_file(str(weights_path))


def load_encoder(directory: str | Path, **overrides: Any) -> Encoder:
    """Rebuild the encoder that ``save_encoder`` wrote (any modality).

    ``overrides`` change config fields that do not touch the architecture (``truncate``,
    ``rc_augment``).
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / ENCODER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} is not a kiban encoder directory (no {ENCODER_CONFIG})")
    meta = json.loads((directory / ENCODER_CONFIG).read_text())
    encoder = create_encoder(meta["modality"], dict(meta["config"]), **overrides)
    missing, unexpected = load_model(encoder, str(directory / ENCODER_WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {directory} do not fit the {meta['modality']} encoder its config describes: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return encoder

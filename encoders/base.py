"""The contract every kiban encoder keeps, and the registry that creates encoders by name.

    Featurizer (CPU, picklable, runs in DataLoader workers):
        raw item -> dict of tensors for that one item        (raises InvalidInput naming the item)
        list of those dicts -> one padded batch dict          (``collate``)
    Encoder (nn.Module):
        batch dict -> ModalityTokens(embeddings [B, N, D], mask [B, N])

B is the number of items of one modality in the batch, N the number of tokens of the longest
item (shorter ones are padded, ``mask`` is False there), D the encoder's width.

Encoders are registered with ``@register_encoder("protein", config=ProteinEncoderConfig)`` and
built with ``create_encoder("protein", preset="esm2_t6_8m", num_layers=2)``. A preset is a
zero-argument function returning a config; configs are dataclasses of plain values, so they
round-trip through JSON and YAML (``config_to_dict`` / ``config_from_dict``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kiban.config import from_plain, to_plain

__all__ = [
    "Encoder",
    "EncoderSpec",
    "Featurizer",
    "InvalidInput",
    "ModalityTokens",
    "byte_table",
    "config_from_dict",
    "config_to_dict",
    "create_encoder",
    "encoder_spec",
    "list_encoders",
    "list_presets",
    "pad_stack",
    "read_sequence",
    "register_encoder",
    "register_preset",
    "sequence_bytes",
]


class InvalidInput(ValueError):
    """A raw input that cannot be featurized. The message names the modality, the item and the problem.

    Raised by featurizers (and by the fused model when a prompt and its inputs disagree); callers
    above the model turn it into a rejects-file line or an HTTP 4xx, never a traceback.
    """

    def __init__(self, modality: str, item_id: Any, problem: str) -> None:
        self.modality = modality
        self.item_id = item_id
        self.problem = problem
        super().__init__(f"invalid {modality} input {_describe(item_id)}: {problem}")


def _describe(item_id: Any) -> str:
    text = str(item_id)
    return repr(text if len(text) <= 60 else text[:57] + "...")


@dataclass
class ModalityTokens:
    """Token embeddings of a batch of items of one modality.

    embeddings: [B, N, D] float tensor; mask: [B, N] bool tensor, True where a token is real.
    attentions: optional [B, layers, heads, N, N] attention maps over the same N tokens (the
    protein encoder fills it when asked; the structure head reads it).
    """

    embeddings: Tensor
    mask: Tensor
    attentions: Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 3:
            raise ValueError(f"ModalityTokens.embeddings must be [B, N, D], got {tuple(self.embeddings.shape)}")
        if self.mask.shape != self.embeddings.shape[:2]:
            raise ValueError(
                f"ModalityTokens.mask {tuple(self.mask.shape)} does not match embeddings "
                f"{tuple(self.embeddings.shape)}"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()

    @property
    def dim(self) -> int:
        """The token width D."""
        return self.embeddings.shape[-1]

    def pooled(self) -> Tensor:
        """Masked mean over tokens: [B, D]."""
        weights = self.mask.unsqueeze(-1).to(self.embeddings.dtype)
        return (self.embeddings * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def lengths(self) -> Tensor:
        """Real tokens per item [B] (the mask summed)."""
        return self.mask.sum(1)


class Featurizer(Protocol):
    """Turns raw items into tensors. Cheap to pickle: holds vocabularies and settings, never weights."""

    modality: str

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """Featurize one raw item; ``InvalidInput`` names ``item_id`` and the problem."""
        ...

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pad a list of feature dicts into one batch."""
        ...


class Encoder(nn.Module):
    """Base class of the encoders: owns its featurizer, maps a collated batch to ModalityTokens.

    Subclasses set ``modality``, ``output_dim`` and ``featurizer`` and implement ``forward(**batch)``.
    """

    modality: ClassVar[str] = ""
    # Parameter-name prefixes that no stage trains (e.g. ESM-2's LM head, unused by the token path).
    never_trained: ClassVar[tuple[str, ...]] = ()
    # True for an encoder with no pretraining of its own (the property-condition encoder): it trains
    # wherever its projector does (align and instruct stages too), since frozen it stays random
    trains_with_projector: ClassVar[bool] = False
    config: Any
    output_dim: int
    featurizer: Featurizer

    def portable_config(self) -> Any:
        """A config that rebuilds this architecture without reading any outside weights file.

        ``save_pretrained`` stores this; the weights themselves travel in the saved safetensors.
        Encoders whose config points at a weights file or directory override it.
        """
        return self.config

    def export_assets(self, directory: Path) -> tuple[Any, tuple[str, ...]]:
        """Write what rebuilding this encoder reads besides its weights (tokenizer, architecture
        files) into ``directory``; return (the config that reads them from there, the names of its
        path fields). ``save_pretrained`` stores those paths relative to the model folder, so a
        saved model reads nothing from outside it. Default: nothing to write.
        """
        return self.portable_config(), ()

    def forward(self, **batch: Tensor) -> ModalityTokens:  # pragma: no cover - abstract
        """Encode a featurized batch into ``ModalityTokens``."""
        raise NotImplementedError

    def encode(self, items: Sequence[Any], *, ids: Sequence[Any] | None = None) -> ModalityTokens:
        """Featurize, collate and encode raw items in one call (convenience for notebooks and tests)."""
        ids = list(ids) if ids is not None else [None] * len(items)
        features = [self.featurizer(item, item_id=item_id) for item, item_id in zip(items, ids)]
        batch = self.featurizer.collate(features)
        device = next(self.parameters()).device
        return self(**{k: v.to(device) for k, v in batch.items()})


def pad_stack(tensors: Sequence[Tensor], *, pad_value: float | int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad tensors along dim 0 to the longest and stack: returns (padded [B, N, ...], mask [B, N])."""
    longest = max(t.shape[0] for t in tensors)
    first = tensors[0]
    out = first.new_full((len(tensors), longest, *first.shape[1:]), pad_value)
    mask = torch.zeros(len(tensors), longest, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def sequence_bytes(sequence: str) -> np.ndarray:
    """The letters of an ASCII sequence as uint8 codes (a view of its bytes, for byte lookup tables)."""
    return np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)


def byte_table(values: Mapping[str, int], *, missing: int = -1) -> np.ndarray:
    """A 256-entry lookup table: ``table[ord(letter)] = values[letter]``, ``missing`` elsewhere."""
    table = np.full(256, missing, dtype=np.int64)
    for letter, value in values.items():
        table[ord(letter)] = value
    return table


@functools.lru_cache(maxsize=64)
def _letter_mask(letters: str) -> np.ndarray:
    """Which of the 256 byte values are among ``letters``."""
    mask = np.zeros(256, dtype=bool)
    mask[[ord(letter) for letter in letters if len(letter) == 1 and ord(letter) < 256]] = True
    return mask


def read_sequence(
    item: Any, item_id: Any, *, modality: str, kind: str, allowed: Collection[str], allowed_text: str
) -> tuple[str, Any]:
    """A biological sequence as a cleaned upper-case string, and the id to name it by in errors.

    Accepts a str, a Biopython ``Seq`` or ``SeqRecord`` (its ``.id`` names it). Empty input, another
    type, or letters outside ``allowed`` raise ``InvalidInput`` listing the letters and their 1-based
    positions, e.g. "contains non-amino-acid letters 'J', '1' at positions 4, 5 (allowed: ...)".
    """
    from Bio.Seq import Seq
    from Bio.SeqRecord import SeqRecord

    if isinstance(item, SeqRecord):
        item_id = item.id if item_id is None else item_id
        item = item.seq
    if isinstance(item, Seq):
        item = str(item)
    if item_id is None:
        item_id = item
    if not isinstance(item, str):
        raise InvalidInput(modality, item_id, f"is of type {type(item).__name__}, not a {kind} string or Bio.SeqRecord")
    sequence = item.strip().upper()
    if not sequence:
        raise InvalidInput(modality, item_id, "is empty")
    if sequence.isascii() and _letter_mask("".join(sorted(allowed)))[sequence_bytes(sequence)].all():
        return sequence, item_id  # one table lookup over the bytes; the loop below only names the bad letters
    bad = [(i, letter) for i, letter in enumerate(sequence, start=1) if letter not in allowed]
    if bad:
        shown = 10
        letters = ", ".join(repr(letter) for letter in dict.fromkeys(letter for _, letter in bad))
        positions = ", ".join(str(position) for position, _ in bad[:shown])
        if len(bad) > shown:
            positions += f" and {len(bad) - shown} more"
        raise InvalidInput(
            modality, item_id, f"contains non-{kind} letters {letters} at positions {positions} (allowed: {allowed_text})"
        )
    return sequence, item_id


# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: its config class, builder, presets, default preset and examples."""
    name: str
    config_class: type
    builder: Callable[[Any], Encoder]
    presets: dict[str, Callable[[], Any]]
    default_preset: str
    examples: Callable[[], list[Any]]


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str, *, config: type, examples: Callable[[], list[Any]], default_preset: str = "default"
) -> Callable:
    """Class decorator: ``@register_encoder("dna", config=DnaEncoderConfig, examples=fn)``.

    The decorated class is built as ``cls(config)``. ``examples`` returns a few valid raw items of
    different sizes; the registry-wide tests run every encoder on them, so a new encoder is tested
    the day it is registered.
    """

    def wrap(builder: Callable[[Any], Encoder]) -> Callable[[Any], Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = EncoderSpec(name, config, builder, {"default": config}, default_preset, examples)
        return builder

    return wrap


def register_preset(encoder: str, name: str | None = None) -> Callable:
    """Function decorator registering a zero-argument preset returning a config for ``encoder``."""

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        encoder_spec(encoder).presets[name or fn.__name__] = fn
        return fn

    return wrap


def encoder_spec(name: str) -> EncoderSpec:
    """The registered encoder ``name``; ``KeyError`` names the registered ones."""
    _import_builtin_encoders()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no encoder named {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def list_encoders() -> list[str]:
    """The registered encoder names, sorted."""
    _import_builtin_encoders()
    return sorted(_REGISTRY)


def list_presets(name: str) -> list[str]:
    """The preset names of encoder ``name``, sorted."""
    return sorted(encoder_spec(name).presets)


def create_encoder(name: str, config: Any = None, *, preset: str | None = None, **overrides: Any) -> Encoder:
    """Build a registered encoder from a config, a preset name or the default preset, plus overrides."""
    spec = encoder_spec(name)
    if config is None:
        preset = preset or spec.default_preset
        if preset not in spec.presets:
            raise KeyError(f"encoder {name!r} has no preset {preset!r}; presets: {', '.join(sorted(spec.presets))}")
        config = spec.presets[preset]()
    elif isinstance(config, dict):
        config = config_from_dict(spec.config_class, config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return spec.builder(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/YAML values (tuples become lists)."""
    return to_plain(config)


def config_from_dict(config_class: type, values: dict[str, Any], *, path: str = "") -> Any:
    """Inverse of ``config_to_dict``, through ``kiban.config.from_plain``: an unknown key or a value
    of the wrong type is a ``ConfigError`` naming the field (under ``path``), never dropped.
    """
    return from_plain(config_class, values, path)


# molecule_lm registers the SMILES language-model kind of the molecule encoder (it builds on molecule)
_BUILTINS = ("protein", "dna", "cell", "image", "molecule", "molecule_lm", "text", "properties")


def _import_builtin_encoders() -> None:
    import importlib

    for module in _BUILTINS:
        importlib.import_module(f"kiban.encoders.{module}")

"""``KibanConfig``: the typed description of a fused model, as training YAML and config.json hold it.

    config = KibanConfig.from_plain(json.loads(text))   # strict: ConfigError names the bad field
    config.encoders["protein"]     EncoderSpec(preset="esm2_t6_8m", overrides={"num_layers": 2})
    config.backbone                BackboneConfig(gguf=..., lora=LoraSettings(...))
    config.projectors["cell"]      ProjectorConfig(kind="resampler", num_tokens=16, ...)
    config.to_plain()              the same layout back, for YAML and JSON

The file layout is the one kiban has always written: an encoder is ``{preset: NAME, ...overrides}``
or ``{config: {...full encoder config}, relative_paths: [...]}``; a projector entry lists only the
settings that differ from ``default_projector``. Everything is checked against the registries as it
is read (encoder names, presets, override names and types, projector kinds), so a typo fails at
load time with its full path, e.g. ``model.projectors.cell.num_tokens: expected int, got 'sixteen'``.
Constructing a ``KibanConfig`` from plain dicts in Python goes through the same checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiban.config import ConfigError, fields_from_plain, from_plain, to_plain
from kiban.encoders.base import config_to_dict, encoder_spec, list_encoders
from kiban.fusion.backbone import BackboneConfig
from kiban.fusion.projector import ProjectorConfig, list_projectors
from kiban.version import __version__

__all__ = ["EncoderSpec", "KibanConfig"]


@dataclass
class EncoderSpec:
    """How one encoder is built: a registered ``preset`` plus ``overrides``, or a full ``config``.

    preset: a preset of the encoder (None: its default preset). overrides: encoder config fields
    set over the preset, already checked and typed. config: a whole encoder config dataclass
    (what ``save_pretrained`` writes). relative_paths: fields of ``config`` that name files
    inside the saved model folder.
    """

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config: Any = None
    relative_paths: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, modality: str, values: Any, *, path: str) -> EncoderSpec:
        """The spec of encoder ``modality`` from its file form, checked against the encoder registry."""
        if isinstance(values, EncoderSpec):
            return values
        registered = list_encoders()
        if modality not in registered:
            raise ConfigError(path, f"unknown encoder {modality!r}; registered encoders: {', '.join(registered)}")
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            raise ConfigError(path, f"expected {{preset: NAME, ...overrides}} or {{config: {{...}}}}, got {values!r}")
        encoder = encoder_spec(modality)
        values = dict(values)
        if "config" in values:
            relative = from_plain(list[str], values.pop("relative_paths", []), f"{path}.relative_paths")
            config = from_plain(encoder.config_class, values.pop("config"), f"{path}.config")
            if values:
                raise ConfigError(f"{path}.{sorted(values)[0]}", "unknown field beside config (config, relative_paths)")
            return cls(config=config, relative_paths=relative)
        preset = from_plain(str | None, values.pop("preset", None), f"{path}.preset")
        name = preset or encoder.default_preset
        if name not in encoder.presets:
            raise ConfigError(f"{path}.preset", f"no preset {name!r}; presets: {', '.join(sorted(encoder.presets))}")
        typed = fields_from_plain(encoder.config_class, values, path)
        return cls(preset=preset, overrides=typed)

    def encoder_config(self, modality: str) -> Any:
        """The encoder config dataclass this spec describes."""
        if self.config is not None:
            return self.config
        encoder = encoder_spec(modality)
        config = encoder.presets[self.preset or encoder.default_preset]()
        return dataclasses.replace(config, **self.overrides) if self.overrides else config

    def to_plain(self) -> dict[str, Any]:
        """The file form: ``{preset, ...overrides}`` or ``{config, relative_paths}``."""
        if self.config is not None:
            out: dict[str, Any] = {"config": config_to_dict(self.config)}
            if self.relative_paths:
                out["relative_paths"] = list(self.relative_paths)
            return out
        return {**({"preset": self.preset} if self.preset is not None else {}), **to_plain(self.overrides)}


@dataclass
class KibanConfig:
    """Plain values that build a ``KibanModel``.

    encoders: modality -> ``EncoderSpec`` (file form ``{preset: NAME, ...overrides}`` or ``{config: {...}}``).
    backbone: ``BackboneConfig``. projectors: modality -> ``ProjectorConfig`` (file form: the settings
    that differ from ``default_projector``); a modality not listed gets ``default_projector``.
    max_length: the longest fused sequence the processor builds (None: no limit).
    """

    encoders: dict[str, EncoderSpec]
    backbone: BackboneConfig
    projectors: dict[str, ProjectorConfig] = field(default_factory=dict)
    default_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    max_length: int | None = None

    def __post_init__(self) -> None:
        # plain dicts given in Python (tests, recipes) are read exactly as a file would be
        self._check(path="")

    def _check(self, *, path: str) -> None:
        def where(key: str) -> str:
            return f"{path}.{key}" if path else key

        if not isinstance(self.encoders, Mapping) or not self.encoders:
            raise ConfigError(where("encoders"), "needs at least one encoder, e.g. {protein: {preset: tiny}}")
        self.encoders = {
            str(m): EncoderSpec.parse(str(m), spec, path=where(f"encoders.{m}")) for m, spec in self.encoders.items()
        }
        self.backbone = from_plain(BackboneConfig, self.backbone, where("backbone"))
        if not isinstance(self.default_projector, ProjectorConfig):
            self.default_projector = from_plain(ProjectorConfig, self.default_projector, where("default_projector"))
        _check_kind(self.default_projector, where("default_projector.kind"))
        projectors = {}
        for modality, values in (self.projectors or {}).items():
            at = where(f"projectors.{modality}")
            if modality not in self.encoders:
                raise ConfigError(at, f"has no encoder in encoders ({', '.join(self.encoders)})")
            if not isinstance(values, ProjectorConfig):
                # only what differs from default_projector is written for a modality
                values = dataclasses.replace(self.default_projector, **fields_from_plain(ProjectorConfig, values, at))
            _check_kind(values, f"{at}.kind")
            projectors[str(modality)] = values
        self.projectors = projectors
        self.max_length = from_plain(int | None, self.max_length, where("max_length"))

    @classmethod
    def from_plain(cls, values: Any, *, path: str = "") -> KibanConfig:
        """The config a file holds (config.json, a training YAML's ``model``), strictly checked.

        ``kiban_version`` (written by ``to_plain``) is read and ignored.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(path, f"expected a mapping of KibanConfig fields, got {values!r}")
        values = {k: v for k, v in values.items() if k != "kiban_version"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}" if path else unknown[0], f"unknown field (known here: {', '.join(sorted(known))})")
        for required in ("encoders", "backbone"):
            if required not in values:
                raise ConfigError(f"{path}.{required}" if path else required, "is required")
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(config, f.name, values.get(f.name, default))
        config._check(path=path)
        return config

    def to_plain(self) -> dict[str, Any]:
        """The file form (config.json; a training YAML's ``model``), with the kiban version."""
        return {
            "kiban_version": __version__,
            "encoders": {m: spec.to_plain() for m, spec in self.encoders.items()},
            "backbone": to_plain(self.backbone),
            "projectors": {m: _differences(p, self.default_projector) for m, p in self.projectors.items()},
            "default_projector": to_plain(self.default_projector),
            "max_length": self.max_length,
        }


def _differences(config: ProjectorConfig, default: ProjectorConfig) -> dict[str, Any]:
    return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}


def _check_kind(config: ProjectorConfig, path: str) -> None:
    if config.kind not in list_projectors():
        raise ConfigError(path, f"unknown projector {config.kind!r}; known: {', '.join(list_projectors())}")

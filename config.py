"""Typed configs from plain values: one strict converter for YAML, JSON and Python dicts.

    from kiban.config import ConfigError, from_plain, to_plain

    config = from_plain(TrainConfig, yaml.safe_load(text))     # nested dataclasses, checked
    values = to_plain(config)                                   # back to JSON/YAML values

Every config in kiban (the training YAML, ``KibanConfig`` in a saved model's config.json, encoder
configs, backbone, projectors, head.json) is a dataclass of plain values built by ``from_plain``.
A misspelt key or a value of the wrong type is refused when the file is read, with the field's full
dotted path: ``ConfigError: model.projectors.cell.num_tokens: expected int, got 'sixteen'``.

A dataclass whose file format is not its field list (an older layout, a flat spelling) defines the
classmethod ``from_plain(values, *, path)`` and the method ``to_plain()``; the converter calls them
wherever the class appears.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigError", "from_plain", "to_plain"]


class ConfigError(ValueError):
    """A config value that cannot work; ``field`` is its dotted path (``model.backbone.dtype``)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


def from_plain(hint: Any, value: Any, path: str = "") -> Any:
    """``value`` (plain JSON/YAML values) as the type ``hint`` (a dataclass, or a typing hint).

    path: the dotted path of ``value`` in its file, for error messages (``model.encoders.dna``).
    Raises ``ConfigError`` naming the first field that is unknown, missing or of the wrong type.
    """
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        custom = getattr(hint, "from_plain", None)
        if custom is not None:
            return custom(value, path=path)
        return _dataclass(hint, value, path)
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(hint, value, path)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(path, f"expected one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
        return value
    if origin is tuple or hint is tuple:
        return _tuple(hint, value, path)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [from_plain(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(hint) or (str, Any)
        return {str(k): from_plain(item, v, _join(path, str(k))) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(path, f"expected null, got {value!r}")
        return None
    return value


def to_plain(value: Any) -> Any:
    """A config as plain JSON/YAML values: dataclasses to dicts, tuples to lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        custom = getattr(value, "to_plain", None)
        if custom is not None:
            return custom()
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def fields_from_plain(cls: type, values: Any, path: str) -> dict[str, Any]:
    """The converted keyword arguments of dataclass ``cls`` from a mapping (no construction)."""
    if not isinstance(values, Mapping):
        raise ConfigError(path, f"expected a mapping of {cls.__name__} fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(_join(path, str(unknown[0])), f"unknown field (known here: {', '.join(sorted(fields))})")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(_join(path, missing[0]), "is required")
    hints = _hints(cls)
    return {name: from_plain(hints[name], value, _join(path, name)) for name, value in values.items()}


def _dataclass(cls: type, values: Any, path: str) -> Any:
    kwargs = fields_from_plain(cls, values, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a check in __post_init__
        raise ConfigError(path or cls.__name__, str(error)) from None


def _union(hint: Any, value: Any, path: str) -> Any:
    options = typing.get_args(hint)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return from_plain(option, value, path)
        except ConfigError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(path, f"expected {names}{' or null' if type(None) in options else ''}, got {value!r}")


def _tuple(hint: Any, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list, got {value!r}")
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(from_plain(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if not args:
        return tuple(value)
    if len(value) != len(args):
        raise ConfigError(path, f"expected a list of {len(args)} values, got {value!r}")
    return tuple(from_plain(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(args, value, strict=True)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key

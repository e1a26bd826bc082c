"""The reader registry: one reader per file kind, found by name or by the file's extension.

    read("seqs.fa.gz", rejects=rejects)          # kind detected from the name (and content)
    read("cells.h5ad", kind="h5ad", vocab=...)   # or named
    list_readers()                               # ["fasta", "genbank", "h5ad", ...]

Each reader is a generator function ``fn(path, *, rejects=None, **options) -> Iterator[Record]``
registered with ``@register_reader(kind, suffixes=..., description=...)``. Where one extension
fits several kinds (``.csv`` holds molecules or sequences, ``.jsonl`` instruction records or text
passages) each candidate's ``sniff(path)`` looks at the first lines and the first to claim the
file wins.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiban.data._io import strip_gz
from kiban.data.rejects import Record, Rejects

__all__ = [
    "ReaderSpec",
    "UniqueIds",
    "collector",
    "detect_kind",
    "list_readers",
    "read",
    "reader_spec",
    "register_reader",
]


@dataclass(frozen=True)
class ReaderSpec:
    """A registered reader: its kind, the function that reads, and how files are recognised."""

    kind: str
    suffixes: tuple[str, ...]
    read: Callable[..., Iterator[Record]]
    description: str
    sniff: Callable[[Path], bool] | None = None
    directories: bool = False  # also reads a folder (of images)


_READERS: dict[str, ReaderSpec] = {}
_BUILTINS = ("sequences", "cells", "images", "molecules", "text", "instructions")


def register_reader(
    kind: str,
    *,
    suffixes: tuple[str, ...],
    description: str,
    sniff: Callable[[Path], bool] | None = None,
    directories: bool = False,
) -> Callable:
    """Register a reader generator under ``kind`` for file names ending in ``suffixes`` (.gz allowed)."""

    def wrap(fn: Callable[..., Iterator[Record]]) -> Callable[..., Iterator[Record]]:
        if kind in _READERS:
            raise ValueError(f"reader {kind!r} is registered twice")
        _READERS[kind] = ReaderSpec(kind, suffixes, fn, description, sniff, directories)
        return fn

    return wrap


def _import_builtin_readers() -> None:
    for module in _BUILTINS:
        importlib.import_module(f"kiban.data.{module}")


def list_readers() -> list[str]:
    """The registered reader kinds, sorted."""
    _import_builtin_readers()
    return sorted(_READERS)


def reader_spec(kind: str) -> ReaderSpec:
    """The registered reader of ``kind``; ``KeyError`` names the known kinds."""
    _import_builtin_readers()
    try:
        return _READERS[kind]
    except KeyError:
        raise KeyError(f"no reader of kind {kind!r}; kinds: {', '.join(sorted(_READERS))}") from None


def detect_kind(path: str | Path) -> str:
    """The reader kind for ``path``: by extension (longest match, ``.gz`` ignored), then by content."""
    _import_builtin_readers()
    path = Path(path)
    if path.is_dir():
        kinds = [spec.kind for spec in _READERS.values() if spec.directories]
        if kinds:
            return kinds[0]
        raise ValueError(f"{path} is a folder; only {', '.join(kinds) or 'no'} readers read folders")
    name = strip_gz(path)
    matches = [
        (max(len(s) for s in spec.suffixes if name.endswith(s)), spec)
        for spec in _READERS.values()
        if any(name.endswith(s) for s in spec.suffixes)
    ]
    if not matches:
        known = sorted({s for spec in _READERS.values() for s in spec.suffixes})
        raise ValueError(
            f"cannot tell the kind of {path} from its name (known: {' '.join(known)}); pass kind="
        )
    longest = max(length for length, _ in matches)
    candidates = sorted((spec for length, spec in matches if length == longest), key=lambda spec: spec.kind)
    if len(candidates) == 1:
        return candidates[0].kind
    for spec in candidates:
        if spec.sniff is not None and spec.sniff(path):
            return spec.kind
    raise ValueError(
        f"{path} could hold any of {', '.join(spec.kind for spec in candidates)} and its first lines do not "
        "say which (e.g. no 'smiles' or 'sequence' column); pass kind="
    )


def read(
    path: str | Path, *, kind: str | None = None, rejects: Rejects | None = None, **options: Any
) -> Iterator[Record]:
    """Records of ``path`` through the reader of ``kind`` (detected when None)."""
    spec = reader_spec(kind or detect_kind(path))
    return spec.read(path, rejects=rejects, **options)


def collector(rejects: Rejects | None) -> Rejects:
    """The collector a reader reports to: the caller's, or a strict one (no collector, no silent drops)."""
    return rejects if rejects is not None else Rejects(strict=True)


class UniqueIds:
    """Rejects a second record with an id already seen in the same source (ids must name one record).

    Holds every id of the source in memory: about 100 bytes per record.
    """

    def __init__(self) -> None:
        self._first: dict[str, str] = {}

    def accept(self, record_id: str, location: str, rejects: Rejects) -> bool:
        """Count a record; False (and a ``duplicate id`` reject) when its id was seen before."""
        first = self._first.get(record_id)
        if first is None:
            self._first[record_id] = location
            return True
        rejects.reject(
            id=record_id,
            location=location,
            reason="duplicate id",
            detail=f"id {record_id!r} was already used at {first}",
        )
        return False

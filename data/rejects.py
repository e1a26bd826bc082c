"""Records, rejects and the count report: nothing a reader drops goes unsaid.

Every reader yields ``Record(id, modality, item, location)`` for good input and reports bad input
to a ``Rejects`` collector as ``Reject(id, location, reason, detail)``, then goes on with the rest
of the file. The collector keeps the counts (``read == accepted + rejected``, always, and
rejects by reason), the first few rejects in memory, and optionally streams every reject to a
JSONL file. With ``strict=True`` (the default when a reader is given no collector) the first
reject raises ``DataError`` instead.

A run that reads data writes two files beside its outputs (``rejects_log`` does it for one
process; ``merge_rejects`` joins the per-rank, per-worker shards that the datasets write)::

    rejects.jsonl   one JSON object a line: {"id", "location", "reason", "detail"}
    counts.json     {"read", "accepted", "rejected", "by_reason", "notes"} (+ "parts" when merged)

``reason`` is a short fixed phrase that rejects are grouped by ("invalid residues", "unparseable
SMILES", "path outside dataset root"); ``detail`` is the one-line message naming the problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiban.atomic import write_atomic, write_json

__all__ = [
    "DataError",
    "ReadReport",
    "Record",
    "Reject",
    "Rejects",
    "merge_rejects",
    "rejects_log",
]

logger = logging.getLogger(__name__)

REJECTS_FILE = "rejects.jsonl"
COUNTS_FILE = "counts.json"


class DataError(ValueError):
    """A bad record met in strict mode; the message names its location and the problem."""

    def __init__(self, reject: Reject) -> None:
        self.reject = reject
        super().__init__(f"{reject.location}: {reject.detail}")


@dataclass(frozen=True)
class Record:
    """One accepted input. ``item`` is the raw item its modality's featurizer takes.

    id: stable and unique within its source (a FASTA id, an obs name, ``file:line`` when the file
    names nothing). location: where it came from, e.g. ``seqs.fa:line 12`` or ``cells.h5ad:row 7``.
    fields: the other columns of a table row (labels for fine-tuning), as strings; else empty.
    """

    id: str
    modality: str
    item: Any
    location: str
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    """One input that was not accepted; ``id`` is None when the input was too broken to name."""

    id: str | None
    location: str
    reason: str
    detail: str

    def to_json(self) -> str:
        """One line of a rejects.jsonl file."""
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class ReadReport:
    """Counts of one read: ``read == accepted + rejected``; ``first_rejects`` are the first few."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    first_rejects: list[Reject] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The counts.json form (without the rejects themselves)."""
        return {
            "read": self.read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "by_reason": dict(self.by_reason),
            "notes": self.notes,
        }


class Rejects:
    """Counts what a reader read, accepted and rejected; keeps or streams the rejects.

    strict: raise ``DataError`` at the first reject instead of collecting it.
    sink: a path that every reject is appended to as one JSON line (the file is created on the
        first reject, or by ``close``; ``rejects_log`` manages this).
    keep: how many rejects to keep in memory (the first ones); all are counted and sunk.
    """

    def __init__(self, *, strict: bool = False, sink: str | Path | None = None, keep: int = 100) -> None:
        self.strict = strict
        self.sink = Path(sink) if sink is not None else None
        self.keep = keep
        self.accepted = 0
        self.by_reason: Counter[str] = Counter()
        self.first: list[Reject] = []
        self.notes: dict[str, Any] = {}
        self._handle: Any = None

    @property
    def rejected(self) -> int:
        """How many inputs were rejected."""
        return sum(self.by_reason.values())

    @property
    def read(self) -> int:
        """How many inputs were read: accepted + rejected."""
        return self.accepted + self.rejected

    def accept(self, n: int = 1) -> None:
        """Count ``n`` accepted inputs."""
        self.accepted += n

    def reject(self, *, id: Any, location: str, reason: str, detail: str) -> None:
        """Record one reject (or raise ``DataError`` when strict)."""
        reject = Reject(None if id is None else str(id), location, reason, " ".join(str(detail).split()))
        if self.strict:
            raise DataError(reject)
        self.by_reason[reason] += 1
        if len(self.first) < self.keep:
            self.first.append(reject)
        if self.sink is not None:
            if self._handle is None:
                self.sink.parent.mkdir(parents=True, exist_ok=True)
                self._handle = self.sink.open("a", encoding="utf-8")
            self._handle.write(reject.to_json() + "\n")
            self._handle.flush()  # a worker can be killed at any time; what was written stays
        logger.debug("rejected %s at %s: %s", id, location, detail)

    def note(self, key: str, value: Any) -> None:
        """Attach a fact about the read to the report (gene matching, preprocessing, shapes)."""
        self.notes[key] = value

    def report(self) -> ReadReport:
        """The counts and the first rejects so far."""
        return ReadReport(
            read=self.read,
            accepted=self.accepted,
            rejected=self.rejected,
            by_reason=dict(self.by_reason),
            first_rejects=list(self.first),
            notes=dict(self.notes),
        )

    def write_counts(self, path: str | Path, **extra: Any) -> None:
        """Write this collector's counts as JSON (atomically: a reader never sees half a file)."""
        write_json(path, {**self.report().to_dict(), **extra}, default=str)

    def close(self) -> None:
        """Close the rejects file (creating an empty one when nothing was rejected)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        elif self.sink is not None and not self.sink.exists():
            self.sink.parent.mkdir(parents=True, exist_ok=True)
            self.sink.touch()  # an empty rejects file says "nothing rejected", a missing one says nothing

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # file handles do not cross into DataLoader workers
        return state


@contextlib.contextmanager
def rejects_log(directory: str | Path, *, strict: bool = False, **extra: Any) -> Iterator[Rejects]:
    """A ``Rejects`` that writes ``rejects.jsonl`` and ``counts.json`` into ``directory``.

    For any run that reads data in one process (fine-tuning on a CSV, embedding a FASTA)::

        with rejects_log(out_dir) as rejects:
            records = list(read_sequences("seqs.fa", modality="protein", rejects=rejects))

    counts.json is written on exit even when the run fails, with ``"complete": false`` then.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sink = directory / REJECTS_FILE
    sink.unlink(missing_ok=True)  # this run's rejects, not an earlier run's
    rejects = Rejects(strict=strict, sink=sink)
    complete = False
    try:
        yield rejects
        complete = True
    finally:
        rejects.close()
        rejects.write_counts(directory / COUNTS_FILE, complete=complete, **extra)


def merge_rejects(directory: str | Path, *, into: str | Path | None = None) -> ReadReport:
    """Join the shard files the datasets write into ``rejects.jsonl`` and ``counts.json`` in ``into``
    (default: ``directory`` itself).

    Each (split, epoch, rank, worker) writes ``rejects-<part>.jsonl`` and ``counts-<part>.json``.
    The merged rejects are deduplicated on (id, location, reason), since a record rejected in
    epoch 0 is rejected again in epoch 1; the merged counts sum every part (so they count reads,
    not distinct records) and list the parts. Returns the merged counts.
    """
    directory = Path(directory)
    into = Path(into) if into is not None else directory
    seen: set[tuple[Any, ...]] = set()
    merged = ReadReport()
    lines = []
    for path in sorted(directory.glob("rejects-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            reject = Reject(**json.loads(line))
            key = (reject.id, reject.location, reject.reason)
            if key not in seen:
                seen.add(key)
                lines.append(line)
                if len(merged.first_rejects) < 100:
                    merged.first_rejects.append(reject)
    parts = []
    by_reason: Counter[str] = Counter()
    for path in sorted(directory.glob("counts-*.json")):
        part = json.loads(path.read_text(encoding="utf-8"))
        parts.append(part)
        merged.read += part["read"]
        merged.accepted += part["accepted"]
        merged.rejected += part["rejected"]
        by_reason.update(part["by_reason"])
    merged.by_reason = dict(by_reason)
    into.mkdir(parents=True, exist_ok=True)
    write_atomic(into / REJECTS_FILE, "".join(line + "\n" for line in lines))
    write_json(into / COUNTS_FILE, {**merged.to_dict(), "parts": parts}, default=str)
    return merged

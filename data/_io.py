"""File plumbing shared by the readers: gzip-aware text, numbered lines, CSV rows with locations.

Everything here turns a broken file into rejects rather than exceptions: a truncated gzip stream
or a CSV row the csv module refuses becomes one located reject, and reading goes on where it can.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from kiban.data.rejects import Rejects

__all__ = [
    "TruncatedFile",
    "csv_rows",
    "is_gzip",
    "numbered_lines",
    "open_text",
    "pick_column",
    "row_id",
    "strip_gz",
    "table_header",
]

# A broken compressed stream surfaces as any of these while iterating over lines.
STREAM_ERRORS = (EOFError, OSError, zlib.error)
csv.field_size_limit(64 * 1024 * 1024)  # long protein sequences and mol blocks in one cell are fine


def strip_gz(path: Path) -> str:
    """The file name without a trailing ``.gz``, lower-cased: what format detection looks at."""
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def is_gzip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def open_text(path: str | Path) -> IO[str]:
    """Open a text file, gunzipping it when it is gzip (by content, not name).

    Bytes that are not UTF-8 become U+FFFD rather than an exception: they then fail the
    modality's own checks (a residue, a SMILES) and are reported where they are.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


class TruncatedFile(Exception):
    """Raised by ``numbered_lines`` after the last good line of a stream that breaks off.

    The caller knows what was in progress (a FASTA record, an SDF block) and rejects it.
    """

    def __init__(self, path: str | Path, line: int, error: BaseException) -> None:
        self.location = f"{path}:after line {line}"
        self.detail = (
            f"the file breaks off after line {line} ({type(error).__name__}: {error}); "
            "the records before it were read"
        )
        super().__init__(f"{self.location}: {self.detail}")


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); raises ``TruncatedFile`` where a stream breaks off."""
    number = 0
    with open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                yield number, line.rstrip("\r\n")
        except STREAM_ERRORS as error:
            raise TruncatedFile(path, number, error) from None


def row_fits_header(
    row: list[str], header: list[str], *, record_id: str, location: str, rejects: Rejects
) -> bool:
    """True when a table row has as many fields as its header; otherwise the row is rejected."""
    if len(row) == len(header):
        return True
    rejects.reject(
        id=record_id,
        location=location,
        reason="malformed table row",
        detail=f"the row has {len(row)} fields, the header {len(header)}",
    )
    return False


def csv_rows(path: str | Path, *, delimiter: str, rejects: Rejects) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row ends, fields) for every row, the header included.

    A row the csv module refuses (e.g. a field over the size limit) is a reject, and reading
    continues with the next row.
    """
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                rejects.reject(
                    id=None,
                    location=f"{path}:line {reader.line_num}",
                    reason="malformed table row",
                    detail=f"the csv module cannot read this row: {error}",
                )
                continue
            except STREAM_ERRORS as error:
                rejects.reject(
                    id=None,
                    location=f"{path}:after line {reader.line_num}",
                    reason="truncated or corrupt file",
                    detail=f"the file breaks off after line {reader.line_num} ({type(error).__name__}: "
                    f"{error}); the rows before it were read",
                )
                return
            yield reader.line_num, row


def pick_column(
    header: Sequence[str], *, wanted: str | None, candidates: Sequence[str], what: str, path: Path
) -> int | None:
    """Index of the column named ``wanted`` (an error if absent), else of the first candidate name
    present (case-insensitive), else None.
    """
    lowered = [name.strip().lower() for name in header]
    if wanted is not None:
        if wanted.strip().lower() not in lowered:
            raise ValueError(f"{path}: no {what} column {wanted!r}; columns: {', '.join(header)}")
        return lowered.index(wanted.strip().lower())
    for candidate in candidates:
        if candidate in lowered:
            return lowered.index(candidate)
    return None


def table_header(path: Path) -> list[str]:
    """The first row of a CSV/TSV (by extension), or [] when unreadable; for sniffing a file's kind."""
    delimiter = "\t" if strip_gz(path).endswith(".tsv") else ","
    try:
        with open_text(path) as handle:
            return next(csv.reader(handle, delimiter=delimiter), [])
    except (csv.Error, *STREAM_ERRORS):
        return []


def row_id(row: Sequence[str], index: int | None, path: Path, line: int) -> str:
    """A table row's id: its id column when it has a non-empty one, else ``file:line``."""
    if index is not None and index < len(row) and row[index].strip():
        return row[index].strip()
    return f"{path.name}:{line}"

"""Literature-text readers: JSONL passages, plain-text files and tables with a text column.

* JSONL: one passage a line, ``{"id": ..., "text": ...}`` (other keys ride along in
  ``Record.fields``) or a bare JSON string; a line that is not JSON, or has no non-empty text, is a
  located reject.
* plain text (.txt): passages separated by blank lines; id ``file:line`` of the first line.
* tables (.csv/.tsv) with a ``text`` / ``abstract`` / ``context`` / ``passage`` column.

Items are the passage strings, which the text featurizer (and the LLM's tokenizer) take as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiban.data._io import (
    TruncatedFile,
    csv_rows,
    numbered_lines,
    open_text,
    pick_column,
    row_fits_header,
    row_id,
    strip_gz,
    table_header,
)
from kiban.data.readers import UniqueIds, collector, register_reader
from kiban.data.rejects import Record, Rejects

__all__ = ["first_json_object", "read_text", "read_text_table"]

TEXT_COLUMNS = ("text", "abstract", "passage", "context", "content")


def first_json_object(path: Path) -> Any:
    """The first non-blank line of a JSONL file, parsed; None when it is not JSON (for sniffing)."""
    try:
        with open_text(path) as handle:
            for line in handle:
                if line.strip():
                    return json.loads(line)
    except (ValueError, RecursionError, OSError, EOFError):
        return None
    return None


def _sniff_text_jsonl(path: Path) -> bool:
    first = first_json_object(path)
    return isinstance(first, str) or (isinstance(first, dict) and "text" in first and "messages" not in first)


@register_reader(
    "text",
    suffixes=(".jsonl", ".txt", ".ndjson"),
    description="literature passages: JSONL ({'id', 'text'} or a string a line) or plain text "
    "(blank-line separated)",
    sniff=_sniff_text_jsonl,
)
def read_text(
    path: str | Path, *, text_key: str = "text", rejects: Rejects | None = None
) -> Iterator[Record]:
    """Passages of a text file (one per paragraph, or per line), as ``text`` records."""
    path, rejects = Path(path), collector(rejects)
    if strip_gz(path).endswith(".txt"):
        yield from _read_plain(path, rejects)
    else:
        yield from _read_jsonl(path, text_key, rejects)


def parse_json_line(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, the problem): JSON that is too deeply nested is a problem, not a crash."""
    try:
        return json.loads(text), None
    except ValueError as error:
        return None, f"not valid JSON ({error})"
    except RecursionError:
        return None, "JSON nested too deeply"


def _read_jsonl(path: Path, text_key: str, rejects: Rejects) -> Iterator[Record]:
    ids = UniqueIds()
    try:
        for line, raw in numbered_lines(path):
            if not raw.strip():
                continue
            location = f"{path}:line {line}"
            value, problem = parse_json_line(raw)
            if problem is not None:
                rejects.reject(id=None, location=location, reason="invalid JSON", detail=problem)
                continue
            fields: dict[str, str] = {}
            record_id: Any = None
            if isinstance(value, dict):
                record_id = value.get("id")
                text = value.get(text_key)
                fields = {
                    str(k): v if isinstance(v, str) else json.dumps(v)
                    for k, v in value.items()
                    if k not in ("id", text_key)
                }
            else:
                text = value
            record_id = (
                str(record_id) if record_id is not None and str(record_id).strip() else f"{path.name}:{line}"
            )
            if not isinstance(text, str) or not text.strip():
                what = (
                    f"no string {text_key!r}" if isinstance(value, dict) else f"a JSON {type(value).__name__}"
                )
                rejects.reject(
                    id=record_id,
                    location=location,
                    reason="no text",
                    detail=f"expected a passage ({{'{text_key}': '...'}} or a string), got {what}"
                    + (" that is empty" if isinstance(text, str) else ""),
                )
                continue
            if ids.accept(record_id, location, rejects):
                rejects.accept()
                yield Record(record_id, "text", text, location, fields)
    except TruncatedFile as error:
        rejects.reject(
            id=None, location=error.location, reason="truncated or corrupt file", detail=error.detail
        )


def _read_plain(path: Path, rejects: Rejects) -> Iterator[Record]:
    start, lines = 0, []
    try:
        for line, raw in numbered_lines(path):
            if raw.strip():
                start = start or line
                lines.append(raw.strip())
            elif lines:
                rejects.accept()
                yield Record(f"{path.name}:{start}", "text", " ".join(lines), f"{path}:line {start}")
                start, lines = 0, []
    except TruncatedFile as error:
        rejects.reject(
            id=None, location=error.location, reason="truncated or corrupt file", detail=error.detail
        )
        return
    if lines:
        rejects.accept()
        yield Record(f"{path.name}:{start}", "text", " ".join(lines), f"{path}:line {start}")


def _sniff_text_table(path: Path) -> bool:
    return any(name.strip().lower() in TEXT_COLUMNS for name in table_header(path))


@register_reader(
    "text-table",
    suffixes=(".csv", ".tsv"),
    description="CSV/TSV with a text column (text, abstract, passage, context)",
    sniff=_sniff_text_table,
)
def read_text_table(
    path: str | Path,
    *,
    text_column: str | None = None,
    id_column: str | None = None,
    rejects: Rejects | None = None,
) -> Iterator[Record]:
    """Passages from a column of a CSV/TSV table, as ``text`` records with the other columns."""
    path, rejects, ids = Path(path), collector(rejects), UniqueIds()
    rows = csv_rows(path, delimiter="\t" if strip_gz(path).endswith(".tsv") else ",", rejects=rejects)
    header = next((row for _, row in rows), None)
    if header is None:
        return
    column = pick_column(header, wanted=text_column, candidates=TEXT_COLUMNS, what="text", path=path)
    if column is None:
        raise ValueError(
            f"{path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); columns: {', '.join(header)}"
        )
    id_at = pick_column(
        header, wanted=id_column, candidates=("id", "pmid", "doi", "name"), what="id", path=path
    )
    names = [name.strip() for name in header]
    for line, row in rows:
        location = f"{path}:line {line}"
        record_id = row_id(row, id_at, path, line)
        if not row_fits_header(row, header, record_id=record_id, location=location, rejects=rejects):
            continue
        if not row[column].strip():
            rejects.reject(
                id=record_id, location=location, reason="no text", detail=f"column {names[column]!r} is empty"
            )
        elif ids.accept(record_id, location, rejects):
            rejects.accept()
            fields = {
                name: value for i, (name, value) in enumerate(zip(names, row, strict=True)) if i != column
            }
            yield Record(record_id, "text", row[column], location, fields)

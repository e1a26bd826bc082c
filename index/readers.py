"""Readers: files -> ``Document`` records, one reader per format, chosen by file suffix.

Formats: plain text and Markdown (sections at ``#`` headings), PubMed / PMC XML (JATS articles and
PubMed ``PubmedArticleSet`` records; sections from ``<sec>`` titles and labelled abstract parts),
PDF (pypdf; one section per page), and tables of abstracts (CSV, TSV, JSON Lines; one document per
row). A reader yields a ``Document`` or a ``Rejected`` (with the reason) for every item it reads,
so what was read always equals what was accepted plus what was rejected.

    for item in read_path("papers/"):          # a file or a folder (searched recursively)
        ...
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kiban.index.documents import Document, Section

__all__ = ["Rejected", "TableColumns", "list_formats", "read_path", "register_reader"]


@dataclass(frozen=True)
class Rejected:
    """An item that could not be read: where it is (a path, ``path#row=N``) and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class TableColumns:
    """Column names of a table of abstracts; None picks the first present of the usual names."""

    id: str | None = None
    title: str | None = None
    text: str | None = None


_ID_COLUMNS = ("id", "doc_id", "pmid", "pmcid", "doi")
_TITLE_COLUMNS = ("title", "article_title")
_TEXT_COLUMNS = ("abstract", "text", "context", "body", "content")

Reader = Callable[[Path, TableColumns], Iterator["Document | Rejected"]]
_READERS: dict[str, tuple[str, Reader]] = {}


def register_reader(name: str, *suffixes: str) -> Callable[[Reader], Reader]:
    """Register ``fn(path, columns)`` as the reader of files ending in ``suffixes`` (lower case)."""

    def wrap(fn: Reader) -> Reader:
        for suffix in suffixes:
            _READERS[suffix] = (name, fn)
        return fn

    return wrap


def list_formats() -> dict[str, str]:
    """Suffix -> format name, for help texts and error messages."""
    return {suffix: name for suffix, (name, _) in sorted(_READERS.items())}


def read_path(path: str | Path, *, columns: TableColumns | None = None) -> Iterator[Document | Rejected]:
    """Every item under ``path`` (a file, or a folder searched recursively for known suffixes)."""
    path = Path(path)
    columns = columns or TableColumns()
    if path.is_dir():
        # every file counts (an unknown format is rejected, not skipped); hidden files and folders do not
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        for file in files:
            yield from _read_file(file, columns)
    elif path.is_file():
        yield from _read_file(path, columns)
    else:
        yield Rejected(str(path), "no such file or folder")


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _read_file(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    entry = _READERS.get(_suffix(path))
    if entry is None:
        known = ", ".join(sorted(_READERS))
        yield Rejected(str(path), f"unknown format {path.suffix or '(no suffix)'!r}; known suffixes: {known}")
        return
    try:
        yield from entry[1](path, columns)
    except (OSError, UnicodeDecodeError, ValueError, ElementTree.ParseError) as error:
        yield Rejected(str(path), f"unreadable {entry[0]} file: {error}")


def _document(*, title: str, source: str, text: str, sections: list[Section]) -> Document | Rejected:
    if not text.strip():
        return Rejected(source, "no text")
    return Document(title=title.strip() or Path(source.split("#")[0]).stem, source=source, text=text,
                    sections=tuple(s for s in sections if s.end > s.start))


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Plain text and Markdown


@register_reader("text", ".txt", ".text")
def _plain(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    text = _read_text(path)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    title = first if len(first) <= 200 else path.stem
    yield _document(title=title, source=str(path), text=text, sections=[Section("", 0, len(text))])


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


@register_reader("markdown", ".md", ".markdown")
def _markdown(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    text = _read_text(path)
    headings = list(_HEADING.finditer(text))
    title = next((m.group(2) for m in headings if len(m.group(1)) == 1), path.stem)
    sections, start, name = [], 0, ""
    for match in headings:
        sections.append(Section(name, start, match.start()))
        start, name = match.start(), match.group(2).strip()
    sections.append(Section(name, start, len(text)))
    yield _document(title=title, source=str(path), text=text, sections=sections)


# ----------------------------------------------------------------------------------------------
# PubMed / PMC XML


def _plain_text_of(element: ElementTree.Element | None) -> str:
    if element is None:
        return ""
    return re.sub(r"\s+", " ", "".join(element.itertext())).strip()


class _Builder:
    """Text assembled from named parts, remembering each part's range."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.sections: list[Section] = []
        self.length = 0

    def add(self, title: str, text: str) -> None:
        if not text:
            return
        if self.parts:
            self.parts.append("\n\n")
            self.length += 2
        self.sections.append(Section(title, self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _strip_namespaces(root: ElementTree.Element) -> None:
    for element in root.iter():
        if isinstance(element.tag, str):
            element.tag = _local(element.tag)


def _jats_sections(builder: _Builder, sec: ElementTree.Element, prefix: str) -> None:
    title = _plain_text_of(sec.find("title"))
    name = f"{prefix} / {title}" if prefix and title else (title or prefix)
    paragraphs = [_plain_text_of(p) for p in sec if p.tag == "p"]
    builder.add(name, "\n".join(p for p in paragraphs if p))
    for child in sec.findall("sec"):
        _jats_sections(builder, child, name)


@register_reader("PubMed/PMC XML", ".xml", ".nxml")
def _xml(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    # ElementTree resolves no external entities; expat >= 2.4.1 caps entity expansion
    root = ElementTree.parse(path).getroot()
    _strip_namespaces(root)
    if root.tag in ("PubmedArticleSet", "PubmedArticle"):
        articles = [root] if root.tag == "PubmedArticle" else root.findall("PubmedArticle")
        if not articles:
            yield Rejected(str(path), "a PubmedArticleSet without any PubmedArticle")
        for n, article in enumerate(articles):
            builder = _Builder()
            for part in article.iter("AbstractText"):
                builder.add(part.get("Label", "Abstract").strip().capitalize(), _plain_text_of(part))
            pmid = _plain_text_of(article.find(".//PMID"))
            source = f"{path}#pmid={pmid}" if pmid else f"{path}#article={n}"
            title = _plain_text_of(article.find(".//ArticleTitle"))
            yield _document(title=title, source=source, text=builder.text, sections=builder.sections)
        return
    article = root if root.tag == "article" else root.find(".//article")
    if article is None:
        yield Rejected(str(path), f"neither a JATS <article> nor a PubmedArticleSet (root element <{root.tag}>)")
        return
    builder = _Builder()
    for abstract in article.findall("front/article-meta/abstract"):
        secs = abstract.findall("sec")
        if secs:
            for sec in secs:
                _jats_sections(builder, sec, "Abstract")
        else:
            builder.add("Abstract", "\n".join(_plain_text_of(p) for p in abstract.iter("p")))
    body = article.find("body")
    if body is not None:
        loose = [_plain_text_of(p) for p in body if p.tag == "p"]
        builder.add("", "\n".join(p for p in loose if p))
        for sec in body.findall("sec"):
            _jats_sections(builder, sec, "")
    title = _plain_text_of(article.find("front/article-meta/title-group/article-title"))
    yield _document(title=title, source=str(path), text=builder.text, sections=builder.sections)


# ----------------------------------------------------------------------------------------------
# PDF


@register_reader("PDF", ".pdf")
def _pdf(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            yield Rejected(str(path), "the PDF is encrypted")
            return
        builder = _Builder()
        for n, page in enumerate(reader.pages, 1):
            builder.add(f"page {n}", (page.extract_text() or "").strip())
        title = (reader.metadata.title if reader.metadata else None) or ""
    except PdfReadError as error:
        yield Rejected(str(path), f"unreadable PDF: {error}")
        return
    if not builder.text.strip():
        yield Rejected(str(path), "the PDF has no extractable text (a scanned PDF needs OCR first)")
        return
    if not title.strip():
        title = next((line.strip() for line in builder.text.splitlines() if line.strip()), "")[:200]
    yield _document(title=title, source=str(path), text=builder.text, sections=builder.sections)


# ----------------------------------------------------------------------------------------------
# Tables of abstracts


def _pick(names: list[str], wanted: str | None, usual: tuple[str, ...], *, what: str) -> str | None:
    lower = {name.lower(): name for name in names}
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    return next((lower[name] for name in usual if name in lower), None)


def _rows(path: Path, columns: TableColumns, rows: Iterator[tuple[int, dict | str]],
          names: list[str]) -> Iterator[Document | Rejected]:
    text_column = _pick(names, columns.text, _TEXT_COLUMNS, what="text")
    if text_column is None:
        raise ValueError(
            f"no text column: name one with --text-column, or use one of {', '.join(_TEXT_COLUMNS)} "
            f"(columns: {', '.join(names) or 'none'})"
        )
    id_column = _pick(names, columns.id, _ID_COLUMNS, what="id")
    title_column = _pick(names, columns.title, _TITLE_COLUMNS, what="title")
    for number, row in rows:
        if isinstance(row, str):  # a line that is not a JSON object: the reason
            yield Rejected(f"{path}#row={number}", row)
            continue
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            yield Rejected(f"{path}#row={number}", f"no text in column {text_column!r}")
            continue
        ident = row.get(id_column) if id_column else None
        source = f"{path}#{id_column}={ident}" if ident not in (None, "") else f"{path}#row={number}"
        title = row.get(title_column) if title_column else None
        title = title if isinstance(title, str) and title.strip() else (f"{id_column} {ident}" if ident else "")
        yield _document(title=title, source=source, text=text, sections=[Section("Abstract", 0, len(text))])


@register_reader("CSV/TSV table of abstracts", ".csv", ".tsv")
def _csv(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    csv.field_size_limit(2**31 - 1)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if _suffix(path) == ".tsv" else ",")
        names = list(reader.fieldnames or [])
        rows = ((n, row) for n, row in enumerate(reader, 1))
        yield from _rows(path, columns, rows, names)


@register_reader("JSON Lines of abstracts", ".jsonl", ".ndjson")
def _jsonl(path: Path, columns: TableColumns) -> Iterator[Document | Rejected]:
    def rows() -> Iterator[tuple[int, dict | str]]:
        with path.open(encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield n, f"not JSON: {error}"
                    continue
                yield n, row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"

    names: list[str] = []
    for _, row in rows():  # the first object's keys name the columns
        if isinstance(row, dict):
            names = list(row)
            break
    yield from _rows(path, columns, rows(), names)

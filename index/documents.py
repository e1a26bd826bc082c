"""Documents and chunks: what ``kiban index`` stores, and how a document's text is cut into chunks.

A ``Document`` is one paper, protocol, note or abstract: its whole text, its sections as character
ranges of that text, where it came from, and the access groups that may read it. Its id is derived
from its content (``doc-`` + the first 16 hex digits of the SHA-256 of its text), so the same text
added twice is one document. A ``Chunk`` is a passage of one section with its character offsets
into the document's text, so a citation can point at the exact span it came from.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["Chunk", "ChunkingConfig", "Document", "Section", "check_groups", "chunk_document", "content_hash"]

# Group names travel through SQL arrays, RLS settings and key files: a safe, comma-free alphabet.
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def check_groups(groups: Sequence[str], *, where: str = "groups") -> tuple[str, ...]:
    """``groups`` as a sorted tuple without repeats; ValueError naming ``where`` for a bad name.

    A group name is 1-64 characters: letters, digits and ``_ . : -``, starting with a letter or digit.
    """
    names = []
    for name in groups:
        if not isinstance(name, str) or not _GROUP.fullmatch(name):
            raise ValueError(
                f"{where}: {name!r} is not a valid group name (1-64 letters, digits, '_', '.', ':' or '-', "
                "starting with a letter or digit)"
            )
        names.append(name)
    return tuple(sorted(set(names)))


def content_hash(text: str) -> str:
    """SHA-256 of the UTF-8 text, in hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Section:
    """A named character range ``[start, end)`` of a document's text (title '' for untitled text)."""

    title: str
    start: int
    end: int


@dataclass(frozen=True)
class Document:
    """One document: its full text, sections over it, origin and access groups.

    source: where it was read from (a path, ``path#row=N`` for a table row, ``path#article=N``).
    groups: the access groups that may read it (at least one).
    """

    title: str
    source: str
    text: str
    sections: tuple[Section, ...]
    groups: tuple[str, ...] = ()
    content_hash: str = field(init=False)
    doc_id: str = field(init=False)

    def __post_init__(self) -> None:
        """Derive the content hash and id; check that sections lie inside the text."""
        digest = content_hash(self.text)
        object.__setattr__(self, "content_hash", digest)
        object.__setattr__(self, "doc_id", f"doc-{digest[:16]}")
        for section in self.sections:
            if not 0 <= section.start <= section.end <= len(self.text):
                raise ValueError(f"section {section.title!r} [{section.start}, {section.end}) lies outside the text")


@dataclass(frozen=True)
class Chunk:
    """A passage of a document: ``text == document.text[start:end]``; ``seq`` numbers it within the document."""

    doc_id: str
    seq: int
    section: str
    start: int
    end: int
    text: str

    @property
    def chunk_id(self) -> str:
        """``<doc_id>:<seq>``, stable for as long as the document and the chunking are."""
        return f"{self.doc_id}:{self.seq}"


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut: at most ``max_chars`` per chunk, consecutive chunks sharing ``overlap_chars``.

    1,000 characters is about 200-250 word pieces, inside what MiniLM reads whole (256, trained on 128).
    Cuts fall at a sentence end where there is one in the last third of the window, else at a space.
    """

    max_chars: int = 1000
    overlap_chars: int = 150

    def __post_init__(self) -> None:
        """Refuse sizes that cannot make progress."""
        if self.max_chars < 50 or not 0 <= self.overlap_chars < self.max_chars // 2:
            raise ValueError("chunking needs max_chars >= 50 and 0 <= overlap_chars < max_chars / 2")


_SENTENCE_END = re.compile(r"[.!?;]\s")


def _cut(text: str, start: int, end: int, config: ChunkingConfig) -> Iterator[tuple[int, int]]:
    """Character ranges covering ``text[start:end]``, each at most ``max_chars``, with whitespace trimmed."""
    position = start
    while position < end:
        while position < end and text[position].isspace():
            position += 1
        if position >= end:
            return
        stop = min(position + config.max_chars, end)
        if stop < end:
            window = text[position:stop]
            floor = len(window) * 2 // 3
            ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() > floor]
            if ends:
                stop = position + ends[-1]
            else:
                space = window.rfind(" ", floor)
                if space > 0:
                    stop = position + space
        trimmed = stop
        while trimmed > position and text[trimmed - 1].isspace():
            trimmed -= 1
        yield position, trimmed
        if stop >= end:
            return
        # step back by the overlap, to a word start, but always forward of the previous start
        back = max(stop - config.overlap_chars, position + 1)
        while back < stop and not text[back - 1].isspace():
            back += 1
        position = back


def chunk_document(document: Document, config: ChunkingConfig | None = None) -> list[Chunk]:
    """The chunks of ``document``, section by section (a chunk never spans two sections)."""
    config = config or ChunkingConfig()
    sections = document.sections or (Section("", 0, len(document.text)),)
    chunks = []
    for section in sections:
        for start, end in _cut(document.text, section.start, section.end, config):
            chunks.append(
                Chunk(
                    doc_id=document.doc_id,
                    seq=len(chunks),
                    section=section.title,
                    start=start,
                    end=end,
                    text=document.text[start:end],
                )
            )
    return chunks

"""The store interface: one contract, two implementations (embedded SQLite, PostgreSQL + pgvector).

Every read takes the caller's access groups and applies them inside the query itself, before any
ranking or limit: a dense or lexical search ranks only the chunks of documents that share a group
with the caller, so a top-k is never cut from an unfiltered list and then filtered. Writes (add,
regroup, remove) are transactions: a reader sees a document whole or not at all.

    store = open_store("runs/index")                      # embedded: a folder with index.sqlite
    store = open_store("postgresql://user@host/db")       # shared: PostgreSQL with pgvector
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kiban.index.documents import Chunk, Document

__all__ = [
    "DocumentInfo",
    "Store",
    "StoredChunk",
    "list_stores",
    "open_store",
    "query_terms",
]


@dataclass(frozen=True)
class DocumentInfo:
    """What the store knows of one document (no text)."""

    doc_id: str
    title: str
    source: str
    groups: tuple[str, ...]
    chunks: int
    chars: int


@dataclass(frozen=True)
class StoredChunk:
    """One chunk as stored, with its document's title and source."""

    chunk_id: str
    doc_id: str
    title: str
    source: str
    section: str
    start: int
    end: int
    text: str


class Store(Protocol):
    """What the retriever and ``kiban index`` need from a store; see ``SqliteStore`` and ``PostgresStore``."""

    dim: int

    def add(self, document: Document, chunks: Sequence[Chunk], vectors: np.ndarray) -> str:
        """Store a document with its chunks and their vectors [len(chunks), dim].

        Returns "added", or "unchanged" when the same text is stored with the same groups, or
        "regrouped" when it is stored with other groups (which are replaced by the document's).
        """
        ...

    def find(self, content_hash: str) -> DocumentInfo | None:
        """The stored document with this content hash, if any."""
        ...

    def remove(self, doc_id: str) -> bool:
        """Delete a document and its chunks; False when there was none."""
        ...

    def documents(self, *, groups: Sequence[str] | None) -> list[DocumentInfo]:
        """Documents readable by ``groups`` (None: all of them, for the index's own administration)."""
        ...

    def dense(self, vector: np.ndarray, *, groups: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` readable chunks nearest ``vector``: (chunk id, cosine similarity), best first."""
        ...

    def lexical(self, query: str, *, groups: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` readable chunks best matching ``query``'s words: (chunk id, score), best first."""
        ...

    def chunks(self, chunk_ids: Sequence[str], *, groups: Sequence[str]) -> dict[str, StoredChunk]:
        """The readable chunks among ``chunk_ids``, by id (unreadable or unknown ids are absent)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# location scheme -> (module, class), imported on first use ("" is a local folder)
_STORES: dict[str, tuple[str, str]] = {
    "": ("kiban.index.sqlite", "SqliteStore"),
    "postgresql": ("kiban.index.postgres", "PostgresStore"),
}


def list_stores() -> list[str]:
    """The location schemes a store exists for ("" is the embedded store's folder)."""
    return sorted(_STORES)


def open_store(location: str, *, dim: int = 384, embedder: str = "all-MiniLM-L6-v2", create: bool = True) -> Store:
    """The store at ``location``: a folder (embedded SQLite) or a ``postgresql://`` URL.

    ``dim`` and ``embedder`` are recorded when the store is created and checked when it is opened,
    so vectors of another model never mix with the stored ones. ``create=False`` refuses a missing store.
    """
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme not in _STORES:
        raise ValueError(f"index location {location!r}: unknown scheme {scheme!r} (a folder, or postgresql://...)")
    module, name = _STORES[scheme]
    cls = getattr(importlib.import_module(module), name)
    return cls(location, dim=dim, embedder=embedder, create=create)


# Words too common to help a lexical match; dropping them keeps an OR-query from touching every row.
_STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does for from had has have how in into is it its "
    "may might no not of on or should than that the their them then there these they this those to was "
    "were what when where whether which while who whom why will with would".split()
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def query_terms(query: str, *, limit: int = 64) -> list[str]:
    """The distinct lower-case words of ``query`` (letters and digits only), stopwords dropped."""
    terms = []
    for word in _WORD.findall(query.lower()):
        if word not in _STOPWORDS and word not in terms:
            terms.append(word)
    return terms[:limit]

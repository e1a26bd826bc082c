"""Document index and retrieval: grounded answers over private literature, with access groups.

    from kiban.index import Indexer, open_store

    indexer = Indexer(open_store("runs/index"))
    report = indexer.add_paths(["papers/"], groups=["lab-a"])       # counts: read = accepted + rejected
    hits = indexer.retriever().search("BRCA1 repair", groups=["lab-a"], k=5)

``documents.py`` (documents, chunks, chunking), ``readers.py`` (text, Markdown, PubMed/PMC XML, PDF,
tables of abstracts), ``store.py`` (the store contract), ``sqlite.py`` (embedded default),
``postgres.py`` (PostgreSQL + pgvector, row-level security), ``retrieval.py`` (hybrid search with
reciprocal rank fusion, optional cross-encoder), ``ingest.py`` (the ``kiban index add`` pipeline),
``cli.py`` (``kiban index``). Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AddReport",
    "Chunk",
    "ChunkingConfig",
    "CrossEncoderReranker",
    "Document",
    "DocumentInfo",
    "Hit",
    "Indexer",
    "Rejected",
    "Retriever",
    "Section",
    "SentenceEmbedder",
    "Store",
    "StoredChunk",
    "TableColumns",
    "check_groups",
    "chunk_document",
    "open_store",
    "read_path",
    "reciprocal_rank_fusion",
]

_HOMES = {
    "Chunk": "documents",
    "ChunkingConfig": "documents",
    "Document": "documents",
    "Section": "documents",
    "check_groups": "documents",
    "chunk_document": "documents",
    "Rejected": "readers",
    "TableColumns": "readers",
    "read_path": "readers",
    "DocumentInfo": "store",
    "Store": "store",
    "StoredChunk": "store",
    "open_store": "store",
    "CrossEncoderReranker": "retrieval",
    "Hit": "retrieval",
    "Retriever": "retrieval",
    "reciprocal_rank_fusion": "retrieval",
    "SentenceEmbedder": "embedding",
    "AddReport": "ingest",
    "Indexer": "ingest",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kiban.index' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kiban.index.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)

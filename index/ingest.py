"""The ``kiban index add`` pipeline: read -> chunk -> embed -> store, with counts that add up.

Every item read (a file, a table row, an article of a PubMed XML file) ends in exactly one of:
added, unchanged (the same text is already stored with the same groups), regrouped (the same text
is stored; its groups are replaced by the new ones), or rejected (with the reason, also appended
to the rejects file as JSON Lines). So ``read == added + unchanged + regrouped + rejected``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kiban.index.documents import ChunkingConfig, Document, check_groups, chunk_document
from kiban.index.readers import Rejected, TableColumns, read_path
from kiban.index.store import Store

__all__ = ["AddReport", "Indexer"]


@dataclass
class AddReport:
    """Counts of one ``add``: read = added + unchanged + regrouped + rejected."""

    read: int = 0
    added: int = 0
    unchanged: int = 0
    regrouped: int = 0
    rejected: int = 0
    chunks: int = 0
    rejects: list[Rejected] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The counts as plain values (no rejects, no ids)."""
        return {k: v for k, v in asdict(self).items() if k not in ("rejects", "doc_ids")}


class Indexer:
    """Adds documents to a store; ``retriever()`` searches it with the same embedder."""

    def __init__(self, store: Store, *, embedder=None, chunking: ChunkingConfig | None = None,
                 batch_chunks: int = 64) -> None:
        """``embedder`` defaults to the packaged MiniLM (``SentenceEmbedder``), built on first use."""
        if embedder is None:
            from kiban.index.embedding import SentenceEmbedder

            embedder = SentenceEmbedder()
        self.store, self.embedder = store, embedder
        self.chunking = chunking or ChunkingConfig()
        self.batch_chunks = batch_chunks

    def add_paths(self, paths: Sequence[str | Path], *, groups: Sequence[str], columns: TableColumns | None = None,
                  rejects_path: str | Path | None = None) -> AddReport:
        """Read every file under ``paths`` and add its documents with access ``groups``."""
        groups = check_groups(groups)
        if not groups:
            raise ValueError("--groups: every document needs at least one access group")
        items = (item for path in paths for item in read_path(path, columns=columns))
        return self.add(items, groups=groups, rejects_path=rejects_path)

    def add(self, items: Iterable[Document | Rejected], *, groups: Sequence[str],
            rejects_path: str | Path | None = None) -> AddReport:
        """Add documents (given ``groups`` replace theirs) and count rejects; see the module docstring."""
        groups = check_groups(groups)
        report = AddReport()
        pending: list[tuple[Document, list]] = []

        def flush() -> None:
            texts = [_passage(doc, chunk) for doc, chunks in pending for chunk in chunks]
            vectors = self.embedder.embed(texts)
            at = 0
            for doc, chunks in pending:
                outcome = self.store.add(doc, chunks, vectors[at : at + len(chunks)])
                at += len(chunks)
                setattr(report, outcome, getattr(report, outcome) + 1)
                report.doc_ids.append(doc.doc_id)
                if outcome == "added":
                    report.chunks += len(chunks)
            pending.clear()

        for item in items:
            report.read += 1
            if isinstance(item, Rejected):
                report.rejected += 1
                report.rejects.append(item)
                continue
            document = replace(item, groups=groups) if groups else item
            if self.store.find(document.content_hash) is not None:
                outcome = self.store.add(document, [], self.embedder.embed([])[:0])
                setattr(report, outcome, getattr(report, outcome) + 1)
                report.doc_ids.append(document.doc_id)
                continue
            pending.append((document, chunk_document(document, self.chunking)))
            if sum(len(chunks) for _, chunks in pending) >= self.batch_chunks:
                flush()
        if pending:
            flush()
        if report.rejects and rejects_path is not None:
            path = Path(rejects_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                for reject in report.rejects:
                    handle.write(json.dumps({"source": reject.source, "reason": reject.reason, "time": time.time()}) + "\n")
        return report

    def retriever(self, **options):
        """A ``Retriever`` over this store and embedder."""
        from kiban.index.retrieval import Retriever

        return Retriever(self.store, self.embedder.embed, **options)


def _passage(document: Document, chunk) -> str:
    """What is embedded for a chunk: the document's title, then the chunk's text."""
    return f"{document.title}\n{chunk.text}" if document.title else chunk.text

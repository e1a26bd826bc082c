"""Hybrid retrieval: dense (MiniLM) and lexical (BM25 / full text) searches fused by reciprocal rank.

``Retriever.search(query, groups=..., k=...)`` runs both searches in the store, each already
limited to the caller's groups, fuses the two ranked lists with reciprocal rank fusion
(Cormack, Clarke & Buettcher 2009: score = sum over lists of 1 / (rrf_k + rank), rrf_k = 60), and,
where a cross-encoder is configured, re-scores the fused candidates with it. Modes ``dense`` and
``lexical`` return one list alone (for comparison, and for clients that want exact-word matching).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kiban.index.documents import check_groups
from kiban.index.store import Store, StoredChunk

__all__ = ["CrossEncoderReranker", "Hit", "MODES", "Retriever", "reciprocal_rank_fusion"]

MODES = ("hybrid", "dense", "lexical")


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: where it is, its text and its score under the search's mode.

    ranks: the chunk's 1-based rank in each list it was found in ("dense", "lexical", "rerank").
    """

    chunk: StoredChunk
    score: float
    ranks: dict[str, int] = field(default_factory=dict)

    def to_dict(self, *, text: bool = True) -> dict:
        """Plain values for JSON (``text=False`` leaves the passage out)."""
        chunk = self.chunk
        row = {
            "doc_id": chunk.doc_id,
            "chunk_id": chunk.chunk_id,
            "title": chunk.title,
            "section": chunk.section,
            "source": chunk.source,
            "start": chunk.start,
            "end": chunk.end,
            "score": round(self.score, 6),
            "ranks": dict(self.ranks),
        }
        if text:
            row["text"] = chunk.text
        return row


def reciprocal_rank_fusion(lists: dict[str, Sequence[str]], *, rrf_k: int = 60) -> list[tuple[str, float, dict]]:
    """Fuse ranked id lists: (id, sum of 1/(rrf_k + rank), {list name: rank}), best first; ties by first appearance."""
    scores: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    for name, ids in lists.items():
        for rank, ident in enumerate(ids, 1):
            scores[ident] = scores.get(ident, 0.0) + 1.0 / (rrf_k + rank)
            ranks.setdefault(ident, {})[name] = rank
    order = sorted(scores, key=lambda ident: -scores[ident])  # stable: dict order breaks ties
    return [(ident, scores[ident], ranks[ident]) for ident in order]


class CrossEncoderReranker:
    """A local cross-encoder (a Hugging Face sequence-classification model folder) scoring (query, passage).

    Higher logits mean more relevant (as ms-marco cross-encoders are trained); the first logit is used.
    """

    def __init__(self, model_path: str, *, max_length: int = 512, batch_size: int = 16) -> None:
        """Load the model and tokenizer from ``model_path`` (local files only)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, local_files_only=True).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self._lock = threading.Lock()

    def scores(self, query: str, passages: Sequence[str]) -> list[float]:
        """One relevance score per passage."""
        import torch

        out: list[float] = []
        with self._lock, torch.no_grad():
            for start in range(0, len(passages), self.batch_size):
                batch = list(passages[start : start + self.batch_size])
                encoded = self.tokenizer(
                    [query] * len(batch), batch, truncation=True, max_length=self.max_length,
                    padding=True, return_tensors="pt",
                )
                logits = self.model(**encoded).logits
                out.extend(logits[:, 0].float().tolist())
        return out


class Retriever:
    """Searches over one store with one embedder (and optionally a re-ranker); safe to share between threads."""

    def __init__(
        self,
        store: Store,
        embed: Callable[[Sequence[str]], object],
        *,
        reranker: CrossEncoderReranker | None = None,
        candidates: int = 50,
        rrf_k: int = 60,
    ) -> None:
        """``embed(texts)`` gives vectors [N, dim]; each list contributes up to ``candidates`` chunks."""
        self.store, self.embed, self.reranker = store, embed, reranker
        self.candidates, self.rrf_k = candidates, rrf_k

    def search(self, query: str, *, groups: Sequence[str], k: int = 10, mode: str = "hybrid") -> list[Hit]:
        """The ``k`` best chunks for ``query`` among documents readable by ``groups``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the query is empty")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        groups = check_groups(groups)
        if not groups:
            return []
        depth = max(k, self.candidates)
        found: dict[str, list[tuple[str, float]]] = {}
        if mode in ("hybrid", "dense"):
            found["dense"] = self.store.dense(self.embed([query])[0], groups=groups, k=depth)
        if mode in ("hybrid", "lexical"):
            found["lexical"] = self.store.lexical(query, groups=groups, k=depth)
        if mode == "hybrid":
            lists = {name: [ident for ident, _ in rows] for name, rows in found.items()}
            fused = reciprocal_rank_fusion(lists, rrf_k=self.rrf_k)
        else:
            rows = found[mode]
            fused = [(ident, score, {mode: rank}) for rank, (ident, score) in enumerate(rows, 1)]
        if self.reranker is None:
            fused = fused[:k]
        chunks = self.store.chunks([ident for ident, _, _ in fused], groups=groups)
        hits = [Hit(chunks[ident], score, ranks) for ident, score, ranks in fused if ident in chunks]
        if self.reranker is not None and hits:
            rescored = self.reranker.scores(query, [hit.chunk.text for hit in hits])
            order = sorted(range(len(hits)), key=lambda i: -rescored[i])[:k]
            hits = [
                Hit(hits[i].chunk, rescored[i], {**hits[i].ranks, "rerank": n}) for n, i in enumerate(order, 1)
            ]
        return hits

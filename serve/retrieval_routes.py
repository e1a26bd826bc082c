"""Document search over HTTP, and chat answers grounded in the caller's documents.

With ``kiban serve --index DIR_OR_URL``: ``POST /v1/search`` (passages, best first),
``GET /v1/documents`` (what the caller may read), and the chat request option ``retrieval``
(``ground_chat``): the last user message is searched, the passages go before the conversation as
numbered sources, and the answer ends with the list of sources and carries ``citations``.

Every read takes the groups of the caller's API key (``serve/auth.py``) into the store's query
(``kiban.index.store``); nothing here filters results after the fact. The store is read afresh on
every request, so documents added or removed with ``kiban index`` count from the next request.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from kiban.encoders.base import list_encoders
from kiban.serve.auth import ANONYMOUS, Principal
from kiban.serve.decode import RequestError
from kiban.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    Citation,
    DocumentEntry,
    DocumentList,
    SearchHit,
    SearchRequest,
    SearchResponse,
    TextPart,
    error_responses,
)
from kiban.serve.settings import ServeSettings

__all__ = ["Grounding", "RetrievalService", "add_retrieval_routes", "ground_chat"]

log = logging.getLogger(__name__)

_ERRORS = error_responses(400, 401, 413, 422, 429)


class RetrievalService:
    """The server's index: store, MiniLM embedder and optional re-ranker, built once and shared by threads."""

    def __init__(self, location: str, *, reranker: str | None = None) -> None:
        """Open the store at ``location`` now (a wrong location fails at start); the models load on first use."""
        from kiban.index.embedding import SentenceEmbedder
        from kiban.index.store import open_store

        self.store = open_store(location, create=False)
        self.embedder = SentenceEmbedder()
        self.reranker_path = reranker
        self._retriever = None
        self._lock = threading.Lock()

    def retriever(self):
        """The ``Retriever`` (building the re-ranker on first use)."""
        if self._retriever is None:
            with self._lock:
                if self._retriever is None:
                    from kiban.index.retrieval import CrossEncoderReranker, Retriever

                    reranker = CrossEncoderReranker(self.reranker_path) if self.reranker_path else None
                    self._retriever = Retriever(self.store, self.embedder.embed, reranker=reranker)
        return self._retriever

    def search(self, query: str, *, groups: tuple[str, ...], k: int, mode: str):
        """Hits readable by ``groups``; an empty query is a 422."""
        try:
            return self.retriever().search(query, groups=groups, k=k, mode=mode)
        except ValueError as error:
            raise RequestError(f"query: {error}", param="query") from None


def _principal(request: Request) -> Principal:
    return getattr(request.state, "principal", ANONYMOUS)


def _service(request: Request, *, param: str) -> RetrievalService:
    service = getattr(request.app.state, "retrieval", None)
    if service is None:
        raise RequestError(
            f"{param}: this server has no document index (start it with 'kiban serve ... --index DIR_OR_URL')",
            param=param,
            code="no_index",
        )
    return service


def add_retrieval_routes(app: FastAPI, settings: ServeSettings) -> None:
    """With ``settings.index``: open the index and mount ``/v1/search`` and ``/v1/documents``."""
    app.state.retrieval = None
    if not settings.index:  # no index: no routes (404), and chat 'retrieval' is a 422 that says why
        return
    # the models load on the first search (a few seconds), not beside the engine's own loading
    app.state.retrieval = RetrievalService(settings.index, reranker=settings.reranker)

    @app.post("/v1/search", response_model=SearchResponse, responses=_ERRORS, tags=["retrieval"])
    async def search(body: SearchRequest, request: Request) -> SearchResponse:
        """Passages of the documents the caller's key may read, best first."""
        service = _service(request, param="query")
        groups = _principal(request).groups
        hits = await run_in_threadpool(service.search, body.query, groups=groups, k=body.k, mode=body.mode)
        return SearchResponse(data=[SearchHit(**hit.to_dict()) for hit in hits])

    @app.get("/v1/documents", response_model=DocumentList, responses=_ERRORS, tags=["retrieval"])
    async def documents(request: Request) -> DocumentList:
        """The documents the caller's key may read (each with the caller's groups it is in)."""
        service = _service(request, param="documents")
        groups = _principal(request).groups
        infos = await run_in_threadpool(service.store.documents, groups=groups) if groups else []
        return DocumentList(
            data=[
                DocumentEntry(doc_id=i.doc_id, title=i.title, source=i.source, groups=list(i.groups),
                              chunks=i.chunks, chars=i.chars)
                for i in infos
            ]
        )


# ----------------------------------------------------------------------------------------------
# Grounded chat


@dataclass
class Grounding:
    """A chat request with its sources put in, and how to cite them in the answer."""

    body: ChatCompletionRequest
    citations: list[Citation] = field(default_factory=list)

    def cite(self, answer: str) -> str:
        """The answer followed by its numbered sources."""
        if not self.citations:
            return f"{answer}\n\nSources: none found in the documents you may read."
        lines = [
            f"[{c.index}] {c.title}" + (f", {c.section}" if c.section else "")
            + f" ({c.doc_id}, characters {c.start}-{c.end})"
            for c in self.citations
        ]
        return answer + "\n\nSources:\n" + "\n".join(lines)


def _tags() -> re.Pattern:
    return re.compile("<(" + "|".join(map(re.escape, sorted(list_encoders()))) + ")>")


_TAGS = _tags()


def _query(body: ChatCompletionRequest) -> str:
    """The text of the last user message."""
    for message in reversed(body.messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        return " ".join(part.text for part in message.content or [] if isinstance(part, TextPart))
    return ""


async def ground_chat(request: Request, body: ChatCompletionRequest) -> Grounding | None:
    """None without ``retrieval``; else the request with the caller's best passages as numbered sources."""
    if body.retrieval is None:
        return None
    service = _service(request, param="retrieval")
    if body.stream:
        raise RequestError(
            "retrieval with stream: true is not served yet; send stream: false", param="retrieval",
            code="unsupported_value",
        )
    query = _query(body)
    if not query.strip():
        raise RequestError("retrieval needs a user message with text to search for", param="messages")
    options = body.retrieval
    hits = await run_in_threadpool(
        service.search, query, groups=_principal(request).groups, k=options.k, mode=options.mode
    )
    citations = [
        Citation(index=n, doc_id=h.chunk.doc_id, chunk_id=h.chunk.chunk_id, title=h.chunk.title,
                 section=h.chunk.section, source=h.chunk.source, start=h.chunk.start, end=h.chunk.end,
                 score=h.score)
        for n, h in enumerate(hits, 1)
    ]
    if hits:
        # a document's text may hold a placeholder tag; the model reads it as plain text instead
        sources = "\n\n".join(
            f"[{n}] {h.chunk.title}" + (f" ({h.chunk.section})" if h.chunk.section else "")
            + f"\n{_TAGS.sub(lambda m: f'‹{m.group(1)}›', h.chunk.text)}"
            for n, h in enumerate(hits, 1)
        )
        context = ("Answer the question from the numbered sources below, and cite the sources you use "
                   f"as [1], [2], ....\n\n{sources}")
    else:
        context = ("No passage of the documents this user may read matches the question: say that the "
                   "documents do not answer it.")
    messages: list[Any] = [ChatMessage(role="system", content=context), *body.messages]
    return Grounding(body=body.model_copy(update={"messages": messages}), citations=citations)

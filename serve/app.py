"""The FastAPI app: decode -> engine -> encode, with OpenAI-shaped requests, responses and errors.

``create_app(engine, settings)`` returns an ASGI app whose lifespan starts and stops the engine.
Routes only translate: ``decode.py`` turns a request into engine inputs under the server's limits,
``InferenceEngine`` does the work, and the route shapes the answer. ``guard.py`` checks keys, rate
and body size before any route runs; ``errors.py`` turns every failure into an OpenAI-shaped error.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Path, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

import kiban
from kiban.encoders.base import InvalidInput
from kiban.fusion.prompt import encode_text
from kiban.serve import decode
from kiban.serve.auth import KeyRing
from kiban.serve.design_routes import add_design_routes
from kiban.serve.engine import Completion, InferenceEngine, NotReady, RequestTimeout, UnknownTask
from kiban.serve.errors import ClientDisconnected, add_error_handlers
from kiban.serve.guard import Guard, TokenBuckets
from kiban.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from kiban.serve.retrieval_routes import add_retrieval_routes, ground_chat
from kiban.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    HeadInfo,
    ModelCard,
    ModelList,
    Prediction,
    PredictRequest,
    PredictResponse,
    Status,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_payload,
    error_responses,
)
from kiban.serve.settings import ServeSettings
from kiban.tasks.predict import input_modalities

__all__ = ["create_app"]

log = logging.getLogger(__name__)

T = TypeVar("T")


# With stream: true. Before OpenAPI 3.2 the schema of text/event-stream describes one event.
_SSE_SCHEMA = {
    "type": "object",
    "description": "one server-sent event; the stream ends with the event 'data: [DONE]'",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        # not contentSchema: the last event, [DONE], is not JSON
        "data": {
            "type": "string",
            "description": "JSON of a ChatCompletionChunk (#/components/schemas/ChatCompletionChunk) or "
            "of an ErrorResponse (a failure after the stream began), or [DONE]",
        },
    },
}
_INFERENCE_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503, 504)


def create_app(engine: InferenceEngine, settings: ServeSettings) -> FastAPI:
    """The HTTP API over ``engine``; see ``docs/api.md`` for the endpoints, part types and limits."""
    metrics = ServeMetrics(queue_depth=lambda: engine.queue_depth, ready=lambda: engine.ready)
    engine.stats.on_batch = metrics.observe_batch
    engine.stats.on_reject = metrics.reject
    engine.stats.on_completion = metrics.observe_completion
    limits = settings.limits
    loaded_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(
        title="kiban inference API",
        version=kiban.__version__,
        description="OpenAI-compatible multimodal chat and embeddings, and task-head predictions, "
        "over a kiban model. Every route but /healthz needs 'Authorization: Bearer <key>' when the "
        "server has API keys.",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs would need the key-protected /openapi.json
        redoc_url=None,
    )
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    add_error_handlers(app, metrics)
    app.add_middleware(
        Guard,
        keys=KeyRing(settings.api_keys, path=settings.api_keys_file),
        buckets=TokenBuckets(rate=settings.rate_limit, burst=settings.rate_burst),
        max_body_bytes=limits.max_body_bytes,
        metrics=metrics,
        routes=lambda: app.routes,
    )

    def modalities() -> list[str]:
        if engine.model is None:
            raise NotReady(engine.load_error or "the model is still loading")
        return sorted(engine.model.encoders)

    def check_model(name: str | None) -> str:
        if name is not None and name != settings.model_name:
            raise decode.RequestError(
                f"model {name!r} is not served here; this server serves {settings.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        return settings.model_name

    add_retrieval_routes(app, settings)  # /v1/search, /v1/documents; the index chat requests read
    add_design_routes(app, engine, settings)  # /v1/design/molecules, /v1/design/proteins

    # -- chat ------------------------------------------------------------------------------------

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {"schema": _SSE_SCHEMA}}}, **_INFERENCE_ERRORS},
        tags=["openai"],
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        model_name = check_model(body.model)
        known = modalities()  # NotReady while the model loads
        # a request the server would refuse anyway is told why, even when the queue is full
        settings = decode.generation_settings(body, limits=limits, vocab_size=len(engine.model.tokenizer))
        engine.check_capacity()
        grounding = await ground_chat(request, body)  # None unless the request asks for retrieval
        if grounding is not None:
            body = grounding.body
        record = await run_in_threadpool(decode.chat_record, body, limits=limits, modalities=known)
        await run_in_threadpool(check_prompt_length, record, settings.max_tokens)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            pieces = engine.stream(record, settings)
            # errors before the first token are ordinary HTTP errors
            first = await _unless_disconnected(request, anext(pieces))
            events = _events(
                pieces, first, ident=ident, created=created, model=model_name, include_usage=include_usage
            )
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        answer = await _unless_disconnected(request, engine.generate(record, settings))
        logprobs = None
        if answer.logprobs is not None:
            logprobs = ChoiceLogprobs(content=[_token_logprob(t) for t in answer.logprobs])
        return ChatCompletion(
            id=ident,
            created=created,
            model=model_name,
            choices=[
                Choice(
                    index=0,
                    message=AssistantMessage(
                        content=answer.text if grounding is None else grounding.cite(answer.text)
                    ),
                    finish_reason=answer.finish_reason,
                    logprobs=logprobs,
                )
            ],
            usage=_usage(answer),
            citations=None if grounding is None else grounding.citations,
        )

    def check_prompt_length(record: dict[str, Any], max_tokens: int) -> None:
        """A 422 before any model work when the prompt's text alone leaves no room for max_tokens."""
        context = engine.context_length
        if context is None:
            return
        tokens = decode.prompt_tokens(record, engine.model.tokenizer)
        if tokens + max_tokens > context:
            raise decode.RequestError(
                f"the prompt is {tokens} tokens; with max_tokens={max_tokens} that is over the limit "
                f"context_length={context} tokens of the model (at most {max(context - max_tokens, 0)} "
                "prompt tokens: shorten the messages or lower max_tokens)",
                param="messages",
                code="context_length_exceeded",
            )

    # -- embeddings ------------------------------------------------------------------------------

    @app.post(
        "/v1/embeddings", response_model=EmbeddingResponse, responses=_INFERENCE_ERRORS, tags=["openai"]
    )
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        model_name = check_model(body.model)
        engine.check_capacity()
        items = await run_in_threadpool(decode.embedding_items, body, limits=limits, modalities=modalities())
        if body.dimensions is not None and body.dimensions != engine.width:
            raise decode.RequestError(
                f"dimensions must be {engine.width} (this model's width) or absent", param="dimensions"
            )
        try:
            vectors = (await _unless_disconnected(request, engine.embed(items))).float().cpu().numpy()
        except InvalidInput as error:
            raise _at_index(error, [item for _, item in items], name="input") from None
        data = [
            EmbeddingData(index=i, embedding=_encode_vector(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ]
        tokens = _count_tokens(engine, items)
        return EmbeddingResponse(
            data=data, model=model_name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )

    # -- task heads ------------------------------------------------------------------------------

    @app.post(
        "/v1/predict/{task}",
        response_model=PredictResponse,
        response_model_exclude_none=True,  # a classification row has no "values", a regression row no "label"
        responses=_INFERENCE_ERRORS,
        tags=["tasks"],
    )
    async def predict(
        body: PredictRequest,
        request: Request,
        task: str = Path(description="a task listed under 'heads' by GET /v1/models", max_length=64),
    ) -> PredictResponse:
        """A task head's answer per input; its shape follows the head's kind (see Prediction)."""
        model_name = check_model(body.model)
        head = engine.heads.get(task)
        if head is None:
            raise UnknownTask(
                f"no task head named {task!r} is loaded (tasks: {', '.join(sorted(engine.heads)) or 'none'})"
            )
        options = _contact_options(body, task=task, kind=head.config.kind)
        engine.check_capacity()
        items = await run_in_threadpool(
            decode.predict_items,
            body,
            reads=input_modalities(head.config),
            limits=limits,
            modalities=modalities(),
        )
        try:
            rows = await _unless_disconnected(request, engine.predict(task, items, **options))
        except InvalidInput as error:
            raise _at_index(error, items, name="inputs") from None
        return PredictResponse(
            task=task, model=model_name, data=[Prediction(index=i, **row) for i, row in enumerate(rows)]
        )

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 429, 503), tags=["openai"])
    async def models() -> ModelList:
        heads = [
            HeadInfo(
                task=task,
                modality=head.config.modality,
                inputs=input_modalities(head.config),
                kind=head.config.kind,
                labels=head.config.labels,
                version=str(head.config.version),
                endpoint=f"/v1/predict/{task}",
            )
            for task, head in sorted(engine.heads.items())
        ]
        card = ModelCard(
            id=settings.model_name,
            created=loaded_at,
            modalities=modalities(),
            embedding_dim=engine.width,
            heads=heads,
        )
        return ModelList(data=[card])

    # -- operations ------------------------------------------------------------------------------

    @app.get("/healthz", response_model=Status, response_model_exclude_none=True, tags=["operations"])
    async def healthz() -> Status:
        """The process is alive (no key needed)."""
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Status,
        response_model_exclude_none=True,
        responses={503: {"model": Status, "description": "not ready"}, **error_responses(401)},
        tags=["operations"],
    )
    async def readyz() -> Any:
        """The model is loaded, the batcher is running and a new request would be answered in time."""
        if engine.ready:
            saturated = engine.saturated
            if saturated is None:
                return Status(status="ready")
            return JSONResponse(
                Status(status="saturated", detail=saturated).model_dump(exclude_none=True),
                status_code=503,
                headers={"retry-after": str(engine.retry_after())},
            )
        state = "failed" if engine.load_error else ("stopping" if engine.stopping else "loading")
        return JSONResponse(
            Status(status=state, detail=engine.load_error).model_dump(exclude_none=True),
            status_code=503,
            headers={"retry-after": "5"},
        )

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["operations"],
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            },
            **error_responses(401),
        },
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app, engine, secured=bool(settings.api_keys))
    return app


# ----------------------------------------------------------------------------------------------
# Encoding


def _contact_options(body: PredictRequest, *, task: str, kind: str) -> dict[str, int]:
    """``top_k`` / ``min_separation`` for a contact head's ``predict``; a 422 for any other head."""
    options = {
        name: value
        for name, value in (("top_k", body.top_k), ("min_separation", body.min_separation))
        if value is not None
    }
    if options and kind != "contact":
        raise decode.RequestError(
            f"{' and '.join(options)} apply to contact heads only; task {task!r} is a {kind} head",
            param=next(iter(options)),
        )
    return options


def _usage(answer: Completion) -> Usage:
    return Usage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        total_tokens=answer.prompt_tokens + answer.completion_tokens,
    )


def _encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _count_tokens(engine: InferenceEngine, items: list[tuple[str, Any]]) -> int:
    """Text inputs count their backbone tokens; every other input counts as its one placeholder."""
    tokenizer = engine.model.tokenizer
    return sum(len(encode_text(tokenizer, item)) if modality == "text" else 1 for modality, item in items)


def _token_logprob(token: Any) -> TokenLogprob:
    return TokenLogprob(
        token=token.token,
        logprob=token.logprob,
        bytes=list(token.raw),
        top_logprobs=[TopLogprob(token=t, logprob=p, bytes=list(raw)) for (t, p), raw in zip(token.top, token.top_raw)],
    )


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, or cancel it when the client disconnects first.

    Await ``work`` unless the client disconnects first; then cancel it, which marks its engine
    job cancelled (queued: dropped; running: stopped at its next step), and raise ClientDisconnected.

    The body has been read by now, so the next ASGI message is ``http.disconnect``, sent when the
    client closes the connection.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down: the work stops too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected("the client closed the connection before the answer was ready")


def _at_index(error: InvalidInput, items: Sequence[Any], *, name: str) -> decode.RequestError:
    """The whole batch refused with the index of the input the error is about (the first such)."""

    def holds(item: Any) -> bool:
        if isinstance(item, tuple):
            return any(holds(part) for part in item)
        return item is error.item_id or (isinstance(item, str) and item == error.item_id)

    index = next((i for i, item in enumerate(items) if holds(item)), None)
    where = name if index is None else f"{name}[{index}]"
    return decode.RequestError(f"{where}: {error}", param=where, code="invalid_input")


def _sse(payload: Any) -> str:
    data = (
        payload.model_dump_json(exclude_none=True)
        if hasattr(payload, "model_dump_json")
        else json.dumps(payload)
    )
    return f"data: {data}\n\n"


async def _events(
    pieces: AsyncIterator[str | Completion],
    first: str | Completion,
    *,
    ident: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion, as OpenAI sends them."""

    def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=ident,
            created=created,
            model=model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],
        )

    try:
        yield _sse(chunk(Delta(role="assistant", content="")))
        item = first
        while not isinstance(item, Completion):
            yield _sse(chunk(Delta(content=item)))
            item = await anext(pieces)
        yield _sse(chunk(Delta(), item.finish_reason))
        if include_usage:
            yield _sse(
                ChatCompletionChunk(id=ident, created=created, model=model, choices=[], usage=_usage(item))
            )
        yield "data: [DONE]\n\n"
    except (RequestTimeout, InvalidInput, NotReady) as error:  # the status line is gone: report in-stream
        kind = "timeout" if isinstance(error, RequestTimeout) else "invalid_request_error"
        yield _sse(error_payload(str(error), type=kind))
    except Exception:  # noqa: BLE001 - a bug: logged here, a fixed message in the stream
        log.exception("streamed completion %s failed", ident)
        yield _sse(error_payload("internal server error (logged on the server)", type="server_error"))
    finally:
        await pieces.aclose()  # stops the row's generation when the client went away


# ----------------------------------------------------------------------------------------------
# The OpenAPI document


def _openapi(app: FastAPI, engine: InferenceEngine, *, secured: bool) -> dict[str, Any]:
    """The OpenAPI document, with what only the running server knows.

    The generated document, plus what only the running server knows: the bearer scheme and,
    once the model is loaded, the tasks ``/v1/predict/{task}`` accepts (cached from then on).
    """
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    # the chunk model is referenced only from inside the event-stream schema, so add it by hand
    chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(chunk.pop("$defs", {}))
    components["ChatCompletionChunk"] = chunk
    if engine.ready:
        predict = schema["paths"]["/v1/predict/{task}"]["post"]
        task = next(p for p in predict["parameters"] if p["name"] == "task")
        task["schema"]["enum"] = sorted(engine.heads)
    if secured:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
        schema["security"] = [{"bearer": []}]
        schema["paths"]["/healthz"]["get"]["security"] = []
    if engine.ready:
        app.openapi_schema = schema
    return schema

"""The inference engine: one model, a bounded queue, a dynamic batcher and one worker thread.

This is the Python inference API the HTTP layer sits on; it needs no HTTP and runs in any asyncio
program::

    engine = InferenceEngine(model=model, heads=heads, options=BatchingOptions(max_batch=8))
    await engine.start()
    answer = await engine.generate(record, max_tokens=64)          # Completion (kiban.fusion.generation)
    answer = await engine.generate(record, GenerationSettings(max_tokens=64, temperature=0.7, seed=1))
    vectors = await engine.embed([("protein", "MKT..."), ("text", "a passage")])   # [B, H] tensor
    rows = await engine.predict("toxicity", ["CCO"])               # any head: see kiban.tasks.predict
    rows = await engine.predict("contacts", ["MKT..."], top_k=20)  # options a head's predict takes
    async for piece in engine.stream(record, max_tokens=64): ...   # str deltas, then the Completion
    await engine.stop()

How a request flows: ``submit`` puts a job on a bounded ``asyncio.Queue`` (full -> ``Overloaded``
at once, never an unbounded backlog). The batcher takes the first job, waits up to ``max_wait_ms``
for others until ``max_batch`` rows are gathered, splits the group into jobs that can share one
forward pass (same kind; for generation the same sampling settings) and runs each in the single
worker thread, so the event loop keeps accepting, refusing and streaming while torch computes.
Each job's answer goes back to its own future. A batch that fails on a bad input (featurizers
check inputs before any forward pass, so this is cheap) is re-run one job at a time, so one bad
request never fails its neighbours.

Generation is ``kiban.fusion.generation`` (the path ``KibanModel.generate`` takes); the engine only
supplies each row's settings and hooks: a text sink for streaming and a ``should_stop`` that turns
True at the request's deadline or when its caller stops waiting (a client that left), checked
before encoding, before the prefill and between decoding steps. Embedding and prediction batches
check it between their parts. ``stop`` lets running work finish for ``drain_s`` and then cancels it,
so a shutdown takes a bounded time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiban.device import Placement, place_model
from kiban.encoders.base import InvalidInput
from kiban.fusion.generation import Completion, GenerationSettings, RowHooks, context_length
from kiban.serve.settings import BatchingOptions

__all__ = [
    "Completion",
    "GenerationSettings",
    "InferenceEngine",
    "NotReady",
    "Overloaded",
    "RequestTimeout",
    "UnknownTask",
]

# Retry-After and readiness read the drain rate over this many recent seconds.
_RATE_WINDOW_S = 30.0

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        """Carry the seconds a client should wait before retrying."""
        self.retry_after = retry_after
        super().__init__(f"the server is at capacity (queue full); retry after {retry_after:.0f} s")


class RequestTimeout(RuntimeError):
    """The request was not answered within the engine's ``timeout_s``."""


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class UnknownTask(LookupError):
    """No head is loaded for the task asked for."""


@dataclass(eq=False)
class _Job:
    kind: str  # "generate" | "embed" | "predict" | "call"
    key: tuple  # jobs with equal keys may share one forward pass
    rows: list[Any]  # generate: [record]; embed / predict: [(modality, item), ...]; call: [work]
    future: asyncio.Future
    deadline: float  # loop.time() by which it must be answered
    settings: GenerationSettings | None = None  # generate: the row's settings
    options: dict[str, Any] = field(default_factory=dict)  # predict: keyword options of head.predict
    sink: asyncio.Queue | None = None  # streamed text deltas (generate with stream=True)
    cancelled: bool = False  # set on the loop, read by the worker: a plain flag is enough

    def expired(self, now: float) -> bool:
        return self.cancelled or now >= self.deadline


@dataclass
class _Stats:
    """Callbacks the metrics layer installs; the engine itself depends on no metrics library."""

    on_batch: Callable[[str, int], None] = lambda kind, rows: None
    on_reject: Callable[[str], None] = lambda reason: None
    on_completion: Callable[[str, int], None] = lambda finish_reason, tokens: None


class InferenceEngine:
    """Owns a ``KibanModel`` (given, or loaded from ``model_dir`` by ``start``) and its task heads.

    model / model_dir: exactly one. With ``model_dir`` the model and ``heads/`` are loaded in the
    worker thread after ``start`` (``ready`` turns True when done): ``check_model_dir`` first, then
    safetensors and JSON only, from that directory only; every head is checked against the model
    (``kiban.tasks.predict.check_head_fits``).
    heads: task name -> head when ``model`` is given: anything with ``config`` and
    ``predict(model, items, **options)`` (pooled, multilabel, per-residue, contact and pair heads).
    """

    def __init__(
        self,
        *,
        model: Any = None,
        model_dir: str | Path | None = None,
        heads: Mapping[str, Any] | None = None,
        options: BatchingOptions | None = None,
        placement: Placement | None = None,
        quantize: str | None = None,
    ) -> None:
        """Hold the model (or the folder to load it from), its heads and the batching options.

        placement: the device and dtype the model is moved to (``kiban.device.resolve_device``);
        None leaves it where it is. Every batch goes to the model's device (``KibanModel.prepare``).
        quantize (``model_dir`` only): "int8" / "int4" (``kiban.adapt.quantize``), None: as saved;
        the model is placed first, then quantised for the device it is on.
        """
        if (model is None) == (model_dir is None):
            raise ValueError("give exactly one of model= and model_dir=")
        self.options = options or BatchingOptions()
        self.placement = placement
        self.model = self._placed(model).eval() if model is not None else None
        self.heads: dict[str, Any] = dict(heads or {})
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.quantize = quantize  # model_dir: "int8" / "int4" (kiban.adapt.quantize), None: as saved
        self.stats = _Stats()
        self.load_error: str | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task | None = None
        self._loader: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: deque[float] = deque(maxlen=4096)  # monotonic times at which jobs left the engine
        self._running: list[_Job] = []  # the chunk in the worker thread now
        self._running_since: float | None = None  # monotonic
        self._stopping = False
        self._draining: asyncio.Future | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The model is loaded, the batcher runs and the engine is not shutting down."""
        return (
            self.model is not None and self._batcher is not None and not self._batcher.done() and not self._stopping
        )

    @property
    def stopping(self) -> bool:
        """``stop`` has begun: new work is refused."""
        return self._stopping

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def width(self) -> int | None:
        """The width H of embeddings (the LLM's hidden size), once the model is loaded."""
        if self.model is None:
            return None
        return self.model.llm.get_input_embeddings().embedding_dim

    async def start(self) -> None:
        """Start the worker thread and the batcher; begin loading when built from ``model_dir``.

        Idempotent, so a program may start the engine before handing it to the app's lifespan.
        """
        if self._batcher is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.options.max_queue)
        # One thread: torch already uses every core inside one forward pass, and one thread means
        # one batch at a time, which is what makes batching pay.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiban-model")
        self._batcher = asyncio.create_task(self._batch_loop(), name="kiban-batcher")
        if self.model is None:
            self._loader = self._loop.run_in_executor(self._executor, self._load)

    async def begin_shutdown(self) -> None:
        """Stop taking work, drain the running batch, then cancel it.

        Refuse queued and new work (``NotReady``, HTTP 503), let the running batch finish for up
        to ``drain_s`` seconds, then cancel it: a generation stops at its next step and its caller
        gets ``NotReady``. Idempotent; ``stop`` calls it too.
        """
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        self._stopping = True
        while self._queue is not None and not self._queue.empty():
            self._resolve(self._queue.get_nowait(), error=NotReady("the server is shutting down"))
        until = time.monotonic() + self.options.drain_s
        while self._running and time.monotonic() < until:
            await asyncio.sleep(0.05)
        if self._running:
            log.warning(
                "shutting down: cancelled %d running request(s) still at work after drain_s=%g s",
                len(self._running),
                self.options.drain_s,
            )
        for job in self._running:
            job.cancelled = True

    async def stop(self) -> None:
        """``begin_shutdown``, then stop the batcher and the worker. Idempotent."""
        if self._batcher is None or self._batcher.done():
            return
        await self.begin_shutdown()
        self._batcher.cancel()
        await asyncio.gather(self._batcher, return_exceptions=True)
        while not self._queue.empty():
            self._resolve(self._queue.get_nowait(), error=NotReady("the server is shutting down"))
        # in a thread: the cancelled batch ends at its next step, and the loop keeps serving meanwhile
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for ``model_dir`` loading to finish; raise ``NotReady`` when it failed."""
        if self._loader is not None:
            await asyncio.wait_for(asyncio.shield(self._loader), timeout)
        if not self.ready:
            raise NotReady(self.load_error or "the engine is not started")

    def _load(self) -> None:
        try:
            model, heads = _load_model_dir(self.model_dir, quantize=self.quantize, placement=self.placement)
        except Exception as error:  # noqa: BLE001 - any load failure is reported by /readyz and the CLI
            self.load_error = f"{type(error).__name__}: {error}"
            log.error("loading %s failed: %s", self.model_dir, self.load_error)
            return
        self.model, self.heads = model.eval(), heads
        log.info("model loaded from %s (%d heads) on %s", self.model_dir, len(heads), self.model.device)

    def _placed(self, model: Any) -> Any:
        # heads stay where they are (small, float32): they move each input to their own device
        return place_model(model, self.placement) if self.placement is not None else model

    # -- the public API --------------------------------------------------------------------------

    async def generate(
        self, record: Mapping[str, Any], settings: GenerationSettings | None = None, **options: Any
    ) -> Completion:
        """Answer one chat record.

        Answer one chat record (``{"messages": [...], "inputs": {...}}``) under ``settings`` (or
        ``GenerationSettings(**options)``, e.g. ``max_tokens=64, temperature=0.7, seed=1``).
        """
        job = self._submit("generate", ("generate",), [record], settings=settings or GenerationSettings(**options))
        return self._finished_completion(await self._wait(job))

    async def stream(
        self, record: Mapping[str, Any], settings: GenerationSettings | None = None, **options: Any
    ) -> AsyncIterator[str | Completion]:
        """Yield the answer's text in pieces as it is generated, then the final ``Completion``.

        The concatenated pieces equal the Completion's text. Stopping the iteration early (a client
        that disconnected) stops the row's generation at the next token.
        """
        sink: asyncio.Queue = asyncio.Queue()
        job = self._submit(
            "generate", ("generate",), [record], settings=settings or GenerationSettings(**options), sink=sink
        )
        try:
            while True:
                piece = await self._within_deadline(job, sink.get())
                if piece is None:  # the worker is done with the job
                    yield self._finished_completion(await job.future)
                    return
                yield piece
        finally:
            job.cancelled = True

    async def embed(self, items: Sequence[tuple[str, Any]]) -> torch.Tensor:
        """Pooled fused states [len(items), H] of ``(modality or "text", item)`` pairs."""
        job = self._submit("embed", ("embed",), list(items))
        return await self._wait(job)

    async def predict(self, task: str, items: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """A task head's outputs for raw inputs.

        A task head's outputs (``head.predict``) for raw inputs of the head's modality, or
        (protein, molecule) tuples for a pair head; ``options`` go to ``head.predict`` (contact
        heads: ``top_k``, ``min_separation``). Requests with equal options share a batch.
        """
        if task not in self.heads:
            known = ", ".join(sorted(self.heads)) or "none"
            raise UnknownTask(f"no task head named {task!r} is loaded (tasks: {known})")
        key = ("predict", task, tuple(sorted(options.items())))
        job = self._submit("predict", key, list(items), options=options)
        return await self._wait(job)

    async def call(self, work: Callable[[Any, Callable[[], bool]], Any], *, name: str = "call") -> Any:
        """``work(model, should_stop)`` run alone on the worker thread, queued like any request.

        For requests that drive the model themselves (``kiban.design``: many sampling rounds):
        they wait their turn, keep the server's deadline (``should_stop`` turns True when the caller
        left or the deadline passed) and never run beside another batch on the same model.
        """
        job = self._submit("call", ("call", name, object()), [work])  # a key of its own: never batched
        return await self._wait(job)

    def _finished_completion(self, completion: Completion) -> Completion:
        if completion.finish_reason == "cancelled" and self._stopping:
            raise NotReady("the server is shutting down; the request was cancelled after drain_s")
        if completion.finish_reason == "cancelled":  # else only the deadline cancels a row still awaited
            self.stats.on_reject("timeout")
            raise RequestTimeout(f"no answer within the server's timeout of {self.options.timeout_s:g} s")
        return completion

    def check_capacity(self) -> None:
        """Refuse at once a request that could not be queued.

        Raise ``NotReady`` or ``Overloaded`` now when a request could not be queued, so callers
        can refuse it before spending time decoding it.
        """
        if not self.ready:
            raise NotReady(self.load_error or "the model is still loading")
        if self._queue.full():
            self.stats.on_reject("queue_full")
            raise Overloaded(self.retry_after())

    @property
    def context_length(self) -> int | None:
        """Prompt plus answer tokens the backbone attends over, once the model is loaded."""
        return context_length(self.model.llm) if self.model is not None else None

    def drain_rate(self) -> float | None:
        """Jobs answered per second over the last ``_RATE_WINDOW_S`` seconds (None: too few to say)."""
        now = time.monotonic()
        while self._finished and self._finished[0] < now - _RATE_WINDOW_S:
            self._finished.popleft()
        if len(self._finished) < 2:
            return None
        span = max(now - self._finished[0], 1e-3)
        return len(self._finished) / span

    def retry_after(self) -> int:
        """Seconds until the queue has drained at the measured rate (at least 1, at most timeout_s)."""
        rate = self.drain_rate()
        waiting = self.queue_depth + len(self._running)
        seconds = waiting / rate if rate else self.options.timeout_s / 2
        return int(min(max(1, math.ceil(seconds)), math.ceil(self.options.timeout_s)))

    @property
    def saturated(self) -> str | None:
        """Why a new request would not be answered within ``timeout_s`` now, or None.

        Saturated: the running batch has taken longer than ``timeout_s`` already, or the queue
        would take longer than that to drain at the measured rate (readiness then says not ready).
        """
        timeout = self.options.timeout_s
        if self._running_since is not None and time.monotonic() - self._running_since > timeout:
            return f"the running batch has taken over timeout_s={timeout:g} s"
        rate = self.drain_rate()
        if rate and self.queue_depth / rate > timeout:
            return f"the queue ({self.queue_depth} requests) drains in over timeout_s={timeout:g} s"
        return None

    # -- queueing --------------------------------------------------------------------------------

    def _submit(
        self,
        kind: str,
        key: tuple,
        rows: list[Any],
        *,
        settings: GenerationSettings | None = None,
        options: dict[str, Any] | None = None,
        sink: asyncio.Queue | None = None,
    ) -> _Job:
        if self._stopping:
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise NotReady(self.load_error or "the model is still loading")
        if not rows:
            raise InvalidInput(kind, "request", "has no inputs")
        loop = asyncio.get_running_loop()
        job = _Job(
            kind,
            key,
            rows,
            loop.create_future(),
            loop.time() + self.options.timeout_s,
            settings=settings,
            options=dict(options or {}),
            sink=sink,
        )
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.on_reject("queue_full")
            raise Overloaded(self.retry_after()) from None
        return job

    async def _wait(self, job: _Job) -> Any:
        try:
            return await self._within_deadline(job, asyncio.shield(job.future))
        finally:
            job.cancelled = True  # a no-op when answered; stops the work when the caller gave up

    async def _within_deadline(self, job: _Job, awaitable: Any) -> Any:
        remaining = job.deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(awaitable, max(remaining, 0.0))
        except TimeoutError:
            job.cancelled = True
            self.stats.on_reject("timeout")
            raise RequestTimeout(
                f"no answer within the server's timeout of {self.options.timeout_s:g} s"
            ) from None

    # -- batching --------------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: list[list[_Job]] = []  # chunks gathered but not started: refused if we are stopped
        try:
            while True:
                group = await self._gather()
                now = loop.time()
                live = []
                for job in group:
                    if not self._drop_if_expired(job, now):
                        live.append(job)
                waiting = self._chunks(live)
                while waiting:
                    chunk = waiting.pop(0)
                    chunk = [job for job in chunk if not self._drop_if_expired(job, loop.time())]
                    if not chunk:
                        continue
                    self._running, self._running_since = chunk, time.monotonic()
                    try:
                        await loop.run_in_executor(self._executor, self._run_chunk, chunk)
                    except asyncio.CancelledError:
                        raise  # stop(): the running chunk still finishes, and answers, in its thread
                    except Exception as error:  # never let one batch end the batcher
                        log.exception("batch of %d %s jobs failed", len(chunk), chunk[0].kind)
                        for job in chunk:
                            self._resolve(job, error=error)
                    finally:
                        self._running, self._running_since = [], None
        finally:
            for chunk in waiting:
                for job in chunk:
                    self._resolve(job, error=NotReady("the server is shutting down"))

    def _drop_if_expired(self, job: _Job, now: float) -> bool:
        if job.expired(now):  # its caller already got a 504 or went away: no work for it
            self._resolve(job, error=RequestTimeout("expired in the queue"))
            return True
        return False

    async def _gather(self) -> list[_Job]:
        """The first waiting job plus those arriving within ``max_wait_ms``, up to ``max_batch`` rows."""
        first = await self._queue.get()
        group, rows = [first], len(first.rows)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.options.max_wait_ms / 1000
        while rows < self.options.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            group.append(job)
            rows += len(job.rows)
        return group

    def _chunks(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Group jobs into chunks that share a forward pass.

        Jobs with the same key, in arrival order, cut into chunks of at most ``max_batch`` rows
        (a job larger than that forms its own chunk and is split again in ``_run_jobs``).
        """
        chunks: list[list[_Job]] = []
        by_key: dict[tuple, list[_Job]] = {}
        for job in jobs:
            by_key.setdefault(job.key, []).append(job)
        for same in by_key.values():
            chunk, rows = [], 0
            for job in same:
                if chunk and rows + len(job.rows) > self.options.max_batch:
                    chunks.append(chunk)
                    chunk, rows = [], 0
                chunk.append(job)
                rows += len(job.rows)
            chunks.append(chunk)
        return chunks

    # -- the worker thread -----------------------------------------------------------------------

    def _run_chunk(self, chunk: list[_Job]) -> None:
        try:
            results = self._run_jobs(chunk)
        except RequestTimeout as error:
            for job in chunk:
                self._resolve(job, error=error)
            return
        except InvalidInput as error:
            if len(chunk) == 1:
                self._resolve(chunk[0], error=error)
                return
            for job in chunk:  # find the bad job(s); the others still get their answers
                self._run_chunk([job])
            return
        for job, result in zip(chunk, results):
            if isinstance(result, Completion):
                self.stats.on_completion(result.finish_reason, result.completion_tokens)
            self._resolve(job, result=result)

    def _run_jobs(self, chunk: list[_Job]) -> list[Any]:
        kind = chunk[0].kind
        stops = [self._should_stop(job) for job in chunk]
        if kind == "generate":
            self.stats.on_batch(kind, len(chunk))
            hooks = [RowHooks(self._text_sink(job), stop) for job, stop in zip(chunk, stops)]
            return self.model.complete([job.rows[0] for job in chunk], [job.settings for job in chunk], hooks)
        if kind == "call":
            self.stats.on_batch(kind, 1)
            with torch.inference_mode():
                return [job.rows[0](self.model, stop) for job, stop in zip(chunk, stops)]
        rows = [row for job in chunk for row in job.rows]
        answers: list[Any] = []
        with torch.inference_mode():
            for part in _split(rows, self.options.max_batch):
                if all(stop() for stop in stops):  # every caller has gone or timed out: stop here
                    raise RequestTimeout("no answer within the server's timeout")
                self.stats.on_batch(kind, len(part))
                if kind == "predict":  # the jobs of a chunk share their task and options (the key)
                    answers.extend(self.heads[chunk[0].key[1]].predict(self.model, part, **chunk[0].options))
                else:
                    answers.append(self.model.embed(part))
        if kind == "embed":
            answers = torch.cat(answers)
        out, start = [], 0
        for job in chunk:
            out.append(answers[start : start + len(job.rows)])
            start += len(job.rows)
        return out

    def _should_stop(self, job: _Job) -> Callable[[], bool]:
        # the deadline on this thread's clock (the loop's clock may have another origin, as uvloop's does)
        monotonic_deadline = job.deadline - self._loop.time() + time.monotonic()

        def should_stop() -> bool:
            return job.cancelled or time.monotonic() >= monotonic_deadline

        return should_stop

    def _text_sink(self, job: _Job) -> Callable[[str], None] | None:
        if job.sink is None:
            return None

        def on_text(piece: str) -> None:
            self._loop.call_soon_threadsafe(job.sink.put_nowait, piece)

        return on_text

    def _resolve(self, job: _Job, *, result: Any = None, error: BaseException | None = None) -> None:
        """Answer a job's future on the event loop, from any thread."""

        def settle() -> None:
            self._finished.append(time.monotonic())
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
            if job.sink is not None:
                job.sink.put_nowait(None)
            # nobody may await a failed future (caller gone): mark its exception as retrieved
            if job.future.done() and not job.future.cancelled():
                job.future.exception()

        if self._loop is not None and self._loop.is_running() and not _on_loop(self._loop):
            self._loop.call_soon_threadsafe(settle)
        else:
            settle()


def _load_model_dir(
    model_dir: Path, *, quantize: str | None = None, placement: Placement | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load the model and its heads from a saved model folder.

    (model, heads) of a saved model folder: ``kiban.serve.loading.check_model_dir`` (nothing
    outside the folder is read), ``KibanModel.from_pretrained``, then every head under ``heads/``,
    each checked against the model by its own rule (a pooled head: the model's width; a
    per-residue or contact head: the protein encoder's width; a pair head: both encoders).
    """
    from kiban.serve.loading import check_model_dir
    from kiban.tasks.predict import load_model_with_heads

    root = check_model_dir(model_dir)
    # on the device first, then quantised for it; float32 on the CPU unless asked or saved quantised
    return load_model_with_heads(root, quantize=quantize, placement=placement)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _split(rows: list[Any], size: int) -> list[list[Any]]:
    it = iter(rows)
    return [chunk for chunk in iter(lambda: list(itertools.islice(it, size)), [])]

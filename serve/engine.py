"""The inference engine: one model, a bounded queue, a dynamic batcher and one worker thread.

This is the Python inference API the HTTP layer sits on; it needs no HTTP and runs in any asyncio
program::

    engine = InferenceEngine(model=model, heads=heads, options=BatchingOptions(max_batch=8))
    await engine.start()
    answer = await engine.generate(record, max_tokens=64)          # Completion
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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiban.encoders.base import InvalidInput
from kiban.serve.generation import Completion, RowControl, generate_rows, sampling_key
from kiban.serve.settings import BatchingOptions

__all__ = ["Completion", "InferenceEngine", "NotReady", "Overloaded", "RequestTimeout", "UnknownTask"]

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
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
    kind: str  # "generate" | "embed" | "predict"
    key: tuple  # jobs with equal keys may share one forward pass
    rows: list[Any]  # generate: [record]; embed / predict: [(modality, item), ...]
    future: asyncio.Future
    deadline: float  # loop.time() by which it must be answered
    max_tokens: int = 0
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
    ) -> None:
        if (model is None) == (model_dir is None):
            raise ValueError("give exactly one of model= and model_dir=")
        self.options = options or BatchingOptions()
        self.model = model.eval() if model is not None else None
        self.heads: dict[str, Any] = dict(heads or {})
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.stats = _Stats()
        self.load_error: str | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task | None = None
        self._loader: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seconds_per_batch = 0.1  # running estimate, for Retry-After

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.model is not None and self._batcher is not None and not self._batcher.done()

    @property
    def queue_depth(self) -> int:
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

    async def stop(self) -> None:
        """Refuse queued work, finish the running batch and stop the worker. Idempotent."""
        if self._batcher is None or self._batcher.done():
            return
        self._batcher.cancel()
        await asyncio.gather(self._batcher, return_exceptions=True)
        while not self._queue.empty():
            self._resolve(self._queue.get_nowait(), error=NotReady("the server is shutting down"))
        # in a thread: a running batch may take a while, and the loop must keep serving meanwhile
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for ``model_dir`` loading to finish; raise ``NotReady`` when it failed."""
        if self._loader is not None:
            await asyncio.wait_for(asyncio.shield(self._loader), timeout)
        if not self.ready:
            raise NotReady(self.load_error or "the engine is not started")

    def _load(self) -> None:
        try:
            model, heads = _load_model_dir(self.model_dir)
        except Exception as error:  # noqa: BLE001 - any load failure is reported by /readyz and the CLI
            self.load_error = f"{type(error).__name__}: {error}"
            log.error("loading %s failed: %s", self.model_dir, self.load_error)
            return
        self.model, self.heads = model.eval(), heads
        log.info("model loaded from %s (%d heads)", self.model_dir, len(heads))

    # -- the public API --------------------------------------------------------------------------

    async def generate(
        self, record: Mapping[str, Any], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0
    ) -> Completion:
        """Answer one chat record (``{"messages": [...], "inputs": {...}}``)."""
        job = self._submit(
            "generate", ("generate", *sampling_key(temperature, top_p)), [record], max_tokens=max_tokens
        )
        return self._finished(await self._wait(job))

    async def stream(
        self, record: Mapping[str, Any], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0
    ) -> AsyncIterator[str | Completion]:
        """Yield the answer's text in pieces as it is generated, then the final ``Completion``.

        The concatenated pieces equal the Completion's text. Stopping the iteration early (a client
        that disconnected) stops the row's generation at the next token.
        """
        sink: asyncio.Queue = asyncio.Queue()
        job = self._submit(
            "generate",
            ("generate", *sampling_key(temperature, top_p)),
            [record],
            max_tokens=max_tokens,
            sink=sink,
        )
        try:
            while True:
                piece = await self._within_deadline(job, sink.get())
                if piece is None:  # the worker is done with the job
                    yield self._finished(await job.future)
                    return
                yield piece
        finally:
            job.cancelled = True

    async def embed(self, items: Sequence[tuple[str, Any]]) -> torch.Tensor:
        """Pooled fused states [len(items), H] of ``(modality or "text", item)`` pairs."""
        job = self._submit("embed", ("embed",), list(items))
        return await self._wait(job)

    async def predict(self, task: str, items: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """A task head's outputs (``head.predict``) for raw inputs of the head's modality, or
        (protein, molecule) tuples for a pair head; ``options`` go to ``head.predict`` (contact
        heads: ``top_k``, ``min_separation``). Requests with equal options share a batch.
        """
        if task not in self.heads:
            known = ", ".join(sorted(self.heads)) or "none"
            raise UnknownTask(f"no task head named {task!r} is loaded (tasks: {known})")
        key = ("predict", task, tuple(sorted(options.items())))
        job = self._submit("predict", key, list(items), options=options)
        return await self._wait(job)

    def _finished(self, completion: Completion) -> Completion:
        if completion.finish_reason == "cancelled":  # only the deadline cancels a row still awaited
            self.stats.on_reject("timeout")
            raise RequestTimeout(f"no answer within the server's timeout of {self.options.timeout_s:g} s")
        return completion

    def check_capacity(self) -> None:
        """Raise ``NotReady`` or ``Overloaded`` now when a request could not be queued, so callers
        can refuse it before spending time decoding it.
        """
        if not self.ready:
            raise NotReady(self.load_error or "the model is still loading")
        if self._queue.full():
            self.stats.on_reject("queue_full")
            raise Overloaded(self._retry_after())

    # -- queueing --------------------------------------------------------------------------------

    def _submit(
        self,
        kind: str,
        key: tuple,
        rows: list[Any],
        *,
        max_tokens: int = 0,
        options: dict[str, Any] | None = None,
        sink: asyncio.Queue | None = None,
    ) -> _Job:
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
            max_tokens=max_tokens,
            options=dict(options or {}),
            sink=sink,
        )
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.on_reject("queue_full")
            raise Overloaded(self._retry_after()) from None
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

    def _retry_after(self) -> float:
        batches_waiting = self.queue_depth / self.options.max_batch + 1
        return max(1.0, round(batches_waiting * self._seconds_per_batch))

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
                    if job.expired(now):  # its caller already got a 504 or went away
                        self._resolve(job, error=RequestTimeout("expired in the queue"))
                    else:
                        live.append(job)
                waiting = self._chunks(live)
                while waiting:
                    chunk = waiting.pop(0)
                    started = time.perf_counter()
                    try:
                        await loop.run_in_executor(self._executor, self._run_chunk, chunk)
                    except asyncio.CancelledError:
                        raise  # stop(): the running chunk still finishes, and answers, in its thread
                    except Exception as error:  # never let one batch end the batcher
                        log.exception("batch of %d %s jobs failed", len(chunk), chunk[0].kind)
                        for job in chunk:
                            self._resolve(job, error=error)
                    elapsed = time.perf_counter() - started
                    self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed
        finally:
            for chunk in waiting:
                for job in chunk:
                    self._resolve(job, error=NotReady("the server is shutting down"))

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
        """Jobs with the same key, in arrival order, cut into chunks of at most ``max_batch`` rows
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
        if kind == "generate":
            _, temperature, top_p = chunk[0].key
            controls = [self._control(job) for job in chunk]
            self.stats.on_batch(kind, len(chunk))
            return generate_rows(
                self.model, [job.rows[0] for job in chunk], controls, temperature=temperature, top_p=top_p
            )
        rows = [row for job in chunk for row in job.rows]
        answers: list[Any] = []
        with torch.inference_mode():
            for part in _split(rows, self.options.max_batch):
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

    def _control(self, job: _Job) -> RowControl:
        # the deadline on this thread's clock (the loop's clock may have another origin, as uvloop's does)
        monotonic_deadline = job.deadline - self._loop.time() + time.monotonic()

        def should_stop() -> bool:
            return job.cancelled or time.monotonic() >= monotonic_deadline

        on_text = None
        if job.sink is not None:

            def on_text(piece: str) -> None:
                self._loop.call_soon_threadsafe(job.sink.put_nowait, piece)

        return RowControl(job.max_tokens, on_text, should_stop)

    def _resolve(self, job: _Job, *, result: Any = None, error: BaseException | None = None) -> None:
        """Answer a job's future on the event loop, from any thread."""

        def settle() -> None:
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


def _load_model_dir(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(model, heads) of a saved model folder: ``kiban.serve.loading.check_model_dir`` (nothing
    outside the folder is read), ``KibanModel.from_pretrained``, then every head under ``heads/``,
    each checked against the model by its own rule (a pooled head: the model's width; a
    per-residue or contact head: the protein encoder's width; a pair head: both encoders).
    """
    from kiban.fusion.model import KibanModel
    from kiban.serve.loading import check_model_dir
    from kiban.tasks.predict import load_model_heads

    root = check_model_dir(model_dir)
    model = KibanModel.from_pretrained(root).eval()
    return model, load_model_heads(root, model)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _split(rows: list[Any], size: int) -> list[list[Any]]:
    it = iter(rows)
    return [chunk for chunk in iter(lambda: list(itertools.islice(it, size)), [])]

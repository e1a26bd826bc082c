"""The inference engine on its own, without HTTP: batching routes answers right, one bad request
never fails its neighbours, the queue is bounded, deadlines hold, loading can fail cleanly.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kiban.encoders import InvalidInput
from kiban.fusion.generation import GenerationSettings
from kiban.serve import BatchingOptions, InferenceEngine, NotReady, Overloaded, RequestTimeout
from kiban.tiny import tiny_model

PROTEINS = [
    "MKTAYIAKQR",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSF",
    "GSHMLEDPVDAFQ",
    "MKKLLPTAAAGLLLLAAQPAMA",
    "ACDEFGHIKLMNPQRSTVWY",
    "MSTNPKPQRKTKRNTNRRPQDVKFPGG",
]


def _record(protein: str, smiles: str = "CCO") -> dict:
    return {
        "messages": [{"role": "user", "content": "Does <protein> bind <molecule>?"}],
        "inputs": {"protein": [protein], "molecule": [smiles]},
    }


@pytest.fixture(scope="module")
def model():
    model = tiny_model(["protein", "molecule"], seed=0).eval()
    with torch.no_grad():  # sharpen, so answers depend on the inputs (see conftest.py)
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.mul_(20.0)
    return model


def _run(coroutine_fn, model, **options):
    """Run ``coroutine_fn(engine)`` on a started engine; returns (result, rows per batch seen)."""

    async def main():
        engine = InferenceEngine(model=model, options=BatchingOptions(**options))
        batches = []
        engine.stats.on_batch = lambda kind, rows: batches.append((kind, rows))
        await engine.start()
        try:
            return await coroutine_fn(engine), batches
        finally:
            await engine.stop()

    return asyncio.run(main())


def test_concurrent_generation_equals_one_by_one(model):
    budgets = [12, 3, 12, 7, 1, 12]
    alone = [model.generate([_record(p)], max_new_tokens=n)[0] for p, n in zip(PROTEINS, budgets)]

    async def together(engine):
        streamed: list[str] = []

        async def stream(record, n):
            pieces = [p async for p in engine.stream(record, max_tokens=n)]
            streamed.append("".join(pieces[:-1]))
            return pieces[-1]

        jobs = [engine.generate(_record(p), max_tokens=n) for p, n in zip(PROTEINS[:-1], budgets[:-1])]
        return await asyncio.gather(*jobs, stream(_record(PROTEINS[-1]), budgets[-1])), streamed

    (answers, streamed), batches = _run(together, model, max_batch=8, max_wait_ms=50)
    assert [a.text for a in answers] == alone
    assert len(set(alone)) == len(alone), "the test needs answers that differ"
    assert [a.completion_tokens for a in answers] == budgets  # each row stopped at its own budget
    assert streamed == [answers[-1].text]
    assert max(rows for _, rows in batches) > 1, f"nothing was batched: {batches}"


def test_a_batch_of_rows_matches_generate_one_by_one_for_mixed_prompt_lengths(model):
    records = [_record(p, s) for p, s in zip(PROTEINS, ["CCO", "c1ccccc1", "CC(=O)O", "N", "CCN", "O=C=O"])]
    rows = model.complete(records, [GenerationSettings(max_tokens=10) for _ in records])
    assert [r.text for r in rows] == [model.generate([r], max_new_tokens=10)[0] for r in records]


def test_concurrent_embeddings_equal_one_by_one(model):
    items = [("protein", p) for p in PROTEINS] + [("molecule", s) for s in ("CCO", "c1ccccc1", "CC(=O)O")]
    alone = torch.cat([model.embed([item]) for item in items])

    async def together(engine):
        return await asyncio.gather(*(engine.embed([item]) for item in items), engine.embed(items))

    results, batches = _run(together, model, max_batch=4, max_wait_ms=50)
    torch.testing.assert_close(torch.cat(results[:-1]), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[-1], alone, atol=1e-5, rtol=1e-5)  # a 9-row job split into chunks of 4
    assert max(rows for _, rows in batches) == 4  # batched, and never over max_batch


def test_a_bad_input_fails_only_its_own_request(model):
    async def together(engine):
        return await asyncio.gather(
            engine.generate(_record(PROTEINS[0]), max_tokens=5),
            engine.generate(_record(PROTEINS[1], smiles="C1CC(("), max_tokens=5),
            engine.embed([("protein", PROTEINS[2])]),
            engine.embed([("protein", "MKT!!")]),
            return_exceptions=True,
        )

    (good, bad, good_vector, bad_vector), _ = _run(together, model, max_batch=8, max_wait_ms=50)
    assert good.text == model.generate([_record(PROTEINS[0])], max_new_tokens=5)[0]
    assert isinstance(bad, InvalidInput) and "SMILES" in str(bad)
    assert good_vector.shape == (1, 32)
    assert isinstance(bad_vector, InvalidInput) and "protein" in str(bad_vector)


def test_a_full_queue_refuses_at_once_instead_of_growing(model):
    async def flood(engine):
        started = time.perf_counter()
        results = await asyncio.gather(
            *(engine.generate(_record(p), max_tokens=24) for p in PROTEINS * 3), return_exceptions=True
        )
        return results, time.perf_counter() - started

    (results, _), _ = _run(flood, model, max_batch=2, max_wait_ms=0, max_queue=3)
    refused = [r for r in results if isinstance(r, Overloaded)]
    answered = [r for r in results if not isinstance(r, Exception)]
    # 2 run and 3 wait at most when the flood arrives (the batcher may already hold the first two)
    assert 3 <= len(answered) <= 5 and len(refused) == len(results) - len(answered)
    assert all(r.retry_after >= 1 for r in refused)


def test_deadlines_hold_under_a_backlog_and_free_the_worker(model):
    # One row per batch and a 0.25 s deadline: most of 24 requests cannot be answered in time. Each
    # must end by its deadline, expired jobs must not be computed, and a running row past its
    # deadline must stop, so the worker is free right after.
    async def backlog(engine):
        started = time.perf_counter()
        results = await asyncio.gather(
            *(engine.generate(_record(p), max_tokens=4000) for p in PROTEINS * 4), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.3)  # let the batcher drop the expired jobs
        started = time.perf_counter()
        fast = await engine.generate(_record(PROTEINS[1]), max_tokens=2)
        return results, elapsed, fast, time.perf_counter() - started

    (results, elapsed, fast, seconds), _ = _run(backlog, model, max_batch=1, max_wait_ms=0, timeout_s=0.25)
    assert all(isinstance(r, RequestTimeout) or r.finish_reason in ("stop", "length") for r in results), (
        results
    )
    assert sum(isinstance(r, RequestTimeout) for r in results) >= len(results) // 2
    assert elapsed < 0.25 + 0.5
    assert fast.completion_tokens == 2 and seconds < 0.25


def test_a_closed_stream_stops_its_generation(model):
    record = _record(PROTEINS[0])
    full = model.generate([record], max_new_tokens=4000)[0]

    async def close_early(engine):
        finished = []
        engine.stats.on_completion = lambda reason, tokens: finished.append((reason, tokens))
        pieces = engine.stream(record, max_tokens=4000)
        await anext(pieces)
        await pieces.aclose()  # the client went away
        await engine.generate(_record(PROTEINS[1]), max_tokens=2)  # runs after the stream's batch
        return finished

    finished, _ = _run(close_early, model)
    assert len(full) > 50, "the test needs a long answer"
    reason, tokens = finished[0]
    assert reason == "cancelled" and tokens < len(full.encode()) // 2


def test_loading_failure_is_reported_not_raised(tmp_path):
    (tmp_path / "config.json").write_text('{"encoders": {}, "backbone": {"gguf": "/etc/passwd"}}')

    async def main():
        engine = InferenceEngine(model_dir=tmp_path)
        with pytest.raises(NotReady):
            await engine.embed([("text", "x")])
        await engine.start()
        with pytest.raises(NotReady, match="outside the model directory"):
            await engine.wait_ready(timeout=30)
        assert not engine.ready
        await engine.stop()

    asyncio.run(main())


def test_tiny_temperatures_decode_greedily_instead_of_failing(model):
    # 5e-324 once made every logit inf and the sampler fail on NaN probabilities (found by fuzzing)
    async def both(engine):
        return await asyncio.gather(
            engine.generate(_record(PROTEINS[0]), max_tokens=6, temperature=5e-324, top_p=5e-324),
            engine.generate(_record(PROTEINS[0]), max_tokens=6, temperature=0.5, top_p=0.9),
        )

    (tiny, sampled), _ = _run(both, model)
    assert tiny.text == model.generate([_record(PROTEINS[0])], max_new_tokens=6)[0]
    assert sampled.completion_tokens >= 1


def _no_eos(model) -> dict[int, float]:
    return {model.tokenizer.eos_token_id: -100.0}


def test_retry_after_follows_the_measured_drain_rate(model):
    settings = GenerationSettings(max_tokens=40, logit_bias=_no_eos(model))  # equal jobs

    async def measure(engine):
        for protein in PROTEINS[:4]:  # one at a time: the engine measures how fast jobs leave
            await engine.generate(_record(protein), settings)
        jobs = [asyncio.ensure_future(engine.generate(_record(p), settings)) for p in PROTEINS + PROTEINS[:4]]
        await asyncio.sleep(0)  # all queued
        predicted = engine.retry_after()
        started = time.monotonic()
        await asyncio.gather(*jobs)
        return predicted, time.monotonic() - started

    (predicted, actual), _ = _run(measure, model, max_batch=1, max_wait_ms=0, max_queue=16)
    # whole seconds, from a rate measured on four jobs: right within a factor of two
    assert actual / 2 - 1 <= predicted <= 2 * actual + 1, (predicted, actual)


def test_the_engine_says_it_is_saturated_while_its_queue_outlasts_the_timeout(model):
    settings = GenerationSettings(max_tokens=40, logit_bias=_no_eos(model))

    async def flood(engine):
        for protein in PROTEINS[:3]:
            await engine.generate(_record(protein), settings)
        idle = engine.saturated
        # many more jobs than a fast machine answers within the 1 s deadline, so the queue outlasts it
        jobs = [engine.generate(_record(p), settings) for p in PROTEINS * 12]
        flooded = asyncio.gather(*jobs, return_exceptions=True)
        busy = None
        while not flooded.done() and busy is None:  # read it as a probe would, while the flood lasts
            await asyncio.sleep(0.05)
            busy = engine.saturated
        results = await flooded
        while engine.queue_depth:  # expired jobs leave the queue as the batcher reaches them
            await asyncio.sleep(0.05)
        return idle, busy, engine.saturated, results

    (idle, busy, after, results), _ = _run(flood, model, max_batch=1, max_wait_ms=0, max_queue=64, timeout_s=1.0)
    assert idle is None and after is None
    assert busy is not None and "timeout_s=1" in busy
    assert any(isinstance(r, RequestTimeout) for r in results)  # the flood did outlast the deadline

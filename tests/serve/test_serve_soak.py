"""A bounded soak on loopback: many concurrent clients send a mix of valid, invalid and oversized
requests to one real ``kiban serve`` for about 40 seconds. Afterwards: every valid request was
answered (correctly) or refused with 429/503 + Retry-After, nothing answered 5xx otherwise, no
request hung or lost its connection, the server is healthy and ready, and its memory is back near
where it started.

Loopback only: every request goes to the server this module starts on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import psutil
import pytest

CLIENTS, SOAK_S, REQUEST_TIMEOUT_S = 32, 40.0, 30.0
PAUSE_S, BACKOFF_S = 0.01, 0.2
MEMORY_SLACK_BYTES = 100 * 2**20  # allocator slack: glibc keeps freed arenas, torch caches buffers
FLAGS = tuple(
    "--max-batch 4 --max-wait-ms 10 --max-queue 8 --rate-limit 40 --rate-burst 20 --max-tokens 48 "
    "--default-max-tokens 8 --max-body-bytes 200000 --max-sequence-length 500 --max-text-chars 20000 "
    "--timeout-s 20 --no-access-log".split()
)
PROTEINS = ["MKTAYIAKQR", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSF", "GSHMLEDPVDAFQ"]
CHAT = "/v1/chat/completions"


def _chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


def _valid() -> list[tuple[str, dict]]:
    requests = []
    for protein in PROTEINS:
        parts = [{"type": "text", "text": "Is"}, {"type": "protein", "protein": {"sequence": protein}}]
        requests.append((CHAT, _chat(parts)))
        requests.append((CHAT, _chat(parts, stream=True)))
        requests.append(("/v1/embeddings", {"input": [protein, {"type": "molecule", "molecule": {"smiles": "CCO"}}]}))
    requests.append(("/v1/predict/toxicity", {"inputs": ["CCO", "c1ccccc1"]}))
    return requests


def _invalid() -> list[tuple[str, dict | bytes]]:
    return [
        ("/v1/predict/toxicity", {"inputs": ["CCO", "C1CC(("]}),
        (CHAT, _chat("hello", max_tokens=True)),
        (CHAT, _chat("a\ud800b")),
        (CHAT, _chat("What is <molecule>?")),
        (CHAT, _chat("hello", tools=[{"type": "function"}])),
        (CHAT, _chat("hello", response_format={"type": "json_object"})),
        (CHAT, _chat(None)),
        (CHAT, b'{"messages": ['),
        ("/v1/embeddings", {"input": [{"type": "dna", "dna": {"sequence": "ACGT"}}]}),  # no dna encoder
        ("/v1/predict/nothing", {"inputs": ["CCO"]}),
    ]


def _oversized() -> list[tuple[str, dict]]:
    stack = base64.b64encode(b"II*\x00" + b"\x00" * 64).decode()
    return [
        ("/v1/embeddings", {"input": "x" * 250_000}),  # over max_body_bytes
        (CHAT, _chat([{"type": "protein", "protein": {"sequence": "M" * 5000}}])),  # over max_sequence_length
        (CHAT, _chat("y" * 15_000, max_tokens=2)),  # under max_text_chars, over the backbone's context
        (CHAT, _chat("hello", max_tokens=5000)),  # over max_tokens
        (CHAT, _chat([{"type": "image_url", "image_url": {"url": f"data:image/tiff;base64,{stack}"}}])),
    ]


def _content(path: str, body: dict, response: httpx.Response):
    if body.get("stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), response.text[-500:]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    data = response.json()
    if path == CHAT:
        return data["choices"][0]["message"]["content"]
    if path == "/v1/embeddings":
        return np.array([d["embedding"] for d in data["data"]])
    return [row["label"] for row in data["data"]]


@pytest.fixture(scope="module")
def soak_server(start_server, build_model, tmp_path_factory):
    model_dir = build_model(tmp_path_factory.mktemp("model") / "soak", ["protein", "molecule"])
    return start_server(model_dir, *FLAGS)


def test_a_mixed_storm_of_clients_leaves_the_server_healthy(soak_server, api_keys):
    assert soak_server.url.startswith("http://127.0.0.1:")
    valid, invalid, oversized = _valid(), _invalid(), _oversized()
    with soak_server.client(api_keys[0]) as api:
        expected = [_content(path, body, api.post(path, json=body)) for path, body in valid]
    process = psutil.Process(soak_server.pid)
    time.sleep(1.0)  # every key's bucket refills
    start_rss = process.memory_info().rss

    async def client(c: int, http: httpx.AsyncClient, until: float) -> list[tuple[str, int, object]]:
        mix = [("valid", i) for i in range(len(valid))] + [("invalid", i) for i in range(len(invalid))]
        mix += [("oversized", i) for i in range(len(oversized))]
        out, k = [], c
        while time.monotonic() < until:
            kind, index = mix[k % len(mix)]
            k += 1
            path, body = {"valid": valid, "invalid": invalid, "oversized": oversized}[kind][index]
            request = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(
                body, bytes
            ) else {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
            try:
                response = await asyncio.wait_for(http.post(path, **request), REQUEST_TIMEOUT_S)
                await response.aread()
            except (TimeoutError, httpx.HTTPError) as error:
                out.append((kind, index, error))
                continue
            out.append((kind, index, response))
            await asyncio.sleep(PAUSE_S if response.status_code < 429 else BACKOFF_S)
        return out

    async def storm():
        until = time.monotonic() + SOAK_S
        https = [
            httpx.AsyncClient(
                base_url=soak_server.url, headers={"authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_S
            )
            for key in api_keys
        ]
        try:
            results = await asyncio.gather(*(client(c, https[c % len(https)], until) for c in range(CLIENTS)))
        finally:
            for http in https:
                await http.aclose()
        return [item for per_client in results for item in per_client]

    outcomes = asyncio.run(storm())
    counts: dict[tuple[str, int | str], int] = {}
    differing = 0
    for kind, index, response in outcomes:
        assert isinstance(response, httpx.Response), f"a {kind} request hung or lost its connection: {response!r}"
        status = response.status_code
        counts[(kind, status)] = counts.get((kind, status), 0) + 1
        if status in (429, 503):  # refused for load: any kind of request, always with Retry-After
            assert int(response.headers["retry-after"]) >= 1, response.text
            continue
        assert status < 500, f"{kind} request {index}: {status} {response.text[:300]}"
        if kind == "valid":
            path, body = valid[index]
            assert status == 200, response.text
            got = _content(path, body, response)  # well-formed: a stream ends with [DONE], no error event
            if path == "/v1/embeddings":
                assert np.allclose(got, expected[index], atol=1e-4), f"request {index}: another input's vectors"
            elif got != expected[index]:
                # greedy text can flip on a near-tie when the batch around it has another shape;
                # answers staying with their own request is tests/serve/test_serve_concurrency.py's
                differing += 1
        else:
            assert 400 <= status < 500 and response.json()["error"]["message"], response.text
    print(f"soak: {len(outcomes)} requests, {dict(sorted(counts.items()))}; {differing} greedy texts differed")
    assert counts.get(("valid", 200), 0) >= CLIENTS, counts
    assert sum(n for (kind, status), n in counts.items() if kind != "valid" and 400 <= status < 429) >= CLIENTS

    with soak_server.client(api_keys[1]) as api:
        assert api.get("/readyz").json()["status"] == "ready"
        assert httpx.get(f"{soak_server.url}/healthz").json()["status"] == "ok"
        path, body = valid[0]
        assert _content(path, body, api.post(path, json=body)) == expected[0]
        assert "kiban_queue_depth 0.0" in api.get("/metrics").text
    deadline = time.monotonic() + 15
    while process.memory_info().rss > start_rss + MEMORY_SLACK_BYTES and time.monotonic() < deadline:
        time.sleep(0.2)
    end_rss = process.memory_info().rss
    mib = 2**20
    assert end_rss <= start_rss + MEMORY_SLACK_BYTES, f"RSS {start_rss / mib:.0f} -> {end_rss / mib:.0f} MiB"
    print(f"soak: RSS start {start_rss / mib:.0f} MiB, end {end_rss / mib:.0f} MiB")

"""Batching over real HTTP: the same requests sent concurrently and one by one get the same
answers (chat, streamed chat, embeddings, predictions), and the server did batch them.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np

PROTEINS = [
    "MKTAYIAKQR",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSF",
    "GSHMLEDPVDAFQ",
    "MKKLLPTAAAGLLLLAAQPAMA",
    "ACDEFGHIKLMNPQRSTVWY",
    "MSTNPKPQRKTKRNTNRRPQDVKFPGG",
    "MGSSHHHHHHSSGLVPRGSH",
    "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG",
]
SMILES = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"]


def _requests() -> list[tuple[str, dict]]:
    requests = []
    for i, protein in enumerate(PROTEINS):
        parts = [
            {"type": "text", "text": "Does"},
            {"type": "protein", "protein": {"sequence": protein}},
            {"type": "text", "text": "bind"},
            {"type": "molecule", "molecule": {"smiles": SMILES[i % len(SMILES)]}},
        ]
        body = {"model": "kiban", "max_tokens": 4 + 3 * i, "messages": [{"role": "user", "content": parts}]}
        requests.append(("/v1/chat/completions", body))
        requests.append(("/v1/chat/completions", {**body, "stream": True}))
        requests.append(
            ("/v1/embeddings", {"input": [{"type": "protein", "protein": {"sequence": protein}}, protein]})
        )
    requests += [("/v1/predict/toxicity", {"inputs": [s]}) for s in SMILES]
    return requests


def _answer(path: str, body: dict, response: httpx.Response):
    assert response.status_code == 200, response.text
    if body.get("stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    data = response.json()
    if path == "/v1/chat/completions":
        return data["choices"][0]["message"]["content"]
    if path == "/v1/embeddings":
        return np.array([d["embedding"] for d in data["data"]])
    return data["data"]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, atol=1e-5)
    if isinstance(a, list):  # predictions
        return all(
            x["label"] == y["label"]
            and np.allclose(list(x["probabilities"].values()), list(y["probabilities"].values()), atol=1e-5)
            for x, y in zip(a, b)
        )
    return a == b


def _batched_rows(metrics: str, kind: str) -> tuple[float, float]:
    """(forward passes, rows) of ``kind`` so far, from /metrics."""
    count = float(re.search(rf'kiban_batch_rows_count{{kind="{kind}"}} (\S+)', metrics).group(1))
    total = float(re.search(rf'kiban_batch_rows_sum{{kind="{kind}"}} (\S+)', metrics).group(1))
    return count, total


def test_concurrent_requests_get_the_answers_they_get_one_by_one(server, api, api_keys):
    requests = _requests()
    alone = [_answer(path, body, api.post(path, json=body)) for path, body in requests]
    chats = [
        a
        for (path, body), a in zip(requests, alone)
        if path.endswith("completions") and not body.get("stream")
    ]
    assert len(set(chats)) == len(chats), "the test needs answers that differ"
    before = {kind: _batched_rows(api.get("/metrics").text, kind) for kind in ("generate", "embed")}

    async def all_at_once():
        headers = {"authorization": f"Bearer {api_keys[0]}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
            # twice over, shuffled, so that neighbours in a batch differ from run to run
            order = list(range(len(requests))) * 2
            np.random.default_rng(0).shuffle(order)
            responses = await asyncio.gather(
                *(client.post(requests[i][0], json=requests[i][1]) for i in order)
            )
            return order, responses

    order, responses = asyncio.run(all_at_once())
    for i, response in zip(order, responses):
        path, body = requests[i]
        got = _answer(path, body, response)
        assert _same(got, alone[i]), (
            f"request {i} ({path}) got another request's answer: {got!r} != {alone[i]!r}"
        )
    after = {kind: _batched_rows(api.get("/metrics").text, kind) for kind in ("generate", "embed")}
    passes = after["generate"][0] - before["generate"][0]
    rows = after["generate"][1] - before["generate"][1]
    assert rows == 2 * 2 * len(PROTEINS) and passes < rows, "the chat requests were not batched"

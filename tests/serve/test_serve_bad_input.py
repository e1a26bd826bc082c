"""Hostile and broken requests against a real server: each gets a 4xx whose message says what was
wrong (naming the limit where one was hit), never a 5xx or a traceback, and the next good request
still succeeds.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

GOOD_CHAT = {
    "model": "kiban",
    "max_tokens": 4,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is"},
                {"type": "protein", "protein": {"sequence": "MKTAYIAKQR"}},
            ],
        }
    ],
}
PNG_MAGIC_ONLY = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()


def _chat(*parts: dict, **extra) -> dict:
    return {
        "model": "kiban",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": list(parts)}],
        **extra,
    }


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _protein(sequence: str) -> dict:
    return {"type": "protein", "protein": {"sequence": sequence}}


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _bad_requests(make_data_url) -> list[tuple[str, dict, int, tuple[str, ...]]]:
    """(name, httpx request arguments, status, words the error message must contain)."""
    big_image = make_data_url(np.zeros((600, 600, 3), dtype=np.uint8))
    gray = make_data_url(np.zeros((32, 32), dtype=np.uint8))
    chat = "/v1/chat/completions"
    return [
        (
            "100k-residue protein",
            {"url": chat, "json": _chat(_text("Fold"), _protein("M" * 100_000))},
            422,
            ("100000 characters", "max_sequence_length=2000", "content[1]"),
        ),
        (
            "protein over the encoder's length",
            {"url": chat, "json": _chat(_protein("M" * 1500))},
            422,
            ("1500 residues", "max_length 1022"),
        ),
        ("non-amino-acid letters", {"url": chat, "json": _chat(_protein("MKT123"))}, 422, ("protein",)),
        (
            "invalid SMILES",
            {"url": chat, "json": _chat(_text("Is"), {"type": "molecule", "molecule": {"smiles": "C1CC(("}})},
            422,
            ("SMILES", "C1CC(("),
        ),
        (
            "corrupt base64 image",
            {"url": chat, "json": _chat(_text("See"), _image("data:image/png;base64,iVBOR%%%w0KGgo"))},
            422,
            ("content[1].image_url.url", "corrupt base64"),
        ),
        (
            "base64 that is no image",
            {"url": chat, "json": _chat(_image(f"data:image/png;base64,{PNG_MAGIC_ONLY}"))},
            422,
            ("content[0].image_url.url", "not a PNG, JPEG or TIFF"),
        ),
        (
            "a remote image URL",
            {"url": chat, "json": _chat(_image("http://169.254.169.254/latest/meta-data"))},
            422,
            ("fetches nothing",),
        ),
        (
            "too many pixels",
            {"url": chat, "json": _chat(_image(big_image))},
            422,
            ("1080000 voxels", "max_image_voxels=750000"),
        ),
        ("wrong channel count", {"url": chat, "json": _chat(_image(gray))}, 422, ("image", "in_chans")),
        (
            "unknown part type",
            {"url": chat, "json": _chat({"type": "audio", "audio": {"data": "xyz"}})},
            422,
            ("'audio'", "does not match", "'protein'"),
        ),
        (
            "unknown typed input in embeddings",
            {"url": "/v1/embeddings", "json": {"input": [{"type": "rna", "rna": {}}]}},
            422,
            ("'rna'", "does not match"),
        ),
        (
            "malformed JSON",
            {"url": chat, "content": b'{"messages": [', "headers": {"content-type": "application/json"}},
            400,
            ("not valid JSON",),
        ),
        ("JSON of the wrong shape", {"url": chat, "json": {"messages": "hello"}}, 422, ("messages",)),
        ("no messages", {"url": chat, "json": {"messages": []}}, 422, ("messages", "at least 1")),
        (
            "body that is not JSON",
            {"url": chat, "content": b"hello", "headers": {"content-type": "text/plain"}},
            422,
            (),
        ),
        (
            "max_tokens over the limit",
            {"url": chat, "json": {**GOOD_CHAT, "max_tokens": 5000}},
            422,
            ("max_tokens is 5000", "max_tokens=2000"),
        ),
        ("too many inputs", {"url": chat, "json": _chat(*[_protein("MKT")] * 9)}, 422, ("max_inputs=8",)),
        (
            "too many embedding inputs",
            {"url": "/v1/embeddings", "json": {"input": ["a"] * 9}},
            422,
            ("9 inputs", "max_inputs=8"),
        ),
        (
            "genes and values differ",
            {
                "url": "/v1/embeddings",
                "json": {"input": [{"type": "cell", "cell": {"genes": ["GENE1", "GENE2"], "values": [1.0]}}]},
            },
            422,
            ("genes (2) and values (1)",),
        ),
        (
            "placeholder with no input",
            {"url": chat, "json": _chat(_text("What is <protein>?"))},
            422,
            ("<protein>", "placeholder tag", "typed part"),
        ),
        ("n > 1", {"url": chat, "json": {**GOOD_CHAT, "n": 3}}, 422, ("n",)),
        (
            "last turn not the user's",
            {
                "url": chat,
                "json": {
                    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
                },
            },
            422,
            ("last message",),
        ),
        (
            "assistant speaks first",
            {
                "url": chat,
                "json": {
                    "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]
                },
            },
            422,
            ("must start with a system or user message",),
        ),
        ("unknown model", {"url": chat, "json": {**GOOD_CHAT, "model": "gpt-4o"}}, 404, ("gpt-4o", "kiban")),
        (
            "unknown task",
            {"url": "/v1/predict/solubility", "json": {"inputs": ["CCO"]}},
            404,
            ("solubility",),
        ),
        (
            "wrong embedding width",
            {"url": "/v1/embeddings", "json": {"input": "x", "dimensions": 7}},
            422,
            ("dimensions", "32"),
        ),
        ("unknown route", {"url": "/v1/completions", "json": {"prompt": "x"}}, 404, ()),
    ]


def _check(response: httpx.Response, status: int, words: tuple[str, ...]) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "Traceback" not in response.text


def test_each_bad_request_gets_a_clear_4xx_and_the_next_good_one_succeeds(api, make_data_url):
    for name, request, status, words in _bad_requests(make_data_url):
        response = api.request(request.pop("method", "POST"), **request)
        try:
            _check(response, status, words)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
        good = api.post("/v1/chat/completions", json=GOOD_CHAT)
        assert good.status_code == 200, f"after {name}: {good.text}"


def test_keys_are_required_and_checked(server, api_keys):
    for headers in (
        {},
        {"authorization": "Bearer wrong-key-0000000000000000"},
        {"authorization": api_keys[0]},
        {"authorization": f"Basic {api_keys[0]}"},
    ):
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("GET", "/readyz"),
            ("GET", "/openapi.json"),
            ("GET", "/no/such/route"),
        ):
            response = httpx.request(method, f"{server.url}{path}", headers=headers, json=GOOD_CHAT)
            assert response.status_code == 401, (headers, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]["message"]
    for key in api_keys:  # every key in the file works, right after the refusals
        good = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json=GOOD_CHAT,
            timeout=60,
        )
        assert good.status_code == 200, good.text


def test_oversize_bodies_are_refused_before_they_are_read(api):
    big = {"input": "x" * 1_100_000}
    response = api.post("/v1/embeddings", json=big)
    _check(response, 413, ("max_body_bytes=1000000",))

    def chunks():  # no Content-Length: the server has to count as the body arrives
        for _ in range(12):
            yield b"x" * 100_000

    response = api.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    _check(response, 413, ("max_body_bytes=1000000",))
    assert api.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200


def test_a_part_for_a_modality_the_model_lacks_is_named(small_server, api_keys):
    with small_server.client(api_keys[2]) as api:
        for part in (
            {"type": "dna", "dna": {"sequence": "ACGT"}},
            {"type": "cell", "cell": {"genes": ["GENE1"], "values": [1.0]}},
        ):
            response = api.post("/v1/chat/completions", json=_chat(_text("What is"), part))
            _check(response, 422, (f"{part['type']!r} part", "molecule, protein"))
            response = api.post("/v1/embeddings", json={"input": [part]})
            _check(response, 422, (f"{part['type']!r} part",))
        assert api.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200


def test_no_key_ever_reaches_the_log(server, api_keys):
    httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer wrong-key-0000000000000000"})
    log = server.log()
    assert "POST /v1/chat/completions" in log  # the access log is on, and it is this server's
    for key in (*api_keys, "wrong-key-0000000000000000"):
        assert key not in log


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/embeddings", "/v1/predict/toxicity"])
def test_garbage_bodies_never_give_5xx(api, route):
    for body in (
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"input": null}',
        b"\xff\xfe",
        b'{"messages": [{"role": 1}]}',
        b'{"inputs": [{"type": "protein"}]}',
        b'{"input": [[1, 2, 3]]}',
        b"1e999999",
    ):
        response = api.post(route, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        assert response.json()["error"]["message"]

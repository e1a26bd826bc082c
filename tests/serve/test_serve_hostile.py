"""The API under hostile and careless clients, on the shared real ``kiban serve`` over loopback:
work is bounded in its own unit (prompt tokens, image voxels and encoder passes) and refused before
any model work, a client that leaves frees the engine, text is text (invalid Unicode refused,
placeholder tags refused in every route), request types are strict, and every OpenAI option the
server accepts is honoured (the same answer as ``KibanModel.generate``) while the others are 422s
naming the field.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

from kiban.fusion.backbone import byte_tokenizer

CHAT = "/v1/chat/completions"
PROTEIN = "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF"
EOS = byte_tokenizer().eos_token_id
NO_EOS = {str(EOS): -100}  # answers that run to their max_tokens


def _chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _protein_question(**extra) -> dict:
    parts = [{"type": "text", "text": "Describe"}, {"type": "protein", "protein": {"sequence": PROTEIN}}]
    return _chat(parts, **extra)


def _metric(api: httpx.Client, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(f"{name}{{{labels}}}" if labels else name) + r" (\S+)$"
    found = re.search(pattern, api.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _refused(response: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


def _raw_post(api: httpx.Client, path: str, body: dict) -> httpx.Response:
    r"""POST ``body`` as JSON with ASCII escapes, so a lone surrogate travels as ``\ud800``."""
    return api.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _tiff_url(array: np.ndarray) -> str:
    import base64

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib")  # small on the wire, large decoded
    return "data:image/tiff;base64," + base64.b64encode(buffer.getvalue()).decode()


# -- limits in the unit of work --------------------------------------------------------------------


def test_a_prompt_over_the_context_is_refused_before_any_model_work_and_the_next_is_answered(api):
    passes = _metric(api, "kiban_batch_rows_count", 'kind="generate"')
    started = time.monotonic()
    response = api.post(CHAT, json=_chat("x" * 99_000, max_tokens=2))
    seconds = time.monotonic() - started
    _refused(response, 422, "messages", "context_length=4096", "max_tokens=2")
    assert _metric(api, "kiban_batch_rows_count", 'kind="generate"') == passes  # no forward pass ran
    good = api.post(CHAT, json=_protein_question())
    assert good.status_code == 200, good.text
    print(f"99,000-character prompt refused in {seconds:.3f} s")


def test_a_deep_z_stack_of_tiny_slices_is_refused_before_encoding(api):
    stack = np.zeros((32, 3, 2, 2), dtype=np.uint8)  # 384 voxels, but 32 encoder passes
    image = {"type": "image_url", "image_url": {"url": _tiff_url(stack)}}
    passes = _metric(api, "kiban_batch_rows_count", 'kind="embed"')
    for path, body in (
        ("/v1/embeddings", {"input": [image]}),
        (CHAT, _chat([{"type": "text", "text": "What is"}, image])),
    ):
        error = _refused(api.post(path, json=body), 422, None, "32 z-slices", "max_image_passes=4")
        assert error["code"] == "limit_exceeded"
    assert _metric(api, "kiban_batch_rows_count", 'kind="embed"') == passes


def test_every_axis_counts_against_the_voxel_limit(api):
    # 300 x 300 pixels is far under the limit; nine channels of them are not
    many_channels = np.zeros((9, 300, 300), dtype=np.uint8)
    image = {"type": "image_url", "image_url": {"url": _tiff_url(many_channels)}}
    _refused(api.post("/v1/embeddings", json={"input": [image]}), 422, None, "810000 voxels", "max_image_voxels")


# -- a client that leaves ----------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_generation_frees_the_engine(server, api):
    cancelled = _metric(api, "kiban_completions_total", 'finish_reason="cancelled"')
    tokens = _metric(api, "kiban_completion_tokens_total")
    body = _protein_question(max_tokens=2000, logit_bias=NO_EOS)  # would run all 2000 steps

    def leave_early() -> None:
        with server.client(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post(CHAT, json=body)  # no stream: the client just gives up and closes

    thread = threading.Thread(target=leave_early)
    thread.start()
    thread.join()
    until = time.monotonic() + 30  # a bound on a hang, not a speed check
    while _metric(api, "kiban_completions_total", 'finish_reason="cancelled"') == cancelled:
        assert time.monotonic() < until, "the abandoned generation was never cancelled"
        time.sleep(0.1)
    generated = _metric(api, "kiban_completion_tokens_total") - tokens
    assert 0 < generated < 2000, generated  # it stopped part-way
    assert _metric(api, "kiban_queue_depth") == 0
    assert api.post(CHAT, json=_protein_question()).status_code == 200


# -- text is text ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, _chat("a\ud800b"), "messages[0].content"),
        (CHAT, _chat([{"type": "text", "text": "a\udfffb"}]), "messages[0].content[0].text"),
        (CHAT, _chat([{"type": "protein", "protein": {"sequence": "MK\ud800T"}}]), "messages[0].content[0].protein.sequence"),
        (CHAT, {**_chat("hello"), "stop": ["\ud800"]}, "stop"),
        (CHAT, {**_chat("hello"), "user": "\udc00"}, "user"),
        ("/v1/embeddings", {"input": "a\ud800b"}, "input"),
        ("/v1/embeddings", {"input": [{"type": "text", "text": "\ud800"}]}, "input"),
        ("/v1/embeddings", {"input": [{"type": "cell", "cell": {"genes": ["G\ud800"], "values": [1.0]}}]}, "input"),
        ("/v1/predict/toxicity", {"inputs": ["CC\ud800O"]}, "inputs"),
    ],
)
def test_invalid_unicode_is_a_4xx_naming_the_field_in_every_route(api, path, body, param):
    error = _refused(_raw_post(api, path, body), 422, None, "not valid Unicode", "surrogate")
    assert error["param"].startswith(param), error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, _chat("What is <molecule>?"), "messages[0].content"),
        (CHAT, _chat([{"type": "text", "text": "Compare <protein>"}]), "messages[0].content[0].text"),
        (CHAT, {"messages": [{"role": "system", "content": "<dna>"}, {"role": "user", "content": "hi"}]}, "messages[0].content"),
        ("/v1/embeddings", {"input": "what is <molecule>"}, "input[0]"),
        ("/v1/embeddings", {"input": [{"type": "text", "text": "<cell>"}]}, "input[0].text"),
        ("/v1/predict/toxicity", {"inputs": ["CCO", "<molecule>"]}, "inputs[1]"),
    ],
)
def test_one_rule_for_placeholder_tags_in_every_route(api, path, body, param):
    _refused(api.post(path, json=body), 422, param, "placeholder tag", "typed part")


# -- strict types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"n": "1"}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"logprobs": 1}, "logprobs"),
        ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_no_coercion_and_no_unknown_fields(api, extra, param):
    _refused(api.post(CHAT, json={**_chat("hello"), **extra}), 422, param)


@pytest.mark.parametrize("content", [None, "", [], [{"type": "text", "text": ""}]])
def test_a_user_message_without_content_is_refused(api, content):
    _refused(api.post(CHAT, json=_chat(content)), 422, "messages[0].content", "needs content")


# -- the OpenAI options ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_model(model_dir):
    from kiban.serve.loading import load_model_dir

    model, _ = load_model_dir(model_dir)
    return model


def _local_record() -> dict:
    # what the server makes of _protein_question(): parts joined with spaces, the part a placeholder
    return {"messages": [{"role": "user", "content": "Describe <protein>"}], "inputs": {"protein": [PROTEIN]}}


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_the_server_and_kiban_model_generate_give_the_same_answers(api, local_model):
    greedy = _text(api.post(CHAT, json=_protein_question(max_tokens=16)))
    assert local_model.generate([_local_record()], max_new_tokens=16) == [greedy]
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    sampled = _text(api.post(CHAT, json=_protein_question(max_tokens=16, **sampling)))
    local = local_model.generate([_local_record()], max_new_tokens=16, do_sample=True, **sampling)
    assert local == [sampled]
    assert sampled != greedy, "the test needs a sample that differs from the greedy answer"


def test_the_same_seed_gives_the_same_answer_and_another_seed_another(api):
    def sample(seed: int) -> str:
        return _text(api.post(CHAT, json=_protein_question(max_tokens=24, temperature=1.0, seed=seed, logit_bias=NO_EOS)))

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_stop_strings_end_the_answer_before_them(api):
    full = _text(api.post(CHAT, json=_protein_question(max_tokens=30, logit_bias=NO_EOS)))
    stop = full[6:9]
    response = api.post(CHAT, json=_protein_question(max_tokens=30, logit_bias=NO_EOS, stop=[stop, "\u2603\u2603"]))
    assert _text(response) == full[: full.find(stop)]
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    streamed = api.post(CHAT, json=_protein_question(max_tokens=30, logit_bias=NO_EOS, stop=stop, stream=True))
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")][:-1]
    pieces = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events)
    assert pieces == full[: full.find(stop)]


def test_logprobs_and_top_logprobs(api):
    response = api.post(CHAT, json=_protein_question(max_tokens=6, logit_bias=NO_EOS, logprobs=True, top_logprobs=2))
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == response.json()["usage"]["completion_tokens"] == 6
    # a byte-level token may hold part of a character: its text is then a replacement character,
    # and its bytes, joined with the others', give the answer (OpenAI's contract for ``bytes``)
    assert bytes(b for t in content for b in t["bytes"]).decode("utf-8", "replace") == choice["message"]["content"]
    assert all(t["token"] == bytes(t["bytes"]).decode("utf-8", "replace") for t in content)
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    plain = api.post(CHAT, json=_protein_question(max_tokens=6))
    assert plain.json()["choices"][0].get("logprobs") is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"store": True}, "store"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_options_not_honoured_are_refused_by_name(api, extra, param):
    _refused(api.post(CHAT, json={**_chat("hello"), **extra}), 422, param)


def test_neutral_values_of_unserved_options_are_accepted(api):
    body = {**_chat("hello"), "response_format": {"type": "text"}, "tool_choice": "none", "store": False, "user": "u1"}
    assert api.post(CHAT, json=body).status_code == 200


# -- batches, keys, limits of the rest ---------------------------------------------------------------------


def test_a_bad_item_in_a_batch_is_named_by_its_index(api):
    error = _refused(
        api.post("/v1/predict/toxicity", json={"inputs": ["CCO", "c1ccccc1", "C1CC((", "CCN"]}),
        422,
        "inputs[2]",
        "inputs[2]",
        "C1CC((",
    )
    assert error["code"] == "invalid_input"
    error = _refused(
        api.post("/v1/embeddings", json={"input": ["a passage", {"type": "molecule", "molecule": {"smiles": "C1CC(("}}]}),
        422,
        "input[1]",
    )


def test_an_api_key_in_the_query_string_never_reaches_the_log(server, api, api_keys):
    assert api.get("/v1/models", params={"api_key": api_keys[1]}).status_code == 200
    until = time.monotonic() + 10
    while "api_key=<redacted>" not in server.log():
        assert time.monotonic() < until, "the access log never showed the request"
        time.sleep(0.1)
    assert api_keys[1] not in server.log()

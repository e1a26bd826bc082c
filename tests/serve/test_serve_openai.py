"""The official ``openai`` client against a real ``kiban serve`` on loopback: chat about a protein
and a molecule through typed parts, a streamed completion, embeddings, errors as client exceptions;
plus the kiban-only routes (models, predict, health, metrics) over plain HTTP.
"""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

PROTEIN = "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF"
SMILES = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture
def client(server, api_keys):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_keys[0], max_retries=0) as client:
        yield client


def _question(protein: str = PROTEIN, smiles: str = SMILES) -> list[dict]:
    return [
        {"role": "system", "content": "You are a biology assistant."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Does the protein"},
                {"type": "protein", "protein": {"sequence": protein}},
                {"type": "text", "text": "bind the molecule"},
                {"type": "molecule", "molecule": {"smiles": smiles}},
                {"type": "text", "text": "?"},
            ],
        },
    ]


def test_chat_about_a_protein_and_a_molecule(client):
    answer = client.chat.completions.create(model="kiban", messages=_question(), max_tokens=12)
    assert answer.object == "chat.completion" and answer.model == "kiban"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 12
    # the prompt holds the text plus the projected protein and molecule tokens
    assert answer.usage.prompt_tokens > 20
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # the answer is about these inputs: another protein gets another answer
    other = client.chat.completions.create(
        model="kiban", messages=_question(protein="MKKLLPTAAAGLLLLAAQPAMA"), max_tokens=12
    )
    assert other.choices[0].message.content != choice.message.content


def test_streamed_completion_equals_the_plain_one(client):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "protein", "protein": {"sequence": PROTEIN}},
            ],
        }
    ]
    plain = client.chat.completions.create(model="kiban", messages=messages, max_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model="kiban",
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for piece in pieces if piece) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_embeddings_of_text_and_typed_inputs(client, make_data_url):
    image = make_data_url(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    inputs = [
        "p53 regulates the cell cycle",
        {"type": "protein", "protein": {"sequence": PROTEIN}},
        {"type": "molecule", "molecule": {"smiles": SMILES}},
        {"type": "dna", "dna": {"sequence": "ACGTTGCAACGT"}},
        {"type": "cell", "cell": {"genes": ["GENE1", "GENE5", "GENE9"], "values": [3.0, 1.0, 7.5]}},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    # the client asks for base64 by default and decodes it; ask for floats too and compare
    packed = client.embeddings.create(model="kiban", input=inputs)
    floats = client.embeddings.create(model="kiban", input=inputs, encoding_format="float")
    assert [d.index for d in packed.data] == list(range(len(inputs)))
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (len(inputs), 32) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.array([d.embedding for d in packed.data]), vectors, rtol=1e-6)
    # one shared space: every input its own point
    assert len({tuple(np.round(v, 5)) for v in vectors}) == len(inputs)
    single = client.embeddings.create(
        model="kiban", input="p53 regulates the cell cycle", encoding_format="float"
    )
    np.testing.assert_allclose(single.data[0].embedding, vectors[0], atol=1e-5)
    assert packed.usage.prompt_tokens > len(inputs)


def test_errors_reach_the_client_as_its_usual_exceptions(client, server):
    with pytest.raises(openai.UnprocessableEntityError, match="SMILES"):
        client.chat.completions.create(model="kiban", messages=_question(smiles="C1CC(("), max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=_question(), max_tokens=4)
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key", max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.models.list()


def test_models_lists_the_model_and_its_heads(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["kiban"]
    card = models.data[0].model_dump()
    assert card["modalities"] == ["cell", "dna", "image", "molecule", "properties", "protein", "text"]
    assert card["embedding_dim"] == 32
    heads = {h["task"]: h for h in card["heads"]}
    assert set(heads) == {"stability", "toxicity"}
    assert (
        heads["toxicity"]["labels"] == ["non-toxic", "toxic"]
        and heads["toxicity"]["kind"] == "classification"
    )
    assert heads["stability"]["endpoint"] == "/v1/predict/stability"


def test_predict_with_a_classification_and_a_regression_head(api):
    toxicity = api.post(
        "/v1/predict/toxicity", json={"inputs": [SMILES, {"type": "molecule", "molecule": {"smiles": "CCO"}}]}
    )
    assert toxicity.status_code == 200, toxicity.text
    rows = toxicity.json()["data"]
    assert [r["index"] for r in rows] == [0, 1]
    for row in rows:
        assert set(row["probabilities"]) == {"non-toxic", "toxic"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    stability = api.post("/v1/predict/stability", json={"inputs": [PROTEIN]})
    assert stability.status_code == 200, stability.text
    assert set(stability.json()["data"][0]["values"]) == {"tm", "ddg"}
    # a head reads one modality: a protein sent to the molecule head is refused, naming both
    wrong = api.post(
        "/v1/predict/toxicity", json={"inputs": [{"type": "protein", "protein": {"sequence": "MKT"}}]}
    )
    assert wrong.status_code == 422 and "protein" in wrong.text and "molecule" in wrong.text
    missing = api.post("/v1/predict/solubility", json={"inputs": ["CCO"]})
    assert missing.status_code == 404 and "stability, toxicity" in missing.json()["error"]["message"]


def test_predictions_equal_the_head_run_in_process(api, model_dir):
    from kiban.serve.loading import load_model_dir

    model, heads = load_model_dir(model_dir)
    expected = heads["toxicity"].predict(model, [SMILES, "CCO"])
    served = api.post("/v1/predict/toxicity", json={"inputs": [SMILES, "CCO"]}).json()["data"]
    for want, got in zip(expected, served):
        assert got["label"] == want["label"]
        for label, p in want["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)


def test_health_readiness_and_metrics(server, api):
    import httpx

    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"  # no key needed
    assert httpx.get(f"{server.url}/readyz").status_code == 401  # every other route needs one
    assert api.get("/readyz").json()["status"] == "ready"
    api.post("/v1/embeddings", json={"input": "warm"})
    text = api.get("/metrics").text
    assert 'kiban_http_requests_total{method="POST",route="/v1/embeddings",status="200"}' in text
    assert 'kiban_http_request_duration_seconds_bucket{le="0.005",route="/v1/embeddings"}' in text
    assert 'kiban_batch_rows_count{kind="embed"}' in text
    assert "kiban_queue_depth 0.0" in text
    assert 'kiban_rejects_total{reason="unauthorized"}' in text
    assert "kiban_model_ready 1.0" in text


def test_image_parts_in_png_jpeg_and_tiff(api, make_data_url):
    rgb = np.random.default_rng(5).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "TIFF"):
        body = {"input": [{"type": "image_url", "image_url": {"url": make_data_url(rgb, fmt=fmt)}}]}
        response = api.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
        assert response.status_code == 200, (fmt, response.text)
        vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
        assert vector.shape == (32,) and np.isfinite(vector).all()

"""A real ``kiban serve`` (uvicorn on loopback) over a tiny model folder holding one head of each
kind beyond the pooled ones: per-residue states, contacts, a (protein, molecule) pair head, and a
multilabel head saved in the older head.json form. Each answers over HTTP exactly what the same
head answers in process; requests that do not fit a head get a 422 that says why; the OpenAPI
document describes the new request and response shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kiban.tasks.predict  # noqa: F401 - registers the residue, contact and pair architectures
from kiban.tasks import HeadConfig, create_head
from kiban.tiny import tiny_model

PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
OTHER = "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF"
FLAGS = (
    *("--max-batch", "4", "--max-wait-ms", "10", "--max-queue", "16", "--rate-limit", "0"),
    *("--max-sequence-length", "300", "--max-inputs", "4", "--timeout-s", "60", "--no-access-log"),
)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tasks"
    model = tiny_model(["protein", "molecule"], seed=0).eval()
    model.save_pretrained(path)
    protein_width = model.encoders["protein"].output_dim
    width = model.llm.get_input_embeddings().embedding_dim
    configs = [
        HeadConfig(
            task="ss",
            modality="protein",
            kind="residue_classification",
            architecture="residue",
            labels=["C", "E", "H"],
            input_dim=protein_width,
            hidden_dim=8,
        ),
        HeadConfig(
            task="contacts",
            modality="protein",
            kind="contact",
            architecture="contact",
            labels=["contact"],
            input_dim=protein_width,
            hidden_dim=8,
            extra={"project": 4},
        ),
        HeadConfig(
            task="affinity",
            modality="protein+molecule",
            kind="regression",
            architecture="pair",
            labels=["pKd"],
            input_dim=2 * width,
        ),
        HeadConfig(
            task="tox",
            modality="molecule",
            kind="multilabel",
            architecture="multilabel",
            labels=["NR-AR", "SR-p53"],
            input_dim=width,
        ),
    ]
    torch.manual_seed(7)
    for config in configs:
        create_head(config).save(path / "heads" / config.task)
    # tox as a head.json written before the "multilabel" kind existed
    stored = path / "heads" / "tox" / "head.json"
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "kind": "classification"}))
    return path


@pytest.fixture(scope="module")
def local(heads_dir):
    """The same model and heads, in this process."""
    from kiban.fusion import KibanModel
    from kiban.tasks.predict import load_model_heads

    model = KibanModel.from_pretrained(heads_dir).eval()
    return model, load_model_heads(heads_dir, model)


@pytest.fixture(scope="module")
def task_server(start_server, heads_dir):
    return start_server(heads_dir, *FLAGS)


@pytest.fixture(scope="module")
def api(task_server):
    with task_server.client() as client:
        yield client


def _predict(api, task: str, body: dict) -> list[dict]:
    response = api.post(f"/v1/predict/{task}", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["task"] == task and payload["object"] == "list"
    return payload["data"]


def test_models_lists_every_head_kind_and_its_inputs(api):
    heads = {h["task"]: h for h in api.get("/v1/models").json()["data"][0]["heads"]}
    assert {t: h["kind"] for t, h in heads.items()} == {
        "affinity": "regression",
        "contacts": "contact",
        "ss": "residue_classification",
        "tox": "multilabel",  # the old head.json said classification
    }
    assert heads["affinity"]["inputs"] == ["protein", "molecule"]
    assert heads["affinity"]["modality"] == "protein+molecule"
    assert heads["ss"]["inputs"] == ["protein"] and heads["ss"]["labels"] == ["C", "E", "H"]


def test_per_residue_states(api, local):
    model, heads = local
    (row,) = _predict(api, "ss", {"inputs": [PROTEIN]})
    assert set(row) == {"index", "residues"}
    (expected,) = heads["ss"].predict(model, [PROTEIN])
    assert len(row["residues"]) == len(PROTEIN)
    for got, want in zip(row["residues"], expected["residues"]):
        assert (got["position"], got["residue"], got["label"]) == (
            want["position"],
            want["residue"],
            want["label"],
        )
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_contacts_top_k(api, local):
    model, heads = local
    rows = _predict(
        api,
        "contacts",
        {
            "inputs": [PROTEIN, {"type": "protein", "protein": {"sequence": OTHER}}],
            "top_k": 5,
            "min_separation": 8,
        },
    )
    expected = heads["contacts"].predict(model, [PROTEIN, OTHER], top_k=5, min_separation=8)
    for row, want in zip(rows, expected):
        assert row["length"] == want["length"] and len(row["contacts"]) == 5
        assert [(c["i"], c["j"]) for c in row["contacts"]] == [(c["i"], c["j"]) for c in want["contacts"]]
        assert [c["probability"] for c in row["contacts"]] == pytest.approx(
            [c["probability"] for c in want["contacts"]], abs=1e-6
        )
        assert all(c["j"] - c["i"] >= 8 for c in row["contacts"])
    (default,) = _predict(api, "contacts", {"inputs": [PROTEIN]})
    assert len(default["contacts"]) == len(PROTEIN)  # top-L by default


def test_drug_target_pairs(api, local):
    model, heads = local
    pairs = [(PROTEIN, "CC(=O)Oc1ccccc1C(=O)O"), (OTHER, "CCO")]
    body = {
        "inputs": [
            list(pairs[0]),  # bare strings, in the head's order (protein, molecule)
            [
                {"type": "protein", "protein": {"sequence": pairs[1][0]}},
                {"type": "molecule", "molecule": {"smiles": pairs[1][1]}},
            ],
        ]
    }
    rows = _predict(api, "affinity", body)
    expected = heads["affinity"].predict(model, pairs)
    assert [r["index"] for r in rows] == [0, 1]
    for row, want in zip(rows, expected):
        assert set(row) == {"index", "values"}
        assert row["values"]["pKd"] == pytest.approx(want["values"]["pKd"], abs=1e-5)
    assert rows[0]["values"] != rows[1]["values"]


def test_multilabel_probabilities(api, local):
    model, heads = local
    (row,) = _predict(api, "tox", {"inputs": ["c1ccccc1O"]})
    assert set(row) == {"index", "probabilities"}  # no single label: the labels are not exclusive
    (want,) = heads["tox"].predict(model, ["c1ccccc1O"])
    assert row["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)


@pytest.mark.parametrize(
    ("task", "body", "words"),
    [
        (
            "affinity",
            {"inputs": [PROTEIN]},
            ("inputs[0]", "(protein, molecule) pairs", "[protein, molecule]"),
        ),
        ("ss", {"inputs": [[PROTEIN, "CCO"]]}, ("inputs[0]", "single protein inputs")),
        # bare strings are read in the head's order: the protein sequence is no SMILES
        ("affinity", {"inputs": [["CCO", PROTEIN]]}, ("RDKit cannot parse SMILES",)),
        ("affinity", {"inputs": [[PROTEIN, "CCO", "CCN"]]}, ("inputs",)),
        ("ss", {"inputs": [PROTEIN], "top_k": 3}, ("top_k", "contact heads only", "residue_classification")),
        ("contacts", {"inputs": ["M" * 301]}, ("max_sequence_length=300",)),
        ("contacts", {"inputs": [PROTEIN], "top_k": 0}, ("top_k",)),
        ("ss", {"inputs": ["MKTJ"]}, ("non-amino-acid letters 'J'",)),
        (
            "affinity",
            {"inputs": [[{"type": "molecule", "molecule": {"smiles": "CCO"}}, "CCO"]]},
            ("inputs[0][0] is a molecule input, but this task reads protein inputs",),
        ),
    ],
    ids=[
        "single-to-pair",
        "pair-to-single",
        "swapped-bare-strings",
        "three-items",
        "top_k-elsewhere",
        "too-long",
        "top_k-zero",
        "bad-letter",
        "typed-wrong-side",
    ],
)
def test_requests_that_do_not_fit_the_head(api, task, body, words):
    response = api.post(f"/v1/predict/{task}", json=body)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, (word, message)


def test_the_document_describes_the_new_shapes(api):
    document = api.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    predict = document["paths"]["/v1/predict/{task}"]["post"]
    assert sorted(next(p for p in predict["parameters"] if p["name"] == "task")["schema"]["enum"]) == [
        "affinity",
        "contacts",
        "ss",
        "tox",
    ]
    request = schemas["PredictRequest"]["properties"]
    pair = next(option for option in request["inputs"]["items"]["anyOf"] if option.get("type") == "array")
    assert (pair["minItems"], pair["maxItems"]) == (2, 2)
    assert {"top_k", "min_separation"} <= set(request)
    prediction = next(
        s for name, s in schemas.items() if name.startswith("Prediction") and "residues" in s["properties"]
    )
    assert {"label", "probabilities", "values", "residues", "length", "contacts"} <= set(
        prediction["properties"]
    )
    assert {"position", "residue", "label", "probabilities"} <= set(
        schemas["ResiduePrediction"]["properties"]
    )
    assert set(schemas["ContactPair"]["properties"]) == {"i", "j", "probability"}
    head_info = next(s for name, s in schemas.items() if name.startswith("HeadInfo"))
    assert set(head_info["properties"]["kind"]["enum"]) == {
        "classification",
        "regression",
        "multilabel",
        "residue_classification",
        "contact",
        "token_classification",
    }


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_predict_requests_get_no_5xx_and_documented_answers(task_server, api_keys, mode):
    """Schemathesis, from this server's own document (its task enum names the new heads): every
    answer, pair and per-residue ones included, is declared and fits its schema.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    headers = {"authorization": f"Bearer {api_keys[0]}"}
    schema = schemathesis.openapi.from_url(f"{task_server.url}/openapi.json", headers=headers)
    operation = schema["/v1/predict/{task}"]["POST"]
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case):
        case.call_and_validate(headers=headers, checks=checks, timeout=60)

    fuzz()

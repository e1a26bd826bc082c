"""Property-based fuzzing of the live server from its own OpenAPI document (schemathesis).

Schemathesis reads ``/openapi.json`` (with a key) and sends requests generated from it, valid and
invalid, to every operation. No response may be a 5xx, and every response must be one the document
declares, with the declared content type and schema: the document describes the API accurately.
Bounded: a few dozen examples per operation.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="session")
def api_schema(server, api_keys):
    return schemathesis.openapi.from_url(
        f"{server.url}/openapi.json", headers={"authorization": f"Bearer {api_keys[0]}"}
    )


# Listed here rather than read from the document at collection time, when no server runs yet;
# test_the_document_lists_every_endpoint_and_part_type checks the list is complete.
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/predict/{task}"),
    ("GET", "/v1/models"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_generated_request_gets_a_5xx_or_an_undocumented_answer(api_schema, api_keys, method, path, mode):
    if path == "/healthz" and mode == GenerationMode.NEGATIVE:
        pytest.skip("/healthz takes no input and no key: there is nothing to make invalid")
    # schemathesis' own pytest plugin (schema.parametrize with a fixture) fails on pytest 9, so the
    # hypothesis test is built here, one per operation and generation mode
    operation = api_schema[path][method]
    headers = {"authorization": f"Bearer {api_keys[0]}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    statuses: dict[int, int] = {}
    fuzz()
    print(f"{method} {path} {mode.value}: {statuses}")


def test_the_document_lists_every_endpoint_and_part_type(api):
    document = api.get("/openapi.json").json()
    assert set(document["paths"]) == {
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/predict/{task}",
        "/v1/design/molecules",  # fuzzed in test_serve_design.py, on a server of its own
        "/v1/design/proteins",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    components = document["components"]["schemas"]
    content = components["ChatMessage"]["properties"]["content"]["anyOf"]
    parts = next(c for c in content if c.get("type") == "array")["items"]
    assert parts["discriminator"]["propertyName"] == "type"
    assert set(parts["discriminator"]["mapping"]) == {
        "text",
        "image_url",
        "protein",
        "molecule",
        "dna",
        "cell",
    }
    assert components["CellInput"]["required"] == ["genes", "values"]
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "413", "422", "429", "503", "504"} <= set(responses)
    assert "text/event-stream" in responses["200"]["content"]

"""The design routes, called with a real HTTP client against a real ``kiban serve`` on loopback."""

from __future__ import annotations

import pytest
from rdkit import Chem

from kiban.serve.design_routes import REFERENCE_FILE

from .conftest import KEYS, ServerProcess, build_model_dir

TEMPLATE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
# no rate limit (the fuzzer sends many requests); a deadline that ends a fuzzed request for
# hundreds of molecules within seconds rather than minutes
FLAGS = tuple("--max-batch 4 --max-wait-ms 10 --max-queue 8 --rate-limit 0 --timeout-s 15 --no-access-log".split())


@pytest.fixture(scope="module")
def design_server(keys_file, tmp_path_factory):
    """One server for the module, over a protein + molecule model whose folder holds a design reference."""
    model_dir = build_model_dir(tmp_path_factory.mktemp("model") / "design", ["protein", "molecule"])
    (model_dir / REFERENCE_FILE).write_text("CCO\nc1ccccc1O\nCC(=O)Oc1ccccc1C(=O)O\n")
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(model_dir, keys_file, log_path, *FLAGS)
    try:
        server.wait_ready(key=KEYS[0], timeout=300)  # a shared, loaded CI box can take minutes to import
        yield server
    finally:
        server.stop()


def test_molecules_route_returns_valid_molecules_and_counts(design_server):
    with design_server.client() as client:
        body = {"n": 4, "budget": 8, "seed": 3, "condition": "MW < 500"}
        response = client.post("/v1/design/molecules", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        again = client.post("/v1/design/molecules", json=body).json()
        guided = client.post("/v1/design/molecules", json={**body, "guidance": 3.0})
        negative = client.post("/v1/design/molecules", json={**body, "guidance": -1})
    assert guided.status_code == 200, guided.text
    assert all(Chem.MolFromSmiles(m["smiles"]) is not None for m in guided.json()["molecules"])
    assert [m["selfies"] for m in guided.json()["molecules"]] != [m["selfies"] for m in answer["molecules"]]
    assert negative.status_code == 422 and negative.json()["error"]["param"] == "guidance"
    counts = answer["counts"]
    assert counts["sampled"] == len(answer["molecules"]) == counts["valid"] + counts["invalid"]
    assert counts["invalid"] == 0 and counts["conditions"] == ["MW at most 500"]
    assert all(Chem.MolFromSmiles(m["smiles"]) is not None for m in answer["molecules"])
    assert all(m["in_training_set"] is not None for m in answer["molecules"])  # the model folder's reference
    assert [m["selfies"] for m in again["molecules"]] == [m["selfies"] for m in answer["molecules"]]


def test_molecules_route_refuses_bad_requests_and_bounds_length_in_symbols(design_server):
    with design_server.client() as client:
        far = client.post("/v1/design/molecules", json={"n": 2, "condition": "logP 50"})
        typo = client.post("/v1/design/molecules", json={"n": 2, "condition": "logP fifty"})
        target = client.post("/v1/design/molecules", json={"n": 1, "target": "MKT1AY"})
        short = client.post("/v1/design/molecules", json={"n": 3, "budget": 3, "max_symbols": 2, "temperature": 2.0})
        zero = client.post("/v1/design/molecules", json={"n": 1, "max_symbols": 0})
    assert short.status_code == 200, short.text
    assert all(m["selfies"].count("]") <= 2 for m in short.json()["molecules"])
    assert zero.status_code == 422 and zero.json()["error"]["param"] == "max_symbols"
    assert far.status_code == 422 and far.json()["error"]["param"] == "condition"
    assert "'logP 50' is outside what the training set reaches" in far.json()["error"]["message"]
    assert typo.status_code == 422 and "'logP fifty' is not written like" in typo.json()["error"]["message"]
    assert target.status_code == 422 and target.json()["error"]["param"] == "target"


def test_proteins_route_keeps_fixed_positions(design_server):
    with design_server.client() as client:
        response = client.post(
            "/v1/design/proteins", json={"template": TEMPLATE, "fixed": "1-10,20", "n": 2, "steps": 12, "temperature": 2.0}
        )
        bad = client.post("/v1/design/proteins", json={"template": TEMPLATE, "fixed": "40"})
    assert response.status_code == 200, response.text
    designs = response.json()["designs"]
    assert len(designs) == 2
    for design in designs:
        assert design["sequence"][:10] == TEMPLATE[:10] and design["sequence"][19] == TEMPLATE[19]
        assert design["pll"] < 0 and 0 < design["identity"] <= 1
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "fixed"
    assert "outside the 33-residue template" in bad.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/design/molecules", "/v1/design/proteins"])
def test_malformed_design_requests_get_a_documented_4xx_never_a_5xx(design_server, path):
    """Schemathesis' negative mode: requests that break the schema somewhere.

    Pydantic's lax mode reads some of them as valid (``"n": 101.0``), and those run for real: a
    documented 504 at the server's deadline is a right answer to a request too large for it, a 500
    never is.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    headers = {"authorization": f"Bearer {KEYS[0]}"}
    schema = schemathesis.openapi.from_url(f"{design_server.url}/openapi.json", headers=headers)
    operation = schema[path]["POST"]
    statuses: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def fuzz(case):
        response = case.call_and_validate(
            headers=headers, checks=[status_code_conformance, content_type_conformance], timeout=60
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    fuzz()
    # a case lax parsing reads as valid is answered (200); what is never right is a 5xx other than 504
    assert statuses and any(400 <= code < 500 for code in statuses), statuses
    assert all(code < 500 or code == 504 for code in statuses), statuses

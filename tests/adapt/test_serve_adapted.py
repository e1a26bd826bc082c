"""Merged and quantised models, end to end: two ``kiban finetune --mode lora`` runs merged with
``kiban merge``, served by a real ``kiban serve`` on loopback (float32 and ``--quantize int8``) and
read by ``kiban predict``; the forgetting figures land in both metrics.json files.

Tolerances stated here (tiny random model, width 32, so quantisation error is at its largest):
int8 class probabilities within 0.02 and regression values within 2% of float32; int8 next-token
distributions within 0.05 total variation of float32 over a prompt.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import openai
import pandas as pd
import pytest
import torch
import yaml

from kiban.adapt.quantize import load_model, quantize_model
from kiban.cli import main
from kiban.fusion import KibanModel
from kiban.serve.launch import ServerProcess
from kiban.tasks.heads import HeadConfig, PooledHead
from kiban.tasks.predict import load_model_heads

SMILES = [f"{'C' * n}O" for n in range(1, 26)] + [f"c1ccccc1{'C' * n}" for n in range(25)]
PROBE = ["CCO", "c1ccccc1CCO", "CCCCCCO"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real ``kiban finetune --mode lora`` run (task "size"), and a second source from the same
    base with other adapters and a classification head "ring" (a second run would cost as long
    again and prove nothing more).
    """
    root = tmp_path_factory.mktemp("runs")
    data = root / "toy.csv"
    pd.DataFrame(
        {
            "id": [f"m{k}" for k in range(len(SMILES))],
            "smiles": SMILES,
            "size": [float(len(s)) for s in SMILES],
            "ring": [int("c1" in s) for s in SMILES],
        }
    ).to_csv(data, index=False)
    args = ["finetune", "size", "--data", str(data), "--labels", "size", "--mode", "lora", "--epochs", "2"]
    assert main([*args, "--out", str(root / "size")]) == 0
    other = KibanModel.from_pretrained(root / "size" / "model").eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in other.llm.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    other.save_pretrained(root / "ring")
    torch.manual_seed(2)
    config = HeadConfig(
        task="ring", modality="molecule", kind="classification", labels=["0", "1"],
        input_dim=other.llm.get_input_embeddings().embedding_dim, extra={"label_columns": ["ring"]},
    )
    PooledHead(config).save(root / "ring" / "heads" / "ring")
    return root, data


@pytest.fixture(scope="module")
def merged(runs):
    root, data = runs
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "density": 0.5,
                "models": [{"path": "size"}, {"path": "ring"}],
                "evaluate": {"heads": {"size": "toy.csv", "ring": "toy.csv"}},
            }
        )
    )
    assert main(["merge", str(recipe), "--out", str(root / "merged")]) == 0
    return root / "merged"


def test_lora_finetune_writes_before_and_after_perplexity(runs):
    root, _ = runs
    forgetting = json.loads((root / "size" / "metrics.json").read_text())["forgetting"]
    before, after = forgetting["before"]["general_text"], forgetting["after"]["general_text"]
    assert before["tokens"] == after["tokens"] > 100
    assert before["perplexity"] != after["perplexity"]  # the adapters changed the backbone
    assert forgetting["ratio"]["general_text"] == pytest.approx(after["perplexity"] / before["perplexity"])


def test_merge_metrics_hold_each_heads_metric_before_and_after(merged, runs):
    root, _ = runs
    metrics = json.loads((merged / "metrics.json").read_text())
    before = metrics["before"]["models"]
    assert set(before) == {str(root / "size"), str(root / "ring")}
    assert before[str(root / "ring")]["heads"]["ring"]["used"] == len(SMILES)
    assert "accuracy" in metrics["after"]["heads"]["ring"]["metrics"]
    assert "size" in metrics["after"]["heads"]["size"]["metrics"]
    assert metrics["after"]["general_text"]["perplexity"] > 1


@pytest.fixture(scope="module")
def float_server(merged, tmp_path_factory):
    with ServerProcess(merged, None, tmp_path_factory.mktemp("log") / "serve.log") as server:
        server.wait_ready(key=None)
        yield server


@pytest.fixture(scope="module")
def int8_server(merged, tmp_path_factory):
    # --device and --quantize together: the model is placed on the device, then quantised there
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with ServerProcess(merged, None, log, "--quantize", "int8", "--device", "cpu") as server:
        server.wait_ready(key=None)
        yield server


def _predict(server, task):
    with server.client(None) as client:
        response = client.post(f"/v1/predict/{task}", json={"inputs": PROBE})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_merged_model_serves_chat_and_both_heads(merged, float_server):
    model = load_model(merged)
    heads = load_model_heads(merged, model)
    assert set(heads) == {"size", "ring"} and not model.has_lora
    for task in ("size", "ring"):
        expected = heads[task].predict(model, PROBE)
        for row, want in zip(_predict(float_server, task), expected):
            key = "values" if task == "size" else "probabilities"
            assert row[key] == pytest.approx(want[key], abs=1e-5)
    messages = [{"role": "user", "content": "What is ethanol?"}]
    with openai.OpenAI(base_url=f"{float_server.url}/v1", api_key="none", max_retries=0) as client:
        answer = client.chat.completions.create(model="kiban", messages=messages, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content == model.generate([{"messages": messages}], max_new_tokens=8)[0]


def test_kiban_predict_reads_the_merged_heads(merged, runs, tmp_path):
    _, data = runs
    out = tmp_path / "size.csv"
    assert main(["predict", str(merged / "heads" / "size"), "--data", str(data), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == len(SMILES)
    model = load_model(merged)
    head = load_model_heads(merged, model)["size"]
    want = [r["values"]["size"] for r in head.predict(model, SMILES)]
    assert np.allclose(table["size"].to_numpy(), want, atol=1e-4)


def test_int8_server_predicts_within_tolerance_of_float(merged, float_server, int8_server):
    for row, want in zip(_predict(int8_server, "ring"), _predict(float_server, "ring")):
        for label, p in want["probabilities"].items():
            assert row["probabilities"][label] == pytest.approx(p, abs=0.02)
    for row, want in zip(_predict(int8_server, "size"), _predict(float_server, "size")):
        assert row["values"]["size"] == pytest.approx(want["values"]["size"], rel=0.02)


def test_int8_server_chats_as_the_int8_model_and_close_to_float(merged, int8_server):
    quantized = load_model(merged, quantize="int8")
    messages = [{"role": "user", "content": "Name a small molecule."}]
    with openai.OpenAI(base_url=f"{int8_server.url}/v1", api_key="none", max_retries=0) as client:
        answer = client.chat.completions.create(model="kiban", messages=messages, max_tokens=8)
    assert answer.choices[0].message.content == quantized.generate([{"messages": messages}], max_new_tokens=8)[0]
    float_model = load_model(merged)
    ids = float_model.tokenizer("Name a small molecule, please.", return_tensors="pt").input_ids
    with torch.no_grad():
        p = float_model.llm(input_ids=ids).logits.softmax(-1)
        q = quantized.llm(input_ids=ids).logits.softmax(-1)
    assert 0.5 * (p - q).abs().sum(-1).max().item() <= 0.05


def test_saved_quantized_model_loads_quantized(merged, tmp_path):
    from kiban.adapt.quantize import save_quantized, saved_quantization

    model = load_model(merged)
    save_quantized(model, tmp_path / "q", "int4")
    assert saved_quantization(tmp_path / "q") == "int4"
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert record["library"].startswith("torchao==")
    again = load_model(tmp_path / "q")
    assert again.quantization == "int4"
    reference = quantize_model(copy.deepcopy(model), "int4")
    items = [("molecule", s) for s in PROBE]
    assert torch.equal(again.embed(items), reference.embed(items))
    with pytest.raises(ValueError, match="quantised already"):
        quantize_model(again, "int8")


def test_kiban_evaluate_reports_perplexity_and_each_head(merged, runs, tmp_path, capsys):
    root, data = runs
    out = tmp_path / "report.json"
    code = main(
        ["evaluate", str(merged), "--head-data", f"ring={data}", "--quantize", "int8", "--device", "cpu", "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["quantize"] == "int8" and report["general_text"]["perplexity"] > 1
    assert report["heads"]["ring"]["used"] == len(SMILES) and "accuracy" in report["heads"]["ring"]["metrics"]
    assert report["heads"]["size"] == {"scored": False, "why": "no labelled file given (--head-data TASK=FILE)"}
    assert main(["evaluate", str(merged), "--head-data", "nope=x.csv"]) == 2

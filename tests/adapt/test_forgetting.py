"""Perplexity figures: the same number Hugging Face's own loss gives, files read strictly."""

from __future__ import annotations

import math

import pytest
import torch

from kiban.adapt.forgetting import GENERAL_TEXT, adapters_off, read_texts, text_perplexity
from kiban.fusion.prompt import encode_text
from kiban.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(["molecule"], seed=0, lora=True).eval()


def test_text_perplexity_is_exp_of_the_token_mean_loss(model):
    texts = ["The river rises in the hills.", "A short one."]
    figures = text_perplexity(model, texts, batch_size=1)
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[model.tokenizer.bos_token_id, *encode_text(model.tokenizer, text)]])
        with torch.no_grad():
            loss = model.llm(input_ids=ids, labels=ids).loss  # HF: mean over the shifted tokens
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert figures["tokens"] == count
    assert figures["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # batching (padding) does not change it
    assert text_perplexity(model, texts, batch_size=2)["perplexity"] == pytest.approx(figures["perplexity"], rel=1e-5)


def test_adapters_off_is_the_model_before_tuning(model):
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    texts = read_texts(GENERAL_TEXT, limit=3)
    after = text_perplexity(model, texts)["perplexity"]
    with adapters_off(model):
        before = text_perplexity(model, texts)["perplexity"]
    base = tiny_model(["molecule"], seed=0).eval()  # same seed, no adapters: the same base weights
    assert before == pytest.approx(text_perplexity(base, texts)["perplexity"], rel=1e-5)
    assert after != pytest.approx(before, rel=1e-3)


def test_read_texts_reads_paragraphs_lines_and_jsonl(tmp_path):
    assert len(read_texts(GENERAL_TEXT)) == 16
    (tmp_path / "lines.txt").write_text("one\ntwo\n\nthree\n")
    assert read_texts(tmp_path / "lines.txt") == ["one\ntwo", "three"]
    (tmp_path / "flat.txt").write_text("one\ntwo\n")
    assert read_texts(tmp_path / "flat.txt") == ["one", "two"]
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_texts(tmp_path / "t.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        read_texts(tmp_path / "empty.txt")

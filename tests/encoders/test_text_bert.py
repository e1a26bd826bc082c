"""A BiomedBERT/PubMedBERT-style Hugging Face folder as the text encoder: parity with transformers' BertModel."""

from __future__ import annotations

import collections
import csv
import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from kiban.encoders import create_encoder

PUBMEDQA_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "text" / "pubmedqa_pqal_1k.csv"
FALLBACK = [
    "Insulin regulates blood glucose.",
    "CRISPR-Cas9 knockout screens identified genes essential for proliferation.",
    "Does aspirin reduce the risk of colorectal cancer in adults over 50?",
]


@pytest.fixture(scope="module")
def passages() -> list[str]:
    if not PUBMEDQA_CSV.is_file():
        return FALLBACK
    with PUBMEDQA_CSV.open() as handle:
        rows = list(csv.DictReader(handle))[:12]
    return [row["question"] for row in rows] + [row["context"][:600] for row in rows[:6]]


@pytest.fixture(scope="module")
def biomedbert_dir(tmp_path_factory, passages) -> tuple[Path, BertForMaskedLM]:
    """An uncased WordPiece vocabulary (frequent words, then characters and ##characters) and a BertForMaskedLM."""
    directory = tmp_path_factory.mktemp("biomedbert")
    words = collections.Counter(w for p in passages for w in re.findall(r"[a-z]+", p.lower()))
    chars = sorted({c for p in passages for c in p.lower() if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    vocab += [w for w, _ in words.most_common(200) if w not in vocab]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text('{"do_lower_case": true, "tokenizer_class": "BertTokenizer"}')
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(5)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(directory)
    return directory, model


def test_tokens_equal_bertmodels_hidden_states(biomedbert_dir, passages):
    directory, reference = biomedbert_dir
    encoder = create_encoder("text", model_path=str(directory), max_length=128).eval()
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    expected = tokenizer(passages, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch = encoder.featurizer.collate([encoder.featurizer(p) for p in passages])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert (expected["input_ids"] == tokenizer.unk_token_id).sum() == 0
    with torch.no_grad():
        tokens = encoder(**batch)
        hidden = reference.bert(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).last_hidden_state
    mask = expected["attention_mask"].bool()
    assert not mask.all()  # the batch pads, so masking is part of what is compared
    assert torch.equal(tokens.mask, mask)
    assert (tokens.embeddings[mask] - hidden[mask]).abs().max().item() <= 1e-5
    assert tokens.embeddings[~mask].abs().max().item() == 0.0


def test_sentence_embeddings_are_mean_pooled_normalised_states(biomedbert_dir, passages):
    directory, reference = biomedbert_dir
    encoder = create_encoder("text", model_path=str(directory), max_length=128).eval()
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    expected = tokenizer(passages[:3], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = reference.bert(**expected).last_hidden_state
    weights = expected["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * weights).sum(1) / weights.sum(1)
    reference_embeddings = torch.nn.functional.normalize(mean, dim=1)
    assert (encoder.embed_sentences(passages[:3]) - reference_embeddings).abs().max().item() <= 1e-5


def test_a_size_override_that_disagrees_with_the_checkpoint_is_refused(biomedbert_dir):
    directory, _ = biomedbert_dir
    with pytest.raises(ValueError, match="hidden_size=64 disagrees with the checkpoint"):
        create_encoder("text", model_path=str(directory), hidden_size=64, max_length=128)

"""Tests of the text encoder: packaged MiniLM (parity with sentence-transformers), tiny preset, bad input."""

from __future__ import annotations

import logging
import pickle
import socket

import pytest
import torch

from kiban.encoders import InvalidInput, config_from_dict, config_to_dict, create_encoder
from kiban.encoders.text import TextEncoder, TextEncoderConfig, minilm_l6, minilm_path, tiny

INSULIN = "Insulin regulates blood glucose."
INSULIN_PARAPHRASE = "Blood sugar is controlled by the hormone insulin."
KINASE = "The kinase domain binds ATP."
STOCKS = "The stock market fell today"
LONG_PASSAGE = " ".join(["Ribosomes translate messenger RNA into protein in the cytoplasm."] * 60)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return create_encoder("text")


@pytest.fixture
def tiny_encoder() -> TextEncoder:
    torch.manual_seed(0)
    return create_encoder("text", preset="tiny").eval()


def test_minilm_paraphrase_is_closer_than_unrelated_text(minilm):
    embeddings = minilm.embed_sentences([INSULIN, INSULIN_PARAPHRASE, KINASE, STOCKS])
    assert embeddings.shape == (4, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    cosine = embeddings @ embeddings.T
    assert cosine[0, 1] > 0.6
    assert cosine[0, 1] > cosine[0, 2] + 0.3
    assert cosine[0, 1] > cosine[0, 3] + 0.3


def test_minilm_matches_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(minilm_path(), device="cpu")
    texts = [INSULIN, INSULIN_PARAPHRASE, KINASE, STOCKS, "p53", LONG_PASSAGE, "  padded\twith  whitespace "]
    expected = reference.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(minilm.embed_sentences(texts, batch_size=3), expected, atol=1e-5, rtol=0)


def test_minilm_tokens(minilm):
    tokens = minilm.encode([INSULIN, "p53"])
    assert minilm.output_dim == 384
    assert tokens.embeddings.shape[0::2] == (2, 384)
    lengths = [len(minilm.featurizer.tokenizer(text)["input_ids"]) for text in (INSULIN, "p53")]
    assert tokens.lengths().tolist() == lengths
    assert (tokens.embeddings[~tokens.mask] == 0).all()


def test_embed_sentences_independent_of_batching_and_keeps_mode(tiny_encoder):
    tiny_encoder.train()
    texts = [INSULIN, LONG_PASSAGE, "p53", KINASE, STOCKS]
    one_batch = tiny_encoder.embed_sentences(texts)
    small_batches = tiny_encoder.embed_sentences(texts, batch_size=2)
    torch.testing.assert_close(one_batch, small_batches, atol=1e-6, rtol=0)
    alone = tiny_encoder.embed_sentences(["p53"])
    torch.testing.assert_close(one_batch[2:3], alone, atol=1e-6, rtol=0)
    assert tiny_encoder.training  # eval mode was only borrowed
    assert tiny_encoder.embed_sentences([]).shape == (0, 32)
    with pytest.raises(TypeError, match="list of strings"):
        tiny_encoder.embed_sentences(INSULIN)


def test_tiny_forward_shapes_and_masks(tiny_encoder):
    items = [INSULIN, "p53", {"text": KINASE}]
    tokens = tiny_encoder.encode(items)
    lengths = [len(tiny_encoder.featurizer.tokenizer(t)["input_ids"]) for t in (INSULIN, "p53", KINASE)]
    assert tokens.embeddings.shape == (3, max(lengths), 32)
    assert tokens.mask.dtype == torch.bool
    assert tokens.lengths().tolist() == lengths
    assert tokens.mask[1].tolist() == [True] * lengths[1] + [False] * (max(lengths) - lengths[1])
    assert (tokens.embeddings[~tokens.mask] == 0).all()
    alone = tiny_encoder.encode(["p53"])
    torch.testing.assert_close(tokens.embeddings[1, : lengths[1]], alone.embeddings[0], atol=1e-5, rtol=0)


def test_tiny_backward_reaches_every_parameter():
    torch.manual_seed(0)
    encoder = create_encoder("text", preset="tiny").train()
    encoder.encode([INSULIN, KINASE]).pooled().sum().backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None]
    assert not missing  # no unused parameters (BERT's pooler is dropped), so DDP needs no extra flag


def test_featurizer_collate_pads_with_pad_token(tiny_encoder):
    featurizer = tiny_encoder.featurizer
    batch = featurizer.collate([featurizer("p53"), featurizer(INSULIN)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    short = int(batch["attention_mask"][0].sum())
    assert (batch["input_ids"][0, short:] == featurizer.tokenizer.pad_token_id).all()
    assert batch["input_ids"][0, 0] == featurizer.tokenizer.cls_token_id


def test_long_text_is_truncated_and_logged(tiny_encoder, caplog):
    with caplog.at_level(logging.INFO, logger="kiban.encoders.text"):
        features = tiny_encoder.featurizer(LONG_PASSAGE, item_id="abstract-9")
    assert features["input_ids"].shape == (128,)
    assert features["input_ids"][-1] == tiny_encoder.featurizer.tokenizer.sep_token_id
    assert "'abstract-9' is longer than max_length=128 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiban.encoders.text"):
        tiny_encoder.featurizer(INSULIN)
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("", "empty text"),
        (" \n\t ", "empty text"),
        (42, "expected a string, got int"),
        (None, "expected a string, got NoneType"),
        ({"text": ""}, "empty text"),
        ({"title": "Insulin"}, "needs a 'text' key"),
    ],
)
def test_invalid_text(tiny_encoder, item, problem):
    with pytest.raises(InvalidInput) as caught:
        tiny_encoder.featurizer(item)
    assert caught.value.modality == "text"
    assert problem in caught.value.problem


def test_invalid_text_names_the_item(tiny_encoder):
    with pytest.raises(InvalidInput, match="'pmid:123'.*empty text"):
        tiny_encoder.featurizer("   ", item_id="pmid:123")
    with pytest.raises(InvalidInput, match="'doc-7'"):
        tiny_encoder.featurizer({"id": "doc-7", "text": ""})
    with pytest.raises(InvalidInput, match=r"'texts\[1\]'.*empty text"):
        tiny_encoder.embed_sentences([INSULIN, ""])


def test_featurizer_pickles(tiny_encoder):
    copy = pickle.loads(pickle.dumps(tiny_encoder.featurizer))
    for key, value in tiny_encoder.featurizer(INSULIN).items():
        assert torch.equal(copy(INSULIN)[key], value)


def test_loading_never_touches_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    encoder = create_encoder("text")
    assert encoder.embed_sentences([INSULIN]).shape == (1, 384)
    assert create_encoder("text", preset="tiny").encode(["p53"]).embeddings.shape[-1] == 32


def test_presets_and_config_round_trip():
    assert minilm_l6().model_path is None and minilm_l6().pretrained
    assert not tiny().pretrained
    for preset in (minilm_l6, tiny):
        config = preset()
        assert config_from_dict(TextEncoderConfig, config_to_dict(config)) == config


def test_portable_config_rebuilds_the_architecture(minilm):
    config = minilm.portable_config()
    assert not config.pretrained and config.hidden_size == 384 and config.num_hidden_layers == 6
    assert config_from_dict(TextEncoderConfig, config_to_dict(config)) == config
    rebuilt = TextEncoder(config).eval()
    rebuilt.load_state_dict(minilm.state_dict())  # strict: same parameter names and shapes
    torch.testing.assert_close(rebuilt.embed_sentences([INSULIN]), minilm.embed_sentences([INSULIN]))


def test_config_disagreeing_with_checkpoint_is_an_error():
    with pytest.raises(ValueError, match="hidden_size=32 disagrees with the checkpoint"):
        create_encoder("text", hidden_size=32)
    with pytest.raises(ValueError, match="max_length=1024 exceeds the model's 512 positions"):
        create_encoder("text", preset="tiny", max_length=1024)

"""The DNA encoder's masked-LM head: built in and from Hugging Face masked-LM directories (a
Nucleotide Transformer-style EsmForMaskedLM over 6-mers and a BERT MaskedLM over single bases),
frozen as never-trained, and carried through export and a fused model's save/load; configs saved
before the head existed still load.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import transformers

from kiban.encoders import config_from_dict, config_to_dict, create_encoder
from kiban.encoders.dna import DnaEncoderConfig


def _esm_tokenizer(directory, tokens):
    (directory / "vocab.txt").write_text("\n".join(tokens))
    transformers.EsmTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)


@pytest.fixture
def nucleotide_transformer_mlm(tmp_path):
    """Nucleotide Transformer v1 layout: EsmForMaskedLM + EsmTokenizer over 6-mers, tied output."""
    specials = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    _esm_tokenizer(tmp_path, specials + ["".join(k) for k in itertools.product("ATCG", repeat=6)] + list("ATCGN"))
    config = transformers.EsmConfig(
        vocab_size=len(specials) + 4**6 + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        position_embedding_type="absolute",
        emb_layer_norm_before=False,
        token_dropout=False,
        pad_token_id=1,
        mask_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.EsmForMaskedLM(config).save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def bert_mlm(tmp_path):
    """A BERT masked LM over single bases (character vocabulary)."""
    tokens = ["<pad>", "<unk>", "<cls>", "<eos>", "<mask>", "A", "C", "G", "T", "N"]
    _esm_tokenizer(tmp_path, tokens)
    config = transformers.BertConfig(
        vocab_size=len(tokens),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    return tmp_path


def _masked(encoder, sequence: str, position: int) -> torch.Tensor:
    tokens = encoder.featurizer(sequence)["tokens"].unsqueeze(0)
    tokens[0, position] = encoder.featurizer.mask_id
    return tokens


# ----------------------------------------------------------------------------------------------
# Built-in transformer


def test_builtin_head_is_frozen_and_the_rest_still_trains() -> None:
    encoder = create_encoder("dna", preset="tiny", mlm_head=True)
    assert encoder.featurizer.mask_id == encoder.featurizer.vocab["[MASK]"]
    assert encoder.never_trained == ("lm_head.",)
    frozen = {name for name, p in encoder.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in encoder.named_parameters() if name.startswith("lm_head.")}
    assert len(frozen) == 6  # dense, layer norm, decoder: weight + bias each
    encoder.train()
    encoder.encode(["ACGTACGTTAGC", "ACG"]).pooled().sum().backward()
    assert [name for name, p in encoder.named_parameters() if p.requires_grad and p.grad is None] == []


def test_builtin_logits_cover_the_vocabulary_and_ignore_padding() -> None:
    encoder = create_encoder("dna", preset="tiny", mlm_head=True, tokenization="kmer", k=3).eval()
    short, long = "ACGTTAGCAT", "GATTACA" * 6
    alone = encoder.featurizer(short)["tokens"].unsqueeze(0)
    batch = encoder.featurizer.collate([encoder.featurizer(short), encoder.featurizer(long)])["tokens"]
    with torch.no_grad():
        logits = encoder.masked_lm_logits(alone)
        batched = encoder.masked_lm_logits(batch)
    assert logits.shape == (1, alone.shape[1], encoder.featurizer.vocab_size)  # [B, T, V], V = 10 + 4**3
    torch.testing.assert_close(batched[0, : alone.shape[1]], logits[0], atol=1e-5, rtol=0)
    # The head reads the input: hiding a token changes the prediction there.
    with torch.no_grad():
        hidden = encoder.masked_lm_logits(_masked(encoder, short, 2))
    assert not torch.allclose(hidden[0, 2], logits[0, 2], atol=1e-3)


def test_without_the_head_it_says_how_to_get_one() -> None:
    encoder = create_encoder("dna", preset="tiny")
    assert encoder.lm_head is None and encoder.never_trained == ()
    with pytest.raises(ValueError, match="no masked-LM head: build it with mlm_head=True"):
        encoder.masked_lm_logits(encoder.featurizer("ACGT")["tokens"].unsqueeze(0))


def test_a_config_saved_before_the_head_existed_builds_the_same_parameters() -> None:
    old = config_to_dict(create_encoder("dna", preset="tiny").config)
    del old["mlm_head"]
    config = config_from_dict(DnaEncoderConfig, json.loads(json.dumps(old)))
    assert config.mlm_head is False
    names = set(create_encoder("dna", config).state_dict())
    assert names and not any(name.startswith("lm_head.") for name in names)


def test_fused_model_freezes_the_head_in_full_training_and_round_trips_it(tmp_path) -> None:
    from kiban.fusion import KibanModel, apply_freeze_policy
    from kiban.tiny import tiny_config

    config = tiny_config(["dna"])
    config.encoders["dna"] = {"preset": "tiny", "mlm_head": True}
    model = KibanModel.from_config(config).eval()
    apply_freeze_policy(model, "full")
    head = model.encoders["dna"].lm_head
    assert not any(p.requires_grad for p in head.parameters())
    assert model.encoders["dna"].backbone.embed_tokens.weight.requires_grad
    with torch.no_grad():
        for p in head.parameters():  # not the initialisation: the saved weights must come back
            p.add_(torch.randn_like(p))
    encoder = model.encoders["dna"]
    tokens = _masked(encoder, "ACGTTTGACAATTAC", 4)
    with torch.no_grad():
        before = encoder.masked_lm_logits(tokens)
    model.save_pretrained(tmp_path / "saved")
    loaded = KibanModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoders["dna"].masked_lm_logits(tokens), before, atol=0, rtol=0)


def test_a_fused_model_saved_before_the_head_existed_still_loads(tmp_path) -> None:
    from kiban.fusion import KibanModel
    from kiban.tiny import tiny_config

    config = tiny_config(["dna"])
    KibanModel.from_config(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["encoders"]["dna"]["config"]["mlm_head"]  # what an older kiban wrote
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert KibanModel.from_pretrained(tmp_path).encoders["dna"].lm_head is None


# ----------------------------------------------------------------------------------------------
# Hugging Face masked-LM directories


def test_nucleotide_transformer_head_matches_transformers(nucleotide_transformer_mlm) -> None:
    encoder = create_encoder("dna", hf_path=str(nucleotide_transformer_mlm), mlm_head=True).eval()
    reference = transformers.AutoModelForMaskedLM.from_pretrained(
        nucleotide_transformer_mlm, local_files_only=True
    ).eval()
    tokens = _masked(encoder, "ACGTTTACGCCAGATTACAAT", 2)
    assert encoder.featurizer.mask_id == 2
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.masked_lm_logits(tokens), reference(input_ids=tokens).logits, atol=1e-5, rtol=1e-5
        )
    # The head's own parameters are frozen; its output matrix is the (trainable) word embedding.
    assert encoder.lm_head.lm_head.decoder.weight is encoder.backbone.model.embeddings.word_embeddings.weight
    frozen = {name for name, p in encoder.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if n.startswith("lm_head.")} == {
        "lm_head.lm_head.bias",
        "lm_head.lm_head.dense.weight",
        "lm_head.lm_head.dense.bias",
        "lm_head.lm_head.layer_norm.weight",
        "lm_head.lm_head.layer_norm.bias",
    }
    assert "backbone.model.embeddings.word_embeddings.weight" not in frozen
    # The encoder's own tokens are unchanged by loading the masked-LM class.
    plain = create_encoder("dna", hf_path=str(nucleotide_transformer_mlm)).eval()
    sequence = ["ACGTTTACGCCAGATTAC"]
    torch.testing.assert_close(encoder.encode(sequence).embeddings, plain.encode(sequence).embeddings)


def test_bert_head_matches_transformers(bert_mlm) -> None:
    encoder = create_encoder("dna", hf_path=str(bert_mlm), mlm_head=True).eval()
    reference = transformers.AutoModelForMaskedLM.from_pretrained(bert_mlm, local_files_only=True).eval()
    tokens = _masked(encoder, "ACGTNACGTTGA", 3)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.masked_lm_logits(tokens), reference(input_ids=tokens).logits, atol=1e-5, rtol=1e-5
        )
    assert encoder.never_trained == ("lm_head.",)
    assert all(not p.requires_grad for n, p in encoder.named_parameters() if n.startswith("lm_head."))


@pytest.mark.parametrize("directory", ["nucleotide_transformer_mlm", "bert_mlm"])
def test_export_writes_the_current_head(directory, request, tmp_path) -> None:
    encoder = create_encoder("dna", hf_path=str(request.getfixturevalue(directory)), mlm_head=True).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config, fields = encoder.export_assets(tmp_path / "export")
    assert fields == ("hf_path",) and config.mlm_head
    rebuilt = create_encoder("dna", config).eval()
    tokens = _masked(encoder, "ACGTTTACGCCAGATTAC", 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.masked_lm_logits(tokens), encoder.masked_lm_logits(tokens))


def test_a_directory_without_head_weights_is_refused(tmp_path) -> None:
    tokens = ["<pad>", "<unk>", "<cls>", "<eos>", "<mask>", "A", "C", "G", "T", "N"]
    _esm_tokenizer(tmp_path, tokens)
    config = transformers.BertConfig(
        vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no masked-LM head weights.*mlm_head=False"):
        create_encoder("dna", hf_path=str(tmp_path), mlm_head=True)
    assert create_encoder("dna", hf_path=str(tmp_path)).lm_head is None

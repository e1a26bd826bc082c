"""Tests of the ESM-2 protein encoder: tokens, shapes, padding, attentions, bad input, real-weight formats."""

from __future__ import annotations

import logging
import pickle
from argparse import Namespace

import esm
import pytest
import torch
import transformers
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from kiban.encoders import InvalidInput, create_encoder
from kiban.encoders.protein import ProteinEncoder, ProteinFeaturizer

SHORT = "MKTAYIAKQR"
LONG = "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF"


@pytest.fixture
def encoder() -> ProteinEncoder:
    torch.manual_seed(0)
    return create_encoder("protein", preset="tiny").eval()


def _perturb(module: torch.nn.Module, *, seed: int) -> None:
    """Move every parameter off its initial value, so a wrongly mapped key cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


# ----------------------------------------------------------------------------------------------
# Featurizer


def test_tokens_equal_esm_batch_converter() -> None:
    featurizer = ProteinFeaturizer()
    sequences = [SHORT, LONG, "xbzuoACDEFGHIKLMNPQRSTVWY"]
    converter = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, expected = converter([(str(i), s.upper()) for i, s in enumerate(sequences)])

    batch = featurizer.collate([featurizer(s) for s in sequences])
    assert torch.equal(batch["tokens"], expected)
    for i, sequence in enumerate(sequences):
        single = featurizer(sequence)["tokens"]
        assert torch.equal(single, expected[i, : len(sequence) + 2])


def test_featurizer_accepts_seqrecord_and_pickles() -> None:
    featurizer = ProteinFeaturizer()
    record = SeqRecord(Seq(SHORT), id="P12345")
    assert torch.equal(featurizer(record)["tokens"], featurizer(SHORT)["tokens"])
    clone = pickle.loads(pickle.dumps(featurizer))
    assert torch.equal(clone(LONG)["tokens"], featurizer(LONG)["tokens"])


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("", ["'': is empty"]),
        ("   ", ["is empty"]),
        ("MKTJ1", ["'MKTJ1'", "'J', '1'", "positions 4, 5"]),
        ("MKT AY*", ["' '", "'*'", "positions 4, 7"]),
        (42, ["'42'", "of type int"]),
    ],
)
def test_bad_input_raises_invalid_input_naming_it(item, words) -> None:
    with pytest.raises(InvalidInput) as raised:
        ProteinFeaturizer()(item)
    assert raised.value.modality == "protein"
    for word in words:
        assert word in str(raised.value)


def test_bad_seqrecord_is_named_by_its_id() -> None:
    with pytest.raises(InvalidInput, match="'sp|BAD1'.*'J'"):
        ProteinFeaturizer()(SeqRecord(Seq("MKJ"), id="sp|BAD1"))
    with pytest.raises(InvalidInput, match="'row 7'"):
        ProteinFeaturizer()("MK1", item_id="row 7")


def test_over_long_is_rejected_or_truncated(caplog) -> None:
    sequence = "M" * 30
    with pytest.raises(InvalidInput, match="is 30 residues long, over max_length 20; set truncate=True"):
        ProteinFeaturizer(max_length=20)(sequence, item_id="long one")
    with caplog.at_level(logging.WARNING, logger="kiban.encoders.protein"):
        tokens = ProteinFeaturizer(max_length=20, truncate=True)(sequence, item_id="long one")["tokens"]
    assert tokens.shape == (22,)
    assert "long one" in caplog.text and "cropped" in caplog.text


# ----------------------------------------------------------------------------------------------
# Encoder


def test_forward_shapes_and_mask(encoder: ProteinEncoder) -> None:
    out = encoder.encode([SHORT, LONG, "MV"])
    assert out.embeddings.shape == (3, len(LONG), encoder.output_dim)
    assert out.lengths().tolist() == [len(SHORT), len(LONG), 2]
    assert out.attentions is None
    assert torch.all(out.embeddings[~out.mask] == 0)
    assert torch.isfinite(out.embeddings).all()


def test_padding_does_not_change_embeddings(encoder: ProteinEncoder) -> None:
    alone = encoder.encode([SHORT]).embeddings[0]
    batched = encoder.encode([SHORT, LONG]).embeddings[0, : len(SHORT)]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_attentions_are_over_residues(encoder: ProteinEncoder) -> None:
    batch = encoder.featurizer.collate([encoder.featurizer(s) for s in [SHORT, LONG]])
    out = encoder(**batch, return_attentions=True)
    config = encoder.config
    assert out.attentions.shape == (2, config.num_layers, config.attention_heads, len(LONG), len(LONG))
    # Residue-to-residue part of ESM-2's full attention, BOS/EOS rows and columns cut away.
    full = encoder.model(batch["tokens"], need_head_weights=True)["attentions"]
    torch.testing.assert_close(out.attentions[1], full[1, :, :, 1:-1, 1:-1])
    n = len(SHORT)
    torch.testing.assert_close(out.attentions[0, ..., :n, :n], full[0, :, :, 1 : n + 1, 1 : n + 1])
    assert torch.all(out.attentions[0, ..., n:, :] == 0) and torch.all(out.attentions[0, ..., :, n:] == 0)
    # The padding-free embeddings are unchanged by asking for attentions.
    torch.testing.assert_close(out.embeddings, encoder(**batch).embeddings)


def test_contacts_match_esm(encoder: ProteinEncoder) -> None:
    batch = encoder.featurizer.collate([encoder.featurizer(s) for s in [LONG, SHORT]])
    contacts = encoder.contacts(batch)
    assert contacts.shape == (2, len(LONG), len(LONG))
    n = len(SHORT)
    alone = encoder.model.predict_contacts(encoder.featurizer(SHORT)["tokens"][None])
    torch.testing.assert_close(contacts[1, :n, :n], alone[0], atol=1e-5, rtol=0)
    assert torch.all(contacts[1, n:] == 0)


def test_every_trainable_parameter_gets_a_gradient(encoder: ProteinEncoder) -> None:
    encoder.train()
    encoder.encode([SHORT, LONG]).pooled().sum().backward()
    trainable = {name: p for name, p in encoder.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in trainable  # the tied LM-head matrix stays trainable
    assert not encoder.model.lm_head.dense.weight.requires_grad
    assert not encoder.model.contact_head.regression.weight.requires_grad
    assert [name for name, p in trainable.items() if p.grad is None] == []


def test_repr_layer_selects_an_inner_layer() -> None:
    torch.manual_seed(0)
    encoder = create_encoder("protein", preset="tiny", repr_layer=1).eval()
    tokens = encoder.featurizer.collate([encoder.featurizer(SHORT)])["tokens"]
    expected = encoder.model(tokens, repr_layers=[1])["representations"][1][:, 1:-1]
    torch.testing.assert_close(encoder(tokens=tokens).embeddings, expected)
    assert not any(p.requires_grad for p in encoder.model.layers[1].parameters())
    with pytest.raises(ValueError, match="repr_layer 5"):
        create_encoder("protein", preset="tiny", repr_layer=5)


# ----------------------------------------------------------------------------------------------
# Real weights


def _save_torch_hub_checkpoint(model: esm.ESM2, path) -> None:
    """Write ``model`` the way fair-esm publishes ESM-2: fairseq keys, a cfg Namespace, and the
    contact regression in a separate ``<name>-contact-regression.pt``.
    """
    state, regression = {}, {}
    for key, value in model.state_dict().items():
        if key.startswith("contact_head."):
            regression[key] = value
        elif key.startswith("lm_head."):
            state["encoder." + key] = value
        else:
            state["encoder.sentence_encoder." + key] = value
    cfg = Namespace(
        arch="esm2",
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=model.token_dropout,
    )
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    torch.save({"model": regression}, path.with_name(path.stem + "-contact-regression.pt"))


def test_loads_fair_esm_torch_hub_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    source = esm.ESM2(num_layers=2, embed_dim=24, attention_heads=3, token_dropout=True).eval()
    _perturb(source, seed=1)
    path = tmp_path / "esm2_t2_24_test.pt"
    _save_torch_hub_checkpoint(source, path)

    # The file is in fair-esm's own format: its loader reads it back.
    with torch.serialization.safe_globals([Namespace]):
        reference, _ = esm.pretrained.load_model_and_alphabet_local(str(path))
    reference.eval()

    # The preset's architecture is overridden by the file's.
    encoder = create_encoder("protein", preset="tiny", weights_path=str(path)).eval()
    assert (encoder.config.num_layers, encoder.config.embed_dim, encoder.output_dim) == (2, 24, 24)

    batch = encoder.featurizer.collate([encoder.featurizer(s) for s in [LONG, SHORT]])
    out = encoder(**batch, return_attentions=True)
    with torch.no_grad():
        for model in (source, reference):
            expected = model(batch["tokens"], repr_layers=[2], need_head_weights=True)
            torch.testing.assert_close(
                out.embeddings[0], expected["representations"][2][0, 1:-1], atol=0, rtol=0
            )
            torch.testing.assert_close(
                out.attentions[0], expected["attentions"][0, ..., 1:-1, 1:-1], atol=0, rtol=0
            )
    torch.testing.assert_close(encoder.contacts(batch)[0], source.predict_contacts(batch["tokens"])[0])


def test_torch_hub_checkpoint_without_contact_regression_warns(tmp_path) -> None:
    source = esm.ESM2(num_layers=1, embed_dim=16, attention_heads=2)
    path = tmp_path / "esm2_t1_16.pt"
    _save_torch_hub_checkpoint(source, path)
    path.with_name("esm2_t1_16-contact-regression.pt").unlink()
    with pytest.warns(UserWarning, match="contact regression"):
        create_encoder("protein", weights_path=str(path))


def test_refuses_pickled_code_and_missing_paths(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": logging.getLogger("x")}}, path)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        create_encoder("protein", preset="tiny", weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_encoder("protein", preset="tiny", weights_path=str(tmp_path / "nowhere.pt"))


def _hf_esm2_config(**overrides) -> transformers.EsmConfig:
    values = dict(
        vocab_size=33,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=True,
        pad_token_id=1,
        mask_token_id=32,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.EsmConfig(**(values | overrides))


def test_loads_hugging_face_esm_directory(tmp_path) -> None:
    torch.manual_seed(2)
    source = transformers.EsmForMaskedLM(_hf_esm2_config())
    _perturb(source, seed=2)
    source.save_pretrained(tmp_path)

    encoder = create_encoder("protein", weights_path=str(tmp_path)).eval()
    assert encoder.output_dim == 24

    reference = transformers.EsmModel.from_pretrained(
        tmp_path, local_files_only=True, attn_implementation="eager"
    )
    reference.eval()
    batch = encoder.featurizer.collate([encoder.featurizer(s) for s in [LONG, SHORT]])
    attention_mask = batch["tokens"].ne(encoder.featurizer.padding_idx).long()
    with torch.no_grad():
        expected = reference(batch["tokens"], attention_mask=attention_mask, output_attentions=True)
        contacts = reference.predict_contacts(batch["tokens"], attention_mask)
    out = encoder(**batch, return_attentions=True)
    hidden = expected.last_hidden_state[:, 1:-1]
    torch.testing.assert_close(out.embeddings[out.mask], hidden[out.mask], atol=1e-4, rtol=1e-4)
    attentions = torch.stack(expected.attentions, 1)[..., 1:-1, 1:-1]
    n = len(SHORT)
    torch.testing.assert_close(out.attentions[0], attentions[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out.attentions[1, ..., :n, :n], attentions[1, ..., :n, :n], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(encoder.contacts(batch)[0], contacts[0], atol=1e-4, rtol=1e-4)


def test_refuses_hugging_face_esm1b_directory(tmp_path) -> None:
    transformers.EsmModel(_hf_esm2_config(position_embedding_type="absolute")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an ESM-2 model.*'absolute'"):
        create_encoder("protein", weights_path=str(tmp_path))


def test_loads_hugging_face_esm_model_directory_without_lm_head(tmp_path) -> None:
    torch.manual_seed(3)
    source = transformers.EsmModel(_hf_esm2_config()).eval()  # saved with a pooler, no LM head
    _perturb(source, seed=3)
    source.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no masked-LM head"):
        encoder = create_encoder("protein", weights_path=str(tmp_path)).eval()
    tokens = encoder.featurizer(LONG)["tokens"][None]
    with torch.no_grad():
        expected = source(tokens).last_hidden_state[:, 1:-1]
    torch.testing.assert_close(encoder(tokens=tokens).embeddings, expected, atol=1e-4, rtol=1e-4)


def test_portable_config_rebuilds_a_loaded_checkpoint(tmp_path) -> None:
    source = transformers.EsmForMaskedLM(_hf_esm2_config(layer_norm_eps=1e-6))
    _perturb(source, seed=4)
    source.save_pretrained(tmp_path)
    loaded = create_encoder("protein", weights_path=str(tmp_path)).eval()
    portable = loaded.portable_config()
    assert portable.weights_path is None and portable.layer_norm_eps == 1e-6
    rebuilt = create_encoder("protein", portable).eval()
    rebuilt.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(
        rebuilt.encode([LONG]).embeddings, loaded.encode([LONG]).embeddings, atol=0, rtol=0
    )


def test_never_trained_names_exactly_the_frozen_parameters() -> None:
    encoder = create_encoder("protein", preset="tiny", repr_layer=1)
    frozen = {name for name, p in encoder.named_parameters() if not p.requires_grad}
    named = {name for name, _ in encoder.named_parameters() if name.startswith(encoder.never_trained)}
    assert frozen == named
    assert "model.layers.1.fc1.weight" in frozen and "model.embed_tokens.weight" not in frozen

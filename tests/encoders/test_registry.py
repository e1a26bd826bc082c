"""Every registered encoder, at its tiny preset, on its own example inputs: a new encoder is tested
the day it is registered.
"""

import json
import pickle

import pytest
import torch

from kiban.encoders import (
    Encoder,
    ModalityTokens,
    config_from_dict,
    config_to_dict,
    create_encoder,
    encoder_spec,
    list_encoders,
)

ENCODERS = list_encoders()


def test_the_six_modalities_and_property_conditions_are_registered():
    assert ENCODERS == ["cell", "dna", "image", "molecule", "properties", "protein", "text"]


@pytest.fixture(scope="module", params=ENCODERS)
def built(request):
    torch.manual_seed(0)
    encoder = create_encoder(request.param, preset="tiny").eval()
    return request.param, encoder, encoder_spec(request.param).examples()


def test_forward_shapes_masks_and_no_nans(built):
    name, encoder, examples = built
    assert isinstance(encoder, Encoder) and encoder.featurizer.modality == name
    out = encoder.encode(examples)
    assert isinstance(out, ModalityTokens)
    assert out.embeddings.shape[0] == len(examples) and out.embeddings.shape[-1] == encoder.output_dim
    assert out.mask.dtype == torch.bool and out.mask.any(1).all()
    assert torch.isfinite(out.embeddings[out.mask]).all()


def test_padding_does_not_change_an_items_tokens(built):
    name, encoder, examples = built
    together = encoder.encode(examples)
    for i, item in enumerate(examples):
        alone = encoder.encode([item])
        n = int(alone.mask[0].sum())
        assert int(together.mask[i].sum()) == n, f"{name} example {i}: token count depends on the batch"
        torch.testing.assert_close(
            together.embeddings[i][together.mask[i]], alone.embeddings[0][alone.mask[0]], atol=1e-4, rtol=1e-4
        )


def test_backward_reaches_every_trainable_parameter(built):
    name, encoder, examples = built
    encoder.train()
    try:
        encoder.zero_grad()
        out = encoder.encode(examples)
        (out.embeddings[out.mask] ** 2).mean().backward()
        missing = [
            n
            for n, p in encoder.named_parameters()
            if p.requires_grad and not n.startswith(tuple(encoder.never_trained)) and p.grad is None
        ]
        assert not missing, f"{name}: no gradient for {missing[:5]}"
    finally:
        encoder.eval()


def test_config_round_trips_through_json(built):
    name, encoder, _ = built
    plain = json.loads(json.dumps(config_to_dict(encoder.config)))
    assert config_from_dict(encoder_spec(name).config_class, plain) == encoder.config


def test_featurizer_pickles_for_dataloader_workers(built):
    name, encoder, examples = built
    clone = pickle.loads(pickle.dumps(encoder.featurizer))
    a, b = encoder.featurizer(examples[0]), clone(examples[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_unknown_names_list_the_choices():
    with pytest.raises(KeyError, match="protein"):
        create_encoder("rna")
    with pytest.raises(KeyError, match="tiny"):
        create_encoder("protein", preset="huge")

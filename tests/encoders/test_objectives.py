"""Every registered pretraining objective, at its encoder's tiny size: shapes, loss, gradients, save/load.

Parametrised over ``list_objectives()``, so an objective is tested the day it is registered.
"""

import pickle

import pytest
import torch

from kiban.data.resumable import seeded
from kiban.encoders.base import create_encoder, encoder_spec
from kiban.encoders.pretraining import (
    create_objective,
    list_objectives,
    load_encoder,
    objective_spec,
    save_encoder,
)

OBJECTIVES = [(modality, name) for modality, names in list_objectives().items() for name in names]


def _tiny_encoder(modality, name):
    spec = encoder_spec(modality)
    preset = "tiny" if "tiny" in spec.presets else spec.default_preset
    return create_encoder(modality, preset=preset, **objective_spec(modality, name).builder.tiny_overrides)


def _batch(objective, modality, *, seed=0):
    featurizer = objective.encoder.featurizer
    items = []
    for i, example in enumerate(encoder_spec(modality).examples()):
        with seeded(seed * 1000 + i):
            items.append(objective.masker(featurizer(example, item_id=f"example-{i}")))
    return objective.masker.collate(items)


def test_protein_and_dna_register_their_objectives_as_defaults():
    objectives = list_objectives()
    assert objectives["protein"][0] == "mlm" and objectives["dna"][0] == "mlm"
    assert objective_spec("protein").name == "mlm"
    with pytest.raises(KeyError, match="no objective 'nope'"):
        objective_spec("protein", "nope")


@pytest.mark.parametrize(("modality", "name"), OBJECTIVES)
def test_objective_gives_a_finite_loss_and_a_gradient_to_every_trainable_parameter(modality, name):
    torch.manual_seed(0)
    objective = create_objective(modality, _tiny_encoder(modality, name), name=name)
    pickle.loads(pickle.dumps(objective.masker))  # it runs in DataLoader workers
    out = objective(_batch(objective, modality))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    for metric, value in out.metrics.items():
        assert torch.isfinite(torch.as_tensor(value)).all(), metric
    out.loss.backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert trainable
    # DDP's unused-parameter check needs every trainable parameter in the graph
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{modality}/{name}: no gradient for {missing[:5]}"
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize(("modality", "name"), OBJECTIVES)
def test_masking_is_a_pure_function_of_the_seed(modality, name):
    objective = create_objective(modality, _tiny_encoder(modality, name), name=name)
    first, again, other = (_batch(objective, modality, seed=s) for s in (1, 1, 2))
    assert first.keys() == again.keys()
    for key in first:
        if isinstance(first[key], torch.Tensor):
            assert torch.equal(first[key], again[key]), key
    assert any(
        isinstance(first[k], torch.Tensor)
        and first[k].shape == other[k].shape
        and not torch.equal(first[k], other[k])
        for k in first
    ), "another seed should mask differently"


@pytest.mark.parametrize(("modality", "name"), OBJECTIVES)
def test_pretrained_encoder_saves_and_loads_with_the_heads_it_owns(modality, name, tmp_path):
    torch.manual_seed(0)
    objective = create_objective(modality, _tiny_encoder(modality, name), name=name)
    encoder = objective.encoder.eval()
    save_encoder(encoder, tmp_path / "encoder", extra={"objective": name})
    loaded = load_encoder(tmp_path / "encoder").eval()
    assert set(loaded.state_dict()) == set(encoder.state_dict())
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    examples = encoder_spec(modality).examples()
    with torch.no_grad():
        a, b = encoder.encode(examples), loaded.encode(examples)
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.embeddings, b.embeddings, atol=0, rtol=0)

"""The per-residue, contact and pair heads in the saved-head format (head.json + head.safetensors,
``load_head``): a reload gives identical outputs, each head checks the model it is given, the
"multilabel" kind (and old head.json files that say "classification"), and ``--labels`` parsing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kiban.tasks.dti import PairHead
from kiban.tasks.finetune import resolve_labels
from kiban.tasks.heads import HeadConfig, MultiLabelHead, create_head, load_head, load_heads
from kiban.tasks.predict import check_head_fits, load_model_heads
from kiban.tasks.secondary import ResidueClassifierHead
from kiban.tasks.structure import ContactMapHead
from kiban.tiny import tiny_model

PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(["protein", "molecule"], seed=0).eval()


def _heads(model) -> dict[str, HeadConfig]:
    protein_width = model.encoders["protein"].output_dim
    width = model.llm.get_input_embeddings().embedding_dim
    return {
        "ss": HeadConfig(
            task="ss",
            modality="protein",
            kind="residue_classification",
            architecture="residue",
            labels=["C", "E", "H"],
            input_dim=protein_width,
            hidden_dim=8,
        ),
        "contacts": HeadConfig(
            task="contacts",
            modality="protein",
            kind="contact",
            architecture="contact",
            labels=["contact"],
            input_dim=protein_width,
            hidden_dim=8,
            extra={"project": 4},
        ),
        "affinity": HeadConfig(
            task="affinity",
            modality="protein+molecule",
            kind="regression",
            architecture="pair",
            labels=["pKd"],
            input_dim=2 * width,
            hidden_dim=8,
        ),
    }


INPUTS = {
    "ss": PROTEINS,
    "contacts": PROTEINS,
    "affinity": [(PROTEINS[0], "CCO"), (PROTEINS[1], "c1ccccc1O")],
}
CLASSES = {"ss": ResidueClassifierHead, "contacts": ContactMapHead, "affinity": PairHead}


@pytest.mark.parametrize("task", ["ss", "contacts", "affinity"])
def test_new_heads_reload_and_predict_identically(model, tmp_path, task):
    torch.manual_seed(3)
    head = create_head(_heads(model)[task]).eval()
    assert isinstance(head, CLASSES[task])
    head.save(tmp_path / "heads" / task)
    assert sorted(p.name for p in (tmp_path / "heads" / task).iterdir()) == ["head.json", "head.safetensors"]
    again = load_head(tmp_path / "heads" / task)
    assert type(again) is type(head) and again.config == head.config
    first, second = head.predict(model, INPUTS[task]), again.predict(model, INPUTS[task])
    assert first == second  # bit-identical: same weights, same one-protein-at-a-time tokens
    # and a freshly initialised head of the same config answers differently: the weights were read
    torch.manual_seed(4)
    assert create_head(_heads(model)[task]).eval().predict(model, INPUTS[task]) != first
    # the serving loader accepts it for this model
    assert list(load_model_heads(tmp_path, model)) == [task]


def test_output_shapes(model):
    torch.manual_seed(0)
    heads = {task: create_head(config).eval() for task, config in _heads(model).items()}
    (residues,) = heads["ss"].predict(model, PROTEINS[:1])
    assert [r["position"] for r in residues["residues"]] == list(range(1, len(PROTEINS[0]) + 1))
    assert "".join(r["residue"] for r in residues["residues"]) == PROTEINS[0]
    for r in residues["residues"]:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    (contacts,) = heads["contacts"].predict(model, PROTEINS[1:], top_k=5, min_separation=6)
    assert contacts["length"] == len(PROTEINS[1]) and len(contacts["contacts"]) == 5
    probabilities = [c["probability"] for c in contacts["contacts"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(
        c["j"] - c["i"] >= 6 and 1 <= c["i"] < c["j"] <= len(PROTEINS[1]) for c in contacts["contacts"]
    )
    # the default is L pairs (the P@L convention); the chunked computation equals the full map
    (default,) = heads["contacts"].predict(model, PROTEINS[1:])
    assert len(default["contacts"]) == len(PROTEINS[1])
    from kiban.tasks.structure import protein_tokens

    tokens = protein_tokens(model.encoders["protein"], PROTEINS[1])
    with torch.no_grad():
        full = heads["contacts"](tokens).sigmoid()
    for c in contacts["contacts"]:
        assert full[c["i"] - 1, c["j"] - 1].item() == pytest.approx(c["probability"], abs=1e-6)
    rows = heads["affinity"].predict(model, INPUTS["affinity"])
    assert [set(r) for r in rows] == [{"values"}, {"values"}] and rows[0] != rows[1]


def test_token_heads_own_their_loss_and_metrics(model):
    """The per-residue and contact heads carry the losses their ``fit`` minimises: gradients reach
    every parameter, unknown labels and pairs closer than min_separation never count.
    """
    from kiban.tasks.structure import protein_tokens

    torch.manual_seed(0)
    tokens = protein_tokens(model.encoders["protein"], PROTEINS[1])
    length = len(PROTEINS[1])
    ss = create_head(_heads(model)["ss"])
    states = torch.randint(0, 3, (length,))
    loss = ss.loss(ss(tokens), states)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in ss.parameters())
    assert ss.metrics(ss(tokens).detach().numpy(), states.numpy())["residues"] == length
    contacts = create_head(_heads(model)["contacts"])
    labels = (torch.rand(length, length) < 0.1).float()
    labels = torch.maximum(labels, labels.T)
    logits = contacts(tokens)
    base = contacts.loss(logits, labels)
    near = labels.clone()
    i, j = torch.triu_indices(length, length, offset=1)
    close = (j - i) < 6
    near[i[close], j[close]] = 1 - near[i[close], j[close]]  # flip every pair closer than 6
    unknown = labels.clone()
    unknown[0, 10] = float("nan")
    assert contacts.loss(logits, near) == base
    assert torch.isfinite(contacts.loss(logits, unknown)) and contacts.loss(logits, unknown) != base
    metrics = contacts.metrics(logits.detach().numpy(), unknown.numpy())
    assert set(metrics) >= {"long_P@L", "short_P@L/5"}


def test_heads_check_the_model_they_are_given(model):
    torch.manual_seed(0)
    heads = {task: create_head(config) for task, config in _heads(model).items()}
    molecule_only = tiny_model(["molecule"], seed=0)
    with pytest.raises(ValueError, match="reads protein tokens, but the model has no protein encoder"):
        check_head_fits(heads["ss"], molecule_only)
    with pytest.raises(ValueError, match="no protein encoder"):
        check_head_fits(heads["affinity"], molecule_only)
    wide = HeadConfig(**{**_heads(model)["contacts"].to_dict(), "input_dim": 32})
    with pytest.raises(
        ValueError, match="reads 32-wide protein tokens; the model's protein encoder gives 16"
    ):
        check_head_fits(create_head(wide), model)
    for head in heads.values():
        check_head_fits(head, model)  # no error


def test_bad_new_head_configs_are_refused(model):
    config = _heads(model)
    with pytest.raises(ValueError, match="needs hidden_dim >= 1"):
        create_head(HeadConfig(**{**config["ss"].to_dict(), "hidden_dim": 0}))
    with pytest.raises(ValueError, match="at least 2 labels"):
        HeadConfig(**{**config["ss"].to_dict(), "labels": ["H"]})
    with pytest.raises(ValueError, match="modality must be 'protein'"):
        create_head(HeadConfig(**{**config["contacts"].to_dict(), "modality": "dna"}))
    with pytest.raises(ValueError, match="a pair head reads protein\\+molecule"):
        create_head(HeadConfig(**{**config["affinity"].to_dict(), "modality": "molecule+protein"}))
    from kiban.encoders.base import InvalidInput

    with pytest.raises(InvalidInput, match="not a \\(protein, molecule\\) pair"):
        create_head(config["affinity"]).predict(model, ["CCO"])
    with pytest.raises(InvalidInput, match="non-amino-acid letters"):
        create_head(config["ss"]).predict(model, ["MKT1"])


def test_multilabel_kind_and_old_head_files(tmp_path):
    config = HeadConfig(
        task="tox",
        modality="molecule",
        kind="multilabel",
        architecture="multilabel",
        labels=["a"],
        input_dim=4,
    )
    head = create_head(config)  # one binary task is a valid multilabel head
    assert isinstance(head, MultiLabelHead) and head.config.kind == "multilabel"
    # a head.json written before the kind existed: classification + architecture multilabel
    head.save(tmp_path / "heads" / "tox")
    stored = json.loads((tmp_path / "heads" / "tox" / "head.json").read_text())
    (tmp_path / "heads" / "tox" / "head.json").write_text(json.dumps({**stored, "kind": "classification"}))
    old = load_heads(tmp_path)["tox"]
    assert isinstance(old, MultiLabelHead) and old.config.kind == "multilabel"
    x = torch.randn(3, 4)
    assert old.outputs(x) == head.outputs(x)
    with pytest.raises(ValueError, match="a multilabel head has kind 'multilabel'"):
        create_head(HeadConfig(**{**config.to_dict(), "kind": "regression"}))


def test_labels_name_columns_with_commas():
    columns = ["smiles", "a", "b", "Congenital, familial and genetic disorders", "x,y"]
    assert resolve_labels(["a,b"], columns, missing="no label column") == ["a", "b"]  # the older form
    assert resolve_labels(["Congenital, familial and genetic disorders", "a", "a"], columns, missing="m") == [
        "Congenital, familial and genetic disorders",
        "a",
    ]
    assert resolve_labels(["x,y"], columns, missing="m") == ["x,y"]  # an exact column wins over splitting
    with pytest.raises(ValueError, match=r"no label column 'c'; columns: smiles, a, b"):
        resolve_labels(["a,c"], columns, missing="no label column")
    # a mistyped name with commas is named whole, not as fragments
    with pytest.raises(ValueError, match=r"no label column 'Congenital, familial and genetic disorder';"):
        resolve_labels(["Congenital, familial and genetic disorder"], columns, missing="no label column")
    assert np.array_equal(resolve_labels([], columns, missing="m"), [])

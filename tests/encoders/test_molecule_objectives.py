"""Attribute-masking pretraining of the molecule encoder (Hu et al. 2020) on real MoleculeNet SMILES."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import torch
from rdkit import Chem

from kiban.encoders import create_encoder
from kiban.encoders.molecule import ELEMENTS
from kiban.encoders.pretraining import create_objective, list_objectives

MOLECULES = Path(__file__).resolve().parents[3] / "shared" / "data" / "molecules"


@pytest.fixture(scope="module")
def smiles() -> list[str]:
    path = MOLECULES / "esol_delaney.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with path.open() as handle:
        return [row["smiles"].strip() for row in csv.DictReader(handle)][:96]


def _objective(**options):
    torch.manual_seed(0)
    encoder = create_encoder("molecule", preset="tiny", hidden_dim=32, depth=3)
    return create_objective("molecule", encoder, **options)


def _batch(objective, items):
    featurizer = objective.encoder.featurizer
    return objective.masker.collate([objective.masker(featurizer(s)) for s in items])


def test_attribute_masking_is_the_molecule_default():
    assert list_objectives()["molecule"][0] == "attribute_masking"


def test_masking_statistics_follow_hu_et_al(smiles):
    objective = _objective()
    featurizer = objective.encoder.featurizer
    torch.manual_seed(1)
    total_atoms = total_masked = 0
    for s in smiles:
        clean = featurizer(s)
        item = objective.masker(clean)
        n = clean["atom_features"].shape[0]
        masked = item["masked_atoms"]
        assert masked.numel() == min(n, int(n * 0.15 + 1)) and masked.unique().numel() == masked.numel()
        total_atoms, total_masked = total_atoms + n, total_masked + masked.numel()
        # masked atoms are zeroed, the rest untouched; the targets are the atoms' real elements
        assert item["atom_features"][masked].abs().sum() == 0
        unmasked = torch.ones(n, dtype=torch.bool)
        unmasked[masked] = False
        assert torch.equal(item["atom_features"][unmasked], clean["atom_features"][unmasked])
        mol = Chem.MolFromSmiles(s)
        symbols = [mol.GetAtomWithIdx(int(i)).GetSymbol() for i in masked]
        assert [ELEMENTS[t] if t < len(ELEMENTS) else "other" for t in item["atom_targets"].tolist()] == [
            symbol if symbol in ELEMENTS else "other" for symbol in symbols
        ]
        # exactly the bonds touching a masked atom are masked, in both directions
        ends = item["masked_bond_ends"]
        touching = [b for b in mol.GetBonds() if unmasked[b.GetBeginAtomIdx()] == 0 or unmasked[b.GetEndAtomIdx()] == 0]
        assert ends.shape[1] == len(touching) == item["bond_targets"].numel()
        zero_rows = (item["bond_features"].abs().sum(1) == 0).sum().item()
        assert zero_rows == 2 * len(touching)
    assert 0.15 < total_masked / total_atoms < 0.30  # 15% plus the one extra atom per molecule


def test_masks_differ_between_draws_and_repeat_under_a_seed(smiles):
    objective = _objective()
    features = objective.encoder.featurizer(smiles[0])
    torch.manual_seed(7)
    first = objective.masker(features)["masked_atoms"]
    torch.manual_seed(7)
    again = objective.masker(features)["masked_atoms"]
    draws = {tuple(objective.masker(features)["masked_atoms"].tolist()) for _ in range(10)}
    assert torch.equal(first, again) and len(draws) > 1
    assert pickle.loads(pickle.dumps(objective.masker)).rate == 0.15


@pytest.mark.parametrize("options", [{}, {"contrastive_weight": 0.5}], ids=["masking", "masking+contrastive"])
def test_a_few_seeded_steps_lower_the_loss(smiles, options):
    objective = _objective(**options)
    torch.manual_seed(2)
    held = _batch(objective, smiles[64:96])
    train = [smiles[i : i + 16] for i in range(0, 64, 16)]
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)

    def held_loss() -> float:
        objective.eval()
        with torch.no_grad():
            return objective(held).loss.item()

    before = held_loss()
    torch.manual_seed(3)
    for step in range(40):
        objective.train()
        output = objective(_batch(objective, train[step % len(train)]))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    after = held_loss()
    assert after < 0.7 * before, (before, after)
    metrics = objective(held).metrics
    assert metrics["atom_accuracy"] > 0.5 and metrics["n_masked_atoms"] > 0
    assert ("contrastive_loss" in metrics) == bool(options)


def test_the_smiles_language_model_kind_is_refused_with_one_line(tmp_path):
    from transformers import BertConfig, BertModel

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "C", "O"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    config = BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    BertModel(config).save_pretrained(tmp_path)
    encoder = create_encoder("molecule", kind="smiles_lm", model_path=str(tmp_path), max_length=64)
    with pytest.raises(ValueError, match="attribute masking pretrains the D-MPNN molecule encoder"):
        create_objective("molecule", encoder)


def _save_encoder_dir(encoder, directory: Path) -> None:
    """The folder layout kiban pretrain writes: config.json (modality + portable config) + model.safetensors."""
    import json

    from safetensors.torch import save_model

    from kiban.encoders import config_to_dict

    directory.mkdir(parents=True)
    save_model(encoder, str(directory / "model.safetensors"))
    meta = {"format": "kiban-encoder", "modality": "molecule", "config": config_to_dict(encoder.portable_config())}
    (directory / "config.json").write_text(json.dumps(meta))


def test_a_pretrained_encoder_folder_loads_through_weights_path(smiles, tmp_path):
    objective = _objective()
    with torch.no_grad():
        objective.encoder.W_o.bias.add_(1.0)  # anything a fresh encoder would not have
    _save_encoder_dir(objective.encoder, tmp_path / "encoder")
    loaded = create_encoder("molecule", weights_path=str(tmp_path / "encoder"), dropout=0.1).eval()
    assert loaded.config.hidden_dim == 32 and loaded.config.depth == 3 and loaded.config.dropout == 0.1
    assert loaded.portable_config().weights_path is None
    with torch.no_grad():
        assert torch.equal(loaded.encode(smiles[:5]).embeddings, objective.encoder.eval().encode(smiles[:5]).embeddings)
    with pytest.raises(FileNotFoundError, match="is not a kiban encoder directory.*chemprop_checkpoint"):
        create_encoder("molecule", weights_path=str(tmp_path))

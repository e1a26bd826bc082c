"""Tests of the molecule encoder: RDKit featurization, D-MPNN tokens, invalid input."""

from __future__ import annotations

import csv
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from rdkit import Chem, RDConfig

from kiban.encoders import InvalidInput, config_from_dict, config_to_dict, create_encoder
from kiban.encoders.molecule import (
    ATOM_FEATURE_DIM,
    BOND_FEATURE_DIM,
    MoleculeEncoder,
    MoleculeEncoderConfig,
    MoleculeFeaturizer,
    default,
    tiny,
)

NCI_SDF = os.path.join(RDConfig.RDDataDir, "NCI", "first_200.props.sdf")
ESOL_CSV = Path("/work/shared/data/molecules/esol_delaney.csv")


@pytest.fixture(scope="module")
def nci_molecules() -> list[Chem.Mol]:
    molecules = [mol for mol in Chem.SDMolSupplier(NCI_SDF)][:50]
    assert all(mol is not None for mol in molecules)
    return molecules


def _eval_encoder(preset: str = "tiny", **overrides) -> MoleculeEncoder:
    torch.manual_seed(0)
    return create_encoder("molecule", preset=preset, **overrides).eval()


def test_nci_molecules_featurize_as_smiles_mol_block_and_mol(nci_molecules):
    featurizer = MoleculeFeaturizer()
    for mol in nci_molecules:
        heavy, bonds = mol.GetNumHeavyAtoms(), mol.GetNumBonds()
        for item in (Chem.MolToSmiles(mol), Chem.MolToMolBlock(mol), mol):
            features = featurizer(item)
            assert features["atom_features"].shape == (heavy, ATOM_FEATURE_DIM)
            assert features["edge_index"].shape == (2, 2 * bonds)
            assert features["bond_features"].shape == (2 * bonds, BOND_FEATURE_DIM)
            assert bonds == 0 or int(features["edge_index"].max()) < heavy


def test_nci_batch_encodes(nci_molecules):
    encoder = _eval_encoder()
    tokens = encoder.encode([Chem.MolToSmiles(mol) for mol in nci_molecules])
    heavy = torch.tensor([mol.GetNumHeavyAtoms() for mol in nci_molecules])
    assert tokens.embeddings.shape == (len(nci_molecules), int(heavy.max()), encoder.output_dim)
    assert torch.equal(tokens.lengths(), heavy)
    assert torch.isfinite(tokens.embeddings).all()
    assert (tokens.embeddings[~tokens.mask] == 0).all()


def test_ethanol_features_by_hand():
    features = MoleculeFeaturizer()("CCO")
    # Column layout: atomic number 0-28 (C=3, O=5, Na=7), total degree 29-35, formal charge 36-41
    # (-2,-1,0,1,2,other), chirality 42-46, total Hs 47-52, hybridization 53-59 (S=53, SP3=56),
    # aromatic 60, in ring 61, mass/100 62.
    expected = torch.zeros(3, ATOM_FEATURE_DIM)
    for row, hot in enumerate(
        [
            (3, 29 + 4, 38, 42, 47 + 3, 56),  # CH3: degree 4 counting hydrogens, 3 H
            (3, 29 + 4, 38, 42, 47 + 2, 56),  # CH2
            (5, 29 + 2, 38, 42, 47 + 1, 56),  # OH
        ]
    ):
        expected[row, list(hot)] = 1.0
    expected[:, 62] = torch.tensor([12.011, 12.011, 15.999]) / 100
    torch.testing.assert_close(features["atom_features"], expected, atol=1e-4, rtol=0)
    assert features["edge_index"].tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    single_bond = torch.zeros(BOND_FEATURE_DIM)
    single_bond[[0, 5]] = 1.0  # SINGLE, STEREONONE; not conjugated, not in a ring
    assert torch.equal(features["bond_features"], single_bond.expand(4, -1))


def test_aromatic_and_charged_atoms_by_hand():
    benzene = MoleculeFeaturizer()("c1ccccc1")
    atom = benzene["atom_features"][0]
    # C, degree 3, one H, SP2, aromatic, in a ring
    assert atom[[3, 29 + 3, 38, 47 + 1, 55, 60, 61]].tolist() == [1.0] * 7
    aromatic_bond = torch.zeros(BOND_FEATURE_DIM)
    aromatic_bond[[3, 5, 12, 13]] = 1.0  # AROMATIC, STEREONONE, conjugated, in ring
    assert torch.equal(benzene["bond_features"], aromatic_bond.expand(12, -1))

    sodium = MoleculeFeaturizer()("[Na+]")["atom_features"][0]
    assert sodium.nonzero().flatten().tolist() == [7, 29, 39, 42, 47, 53, 62]  # Na, degree 0, +1, 0 H, S


def test_other_bucket_for_rare_element():
    features = MoleculeFeaturizer()("[U]")["atom_features"][0]
    assert features[28] == 1.0 and features[:28].sum() == 0  # uranium is not in the element list


@pytest.mark.parametrize(
    "smiles",
    ["CC(=O)Oc1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "CC/C=C/c1ccc(cc1)[N+](=O)[O-]"],
)
def test_renumbered_molecule_gives_permuted_tokens(smiles):
    encoder = _eval_encoder("default")
    mol = Chem.MolFromSmiles(smiles)
    order = list(range(mol.GetNumAtoms()))
    random.Random(0).shuffle(order)
    renumbered = Chem.RenumberAtoms(mol, order)
    tokens = encoder.encode([mol, renumbered])
    n = mol.GetNumAtoms()
    # RenumberAtoms puts old atom order[i] at position i.
    torch.testing.assert_close(tokens.embeddings[1, :n], tokens.embeddings[0, order], atol=1e-5, rtol=0)
    pooled = tokens.pooled()
    torch.testing.assert_close(pooled[0], pooled[1], atol=1e-5, rtol=0)


def test_padding_does_not_change_tokens():
    encoder = _eval_encoder()
    alone = encoder.encode(["CCO"])
    batched = encoder.encode(["CC(=O)Oc1ccccc1C(=O)O", "CCO", "[Na+]"])
    torch.testing.assert_close(batched.embeddings[1, :3], alone.embeddings[0], atol=1e-6, rtol=0)
    assert batched.mask.tolist()[1] == [True] * 3 + [False] * 10
    assert (batched.embeddings[1, 3:] == 0).all()


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("C1CC", "unclosed ring"),
        ("C(C)(C)(C)(C)C", "Explicit valence for atom # 0 C, 5, is greater than permitted"),
        ("xyz", "syntax error while parsing: xyz"),
        ("c1cccc1", "Can't kekulize mol"),
        ("", "empty SMILES"),
        ("  ", "empty SMILES"),
    ],
)
def test_invalid_smiles_names_the_smiles_and_rdkit_reason(smiles, reason, capfd):
    with pytest.raises(InvalidInput) as caught:
        MoleculeFeaturizer()(smiles)
    assert caught.value.modality == "molecule"
    assert caught.value.item_id == smiles
    assert reason in caught.value.problem
    assert repr(smiles) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert capfd.readouterr().err == ""  # RDKit's own log lines are captured, not printed


def test_invalid_input_uses_the_given_id():
    with pytest.raises(InvalidInput, match="'row 17'.*unclosed ring") as caught:
        MoleculeFeaturizer()("C1CC", item_id="row 17")
    assert caught.value.item_id == "row 17"


@pytest.mark.parametrize("item", [42, None, ["CCO"]])
def test_non_molecule_items_are_invalid(item):
    with pytest.raises(InvalidInput, match="expected a SMILES string"):
        MoleculeFeaturizer()(item)


def test_unsanitizable_mol_object_is_invalid(capfd):
    mol = Chem.MolFromSmiles("C(C)(C)(C)(C)C", sanitize=False)
    mol.SetProp("_Name", "pentavalent carbon")
    with pytest.raises(InvalidInput, match="'pentavalent carbon'.*Explicit valence"):
        MoleculeFeaturizer()(mol)
    assert capfd.readouterr().err == ""


def test_broken_mol_block_is_invalid():
    block = Chem.MolToMolBlock(Chem.MolFromSmiles("CCO")).replace("  3  2  0", "  3  5  0", 1)
    with pytest.raises(InvalidInput, match="RDKit cannot read the mol block"):
        MoleculeFeaturizer()(block)


def test_explicit_hydrogens_are_suppressed():
    featurizer = MoleculeFeaturizer()
    with_h = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    assert with_h.GetNumAtoms() == 9
    assert torch.equal(featurizer(with_h)["atom_features"], featurizer("CCO")["atom_features"])
    assert featurizer("[H]C([H])([H])[H]")["atom_features"].shape[0] == 1


def test_max_atoms():
    featurizer = MoleculeFeaturizer(max_atoms=5)
    assert featurizer("CCCCC")["atom_features"].shape[0] == 5
    with pytest.raises(InvalidInput, match="6 atoms, more than this encoder's max_atoms=5"):
        featurizer("CCCCCC")


def test_single_atoms_without_bonds():
    encoder = _eval_encoder()
    features = encoder.featurizer("[Na+]")
    assert features["atom_features"].shape == (1, ATOM_FEATURE_DIM)
    assert features["edge_index"].shape == (2, 0)
    assert features["bond_features"].shape == (0, BOND_FEATURE_DIM)
    tokens = encoder.encode(["[Na+]", "C"])  # a batch without a single bond
    assert tokens.embeddings.shape == (2, 1, encoder.output_dim)
    assert tokens.mask.all() and torch.isfinite(tokens.embeddings).all()
    assert not torch.equal(tokens.embeddings[0], tokens.embeddings[1])


def test_disconnected_salt():
    tokens = _eval_encoder().encode(["[Na+].[Cl-]", "CC(=O)[O-].[Na+]"])
    assert tokens.lengths().tolist() == [2, 5]


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    encoder = create_encoder("molecule", preset="tiny", dropout=0.1).train()
    tokens = encoder.encode(["CC(=O)Oc1ccccc1C(=O)O", "CCO", "[Na+]"])
    assert (tokens.embeddings[~tokens.mask] == 0).all()
    tokens.pooled().sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_presets_and_config_round_trip():
    assert tiny().hidden_dim < default().hidden_dim
    encoder = create_encoder("molecule")
    assert encoder.output_dim == 300 and encoder.config.depth == 3
    for preset in (tiny, default):
        config = preset()
        assert config_from_dict(MoleculeEncoderConfig, config_to_dict(config)) == config
    with pytest.raises(ValueError, match="depth"):
        MoleculeEncoder(MoleculeEncoderConfig(depth=0))


def test_featurizer_pickles():
    featurizer = create_encoder("molecule", preset="tiny", max_atoms=64).featurizer
    copy = pickle.loads(pickle.dumps(featurizer))
    assert copy.max_atoms == 64
    for key, value in featurizer("c1ccncc1O").items():
        assert torch.equal(copy("c1ccncc1O")[key], value)


def test_esol_molecules_featurize():
    if not ESOL_CSV.is_file():
        pytest.skip(f"shared data set {ESOL_CSV} is not present")
    with ESOL_CSV.open(newline="") as handle:
        smiles = [row["smiles"] for row in csv.DictReader(handle)]
    assert len(smiles) > 1000
    featurizer = MoleculeFeaturizer()
    counts = [featurizer(s, item_id=i)["atom_features"].shape[0] for i, s in enumerate(smiles)]
    assert counts == [Chem.MolFromSmiles(s).GetNumHeavyAtoms() for s in smiles]
    tokens = _eval_encoder().encode(smiles[:64])
    assert torch.isfinite(tokens.embeddings).all()


def test_encodes_under_bf16_autocast():
    # message passing sums bf16 messages into atoms: the accumulator must follow the messages' dtype
    encoder = create_encoder("molecule", preset="tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder.encode(["CCO", "c1ccccc1O"])
    assert torch.isfinite(out.embeddings.float()).all()

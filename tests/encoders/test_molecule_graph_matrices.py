"""The whole-molecule featurizer (``graph_matrices``) equals the per-atom one, on real molecules."""

import csv

import pytest
import torch
from rdkit import Chem, rdBase

from kiban.encoders.base import InvalidInput
from kiban.encoders.molecule import BOND_FEATURE_DIM, MoleculeFeaturizer, atom_features, bond_features


def _per_atom(mol):
    """The featurizer's output built atom by atom and bond by bond with the per-record functions."""
    atoms = torch.tensor([atom_features(atom) for atom in mol.GetAtoms()], dtype=torch.float32)
    edges, bonds = [], []
    for bond in mol.GetBonds():
        begin, end = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        edges += [(begin, end), (end, begin)]
        bonds += [bond_features(bond)] * 2
    edge_index = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T.contiguous()
    bond_tensor = torch.tensor(bonds, dtype=torch.float32).reshape(-1, BOND_FEATURE_DIM)
    return {"atom_features": atoms, "edge_index": edge_index, "bond_features": bond_tensor}


def _smiles(nci, shared_data_dir):
    """RDKit's 5,000 NCI SMILES, plus charged, isotopic, stereo and odd molecules from MoleculeNet."""
    texts = [line.split()[0] for line in (nci / "first_5K.smi").read_text().splitlines() if line.strip()]
    texts += ["[Na+]", "[2H]C([2H])([2H])O", "F/C=C/F", "C[C@H](N)C(=O)O", "[O-][N+](=O)c1ccccc1", "[Fe+3]", "*C"]
    bbbp = shared_data_dir / "molecules" / "bbbp.csv"
    if bbbp.is_file():
        with bbbp.open() as handle:
            texts += [row["smiles"] for row in csv.DictReader(handle)][:800]
    return texts


@pytest.fixture(scope="module")
def molecules():
    import os
    from pathlib import Path

    import rdkit

    nci = Path(os.path.dirname(rdkit.__file__)) / "Data" / "NCI"
    if not (nci / "first_5K.smi").is_file():
        pytest.skip("RDKit's NCI data is not installed")
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return _smiles(nci, shared)


def test_whole_molecule_features_equal_the_per_atom_features(molecules):
    featurizer = MoleculeFeaturizer()
    checked = 0
    for text in molecules:
        try:
            got = featurizer(text)
        except InvalidInput:
            continue
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(text)
        want = _per_atom(mol)
        for key in want:
            assert got[key].dtype == want[key].dtype, (text, key)
            assert got[key].shape == want[key].shape, (text, key)
            assert torch.equal(got[key], want[key]), (text, key)
        checked += 1
    # RDKit parses 4,991 of the NCI set; BBBP's 800, read only where ../shared/data is present, add more
    with_bbbp = len(molecules) > 5100
    assert checked > (5000 if with_bbbp else 4990)


def test_features_are_identical_across_runs_and_batches_collate(molecules):
    first = [MoleculeFeaturizer()(text) for text in molecules[:300] if Chem.MolFromSmiles(text) is not None]
    second = [MoleculeFeaturizer()(text) for text in molecules[:300] if Chem.MolFromSmiles(text) is not None]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second, strict=True) for k in a)
    batch = MoleculeFeaturizer().collate(first[:16])
    assert batch["edge_index"].shape[0] == 2 and batch["bond_features"].shape[0] == batch["edge_index"].shape[1]

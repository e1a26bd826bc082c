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


def _read_pickle(mol, pickle=None):
    """(status, arrays) of the compiled reader on ``mol``'s binary pickle (or the bytes given)."""
    import numpy as np

    from kiban.encoders.molecule import ATOM_FEATURE_DIM, _graph_kernel

    kernel = _graph_kernel()
    if kernel is None:
        pytest.skip("no C++ compiler: graph_matrices runs RDKit's getters only")
    n_atoms, n_bonds = mol.GetNumAtoms(), mol.GetNumBonds()
    arrays = (
        np.empty((n_atoms, ATOM_FEATURE_DIM), dtype=np.float32),
        np.empty((2, 2 * n_bonds), dtype=np.int64),
        np.empty((2 * n_bonds, BOND_FEATURE_DIM), dtype=np.float32),
    )
    pickle = mol.ToBinary() if pickle is None else pickle
    return kernel(pickle, len(pickle), n_atoms, n_bonds, *(a.ctypes.data for a in arrays)), arrays


def _ring_ladder(n_bonds):
    """200 carbons in a chain, with ring-closing bonds (i, i + 2) until there are ``n_bonds`` bonds."""
    mol = Chem.RWMol()
    for _ in range(200):
        mol.AddAtom(Chem.Atom(6))
    for i in range(199):
        mol.AddBond(i, i + 1, Chem.BondType.SINGLE)
    i = 0
    while mol.GetNumBonds() < n_bonds:
        mol.AddBond(i, i + 2, Chem.BondType.SINGLE)
        i += 3
    mol = mol.GetMol()
    Chem.SanitizeMol(mol)
    return mol


def test_the_compiled_pickle_reader_equals_rdkits_getters_and_refuses_what_it_does_not_read(molecules):
    """``graph_matrices`` reads RDKit's binary pickle in C++; the getters are the reference."""
    import numpy as np

    from kiban.encoders.molecule import graph_matrices_getters

    read, refused = 0, []
    large = [Chem.MolFromSmiles("c1ccccc1" * 43), _ring_ladder(255), _ring_ladder(256)]  # 258 atoms; 1- and 4-byte indices
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(t) for t in molecules) if m is not None and m.GetNumAtoms()]
    for mol in mols + large:
        status, arrays = _read_pickle(mol)
        if status != 0:
            refused.append(Chem.MolToSmiles(mol))
            continue
        want = graph_matrices_getters(mol)
        assert all(np.array_equal(got, w) for got, w in zip(arrays, want, strict=True)), Chem.MolToSmiles(mol)
        read += 1
    # refused: isotopes ([2H], [13C]: their mass needs RDKit's isotope table) and dummy atoms ("*C")
    assert all("[2H]" in s or "*" in s or "[1" in s for s in refused), refused
    assert read >= len(mols) + len(large) - 10
    # a pickle cut short is malformed (-1), never read past its end; another pickle version is refused (1)
    mol = Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O")
    pickle = mol.ToBinary()
    assert all(_read_pickle(mol, pickle[:cut])[0] == -1 for cut in range(0, len(pickle) - 20, 3))
    assert _read_pickle(mol, pickle[:8] + (15).to_bytes(4, "little") + pickle[12:])[0] == 1

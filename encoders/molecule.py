"""Molecule encoder: an RDKit graph featurizer and a directed message-passing network giving atom tokens.

Raw items are SMILES strings, MDL mol blocks (one SDF record) or ``rdkit.Chem.Mol`` objects. Hydrogens
are implicit: the tokens are the atoms of RDKit's hydrogen-suppressed graph (``Chem.RemoveHs``), i.e.
the heavy atoms plus the few hydrogens RDKit keeps (isotopic ``[2H]``, ``[H][H]``). The network is the
D-MPNN of chemprop (Yang et al. 2019, "Analyzing Learned Molecular Representations for Property
Prediction", J. Chem. Inf. Model. 59:3370) without its readout: every atom's hidden state is a token.

Published weights: a chemprop v2 model file or a CheMeleon-style message-passing file loads with
``chemprop_checkpoint: PATH`` (features and network then match chemprop's exactly; see
``molecule_chemprop.py``). A second kind, ``kind: "smiles_lm"``, is a SMILES language model from a
Hugging Face RoBERTa/BERT folder (ChemBERTa-style; see ``molecule_lm.py``) behind the same
``molecule`` name.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rdkit import Chem, rdBase
from torch import Tensor, nn

from kiban import native
from kiban.encoders.base import (
    Encoder,
    InvalidInput,
    ModalityTokens,
    pad_stack,
    register_encoder,
    register_preset,
)
from kiban.encoders.molecule_chemprop import (
    CHEMPROP_BOND_TYPE_COLUMNS,
    CHEMPROP_FEATURES,
    read_chemprop_checkpoint,
)

__all__ = [
    "ATOM_FEATURE_DIM",
    "BOND_FEATURE_DIM",
    "ELEMENTS",
    "GRAPH_FEATURES",
    "GraphFeatures",
    "MoleculeEncoder",
    "MoleculeEncoderConfig",
    "MoleculeFeaturizer",
    "build_molecule_encoder",
    "chemprop_default",
    "default",
    "graph_features",
    "graph_matrices",
    "graph_matrices_getters",
    "read_kiban_encoder_dir",
    "register_molecule_kind",
    "tiny",
]

logger = logging.getLogger(__name__)

MODALITY = "molecule"

# ----------------------------------------------------------------------------------------------
# Feature vocabularies. Each categorical feature is a one-hot over these choices plus a final
# "other" column, as in chemprop, so an unusual atom still gets a valid (if coarse) encoding.

# Elements common in drug-like, natural-product and NCI screening sets; the rest share "other".
ELEMENTS = tuple("H Li B C N O F Na Mg Al Si P S Cl K Ca Mn Fe Co Cu Zn As Se Br Sn I Pt Hg".split())
ATOMIC_NUMBERS = tuple(Chem.GetPeriodicTable().GetAtomicNumber(symbol) for symbol in ELEMENTS)
DEGREES = (0, 1, 2, 3, 4, 5)
FORMAL_CHARGES = (-2, -1, 0, 1, 2)
CHIRAL_TAGS = (
    Chem.ChiralType.CHI_UNSPECIFIED,
    Chem.ChiralType.CHI_TETRAHEDRAL_CW,
    Chem.ChiralType.CHI_TETRAHEDRAL_CCW,
    Chem.ChiralType.CHI_OTHER,
)
NUM_HS = (0, 1, 2, 3, 4)
HYBRIDIZATIONS = (
    Chem.HybridizationType.S,
    Chem.HybridizationType.SP,
    Chem.HybridizationType.SP2,
    Chem.HybridizationType.SP3,
    Chem.HybridizationType.SP3D,
    Chem.HybridizationType.SP3D2,
)
BOND_TYPES = (Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC)
BOND_STEREOS = (
    Chem.BondStereo.STEREONONE,
    Chem.BondStereo.STEREOANY,
    Chem.BondStereo.STEREOZ,
    Chem.BondStereo.STEREOE,
    Chem.BondStereo.STEREOCIS,
    Chem.BondStereo.STEREOTRANS,
)

_ATOM_ONE_HOTS = (ATOMIC_NUMBERS, DEGREES, FORMAL_CHARGES, CHIRAL_TAGS, NUM_HS, HYBRIDIZATIONS)
_BOND_ONE_HOTS = (BOND_TYPES, BOND_STEREOS)
# One-hots (each with its "other" column), then aromatic, in ring, mass / 100.
ATOM_FEATURE_DIM = sum(len(choices) + 1 for choices in _ATOM_ONE_HOTS) + 3
# Bond type and stereo one-hots, then conjugated, in ring.
BOND_FEATURE_DIM = sum(len(choices) + 1 for choices in _BOND_ONE_HOTS) + 2


def _one_hot_offsets(vocabularies: Sequence[Sequence[Any]]) -> list[int]:
    offsets, start = [], 0
    for choices in vocabularies:
        offsets.append(start)
        start += len(choices) + 1
    return offsets


_ATOM_OFFSETS = _one_hot_offsets(_ATOM_ONE_HOTS)
_BOND_OFFSETS = _one_hot_offsets(_BOND_ONE_HOTS)
_ATOM_FLAGS = _ATOM_OFFSETS[-1] + len(_ATOM_ONE_HOTS[-1]) + 1  # first column after the one-hots
_BOND_FLAGS = _BOND_OFFSETS[-1] + len(_BOND_ONE_HOTS[-1]) + 1


def _hot_columns(
    values: Sequence[Any], vocabularies: Sequence[Sequence[Any]], offsets: Sequence[int]
) -> list[int]:
    """The hot column of each categorical value; a value outside its vocabulary gets the "other" column."""
    return [
        offset + (choices.index(value) if value in choices else len(choices))
        for value, choices, offset in zip(values, vocabularies, offsets, strict=True)
    ]


def atom_features(atom: Chem.Atom) -> list[float]:
    """The ATOM_FEATURE_DIM features of one atom (chemprop's atom features, element list shortened)."""
    row = [0.0] * ATOM_FEATURE_DIM
    categorical = (
        atom.GetAtomicNum(),
        atom.GetTotalDegree(),  # counts implicit hydrogens too, as chemprop does
        atom.GetFormalCharge(),
        atom.GetChiralTag(),
        atom.GetTotalNumHs(),
        atom.GetHybridization(),
    )
    for column in _hot_columns(categorical, _ATOM_ONE_HOTS, _ATOM_OFFSETS):
        row[column] = 1.0
    row[_ATOM_FLAGS] = float(atom.GetIsAromatic())
    row[_ATOM_FLAGS + 1] = float(atom.IsInRing())
    row[_ATOM_FLAGS + 2] = atom.GetMass() * 0.01  # scaled to about the range of the one-hots
    return row


def bond_features(bond: Chem.Bond) -> list[float]:
    """The BOND_FEATURE_DIM features of one bond (chemprop's bond features)."""
    row = [0.0] * BOND_FEATURE_DIM
    for column in _hot_columns((bond.GetBondType(), bond.GetStereo()), _BOND_ONE_HOTS, _BOND_OFFSETS):
        row[column] = 1.0
    row[_BOND_FLAGS] = float(bond.GetIsConjugated())
    row[_BOND_FLAGS + 1] = float(bond.IsInRing())
    return row


def _column_table(choices: Sequence[Any], size: int) -> np.ndarray:
    """Position of each integer value 0..size-1 within its one-hot: its index in ``choices``, else "other"."""
    table = np.full(size, len(choices), dtype=np.int64)
    for position, value in enumerate(choices):
        table[int(value)] = position
    return table


# The one-hot column of every categorical atom property value, all six tables end to end: property k's
# value v (shifted by _ATOM_SHIFTS[k], clipped to its table) is at _ATOM_COLUMNS[_ATOM_STARTS[k] + v].
# Each table's last entry is "other", so out-of-range values (degree 7, charge -9, an unlisted
# element) land there.
_ATOM_SHIFTS = np.array([0, 0, 8, 0, 0, 0])
_ATOM_SIZES = np.array([130, 16, 17, 16, 16, 32])
_ATOM_STARTS = np.concatenate([[0], np.cumsum(_ATOM_SIZES)[:-1]])
_ATOM_COLUMNS = np.concatenate(
    [
        offset + _column_table([int(c) + shift for c in choices], size)
        for offset, choices, shift, size in zip(_ATOM_OFFSETS, _ATOM_ONE_HOTS, _ATOM_SHIFTS, _ATOM_SIZES, strict=True)
    ]
)
_BOND_SIZE = 64
_BOND_COLUMNS = np.concatenate([offset + _column_table(choices, _BOND_SIZE) for offset, choices in zip(_BOND_OFFSETS, _BOND_ONE_HOTS, strict=True)])


# Atomic weight by atomic number: Atom.GetMass() of an atom without an isotope.
_ATOMIC_WEIGHTS = np.array([Chem.GetPeriodicTable().GetAtomicWeight(z) for z in range(119)], dtype=np.float64)


@functools.cache
def _graph_kernel() -> Callable[..., int] | None:
    """``kiban_mol_graph`` of mol_graph.cpp with molecule.py's one-hot tables set, or None (no compiler)."""
    library = native.load(Path(__file__).with_name("mol_graph.cpp"))
    if library is None:
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.kiban_mol_graph_tables.argtypes = [pointer] * 4 + [i64, i64, pointer, i64, pointer, i64, i64, i64]
    library.kiban_mol_graph_tables.restype = None
    library.kiban_mol_graph.argtypes = [ctypes.c_char_p, i64, i64, i64, pointer, pointer, pointer]
    library.kiban_mol_graph.restype = ctypes.c_int
    tables = [np.ascontiguousarray(t, dtype=np.int64) for t in (_ATOM_COLUMNS, _ATOM_STARTS, _ATOM_SIZES, _ATOM_SHIFTS, _BOND_COLUMNS)]
    library._kiban_tables = tables  # the library reads them by pointer: they live as long as it does
    library.kiban_mol_graph_tables(
        *(t.ctypes.data for t in tables[:4]), _ATOM_FLAGS, ATOM_FEATURE_DIM,
        _ATOMIC_WEIGHTS.ctypes.data, len(_ATOMIC_WEIGHTS),
        tables[4].ctypes.data, _BOND_SIZE, _BOND_FLAGS, BOND_FEATURE_DIM,
    )  # fmt: skip
    return library.kiban_mol_graph


def graph_matrices(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The "kiban" features of a whole molecule at once: ``atom_features`` / ``bond_features`` row by row.

    Returns (atoms [n_atoms, ATOM_FEATURE_DIM] float32, edge_index [2, 2 * n_bonds] int64, bonds
    [2 * n_bonds, BOND_FEATURE_DIM] float32), the directed edges paired as ``MoleculeFeaturizer``
    documents. The compiled reader of ``mol_graph.cpp`` takes every property from the molecule's
    binary pickle (``Mol.ToBinary``: one RDKit call instead of nine getters per atom and six per
    bond); where it cannot (no compiler, ``KIBAN_NATIVE=off``, an isotope, a query atom, another
    pickle version: see the file), ``graph_matrices_getters`` gives the same arrays.
    """
    kernel = _graph_kernel()
    if kernel is not None:
        n_atoms, n_bonds = mol.GetNumAtoms(), mol.GetNumBonds()
        atoms = np.empty((n_atoms, ATOM_FEATURE_DIM), dtype=np.float32)
        edge_index = np.empty((2, 2 * n_bonds), dtype=np.int64)
        bonds = np.empty((2 * n_bonds, BOND_FEATURE_DIM), dtype=np.float32)
        pickle = mol.ToBinary()
        if kernel(pickle, len(pickle), n_atoms, n_bonds, atoms.ctypes.data, edge_index.ctypes.data, bonds.ctypes.data) == 0:
            return atoms, edge_index, bonds
    return graph_matrices_getters(mol)


def graph_matrices_getters(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``graph_matrices`` by RDKit's getters: one pass per atom and bond into an array, then every
    one-hot set by table lookups (the per-atom functions build 133-float lists one by one).
    """
    atom = mol.GetAtomWithIdx  # by index: iterating mol.GetAtoms() goes through a Python wrapper
    props = np.array(
        [
            (
                a.GetAtomicNum(),
                a.GetTotalDegree(),
                a.GetFormalCharge(),
                a.GetChiralTag(),
                a.GetTotalNumHs(),
                a.GetHybridization(),
                a.GetIsAromatic(),
                a.IsInRing(),
                a.GetMass(),
            )
            for a in map(atom, range(mol.GetNumAtoms()))
        ],
        dtype=np.float64,
    ).reshape(-1, 9)
    n = len(props)
    atoms = np.zeros((n, ATOM_FEATURE_DIM), dtype=np.float32)
    values = np.minimum(np.maximum(props[:, :6].astype(np.int64) + _ATOM_SHIFTS, 0), _ATOM_SIZES - 1)
    atoms[np.arange(n)[:, None], _ATOM_COLUMNS[_ATOM_STARTS + values]] = 1.0
    atoms[:, _ATOM_FLAGS] = props[:, 6]
    atoms[:, _ATOM_FLAGS + 1] = props[:, 7]
    atoms[:, _ATOM_FLAGS + 2] = props[:, 8] * 0.01  # in float64, then float32: as the per-atom rows
    bond = mol.GetBondWithIdx
    links = np.array(
        [
            (b.GetBeginAtomIdx(), b.GetEndAtomIdx(), b.GetBondType(), b.GetStereo(), b.GetIsConjugated(), b.IsInRing())
            for b in map(bond, range(mol.GetNumBonds()))
        ],
        dtype=np.int64,
    ).reshape(-1, 6)
    bonds = np.zeros((len(links), BOND_FEATURE_DIM), dtype=np.float32)
    kinds = np.minimum(np.maximum(links[:, 2:4], 0), _BOND_SIZE - 1) + [0, _BOND_SIZE]
    bonds[np.arange(len(links))[:, None], _BOND_COLUMNS[kinds]] = 1.0
    bonds[:, _BOND_FLAGS] = links[:, 4]
    bonds[:, _BOND_FLAGS + 1] = links[:, 5]
    # bond k -> edges 2k (begin -> end) and 2k + 1 (end -> begin)
    edge_index = np.stack([links[:, :2].reshape(-1), links[:, 1::-1].reshape(-1)])
    return atoms, edge_index, np.repeat(bonds, 2, axis=0)


@dataclass(frozen=True)
class GraphFeatures:
    """One way of turning atoms and bonds into vectors: two functions and their widths.

    ``element_columns`` and ``bond_type_columns`` are the (start, stop) columns of the element and
    bond-type one-hots, which self-supervised objectives read back as class labels. ``matrices``,
    where given, computes the same features for a whole molecule at once (``graph_matrices``).
    """

    atom: Callable[[Chem.Atom], list[float]]
    bond: Callable[[Chem.Bond], list[float]]
    atom_dim: int
    bond_dim: int
    element_columns: tuple[int, int]
    bond_type_columns: tuple[int, int]
    matrices: Callable[[Chem.Mol], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None


# MoleculeEncoderConfig.featurizer names one of these. "kiban" is the original feature set (chemprop's
# v1 features on a shorter element list, plus "in ring"); the chemprop ones reproduce chemprop's
# features exactly, so that chemprop-trained weights see the inputs they were trained on.
GRAPH_FEATURES: dict[str, GraphFeatures] = {
    "kiban": GraphFeatures(
        atom_features,
        bond_features,
        ATOM_FEATURE_DIM,
        BOND_FEATURE_DIM,
        element_columns=(0, len(ELEMENTS) + 1),
        bond_type_columns=(0, len(BOND_TYPES) + 1),
        matrices=graph_matrices,
    ),
    **{
        name: GraphFeatures(
            features.atom,
            features.bond,
            features.atom_dim,
            features.bond_dim,
            element_columns=(0, len(features.atomic_nums) + 1),
            bond_type_columns=CHEMPROP_BOND_TYPE_COLUMNS,
        )
        for name, features in CHEMPROP_FEATURES.items()
    },
}

# chemprop's activations (chemprop/nn/utils.py), by the names its hyper-parameters store
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": partial(nn.LeakyReLU, 0.1),
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def graph_features(name: str) -> GraphFeatures:
    """The feature set registered as ``name`` in GRAPH_FEATURES; ValueError lists the choices."""
    try:
        return GRAPH_FEATURES[name]
    except KeyError:
        raise ValueError(
            f"MoleculeEncoderConfig.featurizer {name!r} is unknown; choices: {', '.join(GRAPH_FEATURES)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class MoleculeEncoderConfig:
    """Settings of the D-MPNN molecule encoder.

    hidden_dim: width of the bond messages and of the atom tokens (D).
    depth: message-passing steps, counted as in chemprop (``depth - 1`` bond-message updates, then
        one aggregation onto the atoms), so each token sees atoms up to ``depth`` bonds away.
    dropout: applied after every activation, as in chemprop.
    bias: bias in the input and message layers (chemprop's default is without); the atom output
        layer always has one.
    max_atoms: molecules with more tokens are rejected as InvalidInput (None: no limit).
    featurizer: the atom/bond features, a key of ``GRAPH_FEATURES``: "kiban" (default), or
        "chemprop_v2" / "chemprop_v1" for chemprop's own.
    activation: relu (default), leakyrelu, prelu, tanh or elu, as chemprop names them.
    undirected: average each bond's two directed states before every message step (chemprop's
        ``undirected=True``).
    chemprop_checkpoint: a chemprop v2 model file (``save_model``) or a CheMeleon-style
        message-passing file. Its hyper-parameters set hidden_dim, depth, bias, activation,
        undirected and featurizer (the values above are ignored); dropout stays this config's.
    weights_path: a kiban encoder folder (``config.json`` + ``model.safetensors``, as ``kiban
        pretrain molecule`` writes it); its architecture replaces the fields above, as with
        chemprop_checkpoint.
    kind: "dmpnn" (this graph network) or "smiles_lm" (a Hugging Face SMILES language model; see
        ``molecule_lm.py``: only max_atoms and the three fields below apply to it).
    model_path: smiles_lm: the Hugging Face folder (config.json, weights, tokenizer).
    pretrained: smiles_lm: load the folder's weights (False: its architecture, random weights).
    max_length: smiles_lm: SMILES tokens per molecule including the special tokens; a longer SMILES
        is rejected as InvalidInput (a truncated SMILES is another molecule).
    """

    hidden_dim: int = 300
    depth: int = 3
    dropout: float = 0.0
    bias: bool = False
    max_atoms: int | None = None
    featurizer: str = "kiban"
    activation: str = "relu"
    undirected: bool = False
    chemprop_checkpoint: str | None = None
    weights_path: str | None = None
    kind: str = "dmpnn"
    model_path: str | None = None
    pretrained: bool = True
    max_length: int = 256


# ----------------------------------------------------------------------------------------------
# Featurizer


_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s?")


def _rdkit_reason(captured: str) -> str:
    """RDKit's logged error text as one line: timestamps, the echoed input and the caret line dropped."""
    lines: list[str] = []
    for line in captured.splitlines():
        line = _TIMESTAMP.sub("", line).strip()
        if line and set(line) <= set("^~ "):
            # A syntax error logs the input, then a "~~^" pointer under it: both say nothing in one line.
            if lines:
                lines.pop()
            continue
        line = line.removeprefix("SMILES Parse Error: ").rstrip(":")
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines)


class MoleculeFeaturizer:
    """SMILES / mol block / ``Chem.Mol`` -> atom and bond feature tensors of one molecule. Picklable.

    One molecule gives ``atom_features [n_atoms, ATOM_FEATURE_DIM]``, ``edge_index [2, 2 * n_bonds]``
    (atom indices, source row then target row) and ``bond_features [2 * n_bonds, BOND_FEATURE_DIM]``.
    Every bond is stored as two directed edges, ``2k`` (begin -> end) and ``2k + 1`` (end -> begin); the
    encoder relies on this pairing to find an edge's reverse.
    """

    modality = MODALITY

    def __init__(self, *, max_atoms: int | None = None, features: str = "kiban") -> None:
        """Featurize with the ``features`` set of GRAPH_FEATURES, refusing more than ``max_atoms`` atoms."""
        graph_features(features)  # an unknown name fails here, not in a DataLoader worker
        self.max_atoms = max_atoms
        self.features = features  # a name, not the functions: keeps the featurizer cheap to pickle

    @property
    def atom_dim(self) -> int:
        """Columns of one atom's feature vector."""
        return graph_features(self.features).atom_dim

    @property
    def bond_dim(self) -> int:
        """Columns of one bond's feature vector."""
        return graph_features(self.features).bond_dim

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """Features of one molecule; raises InvalidInput naming ``item_id`` (or the item)."""
        mol, name = self.parse(item, item_id=item_id)
        n_atoms = mol.GetNumAtoms()
        if self.max_atoms is not None and n_atoms > self.max_atoms:
            raise InvalidInput(
                MODALITY,
                name,
                f"{n_atoms} atoms, more than this encoder's max_atoms={self.max_atoms}",
            )
        features = graph_features(self.features)
        if features.matrices is not None:
            atoms, edge_index, bonds = features.matrices(mol)
            return {
                "atom_features": torch.from_numpy(atoms),
                "edge_index": torch.from_numpy(edge_index),
                "bond_features": torch.from_numpy(bonds),
            }
        atoms = torch.tensor([features.atom(atom) for atom in mol.GetAtoms()], dtype=torch.float32)
        edges, bonds = [], []
        for bond in mol.GetBonds():
            begin, end = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            edges += [(begin, end), (end, begin)]
            bonds += [features.bond(bond)] * 2
        edge_index = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T.contiguous()
        bond_tensor = torch.tensor(bonds, dtype=torch.float32).reshape(-1, features.bond_dim)
        return {"atom_features": atoms, "edge_index": edge_index, "bond_features": bond_tensor}

    def parse(self, item: Any, *, item_id: Any = None) -> tuple[Chem.Mol, Any]:
        """(sanitized H-suppressed RDKit molecule, the id naming it in errors), or InvalidInput."""
        if isinstance(item, Chem.Mol):
            name = item_id if item_id is not None else _mol_name(item)
            mol, reason = _capture_rdkit(lambda: Chem.RemoveHs(item))
            if mol is None:
                raise InvalidInput(MODALITY, name, f"RDKit cannot sanitize the molecule: {reason}")
        elif isinstance(item, str) and "M  END" in item:
            title = item.splitlines()[0].strip()  # a mol block's first line is its name
            name = item_id if item_id is not None else (title or item)
            mol, reason = _capture_rdkit(lambda: Chem.MolFromMolBlock(item))
            if mol is None:
                raise InvalidInput(MODALITY, name, f"RDKit cannot read the mol block: {reason}")
        elif isinstance(item, str):
            smiles = item.strip()
            name = item_id if item_id is not None else item
            if not smiles:
                raise InvalidInput(MODALITY, name, "empty SMILES")
            mol, reason = _capture_rdkit(lambda: Chem.MolFromSmiles(smiles))
            if mol is None:
                raise InvalidInput(MODALITY, name, f"RDKit cannot parse SMILES {smiles!r}: {reason}")
        else:
            name = item_id if item_id is not None else item
            raise InvalidInput(
                MODALITY,
                name,
                f"expected a SMILES string, a mol block or an rdkit Chem.Mol, got {type(item).__name__}",
            )
        if mol.GetNumAtoms() == 0:
            raise InvalidInput(MODALITY, name, "the molecule has no atoms")
        return mol, name

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pad atoms to the largest molecule and offset each edge into the padded, flattened layout.

        Returns ``atom_features [B, N, F_a]``, ``atom_mask [B, N]`` (True on real atoms),
        ``edge_index [2, E]`` indexing the B * N rows of ``atom_features.reshape(B * N, F_a)``, and
        ``bond_features [E, F_b]``; E is the total number of directed edges in the batch.
        """
        atoms, mask = pad_stack([f["atom_features"] for f in features])
        n = atoms.shape[1]
        edge_index = torch.cat([f["edge_index"] + i * n for i, f in enumerate(features)], dim=1)
        bonds = torch.cat([f["bond_features"] for f in features])
        return {"atom_features": atoms, "atom_mask": mask, "edge_index": edge_index, "bond_features": bonds}


def _capture_rdkit(build: Any) -> tuple[Chem.Mol | None, str]:
    """Run an RDKit constructor with its logs kept off stderr: (molecule or None, RDKit's error text)."""
    # BlockLogs mutes RDKit's warnings; the inner capture still receives its errors, which we report.
    with rdBase.BlockLogs(), rdBase.CaptureErrorLog() as capture:
        try:
            mol = build()
        except Chem.rdchem.MolSanitizeException as error:  # RemoveHs raises where the parsers return None
            return None, str(error)
    if mol is None:
        return None, _rdkit_reason(capture.messages) or "no reason given by RDKit"
    return mol, ""


def _mol_name(mol: Chem.Mol) -> str:
    if mol.HasProp("_Name") and mol.GetProp("_Name").strip():
        return mol.GetProp("_Name").strip()
    with rdBase.BlockLogs():
        return Chem.MolToSmiles(mol)


# ----------------------------------------------------------------------------------------------
# Encoder


def _examples() -> list[Any]:
    return ["[Na+]", "CCO", "CC(=O)Oc1ccccc1C(=O)O"]  # one atom without bonds, ethanol, aspirin


class MoleculeEncoder(Encoder):
    """Directed message-passing network (chemprop's D-MPNN, Yang et al. 2019) giving one token per atom.

    Hidden states live on directed bonds: ``h0_vw = W_i [x_v, e_vw]``; each step a bond sums the
    states entering its source atom except its own reverse, ``h_vw <- act(h0_vw + W_h sum_{k != w} h_kv)``;
    finally each atom takes ``act(W_o [x_v, sum_k h_kv])``. Atoms without bonds (``[Na+]``) keep
    ``act(W_o [x_v, 0])``. With ``undirected`` each bond's two directions are averaged before every
    message step. This is chemprop's ``BondMessagePassing`` step for step (same parameter names),
    so its per-atom states before aggregation are these tokens.

    forward returns ModalityTokens with embeddings [B, N, D] and mask [B, N]: B molecules, N atoms of
    the largest one (padding atoms masked False and set to zero), D = ``config.hidden_dim``.
    """

    modality = MODALITY

    def __init__(self, config: MoleculeEncoderConfig) -> None:
        """Build the network of ``config``, loading chemprop_checkpoint or weights_path when set."""
        super().__init__()
        checkpoint = None
        if config.chemprop_checkpoint and config.weights_path:
            raise ValueError("MoleculeEncoderConfig: set chemprop_checkpoint or weights_path, not both")
        if config.weights_path:
            checkpoint = read_kiban_encoder_dir(config.weights_path)
            config = dataclasses.replace(
                config, **{name: checkpoint.config[name] for name in _ARCHITECTURE if name in checkpoint.config}
            )
        elif config.chemprop_checkpoint:
            checkpoint = read_chemprop_checkpoint(config.chemprop_checkpoint)
            config = dataclasses.replace(
                config,
                hidden_dim=checkpoint.hidden_dim,
                depth=checkpoint.depth,
                bias=checkpoint.bias,
                activation=checkpoint.activation,
                undirected=checkpoint.undirected,
                featurizer=checkpoint.featurizer,
            )
        if config.depth < 1:
            raise ValueError(f"MoleculeEncoderConfig.depth must be at least 1, got {config.depth}")
        if config.activation not in _ACTIVATIONS:
            raise ValueError(
                f"MoleculeEncoderConfig.activation {config.activation!r} is unknown; "
                f"choices: {', '.join(_ACTIVATIONS)}"
            )
        self.config = config
        self.output_dim = config.hidden_dim
        self.featurizer = MoleculeFeaturizer(max_atoms=config.max_atoms, features=config.featurizer)
        hidden, atom_dim = config.hidden_dim, self.featurizer.atom_dim
        self.W_i = nn.Linear(atom_dim + self.featurizer.bond_dim, hidden, bias=config.bias)
        self.W_h = nn.Linear(hidden, hidden, bias=config.bias)
        self.W_o = nn.Linear(atom_dim + hidden, hidden)
        self.act = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        if checkpoint is not None:
            self._load_chemprop(checkpoint.state_dict)

    def _load_chemprop(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            source = self.config.weights_path or self.config.chemprop_checkpoint
            raise ValueError(
                f"molecule weights {source!r} do not fit their own hyper-parameters: missing "
                f"{', '.join(missing) or 'nothing'}, unexpected {', '.join(unexpected) or 'nothing'}"
            )

    def portable_config(self) -> MoleculeEncoderConfig:
        """The architecture read from the weights file, without the file: a saved model carries the weights."""
        return dataclasses.replace(self.config, chemprop_checkpoint=None, weights_path=None)

    def forward(
        self, *, atom_features: Tensor, atom_mask: Tensor, edge_index: Tensor, bond_features: Tensor
    ) -> ModalityTokens:
        """Encode a collated batch (see ``MoleculeFeaturizer.collate``) into atom tokens [B, N, D]."""
        batch, n_atoms, _ = atom_features.shape
        dtype = self.W_i.weight.dtype
        # The padded batch is one disconnected graph of B * N atoms; padding atoms have no edges.
        x = atom_features.reshape(batch * n_atoms, -1).to(dtype)
        source, target = edge_index
        # Edges 2k and 2k + 1 are the two directions of bond k (see the featurizer): XOR 1 gives the reverse.
        reverse = torch.arange(source.shape[0], device=source.device) ^ 1

        h0 = self.W_i(torch.cat([x[source], bond_features.to(dtype)], dim=1))
        h = self.act(h0)
        for _ in range(self.config.depth - 1):
            if self.config.undirected:
                h = (h + h[reverse]) / 2
            into_atom = h.new_zeros(x.shape[0], h.shape[1]).index_add_(0, target, h)
            message = into_atom[source] - h[reverse]  # everything entering v except the reverse bond w -> v
            h = self.dropout(self.act(h0 + self.W_h(message)))
        into_atom = h.new_zeros(x.shape[0], h.shape[1]).index_add_(0, target, h)
        atoms = self.dropout(self.act(self.W_o(torch.cat([x.to(h.dtype), into_atom], dim=1))))

        atoms = atoms.reshape(batch, n_atoms, -1) * atom_mask.unsqueeze(-1).to(atoms.dtype)
        return ModalityTokens(atoms, atom_mask)


# Config fields that a weights folder's config decides (the rest, e.g. dropout, stay the user's).
_ARCHITECTURE = ("hidden_dim", "depth", "bias", "activation", "undirected", "featurizer")


@dataclass
class _KibanWeights:
    config: dict[str, Any]
    state_dict: dict[str, Tensor]


def read_kiban_encoder_dir(path: str) -> _KibanWeights:
    """The config values and weights of a molecule encoder folder written by ``kiban pretrain``."""
    from kiban.encoders.pretraining import read_encoder_dir

    try:
        values, state = read_encoder_dir(path, modality=MODALITY)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"molecule weights_path: {error}; a chemprop file goes in chemprop_checkpoint") from None
    if values.get("kind", "dmpnn") != "dmpnn":
        raise ValueError(f"{path!r} holds a {values['kind']!r} molecule encoder, not the D-MPNN")
    return _KibanWeights(values, state)


# MoleculeEncoderConfig.kind -> the encoder class built from the config. The graph network is
# "dmpnn"; molecule_lm.py registers "smiles_lm".
_KINDS: dict[str, Callable[[MoleculeEncoderConfig], Encoder]] = {"dmpnn": MoleculeEncoder}


def register_molecule_kind(name: str) -> Callable:
    """Class decorator: another molecule encoder, built from a MoleculeEncoderConfig with ``kind=name``."""

    def wrap(cls: Callable[[MoleculeEncoderConfig], Encoder]) -> Callable[[MoleculeEncoderConfig], Encoder]:
        if name in _KINDS:
            raise ValueError(f"molecule encoder kind {name!r} is registered twice")
        _KINDS[name] = cls
        return cls

    return wrap


@register_encoder("molecule", config=MoleculeEncoderConfig, examples=_examples, default_preset="default")
def build_molecule_encoder(config: MoleculeEncoderConfig) -> Encoder:
    """The molecule encoder of ``config.kind``: the D-MPNN or a SMILES language model."""
    try:
        kind = _KINDS[config.kind]
    except KeyError:
        raise ValueError(
            f"MoleculeEncoderConfig.kind {config.kind!r} is unknown; kinds: {', '.join(_KINDS)}"
        ) from None
    return kind(config)


@register_preset("molecule")
def tiny() -> MoleculeEncoderConfig:
    """A few-thousand-parameter D-MPNN for tests."""
    return MoleculeEncoderConfig(hidden_dim=16, depth=2)


@register_preset("molecule")
def default() -> MoleculeEncoderConfig:
    """Chemprop's default size: 300 wide, depth 3, no dropout."""
    return MoleculeEncoderConfig(hidden_dim=300, depth=3, dropout=0.0)


@register_preset("molecule")
def chemprop_default() -> MoleculeEncoderConfig:
    """Chemprop v2's default BondMessagePassing on its own v2 features (300 wide, depth 3).

    Set ``chemprop_checkpoint`` to load a chemprop model file or a CheMeleon-style foundation
    checkpoint; the file's hyper-parameters then decide the size.
    """
    return MoleculeEncoderConfig(hidden_dim=300, depth=3, featurizer="chemprop_v2")


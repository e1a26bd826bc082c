"""Molecule encoder: an RDKit graph featurizer and a directed message-passing network giving atom tokens.

Raw items are SMILES strings, MDL mol blocks (one SDF record) or ``rdkit.Chem.Mol`` objects. Hydrogens
are implicit: the tokens are the atoms of RDKit's hydrogen-suppressed graph (``Chem.RemoveHs``), i.e.
the heavy atoms plus the few hydrogens RDKit keeps (isotopic ``[2H]``, ``[H][H]``). The network is the
D-MPNN of chemprop (Yang et al. 2019, "Analyzing Learned Molecular Representations for Property
Prediction", J. Chem. Inf. Model. 59:3370) without its readout: every atom's hidden state is a token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rdkit import Chem, rdBase
from torch import Tensor, nn

from kiban.encoders.base import (
    Encoder,
    InvalidInput,
    ModalityTokens,
    pad_stack,
    register_encoder,
    register_preset,
)

__all__ = [
    "ATOM_FEATURE_DIM",
    "BOND_FEATURE_DIM",
    "ELEMENTS",
    "MoleculeEncoder",
    "MoleculeEncoderConfig",
    "MoleculeFeaturizer",
    "default",
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
    """

    hidden_dim: int = 300
    depth: int = 3
    dropout: float = 0.0
    bias: bool = False
    max_atoms: int | None = None


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

    def __init__(self, *, max_atoms: int | None = None) -> None:
        self.max_atoms = max_atoms

    @property
    def atom_dim(self) -> int:
        return ATOM_FEATURE_DIM

    @property
    def bond_dim(self) -> int:
        return BOND_FEATURE_DIM

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        mol, name = self.parse(item, item_id=item_id)
        n_atoms = mol.GetNumAtoms()
        if self.max_atoms is not None and n_atoms > self.max_atoms:
            raise InvalidInput(
                MODALITY,
                name,
                f"{n_atoms} atoms, more than this encoder's max_atoms={self.max_atoms}",
            )
        atoms = torch.tensor([atom_features(atom) for atom in mol.GetAtoms()], dtype=torch.float32)
        edges, bonds = [], []
        for bond in mol.GetBonds():
            begin, end = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            edges += [(begin, end), (end, begin)]
            bonds += [bond_features(bond)] * 2
        edge_index = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T.contiguous()
        bond_tensor = torch.tensor(bonds, dtype=torch.float32).reshape(-1, BOND_FEATURE_DIM)
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


@register_encoder("molecule", config=MoleculeEncoderConfig, examples=_examples, default_preset="default")
class MoleculeEncoder(Encoder):
    """Directed message-passing network (chemprop's D-MPNN, Yang et al. 2019) giving one token per atom.

    Hidden states live on directed bonds: ``h0_vw = W_i [x_v, e_vw]``; each step a bond sums the
    states entering its source atom except its own reverse, ``h_vw <- act(h0_vw + W_h sum_{k != w} h_kv)``;
    finally each atom takes ``act(W_o [x_v, sum_k h_kv])``. Atoms without bonds (``[Na+]``) keep
    ``act(W_o [x_v, 0])``.

    forward returns ModalityTokens with embeddings [B, N, D] and mask [B, N]: B molecules, N atoms of
    the largest one (padding atoms masked False and set to zero), D = ``config.hidden_dim``.
    """

    modality = MODALITY

    def __init__(self, config: MoleculeEncoderConfig) -> None:
        super().__init__()
        if config.depth < 1:
            raise ValueError(f"MoleculeEncoderConfig.depth must be at least 1, got {config.depth}")
        self.config = config
        self.output_dim = config.hidden_dim
        self.featurizer = MoleculeFeaturizer(max_atoms=config.max_atoms)
        hidden = config.hidden_dim
        self.W_i = nn.Linear(ATOM_FEATURE_DIM + BOND_FEATURE_DIM, hidden, bias=config.bias)
        self.W_h = nn.Linear(hidden, hidden, bias=config.bias)
        self.W_o = nn.Linear(ATOM_FEATURE_DIM + hidden, hidden)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(config.dropout)

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
            into_atom = h.new_zeros(x.shape[0], h.shape[1]).index_add_(0, target, h)
            message = into_atom[source] - h[reverse]  # everything entering v except the reverse bond w -> v
            h = self.dropout(self.act(h0 + self.W_h(message)))
        into_atom = h.new_zeros(x.shape[0], h.shape[1]).index_add_(0, target, h)
        atoms = self.dropout(self.act(self.W_o(torch.cat([x.to(h.dtype), into_atom], dim=1))))

        atoms = atoms.reshape(batch, n_atoms, -1) * atom_mask.unsqueeze(-1).to(atoms.dtype)
        return ModalityTokens(atoms, atom_mask)


@register_preset("molecule")
def tiny() -> MoleculeEncoderConfig:
    """A few-thousand-parameter D-MPNN for tests."""
    return MoleculeEncoderConfig(hidden_dim=16, depth=2)


@register_preset("molecule")
def default() -> MoleculeEncoderConfig:
    """Chemprop's default size: 300 wide, depth 3, no dropout."""
    return MoleculeEncoderConfig(hidden_dim=300, depth=3, dropout=0.0)

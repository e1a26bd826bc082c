"""chemprop v2 compatibility: its atom and bond features, and its model files read without unpickling.

Two things a chemprop-trained D-MPNN needs to run inside kiban's molecule encoder:

* the exact features chemprop computes (``SimpleMoleculeMolGraphFeaturizer`` with
  ``MultiHotAtomFeaturizer.v2()`` / ``.v1()`` and ``MultiHotBondFeaturizer``), reproduced here
  value for value, including chemprop's quirks (its bond-type one-hot has no "other" column, its
  formal-charge choices are ordered -1, -2, 1, 2, 0);
* the weights and hyper-parameters of its ``BondMessagePassing`` block, read from either published
  layout: a whole model saved by ``chemprop.models.utils.save_model`` (``{"hyper_parameters",
  "state_dict", "output_columns"}``, the block under ``message_passing.``) or a bare message-passing
  file as CheMeleon publishes it (``{"hyper_parameters", "state_dict"}`` of the block alone).

A chemprop file is a torch pickle whose hyper-parameters hold class references (``cls``), enums,
metric objects and Lightning's ``AttributeDict``. ``read_chemprop_checkpoint`` never imports or calls
any of them: its unpickler resolves chemprop and torchmetrics names to inert records, rebuilds only
plain containers and tensors, and refuses every other global with one line naming it.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from rdkit import Chem
from torch import Tensor

__all__ = [
    "CHEMPROP_BOND_TYPE_COLUMNS",
    "CHEMPROP_FEATURES",
    "ChemPropCheckpoint",
    "ChempropFeatures",
    "read_chemprop_checkpoint",
]

# ----------------------------------------------------------------------------------------------
# Features, as chemprop 2.x computes them (chemprop/featurizers/atom.py, bond.py)

_H = Chem.HybridizationType
_V1_HYBRIDIZATIONS = (_H.SP, _H.SP2, _H.SP3, _H.SP3D, _H.SP3D2)
_V2_HYBRIDIZATIONS = (_H.S, _H.SP, _H.SP2, _H.SP2D, _H.SP3, _H.SP3D, _H.SP3D2)
_BOND_TYPES = (Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC)
_N_STEREO = 6  # chemprop's ``stereos = range(6)``: NONE, ANY, Z, E, CIS, TRANS; the rest share "other"
CHEMPROP_BOND_DIM = 1 + len(_BOND_TYPES) + 2 + _N_STEREO + 1  # 14
CHEMPROP_BOND_TYPE_COLUMNS = (1, 1 + len(_BOND_TYPES))  # no "other" column: an unknown type is all zero


@dataclass(frozen=True)
class ChempropFeatures:
    """One of chemprop's multi-hot atom featurizations (``MultiHotAtomFeaturizer.v1()`` / ``.v2()``).

    The vectors are: atomic number, total degree, formal charge, chiral tag, total H count and
    hybridization one-hots (each with a final "other" column), then aromatic, then mass / 100.
    Bonds always use chemprop's ``MultiHotBondFeaturizer`` (14 columns).
    """

    atomic_nums: tuple[int, ...]
    hybridizations: tuple[Any, ...]
    degrees: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    formal_charges: tuple[int, ...] = (-1, -2, 1, 2, 0)
    chiral_tags: tuple[int, ...] = (0, 1, 2, 3)
    num_hs: tuple[int, ...] = (0, 1, 2, 3, 4)

    @property
    def _one_hots(self) -> tuple[tuple[Any, ...], ...]:
        return (
            self.atomic_nums,
            self.degrees,
            self.formal_charges,
            self.chiral_tags,
            self.num_hs,
            self.hybridizations,
        )

    @property
    def atom_dim(self) -> int:
        """Columns of one atom's vector (72 for v2, 133 for v1)."""
        return sum(len(choices) + 1 for choices in self._one_hots) + 2

    @property
    def bond_dim(self) -> int:
        """Columns of one bond's vector (14)."""
        return CHEMPROP_BOND_DIM

    def atom(self, atom: Chem.Atom) -> list[float]:
        """Chemprop's feature vector of one atom."""
        row = [0.0] * self.atom_dim
        values = (
            atom.GetAtomicNum(),
            atom.GetTotalDegree(),
            atom.GetFormalCharge(),
            int(atom.GetChiralTag()),
            int(atom.GetTotalNumHs()),
            atom.GetHybridization(),
        )
        start = 0
        for value, choices in zip(values, self._one_hots, strict=True):
            row[start + (choices.index(value) if value in choices else len(choices))] = 1.0
            start += len(choices) + 1
        row[start] = float(atom.GetIsAromatic())
        row[start + 1] = 0.01 * atom.GetMass()  # float64 here, float32 in the tensor, as in chemprop
        return row

    def bond(self, bond: Chem.Bond) -> list[float]:
        """Chemprop's feature vector of one bond: [null, type x4, conjugated, in ring, stereo x7]."""
        row = [0.0] * CHEMPROP_BOND_DIM
        bond_type = bond.GetBondType()
        # chemprop's one-hot has no "other" column for bond types: an unknown type sets no type bit
        if bond_type in _BOND_TYPES:
            row[1 + _BOND_TYPES.index(bond_type)] = 1.0
        row[5] = float(bond.GetIsConjugated())
        row[6] = float(bond.IsInRing())
        stereo = int(bond.GetStereo())
        row[7 + (min(_N_STEREO, stereo))] = 1.0
        return row


CHEMPROP_FEATURES: dict[str, ChempropFeatures] = {
    # chemprop 2's default: elements of the first four periods plus iodine
    "chemprop_v2": ChempropFeatures(atomic_nums=tuple(range(1, 37)) + (53,), hybridizations=_V2_HYBRIDIZATIONS),
    # chemprop 1 (and v1-converted models): atomic numbers 1..100
    "chemprop_v1": ChempropFeatures(atomic_nums=tuple(range(1, 101)), hybridizations=_V1_HYBRIDIZATIONS),
}


# ----------------------------------------------------------------------------------------------
# Reading a chemprop model file without unpickling code


class _Record:
    """An inert stand-in for an object of a chemprop / torchmetrics class: keeps its arguments and state."""

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualified_name}>"


# Packages whose names become _Record classes: chemprop's own (model classes, enums, metrics) and
# torchmetrics' (the metric objects' reduction functions). Nothing from them is imported or run.
_RECORDED_PACKAGES = ("chemprop", "torchmetrics")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
    # Lightning's hyper-parameter container is a dict with attribute access; a dict keeps its content
    ("lightning.fabric.utilities.data", "AttributeDict"): dict,
    ("lightning_fabric.utilities.data", "AttributeDict"): dict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): dict,
}


class RefusedPickle(pickle.UnpicklingError):
    """A chemprop file refers to something kiban does not load."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only plain containers, tensors and inert records; anything else is refused."""

    _records: ClassVar[dict[str, type]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _RECORDED_PACKAGES:
            qualified = f"{module}.{name}"
            if qualified not in self._records:
                self._records[qualified] = type(name, (_Record,), {"qualified_name": qualified})
            return self._records[qualified]
        raise RefusedPickle(f"{module}.{name}")


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler class and ``load``."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


@dataclass
class ChemPropCheckpoint:
    """The message-passing block of a chemprop file: its settings and its weights under kiban's names.

    ``state_dict`` holds ``W_i.weight``, ``W_h.weight``, ``W_o.weight``, ``W_o.bias`` (and the biases
    with ``bias=True``, ``act.weight`` for PReLU), ready for ``MoleculeEncoder.load_state_dict``.
    """

    hidden_dim: int
    depth: int
    bias: bool
    dropout: float
    activation: str
    undirected: bool
    featurizer: str
    state_dict: dict[str, Tensor]


def _plain_activation(value: Any, path: Path) -> str:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, _Record) and value.qualified_name.endswith(".Activation") and value.args:
        return str(value.args[0]).lower()  # an Activation enum pickles as Activation("relu")
    raise ValueError(
        f"chemprop checkpoint {str(path)!r}: activation {value!r} is not one of chemprop's named "
        "activations (relu, leakyrelu, prelu, tanh, elu)"
    )


def read_chemprop_checkpoint(path: str | Path) -> ChemPropCheckpoint:
    """Read the ``BondMessagePassing`` block of a chemprop v2 model file or a CheMeleon-style file.

    Raises ValueError (one line naming the file and the problem) for a file that is not a chemprop
    checkpoint, refers to code outside plain containers, tensors and chemprop's own names, or holds
    a block kiban's D-MPNN cannot reproduce (atom messages, extra atom descriptors, feature scaling
    transforms, multi-component models, features other than chemprop's v1/v2).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chemprop checkpoint {str(path)!r} does not exist")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except RefusedPickle as error:
        raise ValueError(
            f"chemprop checkpoint {str(path)!r} refers to {error}, which kiban does not load: it reads "
            "only hyper-parameters and tensors"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{str(path)!r} is not a readable chemprop checkpoint: {error}") from None
    if not isinstance(contents, dict) or not {"hyper_parameters", "state_dict"} <= set(contents):
        raise ValueError(
            f"{str(path)!r} is not a chemprop checkpoint: expected a dict with 'hyper_parameters' and "
            "'state_dict' (chemprop's save_model or a CheMeleon-style message-passing file)"
        )
    hparams, state = dict(contents["hyper_parameters"]), contents["state_dict"]
    if "message_passing" in hparams:  # a whole MPNN saved by chemprop.models.utils.save_model
        hparams = dict(hparams["message_passing"])
        prefix = "message_passing."
        if any(key.startswith("message_passing.blocks.") for key in state):
            raise ValueError(
                f"chemprop checkpoint {str(path)!r} is a multi-component model; kiban's molecule "
                "encoder reads single-molecule models"
            )
    else:
        prefix = ""
    block = hparams.get("cls")
    if isinstance(block, type) and issubclass(block, _Record) and not block.qualified_name.endswith(".BondMessagePassing"):
        raise ValueError(
            f"chemprop checkpoint {str(path)!r} uses {block.qualified_name}; kiban reproduces "
            "BondMessagePassing (chemprop's default D-MPNN) only"
        )
    for key in ("V_d_transform", "graph_transform"):
        if hparams.get(key) is not None:
            raise ValueError(
                f"chemprop checkpoint {str(path)!r} scales extra features ({key}); kiban's D-MPNN "
                "has no extra atom or bond features"
            )
    if hparams.get("d_vd"):
        raise ValueError(
            f"chemprop checkpoint {str(path)!r} concatenates {hparams['d_vd']} extra atom descriptors "
            "(d_vd); kiban's D-MPNN has none"
        )
    d_v, d_e = int(hparams.get("d_v", 72)), int(hparams.get("d_e", CHEMPROP_BOND_DIM))
    matching = [name for name, feats in CHEMPROP_FEATURES.items() if (feats.atom_dim, feats.bond_dim) == (d_v, d_e)]
    if not matching:
        known = ", ".join(f"{name} ({f.atom_dim}, {f.bond_dim})" for name, f in CHEMPROP_FEATURES.items())
        raise ValueError(
            f"chemprop checkpoint {str(path)!r} was trained on {d_v} atom and {d_e} bond features; "
            f"kiban reproduces {known}"
        )
    tensors = {
        _kiban_name(key.removeprefix(prefix)): value
        for key, value in state.items()
        if key.startswith(prefix) and isinstance(value, Tensor)
    }
    tensors = {key: value for key, value in tensors.items() if key is not None}
    if "W_i.weight" not in tensors:
        raise ValueError(f"chemprop checkpoint {str(path)!r} has no message-passing weights ({prefix}W_i.weight)")
    return ChemPropCheckpoint(
        hidden_dim=int(hparams.get("d_h", tensors["W_i.weight"].shape[0])),
        depth=int(hparams.get("depth", 3)),
        bias=bool(hparams.get("bias", False)),
        dropout=float(hparams.get("dropout", 0.0)),
        activation=_plain_activation(hparams.get("activation", "relu"), path),
        undirected=bool(hparams.get("undirected", False)),
        featurizer=matching[0],
        state_dict=tensors,
    )


def _kiban_name(key: str) -> str | None:
    """Chemprop's parameter name -> kiban's (its activation ``tau`` is kiban's ``act``); others dropped."""
    head = key.split(".")[0]
    if head in ("W_i", "W_h", "W_o"):
        return key
    if head == "tau":
        return "act" + key[len("tau") :]
    return None

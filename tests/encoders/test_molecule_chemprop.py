"""chemprop v2 checkpoints in kiban's D-MPNN: parity with chemprop itself, and a loader that runs no pickled code.

The reference is chemprop 2.3.1 (installed ``--no-deps`` by bin/setup: its pinned RDKit build differs
from ours). chemprop imports a few packages at import time that the D-MPNN path never calls (a
compiled batch featurizer, dataset splitters, descriptor and explanation packages); where they are
absent they are replaced by empty modules before the import, so the reference code under test is
chemprop's own featurizer, BondMessagePassing and save_model.
"""

from __future__ import annotations

import csv
import importlib
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from kiban.encoders import create_encoder
from kiban.encoders.molecule import MoleculeEncoderConfig

ESOL_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "molecules" / "esol_delaney.csv"
# Odd cases beside the real set: salts and disconnected parts, stereo bonds and centres, a kept
# isotopic hydrogen, charges, elements outside chemprop's v2 list (Pt, Se is inside), boron, iodine.
EDGE_SMILES = [
    "[Na+].[Cl-]",
    "C/C=C/C(=O)O",
    "C[C@H](N)C(=O)O",
    "[2H]C([2H])([2H])O",
    "O=[N+]([O-])c1ccccc1",
    "Cl[Pt](Cl)([NH3])[NH3]",
    "[Se]1C=CC=C1",
    "OB(O)c1ccccc1I",
    "C#N",
]
_OPTIONAL_IMPORTS = {
    "cuik_molmaker": {},
    "astartes": {"train_test_split": None, "train_val_test_split": None},
    "astartes.molecules": {"train_test_split_molecules": None, "train_val_test_split_molecules": None},
    "descriptastorus": {},
    "descriptastorus.descriptors": {"rdDescriptors": None, "rdNormalizedDescriptors": None},
    "myerson": {},
    "myerson.chemprop_explain": {},
    "myerson.chemprop_explain.utils": {"unbatch": None},
}


@pytest.fixture(scope="module")
def chemprop():
    if importlib.util.find_spec("chemprop") is None:
        pytest.skip("chemprop is not installed (bin/setup installs it with --no-deps)")
    for name, attributes in _OPTIONAL_IMPORTS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
    return importlib.import_module("chemprop")


@pytest.fixture(scope="module")
def smiles() -> list[str]:
    real = []
    if ESOL_CSV.is_file():
        with ESOL_CSV.open() as handle:
            real = [row["smiles"].strip() for row in csv.DictReader(handle)][:40]
    return real + EDGE_SMILES


def _chemprop_atom_states(chemprop, message_passing, smiles: list[str]) -> tuple[list, torch.Tensor]:
    """Chemprop's own graphs and its per-atom hidden states (before aggregation) for the molecules."""
    from chemprop.data import BatchMolGraph
    from chemprop.featurizers import SimpleMoleculeMolGraphFeaturizer
    from chemprop.utils import make_mol

    featurizer = SimpleMoleculeMolGraphFeaturizer()
    graphs = [featurizer(make_mol(s)) for s in smiles]
    with torch.no_grad():
        states = message_passing.eval()(BatchMolGraph(graphs))
    return graphs, states


def _kiban_atom_states(encoder, smiles: list[str]) -> torch.Tensor:
    with torch.no_grad():
        tokens = encoder.encode(smiles)
    return tokens.embeddings[tokens.mask]  # atoms of molecule 0, then 1, ...: chemprop's order


def _save_mpnn(chemprop, path: Path, **message_passing) -> torch.nn.Module:
    from chemprop import models, nn
    from chemprop.models.utils import save_model

    torch.manual_seed(1)
    mp = nn.BondMessagePassing(**message_passing)
    model = models.MPNN(mp, nn.MeanAggregation(), nn.RegressionFFN(input_dim=mp.output_dim), metrics=[nn.MSE(), nn.MAE()])
    with torch.no_grad():  # chemprop initialises biases to zero; random ones make the parity test sharper
        for parameter in mp.parameters():
            parameter.uniform_(-0.3, 0.3)
    save_model(path, model, ["logS"])
    return mp


def test_features_equal_chemprops(chemprop, smiles):
    from chemprop.featurizers import SimpleMoleculeMolGraphFeaturizer
    from chemprop.utils import make_mol

    featurizer = create_encoder("molecule", preset="chemprop_default", hidden_dim=8).featurizer
    reference = SimpleMoleculeMolGraphFeaturizer()
    assert (featurizer.atom_dim, featurizer.bond_dim) == reference.shape == (72, 14)
    for s in smiles:
        graph, ours = reference(make_mol(s)), featurizer(s)
        assert torch.equal(ours["atom_features"], torch.from_numpy(graph.V)), s
        assert torch.equal(ours["bond_features"], torch.from_numpy(graph.E).float()), s
        assert torch.equal(ours["edge_index"], torch.from_numpy(graph.edge_index)), s


@pytest.mark.parametrize(
    "settings",
    [
        dict(d_h=16, depth=3),  # chemprop's defaults, smaller
        dict(d_h=12, depth=4, bias=True, activation="leakyrelu", undirected=True, dropout=0.2),
        dict(d_h=8, depth=1, activation="prelu"),
        dict(d_h=8, depth=2, activation="tanh", bias=True),
    ],
    ids=["default", "bias-leakyrelu-undirected", "depth1-prelu", "tanh"],
)
def test_atom_tokens_equal_chemprops_atom_states(chemprop, smiles, tmp_path, settings):
    path = tmp_path / "model.pt"
    mp = _save_mpnn(chemprop, path, **settings)
    encoder = create_encoder("molecule", preset="chemprop_default", chemprop_checkpoint=str(path)).eval()
    assert encoder.config.hidden_dim == settings["d_h"] and encoder.config.depth == settings["depth"]
    _, reference = _chemprop_atom_states(chemprop, mp, smiles)
    ours = _kiban_atom_states(encoder, smiles)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-5


def test_chemeleon_style_message_passing_file_loads(chemprop, smiles, tmp_path):
    from chemprop import nn

    torch.manual_seed(2)
    mp = nn.BondMessagePassing(d_h=24, depth=5)
    with torch.no_grad():
        for parameter in mp.parameters():
            parameter.uniform_(-0.2, 0.2)
    # CheMeleon publishes the block alone, plain hyper-parameters, read with weights_only=True
    hyper = {"d_v": 72, "d_e": 14, "d_h": 24, "bias": False, "depth": 5, "dropout": 0.0,
             "activation": "relu", "undirected": False, "d_vd": None}  # fmt: skip
    path = tmp_path / "chemeleon_mp.pt"
    torch.save({"hyper_parameters": hyper, "state_dict": mp.state_dict()}, path)
    assert nn.BondMessagePassing(**torch.load(path, weights_only=True)["hyper_parameters"])  # chemprop reads it too
    encoder = create_encoder("molecule", config={"chemprop_checkpoint": str(path)}).eval()
    _, reference = _chemprop_atom_states(chemprop, mp, smiles)
    assert (_kiban_atom_states(encoder, smiles) - reference).abs().max().item() <= 1e-5


def test_saved_encoder_rebuilds_without_the_chemprop_file(chemprop, smiles, tmp_path):
    path = tmp_path / "model.pt"
    _save_mpnn(chemprop, path, d_h=8, depth=2, activation="elu")
    encoder = create_encoder("molecule", chemprop_checkpoint=str(path)).eval()
    portable = encoder.portable_config()
    assert portable.chemprop_checkpoint is None and portable.featurizer == "chemprop_v2"
    path.unlink()
    rebuilt = create_encoder("molecule", portable).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    assert torch.equal(_kiban_atom_states(rebuilt, smiles[:5]), _kiban_atom_states(encoder, smiles[:5]))


class _Payload:
    """Unpickling this runs ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_file_referring_to_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"hyper_parameters": {"d_h": 8, "hook": _Payload(marker)}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"refers to (posix|os)\.system, which kiban does not load") as error:
        create_encoder("molecule", chemprop_checkpoint=str(path))
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_atom_message_passing_is_refused_with_one_line(chemprop, tmp_path):
    from chemprop import models, nn
    from chemprop.models.utils import save_model

    mp = nn.AtomMessagePassing(d_h=8)
    path = tmp_path / "atom.pt"
    save_model(path, models.MPNN(mp, nn.MeanAggregation(), nn.RegressionFFN(input_dim=8)))
    with pytest.raises(ValueError, match="uses chemprop.nn.message_passing.base.AtomMessagePassing"):
        create_encoder("molecule", chemprop_checkpoint=str(path))


def test_not_a_chemprop_file_says_so(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"W": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="is not a chemprop checkpoint"):
        create_encoder("molecule", chemprop_checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_encoder("molecule", chemprop_checkpoint=str(tmp_path / "absent.pt"))


def test_old_configs_keep_the_kiban_features():
    config = MoleculeEncoderConfig(hidden_dim=8, depth=2)
    encoder = create_encoder("molecule", config={"hidden_dim": 8, "depth": 2})
    assert encoder.config == config and encoder.featurizer.features == "kiban"
    assert pickle.loads(pickle.dumps(encoder.featurizer)).features == "kiban"

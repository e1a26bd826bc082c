"""scGPT checkpoints load through kiban's cell encoder with the reference's tokens and outputs.

The reference is scGPT's own code from its wheel (installed with ``--no-deps``, see bin/setup):
``scgpt/model/model.py`` with ``dsbn.py`` and ``grad_reverse.py`` loaded from their files as a
package (nothing stubbed: they import only torch, numpy and tqdm), and ``binning`` / ``_digitize``
taken from ``scgpt/preprocess.py`` (whose module imports scanpy-era dependencies, so the two
functions are compiled alone from its source). The checkpoint is written as the published
whole-human one is: ``best_model.pt`` with flash-attention's ``Wqkv`` names, ``vocab.json``, ``args.json``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kiban.encoders import create_encoder
from kiban.encoders.cell import CellEncoder

N_GENES = 40
N_BINS = 11
ARGS = {
    "embsize": 32, "nheads": 4, "d_hid": 48, "nlayers": 2, "n_bins": N_BINS, "dropout": 0.2, "pad_token": "<pad>",
    "pad_value": -2, "mask_value": -1, "input_emb_style": "continuous", "max_seq_len": 1200,
    "fast_transformer": True, "MVC": True, "n_layers_cls": 3,
}


@pytest.fixture(scope="module")
def scgpt():
    """ScGPT's model.py (as package ``scgpt_reference``) and its binning functions."""
    spec = importlib.util.find_spec("scgpt")  # finds the wheel without running scgpt/__init__.py
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scgpt is not installed (bin/setup installs it with --no-deps)")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("scgpt_reference")
    package.__path__ = [str(root / "model")]
    sys.modules["scgpt_reference"] = package
    for name in ("dsbn", "grad_reverse", "model"):
        module_spec = importlib.util.spec_from_file_location(f"scgpt_reference.{name}", root / "model" / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    source = (root / "preprocess.py").read_text()
    wanted = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in ("binning", "_digitize")]
    namespace = {"np": np, "torch": torch, "Union": object, "logger": logging.getLogger("scgpt")}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(root / "preprocess.py"), "exec"), namespace)
    yield types.SimpleNamespace(model=sys.modules["scgpt_reference.model"], binning=namespace["binning"])
    for name in [n for n in sys.modules if n.startswith("scgpt_reference")]:
        del sys.modules[name]


def _checkpoint(tmp_path, scgpt):
    """A tiny random scGPT TransformerModel written as the whole-human checkpoint is published."""
    genes = [f"GENE{i}" for i in range(N_GENES)]
    rng = np.random.default_rng(0)
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2}
    for gene, token in zip(genes, rng.permutation(N_GENES) + 3):
        vocab[gene] = int(token)
    torch.manual_seed(0)
    reference = scgpt.model.TransformerModel(
        ntoken=len(vocab), d_model=ARGS["embsize"], nhead=ARGS["nheads"], d_hid=ARGS["d_hid"],
        nlayers=ARGS["nlayers"], vocab=vocab, dropout=ARGS["dropout"], pad_token="<pad>", pad_value=-2,
        do_mvc=True, input_emb_style="continuous", n_input_bins=N_BINS, cell_emb_style="cls",
        use_fast_transformer=False,
    ).eval()
    # the value encoder's LayerNorm starts at identity; move it so the test sees its parameters used
    with torch.no_grad():
        for p in reference.value_encoder.norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in reference.state_dict().items()}
    assert any(".Wqkv." in k for k in state) and any(k.startswith("mvc_decoder.") for k in state)
    folder = tmp_path / "scGPT_human"
    folder.mkdir()
    torch.save(state, folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "args.json").write_text(json.dumps(ARGS))
    return folder, vocab, reference


def _cells(n_cells: int) -> list[tuple[np.ndarray, list[str]]]:
    """Cells of normalised (continuous, tie-free) values over the genes plus 3 the vocabulary lacks."""
    rng = np.random.default_rng(1)
    names = [f"GENE{i}" for i in rng.permutation(N_GENES)] + ["MT-UNKNOWN", "XIST-NOPE", "FOO"]
    cells = []
    for _ in range(n_cells):
        values = rng.lognormal(0.0, 1.0, size=len(names)) * (rng.random(len(names)) < 0.6)
        cells.append((values, names))
    return cells


def _reference_inputs(cells, vocab, scgpt) -> list[tuple[np.ndarray, np.ndarray]]:
    """ScGPT's embedding path (tasks/cell_emb.py + DataCollator): genes in vocabulary, non-zero,
    <cls> first with pad_value, the rest binned by ``binning``.
    """
    out = []
    for values, names in cells:
        known = np.array([name in vocab for name in names])
        row, genes = values[known], np.array([vocab[n] for n, k in zip(names, known) if k])
        nonzero = np.nonzero(row)[0]
        expressions = np.insert(row[nonzero], 0, ARGS["pad_value"]).astype(np.float32)
        ids = np.insert(genes[nonzero], 0, vocab["<cls>"])
        np.random.seed(0)  # binning's tie-breaking draws (no ties here)
        expressions[1:] = scgpt.binning(row=expressions[1:], n_bins=N_BINS)
        out.append((ids, expressions))
    return out


def test_scgpt_folder_gives_the_reference_tokens_and_cell_embeddings(tmp_path, scgpt):
    folder, vocab, reference = _checkpoint(tmp_path, scgpt)
    encoder = create_encoder("cell", preset="scgpt", checkpoint_dir=str(folder)).eval()
    assert (encoder.config.width, encoder.config.num_layers, encoder.config.n_bins) == (32, 2, N_BINS)
    cells = _cells(5)
    expected = _reference_inputs(cells, vocab, scgpt)
    features = [encoder.featurizer(cell) for cell in cells]
    for feature, (ids, expressions) in zip(features, expected):
        # the same (gene token, bin) pairs and the CLS first; kiban orders genes by id, scGPT by column,
        # which the transformer (no positions) does not see
        assert feature["gene_ids"][0].item() == ids[0] == vocab["<cls>"]
        ours = dict(zip(feature["gene_ids"][1:].tolist(), feature["value_ids"][1:].tolist()))
        theirs = dict(zip(ids[1:].tolist(), expressions[1:].astype(int).tolist()))
        assert ours == theirs

    batch = encoder.featurizer.collate(features)
    with torch.no_grad():
        tokens = encoder(**batch)
    for i, (ids, expressions) in enumerate(expected):
        with torch.no_grad():
            states = reference._encode(
                torch.as_tensor(ids[None]), torch.as_tensor(expressions[None]),
                src_key_padding_mask=torch.zeros(1, len(ids), dtype=torch.bool),
            )[0]
        # the cell embedding: the CLS token (scGPT's cell_emb_style "cls")
        assert (tokens.embeddings[i, 0] - states[0]).abs().max().item() <= 1e-5
        by_gene = {g: k for k, g in enumerate(ids.tolist())}
        order = [by_gene[g] for g in batch["gene_ids"][i][batch["mask"][i]].tolist()]
        assert (tokens.embeddings[i, : len(order)] - states[order]).abs().max().item() <= 1e-5


def test_scgpt_encoder_saved_as_kiban_weights_rebuilds_without_the_folder(tmp_path, scgpt):
    folder, _, _ = _checkpoint(tmp_path, scgpt)
    encoder = create_encoder("cell", preset="scgpt", checkpoint_dir=str(folder)).eval()
    rebuilt = CellEncoder(encoder.portable_config()).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    cells = _cells(3)
    with torch.no_grad():
        assert torch.equal(encoder.encode(cells).embeddings, rebuilt.encode(cells).embeddings)


def test_a_batch_label_scgpt_checkpoint_is_refused_by_name(tmp_path, scgpt):
    folder, _, _ = _checkpoint(tmp_path, scgpt)
    state = torch.load(folder / "best_model.pt", weights_only=True)
    state["dsbn.bns.0.weight"] = torch.ones(ARGS["embsize"])
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ValueError, match="batch-label checkpoint"):
        create_encoder("cell", preset="scgpt", checkpoint_dir=str(folder))

"""Tests of the cell encoder: gene matching and its report, scGPT binning, Geneformer ranking, the
three input forms, bad inputs, padding, weights, and real data (scanpy's PBMC 68k, Tabula Muris).
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

import kiban
from kiban.encoders import InvalidInput, config_from_dict, config_to_dict, create_encoder
from kiban.encoders.cell import (
    CellEncoderConfig,
    CellFeaturizer,
    bin_values,
    make_adata,
    match_genes,
    synthetic_gene_names,
    vocab_from_adata,
)

SHARED_DATA = Path(kiban.__file__).resolve().parent.parent / "shared" / "data"
TABULA_MURIS = SHARED_DATA / "single_cell" / "tabula_muris_facs_actinn_5k.h5ad"
VOCAB = ("G0", "G1", "G2", "G3", "G4", "G5")


@pytest.fixture(scope="module")
def pbmc_raw():
    """Scanpy's bundled PBMC 68k subset (700 cells x 765 genes), as its ``raw`` expression.

    Its X is scaled (z-scored per gene, so partly negative), which is not expression; ``adata.raw``
    holds the log-normalised values of the same genes, non-negative and sparse.
    """
    sc = pytest.importorskip("scanpy")
    adata = sc.datasets.pbmc68k_reduced()
    return adata, adata.raw.to_adata()


def _tiny(**overrides):
    return create_encoder("cell", preset="tiny", **overrides).eval()


# ----------------------------------------------------------------------------------------------
# real data


def test_real_pbmc_cells_featurize_with_exact_counts_and_encode(pbmc_raw):
    _, raw = pbmc_raw
    vocab = vocab_from_adata(raw)
    assert len(vocab) == 765
    encoder = _tiny(gene_vocab=vocab)
    cells = [raw[i] for i in range(3)]
    features = [encoder.featurizer(cell, item_id=cell.obs_names[0]) for cell in cells]
    for cell, feature in zip(cells, features, strict=True):
        row = cell.X.toarray()[0]
        assert feature["n_genes_matched"].item() == 765 and feature["n_genes_unmatched"].item() == 0
        assert len(feature["gene_ids"]) == 1 + min(64, int((row > 0).sum()))
        # max_genes keeps the most expressed genes
        kept = set(feature["gene_ids"][1:].tolist())
        kept_values = [row[i] for i in range(765) if i + 2 in kept]
        dropped_values = [row[i] for i in range(765) if i + 2 not in kept]
        assert min(kept_values) >= max(dropped_values)
    tokens = encoder.encode(cells)
    assert tokens.embeddings.shape == (3, 65, 32)
    assert tokens.mask.sum(1).tolist() == [len(f["gene_ids"]) for f in features]
    assert torch.isfinite(tokens.embeddings).all()


def test_scaled_pbmc_matrix_is_rejected_as_not_expression(pbmc_raw):
    scaled, raw = pbmc_raw
    encoder = _tiny(gene_vocab=vocab_from_adata(raw))
    with pytest.raises(InvalidInput, match="negative value") as caught:
        encoder.featurizer(scaled[0], item_id="pbmc-cell-0")
    assert caught.value.item_id == "pbmc-cell-0" and "pbmc-cell-0" in str(caught.value)


def test_unmatched_genes_are_counted_and_reported_exactly(pbmc_raw):
    _, raw = pbmc_raw
    vocab = vocab_from_adata(raw)[:700]  # the last 65 genes are not in the vocabulary
    missing = list(raw.var_names[700:])
    featurizer = _tiny(gene_vocab=vocab).featurizer
    for i in range(3):
        feature = featurizer(raw[i])
        assert (feature["n_genes_matched"].item(), feature["n_genes_unmatched"].item()) == (700, 65)
    report = featurizer.report
    assert (report.n_lists, report.n_matched, report.n_unmatched) == (3, 2100, 195)
    assert report.unmatched_examples == missing[:5]
    assert "2100 gene names matched the vocabulary of 700 genes and 195 did not" in report.summary()

    whole = featurizer.match_genes(raw.var_names)
    assert (whole.n_lists, whole.n_matched, whole.n_unmatched) == (1, 700, 65)
    assert featurizer.report.n_lists == 3  # match_genes keeps no state
    assert match_genes(raw.var_names, vocab=vocab) == whole


@pytest.mark.skipif(not TABULA_MURIS.is_file(), reason=f"shared data file {TABULA_MURIS} is absent")
def test_tabula_muris_counts_read_backed_featurize_and_encode():
    import anndata

    adata = anndata.read_h5ad(TABULA_MURIS, backed="r")  # raw Smart-seq2 counts, sparse, read row by row
    encoder = _tiny(gene_vocab=vocab_from_adata(adata), tokenization="rank")
    cells = [adata[i] for i in range(4)]
    features = [encoder.featurizer(cell) for cell in cells]
    assert all(f["n_genes_matched"].item() == 2000 and f["n_genes_unmatched"].item() == 0 for f in features)
    tokens = encoder.encode(cells)
    assert tokens.embeddings.shape[0] == 4 and tokens.embeddings.shape[2] == 32
    assert torch.isfinite(tokens.embeddings).all()
    adata.file.close()


# ----------------------------------------------------------------------------------------------
# gene matching


def test_case_insensitive_fallback_only_when_unambiguous():
    featurizer = CellFeaturizer(("CD3E", "Actb", "FOO", "foo"))
    report = featurizer.match_genes(["cd3e", "ACTB", "Foo", "FOO", "BAR"])
    # "Foo" has two vocabulary spellings when case is ignored, so it is not guessed
    assert (report.n_matched, report.n_case_insensitive, report.n_unmatched) == (3, 2, 2)
    assert report.unmatched_examples == ["Foo", "BAR"]
    assert "2 matched only when ignoring case" in report.summary()


def test_repeated_gene_names_use_the_first_and_are_counted():
    featurizer = CellFeaturizer(VOCAB, n_bins=5)
    report = featurizer.match_genes(["G1", "g1", "G2", "G1"])
    assert (report.n_matched, report.n_duplicates, report.n_case_insensitive) == (2, 2, 0)
    feature = featurizer({"genes": ["G1", "G1"], "values": [2.0, 7.0]})
    assert feature["gene_ids"].tolist() == [1, 3] and feature["n_genes_matched"].item() == 1


def test_gene_column_reads_names_from_var():
    adata = make_adata(3, 20, seed=0)
    adata.var["ensembl"] = [f"ENSG{i:05d}" for i in range(20)]
    encoder = _tiny(gene_vocab=vocab_from_adata(adata, column="ensembl"), gene_column="ensembl")
    by_id = encoder.featurizer(adata[1])
    by_name = _tiny(gene_vocab=synthetic_gene_names(20)).featurizer(adata[1])
    assert torch.equal(by_id["gene_ids"], by_name["gene_ids"])
    with pytest.raises(InvalidInput, match="no column 'ensembl'"):
        _tiny(gene_column="ensembl").featurizer(make_adata(1, 20, seed=0))


# ----------------------------------------------------------------------------------------------
# tokenization


def test_scgpt_binning_is_exact_on_a_hand_made_cell():
    assert bin_values(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), n_bins=5).tolist() == [0, 1, 2, 3, 4]
    # per-cell quantiles: scaling a cell (deeper sequencing) leaves its bins unchanged
    assert bin_values(np.array([0.0, 10.0, 20.0, 30.0, 40.0]), n_bins=5).tolist() == [0, 1, 2, 3, 4]

    cell = {"genes": ["G4", "G0", "G1", "G2", "G3"], "values": [4.0, 0.0, 1.0, 2.0, 3.0]}
    feature = CellFeaturizer(VOCAB, n_bins=5)(cell)
    # CLS (id 1, value id n_bins) then G1..G4 (ids 2 + vocabulary index) in vocabulary order
    assert feature["gene_ids"].tolist() == [1, 3, 4, 5, 6]
    assert feature["value_ids"].tolist() == [5, 1, 2, 3, 4]

    with_zeros = CellFeaturizer(VOCAB, n_bins=5, include_zeros=True)(cell)
    assert with_zeros["gene_ids"].tolist() == [1, 2, 3, 4, 5, 6]
    assert with_zeros["value_ids"].tolist() == [5, 0, 1, 2, 3, 4]

    # max_genes keeps the two most expressed; bins still come from the whole cell
    top_two = CellFeaturizer(VOCAB, n_bins=5, max_genes=2)(cell)
    assert top_two["gene_ids"].tolist() == [1, 5, 6] and top_two["value_ids"].tolist() == [5, 3, 4]


def test_geneformer_rank_order_is_exact():
    vocab = ("A", "B", "C", "D", "E")
    cell = (np.array([5.0, 0.0, 9.0, 1.0, 5.0]), list(vocab))
    feature = CellFeaturizer(vocab, tokenization="rank")(cell)
    # C(9), then the tie A(5)/E(5) in vocabulary order, then D(1); B is zero
    assert feature["gene_ids"].tolist() == [1, 4, 2, 6, 5]
    assert feature["value_ids"].tolist() == [0, 1, 2, 3, 4]

    medians = (1.0, 1.0, 9.0, 0.1, 0.5)  # scores A 5, C 1, D 10, E 10
    normalised = CellFeaturizer(vocab, tokenization="rank", gene_medians=medians)(cell)
    assert normalised["gene_ids"].tolist() == [1, 5, 6, 2, 4]
    truncated = CellFeaturizer(vocab, tokenization="rank", gene_medians=medians, max_genes=2)(cell)
    assert truncated["gene_ids"].tolist() == [1, 5, 6]


def test_sparse_dense_and_dict_forms_of_a_cell_give_identical_features():
    sparse, dense = make_adata(6, 80, seed=1, sparse=True), make_adata(6, 80, seed=1, sparse=False)
    assert scipy.sparse.issparse(sparse.X) and isinstance(dense.X, np.ndarray)
    genes = list(dense.var_names)
    for include_zeros in (False, True):
        featurizer = CellFeaturizer(synthetic_gene_names(80), n_bins=7, include_zeros=include_zeros)
        for i in range(6):
            forms = [
                sparse[i],
                dense[i],
                (sparse.X[i], genes),  # a 1 x G sparse row
                (dense.X[i], genes),
                {"genes": genes, "values": dense.X[i].tolist()},
            ]
            first, *rest = [featurizer(form) for form in forms]
            for other in rest:
                assert all(torch.equal(first[key], other[key]) for key in first)


# ----------------------------------------------------------------------------------------------
# bad inputs


BAD_CELLS = {
    "no gene in the vocabulary": (
        {"genes": ["X1", "X2"], "values": [1.0, 2.0]},
        "none of its 2 genes are in the vocabulary of 6 genes",
    ),
    "lengths differ": ({"genes": ["G0", "G1", "G2"], "values": [1.0, 2.0]}, "has 2 values but 3 gene names"),
    "negative value": ({"genes": ["G0", "G1"], "values": [1.0, -2.0]}, "1 negative value"),
    "NaN value": ((np.array([1.0, np.nan]), ["G0", "G1"]), "NaN or infinite"),
    "all zero": (
        {"genes": ["G0", "G1", "X"], "values": [0.0, 0.0, 3.0]},
        "all 2 of its genes in the vocabulary have value 0",
    ),
    "text values": ({"genes": ["G0", "G1"], "values": ["high", "low"]}, "values are not numbers"),
    "missing key": ({"genes": ["G0"]}, "needs keys 'genes' and 'values'"),
    "two-row AnnData": (lambda: make_adata(2, 6, seed=0), "exactly one cell, got 2 rows"),
    "a string": ("G0 G1", "expected a one-row AnnData"),
    "2-D values": ((np.ones((2, 2)), ["G0", "G1"]), "expected a 1-D row"),
}


@pytest.mark.parametrize("case", list(BAD_CELLS))
def test_bad_cells_raise_invalid_input_naming_the_item(case):
    item, problem = BAD_CELLS[case]
    item = item() if callable(item) else item  # built here, not at import: collection stays cheap
    featurizer = CellFeaturizer(VOCAB)
    with pytest.raises(InvalidInput, match=problem) as caught:
        featurizer(item, item_id="cell-42")
    assert caught.value.modality == "cell" and caught.value.item_id == "cell-42"
    assert str(caught.value).startswith("invalid cell input 'cell-42': ")
    with pytest.raises(InvalidInput, match=problem) as described:  # no id: the item is described
        featurizer(item)
    assert described.value.item_id


def test_bad_configs_fail_at_build_with_a_reason(tmp_path):
    path = tmp_path / "genes.txt"
    path.write_text("G0\nG1\n")
    with pytest.raises(ValueError, match="not both"):
        _tiny(gene_vocab=("G0",), gene_vocab_path=str(path))
    with pytest.raises(ValueError, match="repeats 1 name"):
        _tiny(gene_vocab=("G0", "G1", "G0"))
    with pytest.raises(ValueError, match="rank tokenization only"):
        _tiny(gene_vocab=("G0",), gene_medians=(1.0,))
    with pytest.raises(ValueError, match="tokenization must be"):
        _tiny(tokenization="words")


# ----------------------------------------------------------------------------------------------
# the encoder


@pytest.mark.parametrize("tokenization", ["binning", "rank"])
def test_padding_does_not_change_a_cells_embeddings(tokenization):
    encoder = _tiny(tokenization=tokenization)
    short = {"genes": ["GENE1", "GENE5", "GENE9"], "values": [3.0, 1.0, 2.0]}
    long = make_adata(1, 120, seed=5)
    with torch.no_grad():
        alone = encoder.encode([short])
        padded = encoder.encode([short, long])
    n = alone.embeddings.shape[1]
    assert n == 4 and padded.embeddings.shape[1] > n
    assert padded.mask[0].tolist() == [True] * n + [False] * (padded.embeddings.shape[1] - n)
    torch.testing.assert_close(padded.embeddings[0, :n], alone.embeddings[0], atol=1e-5, rtol=0)
    assert (padded.embeddings[0, n:] == 0).all()


def test_batch_carries_match_counts_and_gradients_flow():
    encoder = create_encoder("cell", preset="tiny").train()
    cells = [make_adata(1, 50, seed=s) for s in range(3)] + [
        {"genes": ["GENE1", "NOT_A_GENE"], "values": [1.0, 2.0]}
    ]
    batch = encoder.featurizer.collate([encoder.featurizer(c) for c in cells])
    assert batch["n_genes_matched"].tolist() == [50, 50, 50, 1]
    assert batch["n_genes_unmatched"].tolist() == [0, 0, 0, 1]
    tokens = encoder(**batch)
    tokens.pooled().sum().backward()
    assert encoder.trunk.gene_embedding.weight.grad is not None


def test_vocab_file_weights_file_and_portable_config_rebuild_the_same_encoder(tmp_path):
    vocab_file = tmp_path / "genes.txt"
    vocab_file.write_text("\n".join(synthetic_gene_names(30)) + "\n")
    source = _tiny(gene_vocab_path=str(vocab_file))
    assert source.featurizer.vocab == synthetic_gene_names(30)
    for name in ("w.safetensors", "w.pt"):
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(source.state_dict(), tmp_path / name)
        else:
            torch.save(source.state_dict(), tmp_path / name)
        loaded = _tiny(gene_vocab_path=str(vocab_file), weights_path=str(tmp_path / name))
        cells = [make_adata(1, 30, seed=s) for s in range(2)]
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(cells).embeddings, source.encode(cells).embeddings)

    portable = loaded.portable_config()
    assert portable.gene_vocab == synthetic_gene_names(30) and portable.gene_vocab_path is None
    assert portable.weights_path is None
    assert config_from_dict(CellEncoderConfig, config_to_dict(portable)) == portable
    rebuilt = create_encoder("cell", config_to_dict(portable))
    assert rebuilt.featurizer.vocab == source.featurizer.vocab


def test_featurizer_pickles_for_dataloader_workers():
    featurizer = create_encoder("cell", preset="tiny").featurizer
    cell = make_adata(1, 40, seed=2)
    before = featurizer(cell)
    copy = pickle.loads(pickle.dumps(featurizer))
    after = copy(cell)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert copy.report.n_lists == 2  # the running report travels with it
    assert not any(isinstance(p, torch.nn.Parameter) for p in vars(copy).values())


def test_make_adata_is_deterministic_with_cell_types():
    a, b = make_adata(20, 30, seed=7), make_adata(20, 30, seed=7)
    assert (a.X != b.X).nnz == 0 and list(a.var_names[:2]) == ["GENE0", "GENE1"]
    assert list(a.obs["cell_type"]) == list(b.obs["cell_type"]) and a.obs["cell_type"].nunique() > 1
    assert (make_adata(20, 30, seed=8).X != a.X).nnz > 0


@pytest.mark.parametrize("preset", ["scgpt", "geneformer"])
def test_real_size_presets_run_on_the_registered_examples(preset):
    from kiban.encoders import encoder_spec

    spec = encoder_spec("cell")
    encoder = create_encoder("cell", preset=preset).eval()
    with torch.no_grad():
        tokens = encoder.encode(spec.examples())
    assert tokens.embeddings.shape[::2] == (3, encoder.config.width)
    # Geneformer V1 (the geneformer preset) has no CLS token; scGPT and kiban's own put one first
    specials = (encoder.config.cls_id is not None) + (encoder.config.eos_id is not None)
    expressed = [3, 8, int((spec.examples()[2].X.toarray() > 0).sum())]
    assert tokens.mask.sum(1).tolist() == [n + specials for n in expressed]


def test_state_dicts_saved_before_the_trunks_were_split_out_still_load():
    # kiban's trunk used to sit at the top level of the encoder: gene_embedding.*, transformer.* ...
    source = _tiny()
    old_layout = {key.removeprefix("trunk."): value for key, value in source.state_dict().items()}
    assert "gene_embedding.weight" in old_layout and not any(k.startswith("trunk.") for k in old_layout)
    torch.manual_seed(123)
    loaded = _tiny()
    loaded.load_state_dict(old_layout)
    # and inside a fused model's state dict, under the encoder's prefix
    holder = torch.nn.ModuleDict({"cell": _tiny()})
    holder.load_state_dict({f"cell.{key}": value for key, value in old_layout.items()})
    cells = [make_adata(1, 40, seed=s) for s in range(2)]
    with torch.no_grad():
        expected = source.encode(cells).embeddings
        assert torch.equal(loaded.encode(cells).embeddings, expected)
        assert torch.equal(holder["cell"].encode(cells).embeddings, expected)

"""Geneformer checkpoints load through kiban's cell encoder with the reference's tokens and outputs.

The reference model is transformers' ``BertForMaskedLM`` (what Geneformer publishes); the reference
tokens are Geneformer's own tokenizer steps (``geneformer/tokenizer.py``: ``tokenize_anndata``,
``rank_genes`` and the truncation of ``tokenize_dataset``), restated below because the geneformer
package is not on PyPI. The dictionaries are written as pickles, as Geneformer ships them.
"""

from __future__ import annotations

import pickle

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch

from kiban.encoders import create_encoder
from kiban.encoders.cell import CellEncoder
from kiban.encoders.cell_checkpoints import read_plain_mapping

transformers = pytest.importorskip("transformers")

N_GENES = 60  # genes of the dictionaries
TARGET_SUM = 10_000


def _geneformer_folder(tmp_path, *, special: bool, max_position: int, seed: int = 0):
    """A tiny random BertForMaskedLM in Geneformer's layout, with its two dictionaries as pickles."""
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if special else [])
    tokens = {name: i for i, name in enumerate(specials)}
    # token ids in a shuffled order: kiban must use the dictionary's ids, not vocabulary positions
    for gene, token in zip(genes, rng.permutation(N_GENES) + len(specials)):
        tokens[gene] = int(token)
    # numpy float32 values, as Geneformer's published median pickle holds
    medians = {gene: np.float32(rng.uniform(0.5, 20.0)) for gene in genes[:-5]}  # 5 genes without a median
    folder = tmp_path / ("v2" if special else "v1")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="relu",
        max_position_embeddings=max_position,
        pad_token_id=0,
    )
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(folder)
    (folder / "token_dictionary_gc104M.pkl").write_bytes(pickle.dumps(tokens))
    (folder / "gene_median_dictionary_gc104M.pkl").write_bytes(pickle.dumps(medians))
    return folder, tokens, medians, model


def _cells(n_cells: int, *, seed: int = 1) -> anndata.AnnData:
    """Counts over the dictionary's genes (in another order) plus 4 genes it does not know."""
    rng = np.random.default_rng(seed)
    names = [f"ENSG{i:011d}" for i in rng.permutation(N_GENES)] + [f"ENSGUNKNOWN{i}" for i in range(4)]
    counts = rng.poisson(rng.gamma(0.6, 3.0, size=len(names)), size=(n_cells, len(names))).astype(np.float32)
    var = pd.DataFrame({"ensembl_id": names}, index=[f"gene{i}" for i in range(len(names))])
    adata = anndata.AnnData(X=scipy.sparse.csr_matrix(counts), var=var)
    adata.obs["n_counts"] = counts.sum(1)
    return adata


def _reference_tokens(adata, tokens, medians, *, model_input_size: int, special: bool) -> list[list[int]]:
    """Geneformer's TranscriptomeTokenizer on an AnnData, step for step."""
    gene_keys = list(medians)
    genelist_dict = dict(zip(gene_keys, [True] * len(gene_keys)))
    ids = adata.var["ensembl_id"]
    coding_loc = np.where([genelist_dict.get(i, False) for i in ids])[0]
    norm_factor_vector = np.array([medians[i] for i in ids.iloc[coding_loc]])
    coding_tokens = np.array([tokens[i] for i in ids.iloc[coding_loc]])
    n_counts = adata.obs["n_counts"].values[:, None]
    x_norm = adata.X[:, coding_loc].toarray() / n_counts * TARGET_SUM / norm_factor_vector
    x_norm = scipy.sparse.csr_matrix(x_norm)
    out = []
    for i in range(x_norm.shape[0]):
        row = x_norm[i]
        ranked = coding_tokens[row.indices][np.argsort(-row.data)]  # rank_genes
        if special:
            ranked = ranked[: model_input_size - 2]
            ranked = np.insert(ranked, 0, tokens["<cls>"])
            ranked = np.insert(ranked, len(ranked), tokens["<eos>"])
        else:
            ranked = ranked[:model_input_size]
        out.append(ranked.tolist())
    return out


@pytest.mark.parametrize("special", [True, False], ids=["V2-cls-eos", "V1-no-specials"])
@pytest.mark.parametrize("max_position", [64, 24], ids=["whole-cells", "truncated"])
def test_geneformer_folder_gives_the_reference_tokens_and_outputs(tmp_path, special, max_position):
    folder, tokens, medians, reference = _geneformer_folder(tmp_path, special=special, max_position=max_position)
    encoder = create_encoder("cell", preset="geneformer", checkpoint_dir=str(folder), gene_column="ensembl_id").eval()
    adata = _cells(6)
    expected = _reference_tokens(adata, tokens, medians, model_input_size=max_position, special=special)
    features = [encoder.featurizer(adata[i : i + 1]) for i in range(adata.n_obs)]
    assert [f["gene_ids"].tolist() for f in features] == expected
    if max_position == 24:
        assert max(len(t) for t in expected) == 24  # the truncation was exercised

    batch = encoder.featurizer.collate(features)
    with torch.no_grad():
        ours = encoder(**batch)
        hidden = reference(
            input_ids=batch["gene_ids"], attention_mask=batch["mask"].long(), output_hidden_states=True
        ).hidden_states[-1]
    real = batch["mask"]
    assert ours.mask.equal(real)
    assert (ours.embeddings[real] - hidden[real]).abs().max().item() <= 1e-5
    # the medians came from the pickle's numpy floats, the gene set from the median dictionary
    assert encoder.featurizer.vocab_size == N_GENES - 5
    assert encoder.featurizer.report.n_unmatched == 6 * 9  # 4 unknown genes and 5 without a median, per cell


def test_a_geneformer_encoder_saved_as_kiban_weights_rebuilds_without_the_folder(tmp_path):
    folder, *_ = _geneformer_folder(tmp_path, special=True, max_position=64)
    encoder = create_encoder("cell", preset="geneformer", checkpoint_dir=str(folder), gene_column="ensembl_id").eval()
    rebuilt = CellEncoder(encoder.portable_config()).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    cells = [_cells(2)[i : i + 1] for i in range(2)]
    with torch.no_grad():
        assert torch.equal(encoder.encode(cells).embeddings, rebuilt.encode(cells).embeddings)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"GENE": _Exploit()}, "refusing to load builtins.print"),
        ({1: 2}, "is a int, not a string"),
        (["<pad>", 0], "expected a dictionary"),
        ({"GENE": "7"}, "not an int"),
        ({"GENE": True}, "boolean"),
    ],
)
def test_the_dictionary_reader_refuses_anything_but_plain_mappings(tmp_path, capsys, payload, problem):
    file = tmp_path / "token_dictionary.pkl"
    file.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=problem):
        read_plain_mapping(file, values=int)
    assert "this must never run" not in capsys.readouterr().out


def test_the_dictionary_reader_accepts_numpy_numbers_and_json(tmp_path):
    pkl = tmp_path / "gene_median.pkl"
    pkl.write_bytes(pickle.dumps({"A": np.float32(1.5), "B": np.int64(3), "C": 2.25}))
    assert read_plain_mapping(pkl, values=float) == {"A": 1.5, "B": 3.0, "C": 2.25}
    js = tmp_path / "tokens.json"
    js.write_text('{"<pad>": 0, "A": 5}')
    assert read_plain_mapping(js, values=int) == {"<pad>": 0, "A": 5}


def test_a_folder_without_dictionaries_fails_with_the_key_to_set(tmp_path):
    folder, *_ = _geneformer_folder(tmp_path, special=True, max_position=32)
    for file in folder.glob("*token_dictionary*"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="set token_dictionary_path"):
        create_encoder("cell", preset="geneformer", checkpoint_dir=str(folder))

"""``kiban embed``: obsm["X_kiban"] + uns["kiban"] on a real h5ad, X untouched; beside-file output
for SMILES; a gene-disjoint h5ad fails cleanly.
"""

from __future__ import annotations

import anndata
import numpy as np

from kiban.cli import main


def test_embed_h5ad_writes_obsm_and_provenance(pbmc, tmp_path):
    source = tmp_path / "pbmc.h5ad"
    adata = anndata.AnnData(
        X=pbmc.raw.X.copy(), obs=pbmc.obs[["bulk_labels"]].copy(), var=pbmc.raw.var.copy()
    )
    x = adata.X.tolil()
    x[0] = 0  # one cell with no expressed gene: rejected by the reader, a NaN row
    adata.X = x.tocsr()
    adata.X.eliminate_zeros()  # (explicitly stored zeros would pass the reader's check: see the report)
    adata.write_h5ad(source)
    before = source.read_bytes()
    assert main(["embed", str(source)]) == 0
    assert source.read_bytes() == before  # the input is never touched
    out = anndata.read_h5ad(tmp_path / "pbmc.kiban.h5ad")
    x = out.obsm["X_kiban"]
    assert x.shape == (700, 32) and np.isnan(x[0]).all() and np.isfinite(x[1:]).all()
    np.testing.assert_array_equal(
        out.X.toarray() if hasattr(out.X, "toarray") else out.X,
        adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X,
    )
    info = out.uns["kiban"]
    assert info["n_embedded"] == 699 and info["n_rejected"] == 1 and info["modality"] == "cell"
    assert info["gene_match"]["matched"] == 765 and info["model"] == "tiny"
    assert main(["embed", str(source)]) == 2  # refuses to overwrite its earlier output


def test_embed_smiles_beside_the_file(tmp_path):
    source = tmp_path / "mols.csv"
    source.write_text("smiles,name\nCCO,ethanol\nc1ccccc1,benzene\nnot-smiles,bad\n")
    assert main(["embed", str(source)]) == 0
    written = np.load(tmp_path / "mols.kiban.npz")
    assert written["embeddings"].shape == (2, 32) and written["ids"].tolist() == ["ethanol", "benzene"]
    assert (tmp_path / "mols.kiban.json").is_file()


def test_embed_h5ad_without_gene_overlap(pbmc, tmp_path, capsys):
    from kiban.tiny import tiny_model

    model_dir = tmp_path / "model"
    tiny_model(["cell"]).save_pretrained(model_dir)  # synthetic vocabulary GENE0..GENE499
    source = tmp_path / "pbmc.h5ad"
    anndata.AnnData(X=pbmc.raw.X.copy(), var=pbmc.raw.var.copy()).write_h5ad(source)
    assert main(["embed", str(source), "--model", str(model_dir)]) == 2
    assert "no gene overlaps" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pbmc.h5ad"]

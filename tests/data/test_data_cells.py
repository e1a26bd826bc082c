import numpy as np
import pytest
import scanpy as sc
import scipy.sparse

from kiban.data import CellPreprocessing, H5adReader, Rejects, read, read_h5ad
from kiban.encoders.cell import make_adata


def _report(rejects):
    report = rejects.report()
    assert report.read == report.accepted + report.rejected
    return report


def test_pbmc68k_reduced_scaled_X_is_rejected_cell_by_cell_and_raw_is_read(pbmc_h5ad):
    rejects = Rejects()
    assert list(read(pbmc_h5ad, rejects=rejects)) == []
    report = _report(rejects)
    assert report.by_reason == {"negative values": 700}
    assert report.first_rejects[0].location == f"{pbmc_h5ad}:row 0"
    assert report.first_rejects[0].id == "AAAGCCTGGCTAAC-1"

    rejects = Rejects()
    records = list(read_h5ad(pbmc_h5ad, use_raw=True, chunk_size=128, rejects=rejects))
    assert len(records) == 700 and _report(rejects).rejected == 0
    raw = sc.datasets.pbmc68k_reduced().raw
    expected = raw.X[3]
    item = records[3].item
    assert records[3].id == "AAGTGCACGTGCTA-1" and records[3].modality == "cell"
    assert dict(zip(item["genes"], item["values"], strict=True)) == pytest.approx(
        dict(zip(raw.var_names[expected.indices], expected.data, strict=True))
    )


def test_gene_matching_reports_unmatched_genes_and_the_featurizer_takes_the_items(pbmc_h5ad):
    from kiban.encoders.cell import CellFeaturizer

    genes = list(sc.datasets.pbmc68k_reduced().raw.var_names)
    vocab = genes[::2] + ["NOT_A_GENE"]
    rejects = Rejects()
    records = list(read_h5ad(pbmc_h5ad, use_raw=True, vocab=vocab, rejects=rejects))
    match = rejects.notes["gene_match"]
    assert (match["matched"], match["unmatched"]) == (len(genes[::2]), len(genes) - len(genes[::2]))
    assert rejects.notes["gene_key"] == "var_names"
    featurizer = CellFeaturizer(vocab, max_genes=64)
    batch = featurizer.collate([featurizer(r.item, item_id=r.id) for r in records[:4]])
    assert batch["gene_ids"].shape[0] == 4


def test_ensembl_ids_in_a_var_column_are_found_and_versions_dropped(tmp_path):
    adata = make_adata(40, 30, seed=2)
    adata.var["gene_ids"] = [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(30)]
    adata.write_h5ad(tmp_path / "ens.h5ad")
    vocab = [f"ENSG{i:011d}" for i in range(0, 30, 3)]
    rejects = Rejects()
    records = list(read_h5ad(tmp_path / "ens.h5ad", vocab=vocab, rejects=rejects))
    assert rejects.notes["gene_key"] == "gene_ids" and rejects.notes["gene_match"]["matched"] == 10
    assert all(str(g).startswith("ENSG") and "." not in str(g) for g in records[0].item["genes"])


def test_a_file_without_gene_names_has_every_cell_rejected_with_that_reason(tmp_path):
    adata = make_adata(25, 12)
    adata.var_names = [str(i) for i in range(12)]
    adata.write_h5ad(tmp_path / "nonames.h5ad")
    rejects = Rejects()
    assert list(read(tmp_path / "nonames.h5ad", rejects=rejects)) == []
    report = _report(rejects)
    assert report.by_reason == {"no gene names": 25}
    assert "gene_key" in report.first_rejects[0].detail


def test_bad_rows_are_located_and_the_rest_is_read(tmp_path):
    adata = make_adata(300, 50, seed=4)
    x = adata.X.tolil()
    x[17, 3] = np.nan
    x[150, 5] = -1.0
    x[201, :] = 0.0
    adata.X = scipy.sparse.csr_matrix(x)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    rejects = Rejects()
    records = list(read_h5ad(tmp_path / "bad.h5ad", chunk_size=64, rejects=rejects))
    report = _report(rejects)
    assert len(records) == 297
    assert {(r.reason, r.location.split(":")[-1]) for r in report.first_rejects} == {
        ("invalid values", "row 17"),
        ("negative values", "row 150"),
        ("no expressed genes", "row 201"),
    }


def test_explicitly_stored_zeros_are_not_expressed_genes(tmp_path):
    adata = make_adata(6, 8, seed=4)
    x = adata.X.toarray()
    x[2, :] = 0.0
    x[4, :] = 0.0
    x[4, 1] = 5.0
    data = np.where(np.arange(8) % 2 == 0, 0.0, 1.0).astype(np.float32)  # zeros stored in the CSR data
    stored = scipy.sparse.csr_matrix(x)
    rows = [stored.getrow(i) for i in range(6)]
    rows[2] = scipy.sparse.csr_matrix((data * 0, (np.zeros(8, int), np.arange(8))), shape=(1, 8))
    rows[4] = scipy.sparse.csr_matrix((data * 0 + np.eye(8)[1] * 5, (np.zeros(8, int), np.arange(8))), shape=(1, 8))
    matrix = scipy.sparse.vstack(rows, format="csr")
    assert matrix.getrow(2).nnz == 8 and matrix.getrow(4).nnz == 8  # stored, though (almost) all zero
    adata.X = matrix
    adata.write_h5ad(tmp_path / "zeros.h5ad")
    rejects = Rejects()
    records = {r.location.split(":")[-1]: r for r in read_h5ad(tmp_path / "zeros.h5ad", rejects=rejects)}
    report = _report(rejects)
    assert [(r.reason, r.location.split(":")[-1]) for r in report.first_rejects] == [("no expressed genes", "row 2")]
    assert list(records["row 4"].item["genes"]) == [adata.var_names[1]]
    assert list(records["row 4"].item["values"]) == [5.0]
    assert "row 5" in records  # the rows after a reject keep their location


def test_preprocessing_matches_scanpy_per_cell_and_highly_variable_genes(tmp_path):
    adata = make_adata(500, 200, seed=1)
    adata.write_h5ad(tmp_path / "m.h5ad")
    steps = CellPreprocessing(normalize_total=True, log1p=True, highly_variable=40)
    reader = H5adReader(tmp_path / "m.h5ad", preprocessing=steps, chunk_size=77)
    records = [r for r in reader]

    expected = adata.copy()
    sc.pp.normalize_total(expected)
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, flavor="seurat", n_top_genes=40)
    hvg = list(expected.var_names[expected.var["highly_variable"]])
    assert sorted(reader.gene_names[reader.columns]) == sorted(hvg)
    assert reader.notes["target_sum"] == pytest.approx(float(np.median(np.asarray(adata.X.sum(1)).ravel())))
    for i in (0, 123, 499):
        row = expected[i, hvg].X.toarray().ravel()
        got = dict(zip(records[i].item["genes"], records[i].item["values"], strict=True))
        np.testing.assert_allclose([got.get(g, 0.0) for g in hvg], row, rtol=1e-6)


def test_chunk_size_does_not_change_the_records_and_read_many_keeps_order(tmp_path):
    make_adata(130, 40, seed=5, sparse=False).write_h5ad(tmp_path / "dense.h5ad")  # a dense X works too
    a = [r.item["values"].tolist() for r in H5adReader(tmp_path / "dense.h5ad", chunk_size=7)]
    b = [r.item["values"].tolist() for r in H5adReader(tmp_path / "dense.h5ad", chunk_size=1000)]
    assert a == b
    reader = H5adReader(tmp_path / "dense.h5ad", chunk_size=16)
    picked = reader.read_many([99, 3, 4, 5, 120, 0])
    assert [r.id for r in picked] == [f"cell{i}" for i in (99, 3, 4, 5, 120, 0)]


def test_shared_single_cell_files(shared_data):
    rejects = Rejects()
    records = list(read(shared_data / "single_cell/tabula_muris_facs_actinn_5k.h5ad", rejects=rejects))
    assert len(records) + rejects.rejected == 5000 and len(records) > 4900
    rejects = Rejects()
    records = list(read(shared_data / "single_cell/starmap_mpfc_3704cells.h5ad", rejects=rejects))
    assert len(records) + rejects.rejected == 3704 and rejects.notes["genes"] == 158


def test_an_unreadable_file_is_one_reject(tmp_path):
    (tmp_path / "broken.h5ad").write_bytes(b"not an hdf5 file at all")
    rejects = Rejects()
    assert list(read(tmp_path / "broken.h5ad", rejects=rejects)) == []
    assert rejects.report().by_reason == {"unreadable h5ad": 1}

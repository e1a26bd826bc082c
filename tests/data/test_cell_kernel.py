"""The compiled cell featurizer (``kiban.data.cell_kernel``) and the direct HDF5 reader (``h5direct``).

Every batch the compiled path gives is compared, tensor for tensor, with the per-cell featurizer and
collate (the reference ``test_data_cell_batches.py`` also uses), on files built here with the cases
the kernel treats specially: fractional values (its radix path), counts too large for its histogram,
ties at the top-``max_genes`` cut, NaN and negative cells, rows with unsorted column indices (sent to
the numpy path), highly variable genes (columns the reader leaves out) and int64 indices.
"""

import os
import pickle
import subprocess
import sys
import warnings

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse
import torch

from kiban.data import CellBatchFeaturizer, H5adReader, cell_kernel
from kiban.data.cells import CellPreprocessing
from kiban.data.h5direct import DirectArray
from kiban.encoders.base import InvalidInput
from kiban.encoders.cell import CellFeaturizer

pytestmark = pytest.mark.skipif(cell_kernel.kernel() is None, reason="no C++ compiler: the numpy path is used")

GENES = [f"G{i}" for i in range(300)]
VOCAB = [g for i, g in enumerate(GENES) if i % 5] + ["ABSENT"]  # every fifth gene unknown


def _matrix(kind: str, *, cells: int = 400, seed: int = 0) -> scipy.sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = np.zeros((cells, len(GENES)), dtype=np.float32)
    for row in range(cells):
        columns = rng.choice(len(GENES), size=int(rng.integers(1, 160)), replace=False)
        if kind == "counts":
            dense[row, columns] = rng.geometric(0.3, len(columns))
        elif kind == "fractional":  # normalised data: the radix path
            dense[row, columns] = np.round(rng.lognormal(0.0, 1.0, len(columns)), 3)
        elif kind == "large":  # counts beyond the histogram's reach
            dense[row, columns] = rng.integers(1, 10**7, len(columns))
        elif kind == "ties":  # few distinct values: ties at the top-k cut
            dense[row, columns] = rng.integers(1, 4, len(columns))
        elif kind == "log":  # log1p of counts, as highly variable genes expect
            dense[row, columns] = np.log1p(rng.geometric(0.3, len(columns)))
    dense[5] = 0  # an empty cell
    dense[6, ::5] = 2.0  # only genes the vocabulary lacks
    dense[6, 1::5] = 0
    dense[7, 3] = np.nan
    dense[8, 4] = -1.0
    matrix = scipy.sparse.csr_matrix(dense)
    matrix.data[::37] = 0.0  # stored zeros
    return matrix


def _write(path, matrix, *, index_dtype=None, unsorted_row=None):
    adata = anndata.AnnData(X=matrix)
    adata.var_names = GENES
    adata.obs_names = [f"cell{i}" for i in range(matrix.shape[0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    if index_dtype is not None or unsorted_row is not None:
        with h5py.File(path, "r+") as handle:
            indices = handle["X/indices"][:]
            if unsorted_row is not None:
                lo, hi = matrix.indptr[unsorted_row], matrix.indptr[unsorted_row + 1]
                indices[lo:hi] = indices[lo:hi][::-1]
            if index_dtype is not None:
                indices = indices.astype(index_dtype)
            del handle["X/indices"]
            handle["X"].create_dataset("indices", data=indices, chunks=(4096,))
    return path


def _featurizers():
    medians = np.random.default_rng(1).uniform(0.5, 3.0, len(VOCAB)).round(3).tolist()
    return {
        "binning": CellFeaturizer(VOCAB, max_genes=60, n_bins=11),
        "binning-cls": CellFeaturizer(VOCAB, max_genes=1000, n_bins=51, cls_id=3, pad_id=0),
        "binning-profile": CellFeaturizer(VOCAB, max_genes=25, n_bins=7, profile=True),
        "rank": CellFeaturizer(VOCAB, tokenization="rank", max_genes=40, target_sum=1e4),
        "rank-medians": CellFeaturizer(
            VOCAB, tokenization="rank", max_genes=2048, gene_medians=medians, cls_id=2, eos_id=3
        ),
    }


def _per_record(reader, featurizer, indices):
    ids, features, rejects = [], [], []
    for result in reader.read_many(indices):
        if not hasattr(result, "item"):
            rejects.append((result.id, result.reason, result.detail))
            continue
        try:
            features.append(featurizer(result.item, item_id=result.id))
            ids.append(result.id)
        except InvalidInput as error:
            rejects.append((result.id, f"invalid {error.modality} input", str(error)))
    return ids, (featurizer.collate(features) if features else None), rejects


def _check(reader, featurizer, *, seed=0):
    order = np.random.default_rng(seed).permutation(len(reader))
    pool = [order[i : i + 64] for i in range(0, len(order), 64)]
    batched = CellBatchFeaturizer(featurizer)
    for indices, (ids, got, rejects) in zip(pool, batched.read_pool(reader, pool), strict=True):
        want_ids, want, want_rejects = _per_record(reader, featurizer, indices)
        assert ids == want_ids
        assert [(r.id, r.reason, r.detail) for r in rejects] == want_rejects
        if want is None:
            assert got is None
            continue
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key
    return batched


@pytest.mark.parametrize("kind", ["counts", "fractional", "large", "ties"])
def test_the_kernel_equals_the_per_cell_featurizer(kind, tmp_path):
    path = _write(tmp_path / f"{kind}.h5ad", _matrix(kind))
    reader = H5adReader(path, chunk_size=64)
    for name, featurizer in _featurizers().items():
        batched = _check(reader, featurizer)
        assert batched.numpy_batches == 0, name  # every batch came from the kernel


def test_ties_at_the_cut_and_fractions_took_the_paths_they_are_for(tmp_path):
    """The files above reach the kernel's special cases (not only its common one)."""
    ties = _matrix("ties")
    lengths = np.diff(ties.indptr)
    assert (lengths > 60).sum() > 10  # cells cut to max_genes=60, among values 1-3: ties at the cut
    fractional = _matrix("fractional")
    assert (fractional.data != np.round(fractional.data)).mean() > 0.5
    assert np.nanmax(_matrix("large").data) > 4 * lengths.max() + 4096


def test_unsorted_indices_send_the_batch_to_the_numpy_path(tmp_path):
    path = _write(tmp_path / "unsorted.h5ad", _matrix("counts"), unsorted_row=20)
    reader = H5adReader(path, chunk_size=64)
    batched = _check(reader, _featurizers()["binning"])
    assert batched.numpy_batches == 1  # the batch holding row 20, and only it


def test_int64_indices_and_highly_variable_genes(tmp_path):
    path = _write(tmp_path / "int64.h5ad", _matrix("fractional"), index_dtype=np.int64)
    reader = H5adReader(path, chunk_size=64)
    assert reader.read_entries([0, 1]).indices.dtype == np.int64
    _check(reader, _featurizers()["rank-medians"])
    logged = _write(tmp_path / "log.h5ad", _matrix("log"))
    hvg = H5adReader(logged, chunk_size=64, preprocessing=CellPreprocessing(highly_variable=100))
    hvg.prepare()
    assert len(hvg.columns) < len(GENES)
    for featurizer in _featurizers().values():
        assert _check(hvg, featurizer).numpy_batches == 0


def test_native_off_gives_the_same_batches(tmp_path):
    """KIBAN_NATIVE=off: the numpy path, in a fresh process, with the same tensors."""
    path = _write(tmp_path / "counts.h5ad", _matrix("counts"))
    script = (
        "import sys, torch, numpy as np\n"
        "from kiban.data import CellBatchFeaturizer, H5adReader, cell_kernel\n"
        "from kiban.encoders.cell import CellFeaturizer\n"
        f"vocab = {VOCAB!r}\n"
        "reader = H5adReader(sys.argv[1], chunk_size=64)\n"
        "pool = [np.arange(i, min(i + 64, len(reader))) for i in range(0, len(reader), 64)]\n"
        "out = list(CellBatchFeaturizer(CellFeaturizer(vocab, max_genes=60, n_bins=11)).read_pool(reader, pool))\n"
        "torch.save({'native': cell_kernel.kernel() is not None, 'batches': [(i, b) for i, b, _ in out]}, sys.argv[2])\n"
    )
    results = {}
    for setting in ("off", "on"):
        env = {**os.environ, "KIBAN_NATIVE": setting}
        target = tmp_path / f"{setting}.pt"
        subprocess.run([sys.executable, "-c", script, str(path), str(target)], check=True, env=env)
        results[setting] = torch.load(target)
    assert not results["off"]["native"] and results["on"]["native"]
    for (ids, off), (ids_on, on) in zip(results["off"]["batches"], results["on"]["batches"], strict=True):
        assert ids == ids_on
        assert all(torch.equal(off[key], on[key]) for key in off)


# -- the direct reader ---------------------------------------------------------------------------


@pytest.fixture
def layouts(tmp_path):
    path = tmp_path / "layouts.h5"
    values = np.arange(1000, dtype=np.float32) * 0.5
    with h5py.File(path, "w") as handle:
        handle.create_dataset("contiguous", data=values)
        handle.create_dataset("chunked", data=values, chunks=(64,))
        handle.create_dataset("big_endian", data=values.astype(">f4"), chunks=(100,))
        handle.create_dataset("int16", data=np.arange(1000, dtype=np.int16))
        handle.create_dataset("gzip", data=values, chunks=(64,), compression="gzip")
        handle.create_dataset("unwritten", shape=(1000,), dtype=np.float32, chunks=(64,))
        handle["unwritten"][:64] = 1.0
    return path, values


def test_direct_reads_equal_h5py_where_the_layout_allows(layouts):
    path, values = layouts
    with h5py.File(path, "r") as handle:
        for name in ("contiguous", "chunked", "big_endian", "int16"):
            direct = DirectArray.of(handle[name])
            assert direct is not None, name
            for lo, hi in ((0, 1000), (63, 65), (0, 0), (130, 997), (999, 1000)):
                got = direct.read(lo, hi)
                assert got.dtype.isnative and np.array_equal(got, handle[name][lo:hi]), (name, lo, hi)
            out = np.zeros(10, dtype=np.float32)
            assert direct.read(5, 15, np.float32, out=out) is out and np.array_equal(out, handle[name][5:15])
            again = pickle.loads(pickle.dumps(direct))  # reopens in the process that uses it
            assert np.array_equal(again.read(100, 300), handle[name][100:300])
            again.close()
            direct.close()
        assert DirectArray.of(handle["gzip"]) is None  # filters: h5py reads it
        assert DirectArray.of(handle["unwritten"]) is None  # chunks never written read as the fill value
        with pytest.raises(IndexError, match="outside the 1000 elements"):
            DirectArray.of(handle["chunked"]).read(990, 1001)


def test_a_truncated_file_is_an_error_not_garbage(layouts, tmp_path):
    path, _ = layouts
    with h5py.File(path, "r") as handle:
        direct = DirectArray.of(handle["contiguous"])
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: int(direct.addresses[0]) + 400])
    direct.path = str(cut)
    with pytest.raises(OSError, match="ends before element"):
        direct.read(0, 1000)
    direct.close()


def test_the_reader_reads_the_same_rows_either_way(tmp_path):
    path = _write(tmp_path / "counts.h5ad", _matrix("counts"))
    reader = H5adReader(path, chunk_size=64)
    direct_rows = reader.read_rows(10, 200)
    with h5py.File(path, "r") as handle:
        x = handle["X"]
        lo, hi = x["indptr"][10], x["indptr"][200]
        assert np.array_equal(direct_rows.data, x["data"][lo:hi])
        assert np.array_equal(direct_rows.indices, x["indices"][lo:hi])

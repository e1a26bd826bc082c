"""The vectorised cell featurizer gives exactly what the per-cell featurizer and collate gave.

Real files (``../shared/data/single_cell``) with the awkward parts added where the file has none:
genes absent from the vocabulary, gene names repeated in the file and names that match only when
ignoring case, empty cells, cells expressing only unknown genes, and zeros stored in the matrix.
"""

import dataclasses
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse
import torch
from torch.utils.data import DataLoader

from kiban.data import CellBatchFeaturizer, FeaturizerTransform, H5adReader, ShardedStream, cell_kernel
from kiban.data.cell_batches import row_sums
from kiban.encoders.base import InvalidInput
from kiban.encoders.cell import CellFeaturizer, geneformer, scgpt, tiny

FILES = ("tabula_muris_facs_actinn_5k.h5ad", "starmap_mpfc_3704cells.h5ad")
CELLS = 700
UNKNOWN = 4  # the first genes of each file, left out of the vocabulary  # cells of each file used (the first ones), to keep the test short


def _awkward_copy(source, target, *, seed):
    """The first CELLS cells of ``source``, with repeated genes, empty cells and stored zeros added."""
    adata = anndata.read_h5ad(source)[:CELLS].to_memory()
    rng = np.random.default_rng(seed)
    x = scipy.sparse.csr_matrix(adata.X, dtype=np.float32)
    names = list(map(str, adata.var_names))
    n_genes = len(names)
    # repeated names: a few columns take the name of an earlier one (first and later occurrences alike)
    for column in rng.choice(np.arange(n_genes // 2, n_genes), size=max(3, n_genes // 40), replace=False):
        names[column] = names[int(rng.integers(0, n_genes // 2))]
    x = x.tolil()
    for row in (0, 7, 500):  # empty cells
        x[row, :] = 0
    for row in (11, 600):  # cells expressing only genes the vocabulary lacks (see _vocab)
        x[row, :] = 0
        x[row, :UNKNOWN] = 3.0
    x = scipy.sparse.csr_matrix(x)
    # stored zeros: values set to 0 in place, so the entries stay in the sparsity pattern
    stored = rng.choice(x.nnz, size=x.nnz // 20, replace=False)
    x.data[stored] = 0.0
    assert x.nnz > 0 and (x.data == 0).sum() == len(stored)
    adata = anndata.AnnData(X=x, obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's note about the repeated var names
        adata.var_names = names
    adata.write_h5ad(target)
    return names


def _vocab(names, *, seed):
    """Two thirds of the file's genes (some only in another case), plus names the file lacks."""
    rng = np.random.default_rng(seed)
    distinct = list(dict.fromkeys(names))
    kept = [n for n in distinct if rng.random() < 2 / 3 and n not in names[:UNKNOWN]]
    vocab = [n.upper() if i % 7 == 0 and n.upper() not in distinct else n for i, n in enumerate(kept)]
    vocab = list(dict.fromkeys(vocab)) + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    rng.shuffle(vocab)
    return vocab


@pytest.fixture(scope="module", params=FILES)
def awkward(request, shared_data, tmp_path_factory):
    """(path of the awkward copy, its var names, a vocabulary)."""
    source = shared_data / "single_cell" / request.param
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    target = tmp_path_factory.mktemp("cells") / request.param
    names = _awkward_copy(source, target, seed=len(request.param))
    return target, names, _vocab(names, seed=3)


def _presets(vocab):
    """Every cell featurization the encoder offers: kiban default, profile token, scGPT, Geneformer."""
    medians = np.random.default_rng(0).uniform(0.2, 5.0, len(vocab)).round(3).tolist()
    return {
        "default": CellFeaturizer.from_config(tiny(), vocab=vocab),
        "profile": CellFeaturizer.from_config(dataclasses.replace(tiny(), profile_token="first"), vocab=vocab),
        "scgpt": CellFeaturizer.from_config(dataclasses.replace(scgpt(), max_genes=40), vocab=vocab),
        "geneformer": CellFeaturizer.from_config(
            dataclasses.replace(geneformer(), max_genes=30, gene_medians=tuple(medians)), vocab=vocab
        ),
        "geneformer-v2": CellFeaturizer.from_config(
            dataclasses.replace(geneformer(), max_genes=2048, cls_id=2, eos_id=3, profile_token="only"),
            vocab=vocab,
        ),
        "rank-raw": CellFeaturizer(vocab, tokenization="rank", max_genes=25, target_sum=1e4),
        "binning-zeros": CellFeaturizer(vocab, n_bins=5, max_genes=10_000, include_zeros=True),
    }


def _per_record(reader, featurizer, indices):
    """(ids, collated batch or None, rejects) the per-cell way: read_many, featurize, collate."""
    ids, features, rejects = [], [], []
    for result in reader.read_many(indices):
        if not hasattr(result, "item"):
            rejects.append((result.id, result.location, result.reason, result.detail))
            continue
        try:
            features.append(featurizer(result.item, item_id=result.id))
            ids.append(result.id)
        except InvalidInput as error:
            rejects.append((result.id, result.location, f"invalid {error.modality} input", str(error)))
    return ids, (featurizer.collate(features) if features else None), rejects


def _assert_same(got, want, name):
    """(ids, batch, rejects) of the batch path equal ``_per_record``'s, tensor for tensor."""
    (ids, batch, rejects), (want_ids, want_batch, want_rejects) = got, want
    assert ids == want_ids, name
    assert [(r.id, r.location, r.reason, r.detail) for r in rejects] == want_rejects, name
    if want_batch is None:
        assert batch is None, name
        return
    assert batch.keys() == want_batch.keys(), name
    for key in want_batch:
        assert batch[key].dtype == want_batch[key].dtype, (name, key)
        assert torch.equal(batch[key], want_batch[key]), (name, key)


def _batches(n, *, seed):
    """Shuffled batches of 64, a sorted one and a one-cell batch."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + 64] for i in range(0, n, 64)] + [np.arange(100, 180), np.array([7])]


@pytest.mark.parametrize("vocab_in_reader", [True, False], ids=["reader-vocab", "no-reader-vocab"])
def test_the_batch_featurizer_equals_the_per_record_one_on_real_files(awkward, vocab_in_reader):
    path, names, vocab = awkward
    reader = H5adReader(path, vocab=vocab if vocab_in_reader else None, chunk_size=256)
    batches = _batches(len(reader), seed=1)
    seen_reasons = set()
    for name, featurizer in _presets(vocab).items():
        batched = CellBatchFeaturizer(featurizer)
        for indices in batches:
            want = _per_record(reader, featurizer, indices)
            _assert_same(batched(reader.read_batch(indices)), want, name)
            seen_reasons.update(r[2] for r in want[2])
    # the awkward cells were there: empty ones, and (without the reader's vocabulary) unknown-only ones
    assert "no expressed genes" in seen_reasons
    if not vocab_in_reader:
        assert "invalid cell input" in seen_reasons


@pytest.mark.parametrize("vocab_in_reader", [True, False], ids=["reader-vocab", "no-reader-vocab"])
def test_the_compiled_path_equals_the_per_record_one_on_real_files(awkward, vocab_in_reader):
    """The kernel (``kiban.data.cell_kernel``) straight from the file's entries, batch by batch."""
    library = cell_kernel.kernel()
    if library is None:
        pytest.skip("no C++ compiler here: the numpy path is the one in use")
    path, names, vocab = awkward
    reader = H5adReader(path, vocab=vocab if vocab_in_reader else None, chunk_size=256)
    batches = _batches(len(reader), seed=1)
    for name, featurizer in _presets(vocab).items():
        batched = CellBatchFeaturizer(featurizer)
        native = batched._native_applies()
        assert native == (name != "binning-zeros")  # keeping zeros is the numpy path's
        for indices, got in zip(batches, batched.read_pool(reader, batches), strict=True):
            _assert_same(got, _per_record(reader, featurizer, indices), name)
        assert batched.numpy_batches == 0, name  # the kernel gave every batch itself


def test_repeated_names_and_stored_zeros_were_exercised(awkward):
    path, names, vocab = awkward
    reader = H5adReader(path, vocab=vocab)
    rows = reader.read_batch(np.arange(len(reader)))
    index = CellFeaturizer(vocab).lookup(names)
    hit = index[rows.matrix.indices]
    cell = np.repeat(np.arange(rows.matrix.shape[0]), np.diff(rows.matrix.indptr))
    pairs = cell[hit >= 0].astype(np.int64) * len(vocab) + hit[hit >= 0]
    assert len(pairs) > len(np.unique(pairs))  # some cell expresses two columns of one vocabulary gene
    assert (rows.matrix.data > 0).all()  # stored zeros are not expressed genes
    assert any(v != v.upper() and v.upper() in vocab for v in names)  # case-only matches happen


def test_the_stream_gives_the_same_batches_with_and_without_the_batch_path_and_with_workers(awkward, tmp_path):
    path, names, vocab = awkward
    featurizer = _presets(vocab)["profile"]
    reader = H5adReader(path, vocab=vocab, chunk_size=128)

    def stream(vectorised, folder):
        return ShardedStream(
            reader,
            transform=FeaturizerTransform(featurizer, vectorised=vectorised),
            batch_size=64,
            plan="chunks",
            chunk_size=128,
            pool_batches=8,
            seed=5,
            with_ids=True,
            rejects_dir=tmp_path / folder,
        )

    per_record = list(stream(False, "records"))
    vectorised = stream(True, "batches")
    assert vectorised.transform.batch_reader(reader) is not None
    batches = list(vectorised)
    assert len(batches) == len(per_record)
    for (ids, got), (want_ids, want) in zip(batches, per_record, strict=True):
        assert ids == want_ids
        assert all(torch.equal(got[key], want[key]) for key in want)
    assert (tmp_path / "batches" / "rejects-data-e0-r0-w0.jsonl").read_text() == (
        tmp_path / "records" / "rejects-data-e0-r0-w0.jsonl"
    ).read_text()

    loaded = list(DataLoader(stream(True, "workers"), batch_size=None, num_workers=2))
    assert sorted(i for ids, _ in loaded for i in ids) == sorted(i for ids, _ in per_record for i in ids)


def test_row_sums_are_numpys_sums_bit_for_bit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 3000, 400)
    lengths[::9] = 0
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    parts = [
        rng.random(indptr[-1]).astype(np.float32).astype(np.float64),  # float32 data: the reader's
        rng.integers(0, 500, indptr[-1]).astype(np.float64),  # counts
        rng.random(indptr[-1]) * 10.0 ** rng.integers(-8, 8, indptr[-1]),  # float64 over 16 decades
    ]
    for values in parts:
        want = np.array([values[lo:hi].sum() for lo, hi in zip(indptr[:-1], indptr[1:], strict=True)])
        assert np.array_equal(row_sums(values, indptr), want)


@pytest.mark.parametrize("name", FILES)
def test_a_file_without_repeated_genes_gives_the_same_output(name, shared_data):
    """The real files as they are (no gene named twice): the batch path skips its repeat check."""
    source = shared_data / "single_cell" / name
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    reader = H5adReader(source, chunk_size=256)
    names = list(map(str, reader.gene_names[reader.columns]))
    assert len(set(names)) == len(names)
    vocab = _vocab(names, seed=4)
    rows = np.random.default_rng(2).permutation(len(reader))[:256]
    for preset in ("scgpt", "geneformer", "binning-zeros"):
        featurizer = _presets(vocab)[preset]
        for indices in (rows[:128], rows[128:]):
            want_ids, want, _ = _per_record(reader, featurizer, indices)
            ids, got, _ = CellBatchFeaturizer(featurizer)(reader.read_batch(indices))
            assert ids == want_ids
            assert all(torch.equal(got[key], want[key]) for key in want), preset

"""Streaming an h5ad does not materialise its matrix: peak memory stays flat as the file grows.

A small version of the 200,000 x 20,000 benchmark (benchmarks/data_loading.py): 20,000 x 2,000 cells
(dense float32 would be 160 MB; the sparse matrix itself ~16 MB) against 5,000 x 2,000.
"""

import tracemalloc

import pytest

from kiban.data import H5adReader, Rejects, ShardedStream, read_h5ad
from kiban.data.synthetic import write_sparse_h5ad

N_GENES, PER_CELL = 2_000, 100


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    return {
        n: write_sparse_h5ad(folder / f"c{n}.h5ad", n_cells=n, n_genes=N_GENES, genes_per_cell=PER_CELL)
        for n in (5_000, 20_000)
    }


def _peak(fn):
    tracemalloc.start()
    try:
        count = fn()
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _stream_reader(path):
    return sum(1 for _ in read_h5ad(path, chunk_size=512, rejects=Rejects()))


def _stream_shuffled(path):
    stream = ShardedStream(H5adReader(path, chunk_size=256), batch_size=64, plan="chunks", chunk_size=256)
    return sum(len(batch) for batch in stream)


@pytest.mark.parametrize("stream", [_stream_reader, _stream_shuffled])
def test_peak_memory_does_not_grow_with_the_matrix(files, stream):
    stream(files[5_000])  # warm-up: imports and caches are not what is measured
    small_count, small_peak = _peak(lambda: stream(files[5_000]))
    large_count, large_peak = _peak(lambda: stream(files[20_000]))
    assert (small_count, large_count) == (5_000, 20_000)
    dense = 20_000 * N_GENES * 4
    sparse = 20_000 * PER_CELL * 8  # values + column indices
    assert large_peak < dense / 15 and large_peak < sparse / 2, (large_peak, sparse)
    # 4x the cells: only the per-cell names (obs index, ~100 bytes a cell) grow, not the matrix part
    assert large_peak - small_peak < 15_000 * 200, (small_peak, large_peak)

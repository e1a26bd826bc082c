"""Synthetic data files for tests and benchmarks: large sparse ``.h5ad`` written without holding it.

``write_sparse_h5ad`` writes a cells x genes CSR count matrix chunk by chunk straight into the
HDF5 layout anndata reads (``X`` as ``csr_matrix``; ``obs``/``var`` through ``anndata.io.write_elem``),
so a 200,000 x 20,000 file is made in bounded memory. Counts are Poisson-ish positive integers
stored as float32; each cell expresses a random ``genes_per_cell`` (on average) of the genes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_sparse_h5ad"]


def write_sparse_h5ad(
    path: str | Path,
    *,
    n_cells: int,
    n_genes: int,
    genes_per_cell: int = 500,
    seed: int = 0,
    chunk: int = 10_000,
) -> Path:
    """Write a random sparse h5ad (cells ``cell0..``, genes ``GENE0..``) and return its path."""
    import anndata
    import h5py
    import pandas as pd

    path = Path(path)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("X")
        group.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)}
        )
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 16,))
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 16,)
        )
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        for start in range(0, n_cells, chunk):
            stop = min(start + chunk, n_cells)
            counts = rng.poisson(genes_per_cell, size=stop - start).clip(1, n_genes)
            cols = [np.sort(rng.choice(n_genes, size=k, replace=False)) for k in counts]
            flat = np.concatenate(cols).astype(np.int32)
            values = (rng.geometric(0.4, size=len(flat))).astype(np.float32)
            offset = data.shape[0]
            data.resize((offset + len(flat),))
            indices.resize((offset + len(flat),))
            data[offset:] = values
            indices[offset:] = flat
            indptr[start + 1 : stop + 1] = offset + np.cumsum(counts)
        # int32 offsets while they fit, as anndata writes them: scipy copies the index arrays of a
        # matrix whose indptr and indices differ in dtype on every row selection
        group.create_dataset("indptr", data=indptr.astype(np.int32) if indptr[-1] < 2**31 else indptr)
        anndata.io.write_elem(handle, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        anndata.io.write_elem(handle, "var", pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            anndata.io.write_elem(handle, name, {})
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    return path

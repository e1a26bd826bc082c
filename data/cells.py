"""Single-cell reader: ``.h5ad`` streamed in row chunks, never densified whole.

``H5adReader`` opens the file with ``anndata.read_h5ad(path, backed="r")`` and reads the
expression matrix (``X``, a layer, or ``raw.X``) ``chunk_size`` rows at a time as CSR slices, so
memory holds one chunk of the matrix plus the obs/var tables (anndata's backed mode loads those).
Each accepted cell becomes a ``Record`` whose item is ``{"genes": [...], "values": [...]}`` over
the cell's non-zero genes: the form the cell featurizer takes.

Genes. Names come from ``var_names`` or a ``var`` column (``gene_key``); with a vocabulary
(``vocab``, e.g. ``encoder.featurizer.vocab``) ``gene_key="auto"`` picks whichever of var_names
and the string columns of var matches it best (symbols or Ensembl ids), Ensembl version suffixes
(``ENSG00000141510.17``) are dropped when the vocabulary has none, and the count of unmatched
genes is reported through ``kiban.encoders.cell.match_genes``. A file whose genes carry no names
(var_names ``0, 1, 2, ...``) has every cell rejected with that reason.

Cells. A row with NaN/infinite or negative values (scaled data: read ``raw`` or a counts layer
instead) or with no expressed gene (in the vocabulary, when one is given) is a reject located by
its 0-based row.

Preprocessing (``CellPreprocessing``) is declared, applied in scanpy's standard order and noted
in the report: ``normalize_total`` and ``log1p`` are per-cell, so they run on each chunk through
scanpy's own functions; two things need every cell first, so they take one streaming pass before
reading: the median total count (``normalize_total`` without ``target_sum``, as scanpy does) and
highly-variable genes (``highly_variable``, scanpy's "seurat" flavour computed from streamed
per-gene means and variances; the genes kept are the top ``highly_variable`` ones).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from kiban.data.cell_kernel import CellEntries
from kiban.data.h5direct import DirectArray
from kiban.data.readers import collector, register_reader
from kiban.data.rejects import Record, Reject, Rejects

__all__ = ["CellPreprocessing", "CellRows", "H5adReader", "read_h5ad", "seurat_hvg"]

logger = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*[GT]\d{6,}(\.\d+)?$")
_VERSION = re.compile(r"\.\d+$")


@dataclass(frozen=True)
class CellPreprocessing:
    """scanpy-standard steps, applied in this order (all off by default).

    normalize_total: scale each cell to ``target_sum`` total counts (``sc.pp.normalize_total``);
        ``target_sum=None`` means the median total over all cells, found in a first pass.
    log1p: ``sc.pp.log1p`` (natural log).
    highly_variable: keep the top N highly variable genes (scanpy's "seurat" flavour, which
        expects log data: with ``log1p`` off, X must already be log1p-transformed). Needs a first
        pass. ``hvg_bins``: the number of mean-expression bins (scanpy's ``n_bins``).
    """

    normalize_total: bool = False
    target_sum: float | None = None
    log1p: bool = False
    highly_variable: int | None = None
    hvg_bins: int = 20

    @property
    def needs_pass(self) -> bool:
        """Whether the declared preprocessing needs a first pass over the file."""
        return (self.normalize_total and self.target_sum is None) or self.highly_variable is not None

    def describe(self) -> list[str]:
        """The preprocessing steps in words, for reports."""
        steps = []
        if self.normalize_total:
            steps.append(f"normalize_total(target_sum={self.target_sum if self.target_sum else 'median'})")
        if self.log1p:
            steps.append("log1p")
        if self.highly_variable:
            steps.append(f"highly_variable_genes(flavor='seurat', n_top_genes={self.highly_variable})")
        return steps


def seurat_hvg(mean: np.ndarray, var: np.ndarray, *, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Boolean mask of the ``n_top`` highly variable genes, scanpy's "seurat" flavour.

    ``mean``/``var`` are per-gene mean and (unbiased) variance of expm1 of the log data, as scanpy
    computes them; the steps below are those of ``scanpy.pp.highly_variable_genes`` (dispersion
    = var / mean, log; z-scored within ``n_bins`` bins of log1p(mean); single-gene bins get
    dispersion_norm 1; ties at the cut-off are all kept).
    """
    import pandas as pd

    mean = mean.astype(np.float64).copy()
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    frame = pd.DataFrame({"means": np.log1p(mean), "dispersions": np.log(dispersion)})
    frame["mean_bin"] = pd.cut(frame["means"], bins=n_bins)
    stats = frame.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    stats = stats.loc[frame["mean_bin"]].set_index(frame.index)
    norm = ((frame["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy()
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    if not finite.size:
        return np.zeros(len(norm), dtype=bool)
    cutoff = finite[min(n_top, finite.size) - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cutoff


@dataclass(frozen=True)
class CellRows:
    """A batch of cells of one file as one CSR matrix: what ``H5adReader.read_batch`` returns.

    reader: the file's reader (gene names, ids, rejects). rows: the file row of each batch row.
    matrix: [len(rows), len(reader.columns)] float32 CSR, preprocessed, zeros not stored, each row's
        entries in column order. code: 0 for a usable cell, else the reason the reader rejects it
        (``H5adReader.problem_reject``).
    """

    reader: H5adReader
    rows: np.ndarray
    matrix: scipy.sparse.csr_matrix
    code: np.ndarray

    @property
    def gene_names(self) -> np.ndarray:
        """The name of each matrix column."""
        return self.reader.gene_names[self.reader.columns]

    def ids(self, offsets: np.ndarray) -> list[str]:
        """The obs names of the batch rows at ``offsets``."""
        return [str(name) for name in self.reader.obs_names[self.rows[offsets]]]

    def rejects(self) -> list[Reject]:
        """The reader's rejects among these rows, in batch order."""
        bad = np.flatnonzero(self.code)
        return [self.reader.problem_reject(int(self.rows[i]), int(self.code[i])) for i in bad]

    def take(self, start: int, stop: int) -> CellRows:
        """Batch rows [start, stop) as their own ``CellRows``."""
        return CellRows(self.reader, self.rows[start:stop], self.matrix[start:stop], self.code[start:stop])

    def record(self, offset: int) -> Record:
        """Batch row ``offset`` as the record ``read_many`` gives (for a per-record fallback)."""
        lo, hi = self.matrix.indptr[offset], self.matrix.indptr[offset + 1]
        row = int(self.rows[offset])
        item = {"genes": self.gene_names[self.matrix.indices[lo:hi]], "values": self.matrix.data[lo:hi]}
        return Record(str(self.reader.obs_names[row]), "cell", item, f"{self.reader.path}:row {row}")


class H5adReader:
    """Streams the cells of one ``.h5ad`` file; also a random-access source for the datasets.

    path: the file. vocab: gene names the model knows (None: no matching; every gene is kept).
    gene_key: "auto", "var_names", or a ``var`` column holding the gene ids to use.
    layer / use_raw: read ``layers[layer]`` or ``raw.X`` instead of ``X``.
    preprocessing: a ``CellPreprocessing``; chunk_size: rows read at a time.

    Picklable: the open file is dropped and reopened lazily in each DataLoader worker.
    """

    modality = "cell"

    def __init__(
        self,
        path: str | Path,
        *,
        vocab: Sequence[str] | None = None,
        gene_key: str = "auto",
        layer: str | None = None,
        use_raw: bool = False,
        preprocessing: CellPreprocessing | None = None,
        chunk_size: int = 1024,
    ) -> None:
        if layer is not None and use_raw:
            raise ValueError("read either a layer or raw.X, not both")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        self.layer, self.use_raw, self.chunk_size = layer, use_raw, chunk_size
        self.preprocessing = preprocessing or CellPreprocessing()
        self._adata: Any = None
        self._csr: tuple[int, Any, Any, np.ndarray] | None = None
        self._warned_csc = False
        self._pid = os.getpid()
        adata = self._open()
        self.obs_names = np.asarray(adata.obs_names, dtype=object)
        self.unique_ids = bool(adata.obs_names.is_unique)
        var = adata.raw.var if use_raw else adata.var
        self.n_vars = int(var.shape[0])
        self.gene_key, names = _choose_gene_key(var, gene_key=gene_key, vocab=vocab)
        self.gene_names = np.asarray(
            [_VERSION.sub("", n) if _ENSEMBL.match(n) else n for n in names]
            if _strip_versions(names, vocab)
            else names,
            dtype=object,
        )
        self.problem = _names_problem(self.gene_names, self.gene_key)
        self.notes: dict[str, Any] = {
            "cells": len(self.obs_names),
            "genes": self.n_vars,
            "matrix": "raw.X" if use_raw else f"layers[{layer!r}]" if layer else "X",
            "gene_key": self.gene_key,
            "gene_ids": "Ensembl"
            if np.mean([bool(_ENSEMBL.match(n)) for n in names[:1000]] or [0]) > 0.9
            else "symbols",
            "preprocessing": self.preprocessing.describe(),
        }
        self.matched = np.ones(self.n_vars, dtype=bool)
        if vocab is not None:
            from kiban.encoders.cell import CellFeaturizer

            featurizer = CellFeaturizer(list(vocab))
            report = featurizer.match_genes(list(self.gene_names))
            # which columns match, by the featurizer's own rule (exact, then unambiguous case-insensitive)
            self.matched = featurizer.lookup(list(self.gene_names)) >= 0
            self.notes["gene_match"] = {
                "matched": report.n_matched,
                "unmatched": report.n_unmatched,
                "duplicates": report.n_duplicates,
                "unmatched_examples": report.unmatched_examples,
                "summary": report.summary(),
            }
        self.columns = np.arange(self.n_vars)  # the genes that reach the records (HVG subsets them)
        self.target_sum = self.preprocessing.target_sum
        self._prepared = not self.preprocessing.needs_pass

    # -- file access -----------------------------------------------------------------------------

    def _open(self) -> Any:
        # A handle inherited through fork (DataLoader workers) shares the parent's HDF5 state: reopen.
        if self._adata is None or self._pid != os.getpid():
            import anndata

            self._adata = anndata.read_h5ad(self.path, backed="r")
            self._pid = os.getpid()
        return self._adata

    def _matrix(self) -> Any:
        adata = self._open()
        if self.use_raw:
            if adata.raw is None:
                raise ValueError(f"{self.path} has no raw matrix (use_raw=True)")
            return adata.raw.X
        if self.layer is not None:
            if self.layer not in adata.layers:
                raise ValueError(
                    f"{self.path} has no layer {self.layer!r}; layers: {', '.join(adata.layers) or 'none'}"
                )
            return adata.layers[self.layer]
        if adata.X is None:
            raise ValueError(f"{self.path} has no X matrix; name a layer or use_raw")
        return adata.X

    def __len__(self) -> int:
        return len(self.obs_names)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_adata"] = None
        state["_csr"] = None
        return state

    def close(self) -> None:
        """Close the file (only in the process that opened it)."""
        if self._adata is not None and self._pid == os.getpid():
            self._adata.file.close()
        self._adata = self._csr = None

    def row_lengths(self) -> np.ndarray:
        """Stored entries per cell (for length bucketing), from the CSR index pointer alone."""
        matrix = self._matrix()
        indptr = getattr(matrix, "indptr", None)
        if indptr is None:
            return np.full(len(self), self.n_vars)
        return np.diff(np.asarray(indptr[:]))

    def _csr_datasets(
        self,
    ) -> tuple[Callable[[int, int], np.ndarray], Callable[[int, int], np.ndarray], np.ndarray] | None:
        """Readers of a CSR matrix's data (as float32) and indices by element range, and its whole index
        pointer; None for other matrices.

        Kept per process: looking the datasets up through anndata costs ~1 ms of attribute reads,
        which every shuffled minibatch would pay, and the index pointer (8 bytes a cell) is read once.
        Datasets stored without filters are read by file offset (``kiban.data.h5direct``), others
        through h5py.
        """
        if self._csr is None or self._csr[0] != os.getpid():
            matrix = self._matrix()
            group = getattr(matrix, "group", None)
            if group is None or getattr(matrix, "format", None) != "csr":
                return None
            indptr = np.asarray(group["indptr"][:], dtype=np.int64)
            self._csr = (
                os.getpid(),
                _range_reader(group["data"], np.float32),
                _range_reader(group["indices"]),
                indptr,
            )
        return self._csr[1:]

    def read_rows(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Rows [start, stop) as float32 CSR, raw (no preprocessing).

        A CSR matrix is read straight from its HDF5 datasets (three slice reads); anndata's own
        slicing costs milliseconds of checks per call, which shuffled minibatches would pay often.
        """
        csr = self._csr_datasets()
        if csr is not None:
            read_data, read_indices, row_starts = csr
            indptr = row_starts[start : stop + 1]
            lo, hi = int(indptr[0]), int(indptr[-1])
            return scipy.sparse.csr_matrix(
                (read_data(lo, hi), read_indices(lo, hi), indptr - lo), shape=(stop - start, self.n_vars)
            )
        matrix = self._matrix()
        group = getattr(matrix, "group", None)
        if group is not None and not self._warned_csc:
            self._warned_csc = True
            logger.warning(
                "%s stores its matrix column-major (CSC): every row chunk reads all of it. Convert it once "
                "(adata.X = adata.X.tocsr(); adata.write_h5ad(...)) for streaming.",
                self.path,
            )
        block = matrix[start:stop]  # dense X, or CSC
        if scipy.sparse.issparse(block):
            return scipy.sparse.csr_matrix(block, dtype=np.float32)
        return scipy.sparse.csr_matrix(np.asarray(block, dtype=np.float32))

    # -- preprocessing -------------------------------------------------------------------------

    def prepare(self) -> None:
        """The first streaming pass, when the declared preprocessing needs one (idempotent).

        Call it in the main process before DataLoader workers start, so they inherit the result.
        """
        if self._prepared:
            return
        steps = self.preprocessing
        if steps.normalize_total and steps.target_sum is None:
            totals = [
                np.asarray(
                    self._valid(self.read_rows(s, min(s + self.chunk_size, len(self))))[0].sum(1)
                ).ravel()
                for s in range(0, len(self), self.chunk_size)
            ]
            totals = np.concatenate(totals) if totals else np.zeros(0)
            self.target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
            self.notes["target_sum"] = self.target_sum
        if steps.highly_variable is not None:
            n, total, squares = 0, np.zeros(self.n_vars), np.zeros(self.n_vars)
            for start in range(0, len(self), self.chunk_size):
                chunk, code = self._valid(self.read_rows(start, min(start + self.chunk_size, len(self))))
                chunk = self._transform(chunk)
                chunk.data = np.expm1(chunk.data)  # scanpy's seurat flavour works on expm1 of the log data
                n += int((code == 0).sum())
                total += np.bincount(chunk.indices, weights=chunk.data, minlength=self.n_vars)
                squares += np.bincount(
                    chunk.indices, weights=chunk.data.astype(np.float64) ** 2, minlength=self.n_vars
                )
            mean = total / max(n, 1)
            var = (squares / max(n, 1) - mean**2) * (n / (n - 1) if n > 1 else 1.0)
            keep = seurat_hvg(mean, var, n_top=steps.highly_variable, n_bins=steps.hvg_bins)
            self.columns = np.flatnonzero(keep)
            self.notes["highly_variable_genes"] = int(keep.sum())
        self._prepared = True

    def _transform(self, chunk: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
        """normalize_total and log1p on one chunk, through scanpy's own functions."""
        steps = self.preprocessing
        if not (steps.normalize_total or steps.log1p) or chunk.shape[0] == 0:
            return chunk
        import anndata
        import scanpy as sc

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's notes about the default obs/var names of the piece
            piece = anndata.AnnData(X=chunk)
            if steps.normalize_total:
                sc.pp.normalize_total(piece, target_sum=self.target_sum)
            if steps.log1p:
                sc.pp.log1p(piece)
        return scipy.sparse.csr_matrix(piece.X)

    def _valid(self, chunk: scipy.sparse.csr_matrix) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
        """(the chunk with bad rows emptied, a per-row problem code: 0 ok, 1 non-finite, 2 negative)."""
        chunk.sum_duplicates()
        rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
        code = np.zeros(chunk.shape[0], dtype=np.int8)
        code[rows[chunk.data < 0]] = 2
        code[rows[~np.isfinite(chunk.data)]] = 1
        if code.any():
            chunk.data[np.repeat(code != 0, np.diff(chunk.indptr))] = 0
        # a zero stored explicitly (writers that keep the sparsity pattern) is not an expressed gene
        chunk.eliminate_zeros()
        return chunk, code

    # -- records -------------------------------------------------------------------------------

    def read_block(self, start: int, stop: int) -> list[Record | Reject]:
        """Records (or rejects) of rows [start, stop), preprocessed, one per row in order."""
        return self._records(np.arange(start, stop))

    def _chunk(self, rows: np.ndarray) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
        """Sorted, distinct ``rows`` read as the one span they lie in: (CSR, problem code per row).

        The CSR is preprocessed and cut to ``columns``; code 0 ok, 1 non-finite, 2 negative (those rows
        are emptied), 3 no expressed gene (in the vocabulary, when the reader has one); ``read_batch``
        adds 4, no gene names (the whole file).
        """
        self.prepare()
        start, stop = int(rows[0]), int(rows[-1]) + 1
        chunk = self.read_rows(start, stop)
        if len(rows) < stop - start:
            chunk = chunk[rows - start]
        chunk, code = self._valid(chunk)
        useful = self.columns[self.matched[self.columns]]
        expressed = (chunk if len(useful) == self.n_vars else chunk[:, useful]).getnnz(axis=1)
        code[(code == 0) & (expressed == 0)] = 3
        chunk = self._transform(chunk)
        if len(self.columns) < self.n_vars:
            chunk = chunk[:, self.columns]
        return chunk, code

    def problem_reject(self, row: int, code: int) -> Reject:
        """The reject of file row ``row`` for a non-zero problem code of ``_chunk``."""
        if code == 1:
            return self._reject(row, "invalid values", "the cell has NaN or infinite values")
        if code == 2:
            return self._reject(
                row,
                "negative values",
                "the cell has negative values: X holds scaled data, not counts; "
                "read raw (use_raw) or a counts layer",
            )
        if code == 4:
            return self._reject(row, "no gene names", self.problem)
        scope = " in the vocabulary" if "gene_match" in self.notes else ""
        return self._reject(row, "no expressed genes", f"the cell has no expressed gene{scope}")

    def _records(self, rows: np.ndarray) -> list[Record | Reject]:
        """Records of sorted, distinct ``rows``, read as the one span they lie in."""
        if self.problem:
            self.prepare()
            return [self._reject(int(row), "no gene names", self.problem) for row in rows]
        chunk, code = self._chunk(rows)
        genes = self.gene_names[self.columns][chunk.indices]  # one gather per chunk; rows take views of it
        where = f"{self.path}:row "
        out: list[Record | Reject] = []
        for offset, row in enumerate(rows.tolist()):
            if code[offset]:
                out.append(self.problem_reject(row, int(code[offset])))
            else:
                lo, hi = chunk.indptr[offset], chunk.indptr[offset + 1]
                item = {"genes": genes[lo:hi], "values": chunk.data[lo:hi]}
                out.append(Record(str(self.obs_names[row]), "cell", item, f"{where}{row}"))
        return out

    def _spans(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """The distinct rows of ``indices``, sorted, in spans read at once.

        Rows closer than ``chunk_size`` to the previous one join its span (the rows between are read
        and dropped), so a shuffled minibatch drawn from a few chunks of the file costs a few reads,
        not one per row.
        """
        wanted = np.unique(np.asarray(indices, dtype=np.int64))
        if not len(wanted):
            return
        # a new span where the gap to the previous row exceeds chunk_size, or where a run of close rows
        # reaches another 4 * chunk_size rows from its first (so that no span grows without bound)
        run = np.concatenate([[0], np.cumsum(np.diff(wanted) > self.chunk_size)])
        run_first = wanted[np.concatenate([[0], np.flatnonzero(np.diff(run)) + 1])][run]
        part = (wanted - run_first) // (4 * self.chunk_size)
        breaks = np.flatnonzero((np.diff(run) > 0) | (np.diff(part) != 0)) + 1
        yield from np.split(wanted, breaks)

    def read_batch(self, indices: Sequence[int]) -> CellRows:
        """Rows at ``indices``, in that order, as one CSR batch (``CellRows``): no record per cell.

        The same cells, values and rejects as ``read_many``, for featurizers that work on a whole
        batch (``kiban.data.cell_batches``).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if self.problem or not len(indices):
            self.prepare()
            empty = scipy.sparse.csr_matrix((len(indices), len(self.columns)), dtype=np.float32)
            code = np.full(len(indices), 4 if self.problem else 0, dtype=np.int8)
            return CellRows(self, indices, empty, code)
        parts = [(rows, *self._chunk(rows)) for rows in self._spans(indices)]
        rows = np.concatenate([p[0] for p in parts])
        matrix = parts[0][1] if len(parts) == 1 else scipy.sparse.vstack([p[1] for p in parts], format="csr")
        code = np.concatenate([p[2] for p in parts])
        where = np.searchsorted(rows, indices)  # rows is sorted and holds every index
        if len(rows) != len(indices) or (where != np.arange(len(indices))).any():
            matrix, code = matrix[where], code[where]
        return CellRows(self, indices, matrix, code)

    def read_entries(self, indices: Sequence[int]) -> CellEntries | None:
        """Rows at ``indices`` as spans of their raw CSR entries (``CellEntries``), for compiled featurizers.

        Nothing is checked or preprocessed: the featurizer applies the reader's checks itself. None
        where that does not hold: a matrix that is not CSR, a file without gene names, or
        preprocessing that transforms values (normalize_total, log1p); highly variable genes are
        fine (columns outside them are the featurizer's to skip).
        """
        steps = self.preprocessing
        if self.problem or steps.normalize_total or steps.log1p:
            return None
        csr = self._csr_datasets()
        if csr is None:
            return None
        self.prepare()
        read_data, read_indices, row_starts = csr
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return None
        spans = list(self._spans(indices))
        wanted = np.concatenate(spans)  # sorted, distinct
        lengths = np.diff(row_starts)[wanted]
        bounds = [(int(row_starts[rows[0]]), int(row_starts[rows[-1] + 1])) for rows in spans]
        size = sum(hi - lo for lo, hi in bounds)
        data = np.empty(size, dtype=np.float32)
        kind = read_indices.dtype  # type: ignore[attr-defined]
        column = np.empty(size, dtype=kind if kind in (np.int32, np.int64) else np.int64)
        starts, base = [], 0
        for rows, (lo, hi) in zip(spans, bounds, strict=True):  # one read per span (rows between are skipped)
            read_data(lo, hi, out=data[base : base + hi - lo])
            read_indices(lo, hi, out=column[base : base + hi - lo])
            starts.append(row_starts[rows] - lo + base)
            base += hi - lo
        first = np.concatenate(starts)
        where = np.searchsorted(wanted, indices)
        return CellEntries(indices, data, column, first[where], (first + lengths)[where])

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]:
        """Records of arbitrary rows, in the order given (read in spans, see ``_spans``)."""
        found: dict[int, Record | Reject] = {}
        for rows in self._spans(indices):
            found.update(zip(rows.tolist(), self._records(rows), strict=True))
        return [found[int(i)] for i in indices]

    def _reject(self, row: int, reason: str, detail: str) -> Reject:
        return Reject(str(self.obs_names[row]), f"{self.path}:row {row}", reason, detail)

    def __iter__(self) -> Iterator[Record | Reject]:
        for start in range(0, len(self), self.chunk_size):
            yield from self.read_block(start, min(start + self.chunk_size, len(self)))


def _range_reader(dataset: Any, dtype: Any = None) -> Callable[..., np.ndarray]:
    """``(lo, hi, out=None) -> elements [lo, hi)`` of a 1-D HDF5 dataset (as ``dtype``; into ``out``
    when given): by file offset where it can (``DirectArray``), else through h5py.
    """
    direct = DirectArray.of(dataset)

    def read(lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        if direct is not None:
            return direct.read(lo, hi, dtype, out=out)
        values = np.asarray(dataset[lo:hi], dtype=dtype)
        if out is None:
            return values
        out[...] = values
        return out

    read.dtype = np.dtype(dtype) if dtype is not None else dataset.dtype.newbyteorder("=")  # type: ignore[attr-defined]
    return read


def _choose_gene_key(var: Any, *, gene_key: str, vocab: Sequence[str] | None) -> tuple[str, list[str]]:
    """(the key used, its gene names as strings)."""

    def names_of(key: str) -> list[str]:
        values = var.index if key == "var_names" else var[key]
        return ["" if value is None or value != value else str(value) for value in values]  # NaN -> ""

    if gene_key != "auto":
        if gene_key != "var_names" and gene_key not in var.columns:
            raise ValueError(
                f"no var column {gene_key!r} (gene_key); "
                f"columns: {', '.join(map(str, var.columns)) or 'none'}"
            )
        return gene_key, names_of(gene_key)
    if vocab is None:
        return "var_names", names_of("var_names")
    from kiban.encoders.cell import match_genes

    candidates = ["var_names"] + [
        c for c in var.columns if var[c].dtype == object or str(var[c].dtype) in ("category", "string")
    ]
    scored = []
    for key in candidates:
        names = names_of(key)
        if _strip_versions(names, vocab):
            names = [_VERSION.sub("", n) if _ENSEMBL.match(n) else n for n in names]
        scored.append((match_genes(names, vocab=vocab).n_matched, key))
    best = max(scored, key=lambda pair: pair[0])[1]  # ties keep the earlier key: var_names first
    return best, names_of(best)


def _strip_versions(names: Sequence[str], vocab: Sequence[str] | None) -> bool:
    """Drop Ensembl version suffixes when the names have them and the vocabulary does not."""
    if vocab is None:
        return False
    sample = [n for n in names[:1000] if _ENSEMBL.match(n)]
    versioned = sum("." in n for n in sample)
    vocab_ensembl = [g for g in list(vocab)[:1000] if _ENSEMBL.match(g)]
    return bool(versioned) and not any("." in g for g in vocab_ensembl)


def _names_problem(names: np.ndarray, key: str) -> str:
    """Why the genes cannot be named, or "" when they can."""
    if len(names) == 0:
        return "the file has no genes"
    if all(str(n).isdigit() for n in names[:1000]) and all(str(n).isdigit() for n in names):
        return (
            f"the genes have no names ({key} are the numbers 0..{len(names) - 1}); "
            "name the var column holding gene symbols or Ensembl ids with gene_key="
        )
    empty = sum(1 for n in names if not str(n).strip())
    if empty == len(names):
        return f"every gene name in {key} is empty"
    return ""


@register_reader(
    "h5ad", suffixes=(".h5ad",), description="single-cell AnnData (.h5ad), streamed in backed mode"
)
def read_h5ad(
    path: str | Path,
    *,
    vocab: Sequence[str] | None = None,
    gene_key: str = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    preprocessing: CellPreprocessing | None = None,
    chunk_size: int = 1024,
    rejects: Rejects | None = None,
) -> Iterator[Record]:
    """Records of every cell of an h5ad file, streamed (see ``H5adReader`` for the options)."""
    rejects = collector(rejects)
    try:
        reader = H5adReader(
            path,
            vocab=vocab,
            gene_key=gene_key,
            layer=layer,
            use_raw=use_raw,
            preprocessing=preprocessing,
            chunk_size=chunk_size,
        )
    except (OSError, KeyError) as error:  # h5py's "unable to open", anndata's missing groups
        rejects.reject(
            id=None,
            location=str(path),
            reason="unreadable h5ad",
            detail=f"cannot be opened as AnnData ({type(error).__name__}: {error})",
        )
        return
    try:
        reader.prepare()
        for key, value in reader.notes.items():
            rejects.note(key, value)
        seen: set[str] = set()
        for result in reader:
            if isinstance(result, Reject):
                rejects.reject(
                    id=result.id, location=result.location, reason=result.reason, detail=result.detail
                )
            elif not reader.unique_ids and (result.id in seen or seen.add(result.id)):
                rejects.reject(
                    id=result.id,
                    location=result.location,
                    reason="duplicate id",
                    detail=f"obs name {result.id!r} appears more than once",
                )
            else:
                rejects.accept()
                yield result
    finally:
        reader.close()

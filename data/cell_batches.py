"""Cells featurized a CSR batch at a time: the cell featurizer's output, vectorised over the batch.

``CellFeaturizer`` (``kiban.encoders.cell``) turns one cell into tokens; called once per cell it
spends most of its time in Python (matching the cell's gene names, one quantile call, one sort).
``CellBatchFeaturizer`` takes a whole batch of rows of one file as a CSR matrix
(``H5adReader.read_batch``) and gives exactly the padded batch that featurizing each cell and
collating would give (the same gene ids, value ids, masks, match counts and profiles), with no
Python loop over cells:

* the file's gene names are looked up in the vocabulary once per file (an index per column);
  a vocabulary gene named by several columns counts for the first one the cell expresses, as the
  per-cell matcher does (the later ones are repeats);
* binning takes each cell's quantile edges with numpy's own "linear" interpolation formula over
  the cell's sorted values, then counts the edges at or below each value (``np.digitize``);
* the top ``max_genes`` and the rank order come from one sort of an integer key (cell, score rank, gene).

A cell the per-cell featurizer would refuse (no gene in the vocabulary) is handed to it, so the
reject names the cell and the problem in the same words. The featurizer is picklable and keeps
nothing but its per-file index, so it runs in DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiban.data.cells import CellRows
from kiban.data.datasets import register_batch_featurizer
from kiban.data.rejects import Reject
from kiban.encoders.base import InvalidInput
from kiban.encoders.cell import CellFeaturizer

__all__ = ["CellBatchFeaturizer", "row_sums"]


def row_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sum of each CSR row's values, bit-identical to ``values[lo:hi].sum()`` row by row.

    numpy's ``sum`` adds pairwise and ``np.add.reduceat`` does not, so the two can differ in the
    last bit. They cannot where every partial sum is exact: all values of a row are whole multiples
    of the finest power of two among their granularities (``2**gmin``), so while the sum of their
    magnitudes stays below ``2**52 * 2**gmin`` every order of adding gives the exact sum. Counts and
    float32 data (the reader's) nearly always qualify; any row that does not is summed by numpy
    itself.
    """
    lengths = np.diff(indptr)
    out = np.zeros(len(lengths), dtype=np.float64)
    full = np.flatnonzero(lengths > 0)
    if not len(full):
        return out
    starts = indptr[:-1][full]
    out[full] = np.add.reduceat(values, starts)  # each segment runs to the next non-empty row's start
    fraction, exponent = np.frexp(np.abs(values))
    mantissa = np.ldexp(fraction, 53).astype(np.int64)  # the 53-bit integer significand
    lowest = mantissa & -mantissa  # its lowest set bit (0 for a zero value)
    granularity = np.where(lowest > 0, exponent - 53 + np.frexp(lowest.astype(np.float64))[1] - 1, 1 << 20)
    finest = np.minimum.reduceat(granularity, starts)
    magnitude = np.add.reduceat(np.abs(values), starts)
    inexact = full[~(magnitude < np.ldexp(1.0, np.minimum(finest, 960) + 52))]
    for row in inexact.tolist():  # rare: values spanning more than ~2**29 in one float32 row
        out[row] = values[indptr[row] : indptr[row + 1]].sum()
    return out


@register_batch_featurizer("cell")
class CellBatchFeaturizer:
    """A ``CellFeaturizer``'s padded batch for a ``CellRows`` batch, computed over the whole batch.

    ``__call__(rows)`` returns (ids of the featurized cells, their batch or None when there are
    none, the rejects in batch order). The batch is what ``featurizer.collate`` of the per-cell
    features would be. The featurizer's running ``report`` is not added to: each cell's match
    counts are in the batch, and the file's in the reader's notes.
    """

    def __init__(self, featurizer: CellFeaturizer) -> None:
        """Vectorise ``featurizer`` (its vocabulary, tokenization and token ids)."""
        self.featurizer = featurizer
        self._index: tuple[Any, np.ndarray] | None = None  # (file key, vocabulary index per column)

    def __getstate__(self) -> dict[str, Any]:
        return {"featurizer": self.featurizer, "_index": None}

    def column_index(self, rows: CellRows) -> np.ndarray:
        """Vocabulary index of each column of the batch's file (-1: no match), looked up once per file."""
        reader = rows.reader
        key = (str(reader.path), reader.gene_key, len(reader.columns), hash(reader.columns.tobytes()))
        if self._index is None or self._index[0] != key:
            self._index = (key, self.featurizer.lookup(list(rows.gene_names)))
        return self._index[1]

    def __call__(self, rows: CellRows) -> tuple[list[str], dict[str, torch.Tensor] | None, list[Reject]]:
        """(ids, padded batch or None, rejects in batch order) of one batch of cells."""
        f = self.featurizer
        matrix = rows.matrix
        n = matrix.shape[0]
        lengths = np.diff(matrix.indptr).astype(np.int64)
        row_of = np.repeat(np.arange(n), lengths)
        values = matrix.data.astype(np.float64)
        hit = self.column_index(rows)[matrix.indices] if matrix.nnz else np.zeros(0, dtype=np.int64)

        # a vocabulary gene named by several columns: the cell's first entry for it counts, the others
        # are repeats (as the per-cell matcher, which sees only the cell's own genes, counts them)
        named = np.flatnonzero(hit >= 0)
        _, first = np.unique(row_of[named] * f.vocab_size + hit[named], return_index=True)
        gene = np.full(len(hit), -1, dtype=np.int64)
        gene[named[first]] = hit[named[first]]
        n_matched = np.bincount(row_of[gene >= 0], minlength=n)
        n_unmatched = np.bincount(row_of[hit < 0], minlength=n)
        totals = row_sums(values, matrix.indptr)
        keep = gene >= 0
        if not f.include_zeros:
            keep &= values > 0
        n_kept = np.bincount(row_of[keep], minlength=n)

        # cells the per-cell featurizer refuses: let it say why, in its own words
        refused = (rows.code == 0) & ((n_matched == 0) | (totals <= 0) | (n_kept == 0))
        problems: dict[int, Reject] = dict(zip(np.flatnonzero(rows.code).tolist(), rows.rejects(), strict=True))
        for offset in np.flatnonzero(refused).tolist():
            problems[offset] = self._refusal(rows, offset)
        ok = np.ones(n, dtype=bool)
        ok[list(problems)] = False
        rejects = [problems[offset] for offset in sorted(problems)]
        good = np.flatnonzero(ok)
        if not len(good):
            return [], None, rejects

        keep &= ok[row_of]
        entry = np.flatnonzero(keep)
        renumber = np.cumsum(ok) - 1  # batch offset -> position among the good cells
        r, g, v = renumber[row_of[entry]], gene[entry], values[entry]
        scale = f.target_sum / totals[good]
        batch = self._tokens(r, g, v, scale, len(good))
        batch["n_genes_matched"] = torch.as_tensor(n_matched[good], dtype=torch.long)
        batch["n_genes_unmatched"] = torch.as_tensor(n_unmatched[good], dtype=torch.long)
        if f.profile:
            counts = np.bincount(r, minlength=len(good))
            index, _ = _pad(r, counts, g, pad=0, dtype=torch.long)
            profile = np.log1p(v * scale[r]).astype(np.float32)
            batch["profile_index"] = index
            batch["profile_values"], _ = _pad(r, counts, profile, pad=0.0, dtype=torch.float32)
        return rows.ids(good), batch, rejects

    # -- tokens -----------------------------------------------------------------------------------

    def _tokens(
        self, r: np.ndarray, g: np.ndarray, v: np.ndarray, scale: np.ndarray, n: int
    ) -> dict[str, torch.Tensor]:
        """gene_ids, value_ids, mask [n, N] from the kept entries (cell r, vocabulary gene g, value v)."""
        f = self.featurizer
        if f.tokenization == "binning":
            bins = self._bins(r, v, n)
            score = v
        else:
            bins = None
            score = v * scale[r]
            if f.gene_medians is not None:
                score = score / f.gene_medians[g]
        # the top max_genes of each cell, highest first, ties to the earlier vocabulary gene: one sort of
        # an integer key (cell, descending score rank, gene); np.lexsort is several times slower
        levels, dense = _dense_rank(score)
        order = np.argsort((r * levels + (levels - 1 - dense)) * f.vocab_size + g)  # keys are distinct
        starts = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n))])
        rank = np.arange(len(order)) - starts[r[order]]
        chosen = order[rank < f.max_genes]
        if bins is not None:
            chosen = chosen[np.argsort(r[chosen] * f.vocab_size + g[chosen])]  # gene order within the cell
        rc = r[chosen]
        head = [f.cls_id] if f.cls_id is not None else []
        tail = [f.eos_id] if (f.eos_id is not None and bins is None) else []
        counts = np.bincount(rc, minlength=n)
        width = len(head) + len(tail) + (int(counts.max()) if n else 0)
        lengths = counts + len(head) + len(tail)
        gene_ids = np.full((n, width), f.pad_id, dtype=np.int64)
        value_ids = np.zeros((n, width), dtype=np.int64)
        column = np.arange(len(rc)) - np.concatenate([[0], np.cumsum(counts)])[rc] + len(head)
        gene_ids[rc, column] = f.token_ids[g[chosen]]
        if head:
            gene_ids[:, 0] = head[0]
        if tail:
            gene_ids[np.arange(n), lengths - 1] = tail[0]
        if bins is not None:
            value_ids[rc, column] = bins[chosen]
            if head:
                value_ids[:, 0] = f.n_bins  # n_bins = "no value" (CLS)
        else:
            value_ids[:] = np.arange(width)  # rank position; CLS is position 0
        mask = np.arange(width)[None, :] < lengths[:, None]
        value_ids[~mask] = 0
        return {
            "gene_ids": torch.from_numpy(gene_ids),
            "value_ids": torch.from_numpy(value_ids),
            "mask": torch.from_numpy(mask),
        }

    def _bins(self, r: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
        """ScGPT's value bins of every entry (``bin_values`` per cell): edges at each cell's quantiles."""
        f = self.featurizer
        bins = np.zeros(len(v), dtype=np.int64)
        expressed = np.flatnonzero(v > 0)
        if not len(expressed):
            return bins
        er, ev = r[expressed], v[expressed]
        levels, dense = _dense_rank(ev)
        order = np.argsort(er * levels + dense)  # by cell, then value (equal values: either order)
        ordered = ev[order]
        count = np.bincount(er, minlength=n)
        start = np.concatenate([[0], np.cumsum(count)])[:-1]
        cells = np.flatnonzero(count)
        # np.quantile(values, linspace(0, 1, n_bins - 1)), method "linear", numpy's own arithmetic:
        # virtual index (n - 1) * q, neighbours floor and floor + 1 (the last value at or past the end),
        # then _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) where t >= 0.5
        q = np.linspace(0.0, 1.0, f.n_bins - 1)
        size = count[cells][:, None]
        virtual = (size - 1) * q[None, :]
        below = np.floor(virtual)
        past = virtual >= size - 1
        lo = np.where(past, size - 1, below).astype(np.int64)
        hi = np.where(past, size - 1, below + 1).astype(np.int64)
        gamma = np.where(past, virtual + 1, virtual - below)
        a = ordered[start[cells][:, None] + lo]
        b = ordered[start[cells][:, None] + hi]
        diff = b - a
        edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
        # np.digitize(x, edges) for increasing edges is the number of edges at or below x: one
        # searchsorted over (cell, exact rank) keys of the edges and values together
        levels, dense = _dense_rank(np.concatenate([edges.ravel(), ev]))
        width = f.n_bins - 1
        edge_keys = np.repeat(cells, width) * levels + dense[: edges.size]
        value_keys = er * levels + dense[edges.size :]
        position = np.zeros(n, dtype=np.int64)
        position[cells] = np.arange(len(cells)) * width
        bins[expressed] = np.searchsorted(edge_keys, value_keys, side="right") - position[er]
        return bins

    # -- bookkeeping ------------------------------------------------------------------------------

    def _refusal(self, rows: CellRows, offset: int) -> Reject:
        record = rows.record(offset)
        try:
            self.featurizer(record.item, item_id=record.id)
        except InvalidInput as error:
            return Reject(record.id, record.location, f"invalid {error.modality} input", str(error))
        raise AssertionError(f"the cell featurizer accepted {record.id}, which the batch featurizer refused")


def _dense_rank(values: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of distinct values, each value's rank among them): equal values share a rank."""
    distinct, rank = np.unique(values, return_inverse=True)
    return max(len(distinct), 1), rank.astype(np.int64)


def _pad(
    r: np.ndarray, counts: np.ndarray, values: np.ndarray, *, pad: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (cell r, in order) right-padded into [cells, longest]: (padded, mask)."""
    n = len(counts)
    width = int(counts.max()) if n else 0
    column = np.arange(len(r)) - np.concatenate([[0], np.cumsum(counts)])[r]
    out = torch.full((n, width), pad, dtype=dtype)
    out[torch.from_numpy(r), torch.from_numpy(column)] = torch.as_tensor(values, dtype=dtype)
    mask = torch.from_numpy(np.arange(width)[None, :] < counts[:, None])
    return out, mask

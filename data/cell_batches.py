"""Cells featurized a CSR batch at a time: the cell featurizer's output, vectorised over the batch.

``CellFeaturizer`` (``kiban.encoders.cell``) turns one cell into tokens; called once per cell it
spends most of its time in Python (matching the cell's gene names, one quantile call, one sort).
``CellBatchFeaturizer`` takes a whole batch of rows of one file as a CSR matrix
(``H5adReader.read_batch``) and gives exactly the padded batch that featurizing each cell and
collating would give (the same gene ids, value ids, masks, match counts and profiles), with no
Python loop over cells:

* the file's gene names are looked up in the vocabulary once per file (an index per column);
  a vocabulary gene named by several columns counts for the first one the cell expresses, as the
  per-cell matcher does (the later ones are repeats); files without such columns skip that step;
* the kept entries are laid out one row per cell ([cells, longest], padded), so every sort is a
  sort of each short row on its own (``axis=1``), never of a key spanning the batch;
* binning sorts each row's values once, takes the quantile edges with numpy's own "linear"
  interpolation formula, and reads each value's bin (``np.digitize``: edges at or below it) off the
  sorted row by counting, without searching;
* the top ``max_genes`` and the gene or rank order come from stable row sorts (genes as 16-bit keys,
  numpy's radix sort, where the vocabulary allows).

A cell the per-cell featurizer would refuse (no gene in the vocabulary) is handed to it, so the
reject names the cell and the problem in the same words. The featurizer is picklable and keeps
nothing but its per-file index, so it runs in DataLoader workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kiban.data import cell_kernel
from kiban.data.cells import CellRows
from kiban.data.datasets import featurize_pool, register_batch_featurizer
from kiban.data.rejects import Reject
from kiban.encoders.base import InvalidInput
from kiban.encoders.cell import CellFeaturizer

__all__ = ["CellBatchFeaturizer", "row_sums"]

REFUSED = 5  # the kernel's code for a cell the featurizer refuses (no matched gene, a zero total)


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
        # (file key, vocabulary index per column, columns whose vocabulary gene another column names too)
        self._index: tuple[Any, np.ndarray, np.ndarray] | None = None
        self._maps: tuple[Any, cell_kernel.ColumnMaps] | None = None  # (the _index it was made from, maps)
        self.numpy_batches = 0  # batches read_pool's compiled path sent back to the numpy path

    def __getstate__(self) -> dict[str, Any]:
        return {
            "featurizer": self.featurizer,
            "_index": None,
            "_maps": None,
            "numpy_batches": 0,
        }

    def column_index(self, rows: CellRows) -> np.ndarray:
        """Vocabulary index of each column of the batch's file (-1: no match), looked up once per file."""
        return self._columns(rows.reader)[0]

    def _columns(self, reader: Any) -> tuple[np.ndarray, np.ndarray]:
        """(vocabulary index per reader column, whether another column names the same vocabulary gene)."""
        key = (str(reader.path), reader.gene_key, len(reader.columns), hash(reader.columns.tobytes()))
        if self._index is None or self._index[0] != key:
            index = self.featurizer.lookup(list(reader.gene_names[reader.columns]))
            named = index[index >= 0]
            repeated = np.bincount(named, minlength=self.featurizer.vocab_size) > 1
            self._index = (key, index, (index >= 0) & repeated[np.maximum(index, 0)])
        return self._index[1], self._index[2]

    def read_pool(
        self, reader: Any, pool: Sequence[Sequence[int]]
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor] | None, list[Reject]]]:
        """(ids, padded batch or None, rejects) of each batch of ``pool``, reading the pool's rows at once.

        The compiled path (``kiban.data.cell_kernel``: two calls for the whole pool) where it applies;
        the numpy path (``read_batch`` and ``__call__``) otherwise, and for any batch the kernel sends
        back. Both give the same output.
        """
        library = cell_kernel.kernel() if self._native_applies() else None
        flat = [i for batch in pool for i in batch]
        entries = (
            reader.read_entries(flat) if library is not None and hasattr(reader, "read_entries") else None
        )
        if entries is None:
            yield from featurize_pool(self, reader, pool)
            return
        bounds = np.concatenate([[0], np.cumsum([len(batch) for batch in pool])]).tolist()
        done = cell_kernel.featurize(library, entries, self._file_maps(reader), self.featurizer, bounds)
        code = done.code
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if i in done.sent_back:  # a row only the numpy path can vouch for
                self.numpy_batches += 1
                yield self(reader.read_batch(pool[i]))
                continue
            problems: dict[int, Reject] = {}
            for offset in np.flatnonzero(code[lo:hi]).tolist():
                row = int(entries.rows[lo + offset])
                if code[lo + offset] == REFUSED:  # the featurizer's refusal, in its own words
                    problems[offset] = self._refusal(reader.read_batch([row]), 0)
                else:
                    problems[offset] = reader.problem_reject(row, int(code[lo + offset]))
            rejects = [problems[offset] for offset in sorted(problems)]
            batch = done.batches[i]
            if batch is None:
                yield [], None, rejects
                continue
            good = np.flatnonzero(code[lo:hi] == 0) + lo
            yield [str(name) for name in reader.obs_names[entries.rows[good]]], batch, rejects

    def _native_applies(self) -> bool:
        f = self.featurizer
        return not f.include_zeros and f.tokenization in ("binning", "rank")

    def _file_maps(self, reader: Any) -> cell_kernel.ColumnMaps:
        """The kernel's per-column arrays over the file's raw columns (made with the column index)."""
        index, repeated = self._columns(reader)
        if self._maps is None or self._maps[0] is not self._index:
            gene = np.full(reader.n_vars, -2, dtype=np.int32)
            gene[reader.columns] = index
            flags = np.zeros(reader.n_vars, dtype=np.uint8)
            flags[reader.columns] = repeated
            useful = np.zeros(reader.n_vars, dtype=np.uint8)
            useful[reader.columns] = reader.matched[reader.columns]
            self._maps = (self._index, cell_kernel.ColumnMaps(gene, flags, useful))
        return self._maps[1]

    def __call__(self, rows: CellRows) -> tuple[list[str], dict[str, torch.Tensor] | None, list[Reject]]:
        """(ids, padded batch or None, rejects in batch order) of one batch of cells."""
        f = self.featurizer
        matrix = rows.matrix
        n = matrix.shape[0]
        lengths = np.diff(matrix.indptr).astype(np.int64)
        row_of = np.repeat(np.arange(n), lengths)
        values = matrix.data.astype(np.float64)
        index, repeated = self._columns(rows.reader)
        hit = index[matrix.indices] if matrix.nnz else np.zeros(0, dtype=np.int64)

        # a vocabulary gene named by several columns: the cell's first entry for it counts, the others
        # are repeats (as the per-cell matcher, which sees only the cell's own genes, counts them)
        gene = hit.copy()
        if repeated.any() and matrix.nnz:  # only entries of genes named by several columns can be repeats
            shared = np.flatnonzero(repeated[matrix.indices])
            _, first = np.unique(row_of[shared] * f.vocab_size + hit[shared], return_index=True)
            gene[shared] = -1
            gene[shared[first]] = hit[shared[first]]
        n_matched = np.bincount(row_of[gene >= 0], minlength=n)
        n_unmatched = np.bincount(row_of[hit < 0], minlength=n)
        totals = row_sums(values, matrix.indptr)
        keep = gene >= 0
        if not f.include_zeros:
            keep &= values > 0
        n_kept = np.bincount(row_of[keep], minlength=n)

        # cells the per-cell featurizer refuses: let it say why, in its own words
        refused = (rows.code == 0) & ((n_matched == 0) | (totals <= 0) | (n_kept == 0))
        problems: dict[int, Reject] = dict(
            zip(np.flatnonzero(rows.code).tolist(), rows.rejects(), strict=True)
        )
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
        """gene_ids, value_ids, mask [n, N] from the kept entries (cell r ascending, vocabulary gene g, value v).

        The entries are laid out as one row per cell ([n, longest], padded), so that every sort is a
        sort of each row on its own (``axis=1``): short, cache-resident, no key spanning the batch.
        """
        f = self.featurizer
        counts = np.bincount(r, minlength=n)
        width = int(counts.max())
        column = np.arange(len(r)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[r]
        real = np.arange(width)[None, :] < counts[:, None]
        values = np.zeros((n, width))
        values[r, column] = v
        # genes sort as unsigned 16-bit keys where the vocabulary allows (numpy's radix sort), padding last
        genes = np.full((n, width), f.vocab_size, dtype=np.uint16 if f.vocab_size < 2**16 else np.int64)
        genes[r, column] = g
        keep = min(width, f.max_genes)
        if f.tokenization == "binning":
            bins = self._bins(values, n_bins=f.n_bins)
            # the top max_genes by value (ties to the earlier gene) where a cell has more, then gene order
            if width > f.max_genes:
                chosen = _top(np.where(real, values, -np.inf), genes, keep)
                chosen = np.take_along_axis(
                    chosen, np.argsort(np.take_along_axis(genes, chosen, 1), axis=1, kind="stable"), 1
                )
            else:
                chosen = np.argsort(genes, axis=1, kind="stable")
            body_values = np.take_along_axis(bins, chosen, 1)
        else:
            score = values * scale[:, None]
            if f.gene_medians is not None:
                score = score / f.gene_medians[np.where(real, genes, 0)]
            chosen = _top(np.where(real, score, -np.inf), genes, keep)
            body_values = None
        body_genes = np.take_along_axis(genes, chosen, 1).astype(np.int64)
        taken = np.minimum(counts, f.max_genes)
        body = np.arange(keep)[None, :] < taken[:, None]
        head = 1 if f.cls_id is not None else 0
        tail = 1 if (f.eos_id is not None and body_values is None) else 0
        lengths = taken + head + tail
        size = head + tail + keep
        gene_ids = np.full((n, size), f.pad_id, dtype=np.int64)
        gene_ids[:, head : head + keep] = np.where(body, f.token_ids[np.where(body, body_genes, 0)], f.pad_id)
        if head:
            gene_ids[:, 0] = f.cls_id
        if tail:
            gene_ids[np.arange(n), lengths - 1] = f.eos_id
        mask = np.arange(size)[None, :] < lengths[:, None]
        if body_values is not None:
            value_ids = np.zeros((n, size), dtype=np.int64)
            value_ids[:, head : head + keep] = np.where(body, body_values, 0)
            if head:
                value_ids[:, 0] = f.n_bins  # n_bins = "no value" (CLS)
        else:
            value_ids = np.where(mask, np.arange(size)[None, :], 0)  # rank position; CLS is position 0
        return {
            "gene_ids": torch.from_numpy(gene_ids),
            "value_ids": torch.from_numpy(value_ids),
            "mask": torch.from_numpy(mask),
        }

    @staticmethod
    def _bins(values: np.ndarray, *, n_bins: int) -> np.ndarray:
        """ScGPT's value bins (``bin_values`` per cell) of [cells, longest] values (0: padding or not expressed).

        Edges at each cell's quantiles of its expressed values, by numpy's own "linear" formula over the
        cell's sorted values; a value's bin is the number of edges at or below it (``np.digitize``),
        read off the sorted row: edge j sits between sorted positions lo_j and lo_j + 1, so the values
        below it are the first lo_j + 1 (or, where the edge equals the value at lo_j, the values before
        that value's run of ties).
        """
        n, width = values.shape
        expressed = values > 0
        size = expressed.sum(axis=1)
        order = np.argsort(np.where(expressed, values, np.inf), axis=1)  # expressed first, ascending
        ordered = np.take_along_axis(values, order, 1)
        # np.quantile(values, linspace(0, 1, n_bins - 1)), method "linear", numpy's own arithmetic:
        # virtual index (n - 1) * q, neighbours floor and floor + 1 (the last value at or past the end),
        # then _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) where t >= 0.5
        q = np.linspace(0.0, 1.0, n_bins - 1)
        last = np.maximum(size - 1, 0)[:, None]
        virtual = last * q[None, :]
        below = np.floor(virtual)
        past = virtual >= last
        lo = np.where(past, last, below).astype(np.int64)
        hi = np.where(past, last, below + 1).astype(np.int64)
        gamma = np.where(past, virtual + 1, virtual - below)
        a = np.take_along_axis(ordered, lo, 1)
        b = np.take_along_axis(ordered, hi, 1)
        diff = b - a
        edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
        # how many of the cell's values lie below each edge
        position = np.arange(width)[None, :]
        run_start = np.zeros((n, width), dtype=np.int64)
        run_start[:, 1:] = np.where(ordered[:, 1:] != ordered[:, :-1], position[:, 1:], 0)
        run_start = np.maximum.accumulate(run_start, axis=1)
        below_edge = np.where(edges > a, lo + 1, np.take_along_axis(run_start, lo, 1))
        between = (edges == a) | ((edges > a) & (edges <= b))  # numpy's lerp stays between its ends
        odd = np.flatnonzero(~between.all(axis=1) & (size > 0))
        for row in odd.tolist():  # never seen; counted directly so that the result stays exact
            below_edge[row] = (ordered[row, : size[row], None] < edges[row][None, :]).sum(axis=0)
        # bin of sorted position k = number of edges with below_edge <= k
        slots = (np.arange(n)[:, None] * (width + 1) + below_edge).ravel()
        tally = np.bincount(slots, minlength=n * (width + 1)).reshape(n, width + 1)
        ranked = np.cumsum(tally[:, :width], axis=1)
        ranked[position >= size[:, None]] = 0  # not expressed (or padding): bin 0
        bins = np.empty_like(ranked)
        np.put_along_axis(bins, order, ranked, 1)
        return bins

    # -- bookkeeping ------------------------------------------------------------------------------

    def _refusal(self, rows: CellRows, offset: int) -> Reject:
        record = rows.record(offset)
        try:
            self.featurizer(record.item, item_id=record.id)
        except InvalidInput as error:
            return Reject(record.id, record.location, f"invalid {error.modality} input", str(error))
        raise AssertionError(f"the cell featurizer accepted {record.id}, which the batch featurizer refused")


def _top(score: np.ndarray, genes: np.ndarray, k: int) -> np.ndarray:
    """[cells, k] positions of each row's k highest scores, highest first, ties to the earlier gene.

    Each row is ordered by its genes first, then stably by descending score: the per-cell featurizer's
    ``lexsort((gene, -score))``, row by row. Padding scores -inf and comes last.
    """
    by_gene = np.argsort(genes, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(score, by_gene, 1), axis=1, kind="stable")
    return np.take_along_axis(by_gene, by_score[:, :k], 1)


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

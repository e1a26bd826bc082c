"""The compiled path of ``CellBatchFeaturizer``: tokens straight from a file's CSR entries.

``cell_tokens.cpp`` (built on first use by ``kiban.native``) does per row what the numpy path does
per batch — the reader's checks (NaN, negative, no expressed gene), the gene match with repeats,
the total, scGPT's bins or Geneformer's ranks, the top ``max_genes`` — with counting and radix sorts
of each row's few hundred entries instead of numpy passes over [cells, longest] arrays. It reads the rows
where they lie in the pool's arrays (``CellEntries``: no CSR matrix is built, no row is copied),
so reading and featurizing a shuffled batch costs a few microseconds a cell.

The output is the numpy path's, bit for bit (``tests/data/test_cell_kernel.py`` and
``test_data_cell_batches.py`` compare both with the per-cell featurizer on the same files). Where the kernel cannot vouch for that — unsorted or repeated column indices, a
total whose rounding could depend on the order of adding, quantile edges out of order — it says so
(code 6) and the batch takes the numpy path. ``KIBAN_NATIVE=off``, no compiler, a featurizer that
keeps zeros, or a reader that normalises or log-transforms: the numpy path throughout.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.native import load

__all__ = ["CellEntries", "ColumnMaps", "Featurized", "NEEDS_NUMPY", "featurize", "kernel"]

NEEDS_NUMPY = 6  # the row code that sends a batch to the numpy path

# cell_batches' parameters, in order: p pointer, I int64, i int, d double (see cell_tokens.cpp)
_SIGNATURE = "ppipppIIpppIiIpIIpIIIpdppppppppppppi"
_TYPES = {"p": ctypes.c_void_p, "I": ctypes.c_int64, "i": ctypes.c_int, "d": ctypes.c_double}


@dataclass(frozen=True)
class CellEntries:
    """Rows of one file as spans of the arrays read for them: what ``H5adReader.read_entries`` returns.

    rows: the file row of each batch row. data (float32) / indices (int32 or int64): the entries read
    (raw: not preprocessed, stored zeros and all); batch row i is data[starts[i]:ends[i]].
    """

    rows: np.ndarray
    data: np.ndarray
    indices: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def take(self, start: int, stop: int) -> CellEntries:
        """Batch rows [start, stop), sharing the arrays."""
        return CellEntries(
            self.rows[start:stop], self.data, self.indices, self.starts[start:stop], self.ends[start:stop]
        )


def kernel() -> ctypes.CDLL | None:
    """The built library, or None where the numpy path is used."""
    library = load(Path(__file__).with_name("cell_tokens.cpp"))
    if library is not None and not getattr(library, "_kiban_typed", False):
        library.cell_batches.argtypes = [_TYPES[c] for c in _SIGNATURE]
        library.cell_batches.restype = None
        library._kiban_typed = True
    return library


def _threads(batches: int) -> int:
    """Threads for a call: PyTorch's intra-op threads (1 in DataLoader workers), at most one per batch."""
    return max(1, min(torch.get_num_threads(), batches))


def _ptr(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


@dataclass(frozen=True)
class ColumnMaps:
    """Per file column: vocabulary index (-1 no match, -2 left out by the reader), repeated, useful."""

    gene: np.ndarray  # int32
    repeated: np.ndarray  # uint8: another column names the same vocabulary gene
    useful: np.ndarray  # uint8: kept by the reader and in the reader's vocabulary (its "expressed" test)


@dataclass(frozen=True)
class Featurized:
    """``cell_batches`` of a pool: per row its code and counts; per batch its padded tensors.

    batches[b]: gene_ids, value_ids, mask (and profile_index / profile_values) of batch b's usable rows
    (code 0), or None where it has none or where a row sent it to the numpy path (``b in sent_back``).
    """

    code: np.ndarray  # int8 per row (see cell_tokens.cpp)
    matched: np.ndarray  # n_genes_matched
    unmatched: np.ndarray  # n_genes_unmatched
    batches: list[dict[str, torch.Tensor] | None]
    sent_back: set[int]


def featurize(
    library: ctypes.CDLL,
    entries: CellEntries,
    maps: ColumnMaps,
    featurizer: Any,
    bounds: Sequence[int],
) -> Featurized:
    """The tokens of every batch [bounds[b], bounds[b + 1]) of ``entries``' rows, in one call."""
    f = featurizer
    n = len(entries.rows)
    n_batches = len(bounds) - 1
    lengths = entries.ends - entries.starts
    rank = f.tokenization != "binning"
    extra = (1 if f.cls_id is not None else 0) + (1 if (f.eos_id is not None and rank) else 0)
    # each batch's buffers hold its rows at the widest they could be (every stored entry kept); the
    # kernel writes the usable rows at their batch's real width from the start
    sizes = np.diff(bounds)
    longest = np.maximum.reduceat(lengths, bounds[:-1]) if n else np.zeros(0, dtype=np.int64)
    capacity = (np.minimum(longest, f.max_genes) + extra).astype(np.int64)
    blocks = [_Block(rows, rows * room) for rows, room in zip(sizes.tolist(), capacity.tolist(), strict=True)]
    gene_buffers, value_buffers, mask_buffers = (
        np.array([block.address(part) for block in blocks], dtype=np.int64)
        for part in ("genes", "values", "mask")
    )
    profile_offset = profile_index = profile_scaled = None
    if f.profile:
        profile_offset = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=profile_offset[1:])
        profile_index = np.empty(int(lengths.sum()), dtype=np.int64)
        profile_scaled = np.empty(int(lengths.sum()), dtype=np.float64)
    q = np.linspace(0.0, 1.0, f.n_bins - 1)  # numpy's own quantile points, as bin_values takes them
    medians = None if f.gene_medians is None else np.ascontiguousarray(f.gene_medians, dtype=np.float64)
    token_ids = np.ascontiguousarray(f.token_ids, dtype=np.int64)
    width = np.empty(n_batches, dtype=np.int64)
    code = np.empty(n, dtype=np.int8)
    matched, unmatched, total = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n)
    bounds_array = np.asarray(bounds, dtype=np.int64)
    library.cell_batches(
        _ptr(entries.data), _ptr(entries.indices), entries.indices.itemsize, _ptr(entries.starts),
        _ptr(entries.ends), _ptr(bounds_array), n_batches, len(maps.gene), _ptr(maps.gene), _ptr(maps.repeated),
        _ptr(maps.useful), f.vocab_size, 1 if rank else 0, f.n_bins, _ptr(q), len(q), f.max_genes,
        _ptr(token_ids), -1 if f.cls_id is None else f.cls_id, -1 if f.eos_id is None else f.eos_id, f.pad_id,
        _ptr(medians), float(f.target_sum), _ptr(capacity), _ptr(gene_buffers), _ptr(value_buffers),
        _ptr(mask_buffers), _ptr(profile_offset), _ptr(profile_index), _ptr(profile_scaled), _ptr(width),
        _ptr(code), _ptr(matched), _ptr(unmatched), _ptr(total), _threads(n_batches),
    )  # fmt: skip
    batches: list[dict[str, torch.Tensor] | None] = []
    sent_back = set(np.flatnonzero(width < 0).tolist())
    for b, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if width[b] <= 0:
            batches.append(None)
            continue
        good = np.flatnonzero(code[lo:hi] == 0) + lo
        batch = blocks[b].batch(len(good), int(width[b]), matched[good], unmatched[good])
        if f.profile:
            batch["profile_index"], batch["profile_values"] = _profile(
                profile_offset, profile_index, profile_scaled, matched[good], good
            )
        batches.append(batch)
    return Featurized(code, matched, unmatched, batches, sent_back)


class _Block:
    """One batch's tensors in two storages: gene_ids, value_ids, n_genes_matched, n_genes_unmatched
    (int64) in one, mask in the other.

    A DataLoader worker hands each storage to the main process through its own file descriptor; two
    storages a batch instead of five took two workers from 8.9k to 14k cells/s here. (One storage
    would be cheaper still, but ``torch.save`` refuses tensors that view one storage as two types.)
    """

    def __init__(self, rows: int, elements: int) -> None:
        self.rows, self.elements = rows, elements
        self.numbers = torch.empty(2 * elements + 2 * rows, dtype=torch.int64)
        self.mask = torch.empty(elements, dtype=torch.bool)

    def address(self, part: str) -> int:
        """Where the kernel writes ``part`` (rows at the batch's width, from the start)."""
        if part == "mask":
            return self.mask.data_ptr()
        return self.numbers.data_ptr() + 8 * (self.elements if part == "values" else 0)

    def batch(
        self, rows: int, width: int, matched: np.ndarray, unmatched: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """The tensors of the ``rows`` usable rows written at ``width``, with their match counts."""
        used, e = rows * width, self.elements
        counts = self.numbers[2 * e : 2 * e + 2 * rows].view(2, rows)
        counts[0].copy_(torch.from_numpy(matched))
        counts[1].copy_(torch.from_numpy(unmatched))
        return {
            "gene_ids": self.numbers[:used].view(rows, width),
            "value_ids": self.numbers[e : e + used].view(rows, width),
            "mask": self.mask[:used].view(rows, width),
            "n_genes_matched": counts[0],
            "n_genes_unmatched": counts[1],
        }


def _profile(
    offset: np.ndarray, index: np.ndarray, scaled: np.ndarray, counts: np.ndarray, good: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """profile_index / profile_values of rows ``good``: every kept gene in column order, log1p of its scaled value."""
    longest = int(counts.max())
    entry = np.repeat(offset[good] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(
        counts.sum()
    )
    filled = np.arange(longest)[None, :] < counts[:, None]
    genes = np.zeros((len(good), longest), dtype=np.int64)
    values = np.zeros((len(good), longest), dtype=np.float32)
    genes[filled] = index[entry]
    values[filled] = np.log1p(scaled[entry]).astype(np.float32)
    return torch.from_numpy(genes), torch.from_numpy(values)

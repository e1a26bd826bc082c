"""1-D HDF5 datasets read with ``os.preadv`` straight into numpy arrays, for the cell stream's hot path.

A shuffled minibatch of cells reads a few spans of a CSR matrix's ``data`` and ``indices``. Through
h5py each span costs HDF5's chunk machinery (a chunk cache, a copy, a type conversion): about
6.7 µs a cell for spans of 256 cells, against 1.8 µs for reading the same bytes with ``preadv``
(benchmarks/README.md, "Data loading"). When a dataset is stored without filters (no compression,
no shuffle, no checksum), as anndata writes by default, every element's place in the file follows
from the dataset's layout: one offset for a contiguous dataset, one per chunk for a chunked one.
``DirectArray.of`` reads that layout once and returns None for anything else (filters, compact
storage, chunks never written, more than one dimension), where h5py keeps reading.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["DirectArray"]

_CONTIGUOUS, _CHUNKED = 1, 2  # H5D_CONTIGUOUS, H5D_CHUNKED


class DirectArray:
    """Element ranges of one unfiltered 1-D HDF5 dataset, read by file offset. Picklable (reopens)."""

    def __init__(self, path: str, dtype: np.dtype, length: int, chunk: int, addresses: np.ndarray) -> None:
        self.path, self.dtype, self.length, self.chunk = path, dtype, length, chunk
        self.addresses = addresses  # byte offset of each chunk (one "chunk" spanning a contiguous dataset)
        self._fd: int | None = None
        self._pid = os.getpid()

    @classmethod
    def of(cls, dataset: Any) -> DirectArray | None:
        """A direct reader of the h5py ``dataset``, or None where its layout does not allow one."""
        plist = dataset.id.get_create_plist()
        if dataset.ndim != 1 or plist.get_nfilters() or dataset.dtype.kind not in "iuf":
            return None
        length = int(dataset.shape[0])
        layout = plist.get_layout()
        if layout == _CONTIGUOUS:
            offset = dataset.id.get_offset()
            if offset is None:  # never written (or empty)
                return None
            return cls(dataset.file.filename, dataset.dtype, length, max(length, 1), np.array([offset]))
        if layout != _CHUNKED:
            return None
        chunk = int(dataset.chunks[0])
        found: list[tuple[int, int]] = []
        try:
            dataset.id.chunk_iter(lambda info: found.append((info.chunk_offset[0], info.byte_offset)))
        except (AttributeError, RuntimeError):  # HDF5 before 1.12.3: one query per chunk
            found = [
                (info.chunk_offset[0], info.byte_offset)
                for info in map(dataset.id.get_chunk_info, range(dataset.id.get_num_chunks()))
            ]
        if len(found) != -(-length // chunk):  # a chunk never written reads as the fill value
            return None
        found.sort()
        return cls(dataset.file.filename, dataset.dtype, length, chunk, np.array([a for _, a in found]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, lo: int, hi: int, dtype: Any = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [lo, hi), as ``dtype`` (default: the stored type, in native byte order).

        out: an array of hi - lo elements to read into (a slice of a larger buffer), used where its
        type is the stored one; the result is returned either way.
        """
        if not 0 <= lo <= hi <= self.length:
            raise IndexError(f"[{lo}, {hi}) is outside the {self.length} elements of {self.path}")
        if out is None or out.dtype != self.dtype or out.shape != (hi - lo,):
            target = np.empty(hi - lo, dtype=self.dtype)
        else:
            target = out
        result = self._read_into(lo, hi, target)
        if dtype is not None and result.dtype != dtype:
            result = result.astype(dtype)
        if out is not None and result is not out:
            out[...] = result
            return out
        return result

    def _read_into(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        view = memoryview(out.view(np.uint8))
        size, fd = self.dtype.itemsize, self._descriptor()
        position = lo
        while position < hi:
            chunk = position // self.chunk
            stop = min(hi, (chunk + 1) * self.chunk)
            start_byte = (position - lo) * size
            target = view[start_byte : (stop - lo) * size]
            offset = int(self.addresses[chunk]) + (position - chunk * self.chunk) * size
            while len(target):  # a regular file may still return fewer bytes than asked
                got = os.preadv(fd, [target], offset)
                if got <= 0:
                    raise OSError(f"{self.path} ends before element {stop} of a dataset (truncated?)")
                target, offset = target[got:], offset + got
            position = stop
        return out if self.dtype.isnative else out.astype(self.dtype.newbyteorder("="))

    def close(self) -> None:
        """Close the descriptor (only in the process that opened it)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.close()

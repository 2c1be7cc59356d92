"""The raw feature file of a gallery index: ``rows x dim`` values of one dtype (float32 or float16), row after row,
no header (the manifest, ``gallery_index``, says what it holds).

``FeatureFile.chunks`` converts it, chunk by chunk of rows, into one float32 buffer that it reuses, reading the rows
from a read-only memory map and dropping the mapped pages of each chunk after it (``madvise(MADV_DONTNEED)``): the
memory that a search over it takes is that buffer's, whatever the number of rows (the file's pages stay in the page
cache, which the kernel gives back when it needs them, and are no part of the process's resident size). Reading
through the map saves the copy that ``pread`` makes: the conversion reads the page cache itself. Row lookups
(``gather``) and raw copies (``read_raw``) use ``os.preadv``. ``FeatureWriter`` appends rows. A row range
``[start, stop)`` is all that a reader needs: a shard of the gallery is a row range of one file."""
from __future__ import annotations

import math
import mmap
import os
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SUFFIX = {"float32": "f32", "float16": "f16"}  # the feature file's name ends so
READ_CHUNK_BYTES = 4 << 20  # bytes of stored rows converted at a time: the chunk and its float32 copy stay in cache
ROW_ALIGN = 64  # a chunk's rows are a multiple of this: every column of a chunk's matmul takes the same kernel path


class IndexDamaged(Exception):
    """A feature file that does not hold what its manifest says (a wrong size, values that are not finite)."""


def check_similarities(sims: torch.Tensor, first_row: int) -> None:
    """Raises ``IndexDamaged`` naming the rows when the similarities (Q, C) of the rows ``first_row ...`` are not
    all finite: a stored row holding NaN or infinity gives a NaN or infinite similarity with every query (0 x inf
    is NaN), and a finite unit row gives a finite one. One sum (the similarities are at most 1 in magnitude, so it
    cannot overflow); the rows are found only when it is not finite."""
    if math.isfinite(float(sims.sum())):
        return
    bad = (torch.nonzero(~torch.isfinite(sims).all(dim=0)).flatten() + first_row).tolist()
    raise IndexDamaged(f"'features' hold NaN or infinite values in row{'s' * (len(bad) > 1)} "
                       f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}")


class FeatureFile:
    """Read access to the feature file ``path`` of ``rows`` rows of ``dim`` values of ``dtype``.

    ``exact_size``: the file holds exactly those rows (a committed index); otherwise it may hold more bytes after
    them (a build that was stopped while it wrote), which are never read. A wrong size raises ``IndexDamaged``."""

    def __init__(self, path: str, rows: int, dim: int, dtype: str, chunk_bytes: int = READ_CHUNK_BYTES,
                 exact_size: bool = True) -> None:
        self.path, self.rows, self.dim, self.dtype = path, int(rows), int(dim), dtype
        self.np_dtype = DTYPES[dtype]
        self.row_bytes = self.dim * self.np_dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        if size < self.rows * self.row_bytes or (exact_size and size != self.rows * self.row_bytes):
            os.close(self.fd)
            raise IndexDamaged(f"the feature file {os.path.basename(path)} holds {size // self.row_bytes} rows "
                               f"for {self.rows} files")
        per_chunk = max(ROW_ALIGN, int(chunk_bytes) // self.row_bytes // ROW_ALIGN * ROW_ALIGN)
        self.rows_per_chunk = min(per_chunk, -(-max(self.rows, 1) // ROW_ALIGN) * ROW_ALIGN)
        self._map: mmap.mmap | None = None  # the rows, mapped on the first ``chunks``
        self._mapped: torch.Tensor | None = None  # (rows, dim) of dtype: a view of the map, never written
        self._raw: np.ndarray | None = None  # (rows_per_chunk, dim) of dtype: read_raw's buffer
        self._f32: torch.Tensor | None = None  # (rows_per_chunk, dim) fp32: chunks' buffer

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the reader's buffers: the float32 chunk of ``chunks`` and the raw chunk of ``read_raw``,
        each made on first use."""
        return (self._f32.numel() * 4 if self._f32 is not None else 0) + (
            self._raw.nbytes if self._raw is not None else 0)

    def close(self) -> None:
        """Closes the file and its memory map."""
        if self._map is not None:
            self._mapped = None
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pread(self, out: np.ndarray, row: int) -> None:
        """Fills ``out`` (n, dim) with the rows from ``row`` on."""
        view, offset = memoryview(out.reshape(-1).view(np.uint8)), row * self.row_bytes
        while len(view):
            got = os.preadv(self.fd, [view], offset)
            if got <= 0:
                raise IndexDamaged(f"the feature file {os.path.basename(self.path)} ends at byte {offset}")
            view, offset = view[got:], offset + got

    def read_raw(self, start: int, n: int) -> np.ndarray:
        """Rows ``[start, start + n)`` (n <= rows_per_chunk) as stored, (n, dim): a view of the reused buffer,
        valid until the next read."""
        if self._raw is None:
            self._raw = np.empty((self.rows_per_chunk, self.dim), dtype=self.np_dtype)
        out = self._raw[:n]
        self._pread(out, start)
        return out

    def _map_rows(self) -> torch.Tensor:
        if self._mapped is None:
            self._map = mmap.mmap(self.fd, self.rows * self.row_bytes, prot=mmap.PROT_READ)
            with warnings.catch_warnings():  # the map is read-only, and the tensor is only read
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(self._map, dtype=TORCH_DTYPES[self.dtype], count=self.rows * self.dim)
            self._mapped = flat.view(self.rows, self.dim)
        return self._mapped

    def _drop_pages(self, start: int, stop: int) -> None:
        """Unmaps the resident pages of the rows ``[start, stop)`` (they stay in the page cache)."""
        first = start * self.row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, first, stop * self.row_bytes - first)

    def chunks(self, start: int = 0, stop: int | None = None,
               padded: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows (C, dim) float32)`` for the rows ``[start, stop)`` in chunks of ``rows_per_chunk``;
        each tensor is a view of the reused buffer, valid until the next chunk. ``padded``: every tensor has
        ``rows_per_chunk`` rows, zero after the last one asked for (a matmul of one shape for every chunk). The
        values are not checked: a caller finds a non-finite row in its similarities (``check_similarities``)."""
        stop = self.rows if stop is None else min(stop, self.rows)
        if stop <= start:
            return
        mapped = self._map_rows()
        if self._f32 is None:
            self._f32 = torch.zeros(self.rows_per_chunk, self.dim, dtype=torch.float32)  # (rows_per_chunk, D)
        for row in range(start, stop, self.rows_per_chunk):
            n = min(self.rows_per_chunk, stop - row)
            self._f32[:n].copy_(mapped[row:row + n])  # (n, D) converted to float32
            self._drop_pages(row, row + n)
            if padded and n < self.rows_per_chunk:
                self._f32[n:].zero_()
            yield row, (self._f32 if padded else self._f32[:n])

    def gather(self, ids: Sequence[int], check_finite: bool = True) -> torch.Tensor:
        """The rows ``ids`` (n,) as a new float32 tensor (n, dim), in the order given; consecutive ids are read
        with one call."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=self.np_dtype)
        if len(ids):
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            breaks = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
            staged = np.empty_like(out)
            for run in np.split(np.arange(len(ids)), breaks):
                self._pread(staged[run[0]:run[-1] + 1], int(sorted_ids[run[0]]))
            out[order] = staged
        if check_finite and not np.isfinite(out).all():
            bad = sorted(int(i) for i in ids[~np.isfinite(out).all(axis=1)])
            raise IndexDamaged(f"'features' hold NaN or infinite values in row{'s' * (len(bad) > 1)} "
                               f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}")
        return torch.from_numpy(out).float()


class FeatureWriter:
    """Appends rows to the feature file ``path``, keeping its first ``rows`` rows (bytes after them are cut off;
    the file is made when missing). ``durable``: ``sync`` flushes the rows to the disk."""

    def __init__(self, path: str, dim: int, dtype: str, rows: int = 0, durable: bool = True) -> None:
        self.path, self.dim, self.dtype, self.durable = path, int(dim), dtype, durable
        self.np_dtype = DTYPES[dtype]
        self.row_bytes = self.dim * self.np_dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.rows = int(rows)
        os.ftruncate(self.fd, self.rows * self.row_bytes)

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        """Writes ``rows`` (n, dim), cast to the file's dtype, after the rows written so far."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must be (n, {self.dim}), got {rows.shape}")
        data = memoryview(np.ascontiguousarray(rows, dtype=self.np_dtype).reshape(-1).view(np.uint8))
        offset = self.rows * self.row_bytes
        while len(data):
            put = os.pwrite(self.fd, data, offset)
            data, offset = data[put:], offset + put
        self.rows += rows.shape[0]

    def sync(self) -> None:
        """The rows written so far reach the disk (``fsync``) when the writer is durable."""
        if self.durable:
            os.fsync(self.fd)

    def close(self) -> None:
        """Closes the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def memory_map(path: str, rows: int, dim: int, dtype: str) -> torch.Tensor:
    """The whole feature file as one (rows, dim) tensor of its dtype, memory-mapped copy-on-write: rows are read
    as they are touched, and touching every row makes the whole file resident (the search reads chunks with
    ``FeatureFile`` instead)."""
    if rows == 0:
        return torch.empty(0, dim, dtype=torch.float32 if dtype == "float32" else torch.float16)
    return torch.from_numpy(np.memmap(path, dtype=DTYPES[dtype], mode="c", shape=(rows, dim)))

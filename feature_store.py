"""The raw feature file of a gallery index: ``rows x dim`` values of one dtype (float32 or float16), row after row,
no header (the manifest, ``gallery_index``, says what it holds).

``FeatureFile`` reads it in chunks of rows with ``os.preadv`` into one buffer that it reuses, so the memory that a
search over it takes is that buffer's, whatever the number of rows (the pages it reads go to the page cache, which
the kernel gives back when it needs them, and are no part of the process's resident size); ``FeatureWriter``
appends rows to it. A row range ``[start, stop)`` is all that a reader needs: a shard of the gallery is a row range
of one file."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
SUFFIX = {"float32": "f32", "float16": "f16"}  # the feature file's name ends so
READ_CHUNK_BYTES = 16 << 20  # bytes of stored rows read at a time: 16 MiB stays in a CPU's last-level cache
ROW_ALIGN = 64  # a chunk's rows are a multiple of this: every column of a chunk's matmul takes the same kernel path


class IndexDamaged(Exception):
    """A feature file that does not hold what its manifest says (a wrong size, values that are not finite)."""


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
        self._raw: np.ndarray | None = None  # (rows_per_chunk, dim) of dtype: the read buffer, made on first use
        self._f32: torch.Tensor | None = None  # (rows_per_chunk, dim) fp32: float16 rows converted, reused

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the reader's buffers: the raw chunk and, for a float16 file, its float32 copy (a float32
        file is read straight into its float32 buffer)."""
        if self._f32 is None:
            return 0
        return self._f32.numel() * 4 + (self._raw.nbytes if self.np_dtype != np.float32 else 0)

    def close(self) -> None:
        """Closes the file."""
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

    def _make_buffers(self) -> None:
        self._f32 = torch.zeros(self.rows_per_chunk, self.dim, dtype=torch.float32)  # (rows_per_chunk, D)
        self._raw = self._f32.numpy() if self.np_dtype == np.float32 else \
            np.zeros((self.rows_per_chunk, self.dim), dtype=self.np_dtype)

    def read_raw(self, start: int, n: int) -> np.ndarray:
        """Rows ``[start, start + n)`` (n <= rows_per_chunk) as stored, (n, dim): a view of the reused buffer,
        valid until the next read."""
        if self._raw is None:
            self._make_buffers()
        out = self._raw[:n]
        self._pread(out, start)
        return out

    def chunks(self, start: int = 0, stop: int | None = None, check_finite: bool = True,
               padded: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows (C, dim) float32)`` for the rows ``[start, stop)`` in chunks of ``rows_per_chunk``;
        each tensor is a view of the reused buffer, valid until the next chunk. ``padded``: every tensor has
        ``rows_per_chunk`` rows, zero after the last one asked for (a matmul of one shape for every chunk).
        ``check_finite``: a chunk that holds NaN or infinity raises ``IndexDamaged``."""
        stop = self.rows if stop is None else min(stop, self.rows)
        for row in range(start, stop, self.rows_per_chunk):
            n = min(self.rows_per_chunk, stop - row)
            raw = self.read_raw(row, n)  # (n, D) as stored
            if self.np_dtype != np.float32:
                self._f32[:n].copy_(torch.from_numpy(raw))
            if padded and n < self.rows_per_chunk:
                self._f32[n:].zero_()
            if check_finite and not bool(torch.isfinite(self._f32[:n]).all()):
                raise IndexDamaged(f"'features' hold NaN or infinite values in rows {row}..{row + n - 1}")
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
        rows = torch.from_numpy(out).float()
        if check_finite and not bool(torch.isfinite(rows).all()):
            raise IndexDamaged("'features' hold NaN or infinite values")
        return rows


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

"""The float vectors of a compressed shard, on disk by HNSW offset: what the exact re-rank reads.

One file of unit-length float32 rows, row ``offset`` at byte ``offset * n_dim * 4``. Written with
``pwrite`` and ``fdatasync`` before the write is acknowledged; read through a memory map, so the
vectors a search re-ranks come from the page cache (or disk), not from the process's own memory,
and not by unpickling documents from RocksDB. Hand-written because no installed library keeps an
append-and-overwrite float file by row number: numpy's memmap cannot grow, faiss's on-disk
inverted lists store codes, not the rows a re-rank needs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

VECTOR_FILE = 'vectors.f32'


class VectorFile:
    """float32 rows by offset: ``write`` durably, ``read`` the rows of given offsets."""

    def __init__(self, folder: Path, n_dim: int):
        self.path = Path(folder) / VECTOR_FILE
        self.n_dim = n_dim
        self._row_bytes = n_dim * 4
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._map: np.ndarray = np.empty((0, n_dim), dtype=np.float32)
        self._map_lock = threading.Lock()

    @property
    def rows(self) -> int:
        return os.fstat(self._fd).st_size // self._row_bytes

    def write(self, offsets: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors[i]`` at row ``offsets[i]`` and make it durable (runs of rows in one call)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        offsets = np.asarray(offsets, dtype=np.int64)
        order = np.argsort(offsets, kind='stable')
        start = 0
        while start < len(order):  # consecutive offsets (the usual case: a batch appended) go in one pwrite
            end = start + 1
            while end < len(order) and offsets[order[end]] == offsets[order[end - 1]] + 1:
                end += 1
            rows = vectors[order[start:end]]
            os.pwrite(self._fd, rows.tobytes(), int(offsets[order[start]]) * self._row_bytes)
            start = end
        os.fdatasync(self._fd)

    def read(self, offsets: np.ndarray) -> np.ndarray:
        """The rows at ``offsets`` (any shape), as an array of shape ``offsets.shape + (n_dim,)``."""
        offsets = np.asarray(offsets, dtype=np.int64)
        mapped = self._map
        if offsets.size and int(offsets.max()) >= len(mapped):
            mapped = self._remap()
        return mapped[offsets]

    def _remap(self) -> np.ndarray:
        with self._map_lock:
            rows = self.rows
            if rows > len(self._map):
                self._map = np.memmap(self.path, dtype=np.float32, mode='r', shape=(rows, self.n_dim))
            return self._map

    def close(self) -> None:
        self._map = np.empty((0, self.n_dim), dtype=np.float32)
        os.close(self._fd)

"""Background compaction of a shard's HNSW graph: a new graph of the live documents, swapped in.

annlite's delete only marks a node deleted, and a replace (an update, a re-index) is a delete plus an
insert at a new offset, so every update leaves a node behind: the graph's memory grows, and inserts
slow down as their walk wades through deleted nodes (bench/updates.py). Neither annlite nor hnswlib
removes nodes, and hnswlib's reuse of deleted slots (``replace_deleted``) lost live documents from
search here (tests/test_updates.py). So the shard builds a new graph of its live documents in a
thread (hnswlib's ``add_items`` leaves the GIL: searches and writes go on meanwhile), catches it up
with the writes made during the build, and swaps it in under the write lock.

The new graph keeps every document's offset as its label, so annlite's tables and the PQ vector
file, which are keyed by offset, stay as they are. Offsets are never reused (the offset table's
``AUTOINCREMENT``): the documents written during the build are exactly the offsets in the table
that the new graph lacks, and the documents deleted during it the reverse.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable, Iterable, Optional

import numpy as np

from clip_search import shard_store

READ_CHUNK = 256  # float vectors read from the old graph per hold of the write lock: writes wait little
ADD_CHUNK = 2048  # vectors added to the new graph per hnswlib call
CATCH_UP_ROUNDS = 3  # catch-ups outside the write lock before the last one, under it


def check_setting(compact_deleted: Optional[float]) -> None:
    """Refuse, by name, a compaction share that is not a positive number (None: never compact)."""
    if compact_deleted is None:
        return
    if isinstance(compact_deleted, bool) or not isinstance(compact_deleted, (int, float)) or not compact_deleted > 0:
        raise ValueError(f'compact_deleted={compact_deleted!r} must be a number above 0 (or null: never compact)')


def is_due(index, compact_deleted: Optional[float]) -> bool:
    """Whether the graph's deleted nodes exceed ``compact_deleted`` times its documents."""
    if compact_deleted is None:
        return False
    documents = index.total_docs
    return int(index.vec_index(0)._index.element_count) - documents > compact_deleted * max(documents, 1)


class Rebuild:
    """A new graph of the live documents, built beside the shard's graph and caught up with its writes.

    ``write_lock`` is the shard's: the old graph is read under it, a chunk at a time, because a write
    may grow (reallocate) that graph; ``add_codes`` inserts unit vectors into a graph over PQ codes
    (``clip_search.pq.Compression``), and ``float_vectors`` reads them by offset from the vector file
    (None for a float graph, whose own vectors are read back).
    """

    def __init__(
        self,
        index,
        write_lock: threading.Lock,
        float_vectors: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        add_codes: Optional[Callable] = None,
    ):
        self.index = index
        self.old = index.vec_index(0)
        self.new = empty_graph_like(self.old)
        self.present = np.empty(0, dtype=np.int64)  # the labels of the new graph's live nodes, sorted
        self._write_lock = write_lock
        self._float_vectors = float_vectors
        self._add_codes = add_codes

    def build(self, stopped: Callable[[], bool]) -> int:
        """Add the documents indexed now; returns how many (``stopped()`` ends it early: the shard closes)."""
        with self._write_lock:
            offsets = shard_store.live_offsets(self.index)
        added = []
        for start in range(0, len(offsets), ADD_CHUNK):
            if stopped():
                return 0
            added.append(self._add(offsets[start : start + ADD_CHUNK]))
        self.present = np.sort(np.concatenate([self.present, *added]))
        return len(self.present)

    def catch_up(self, under_lock: bool = False) -> int:
        """Apply the writes made since the build (or the last catch-up); returns the changed offsets.

        Outside the write lock, the offsets are read under it and the slow part (inserting) runs
        without it; ``under_lock``: the caller holds it, and the new graph is then exactly current.
        """
        if under_lock:
            live = shard_store.live_offsets(self.index)
        else:
            with self._write_lock:
                live = shard_store.live_offsets(self.index)
        new = np.setdiff1d(live, self.present, assume_unique=True)
        removed = np.setdiff1d(self.present, live, assume_unique=True)
        for offset in removed.tolist():
            self.new._index.mark_deleted(offset)
        added = [self._add(new[start : start + ADD_CHUNK], locked=under_lock) for start in range(0, len(new), ADD_CHUNK)]
        self.present = np.union1d(np.setdiff1d(self.present, removed, assume_unique=True), np.concatenate([self.present[:0], *added]))
        return len(new) + len(removed)

    def swap_in(self) -> None:
        """Put the new graph in the old one's place (the caller holds the write lock). A search that
        began on the old graph finishes on it: nothing writes to it any more."""
        self.index._vec_indexes[0] = self.new
        self.old.__dict__.pop('add_with_ids', None)  # the shard's wrapper on it refers back to it: no cycle

    def _add(self, offsets: np.ndarray, locked: bool = False) -> np.ndarray:
        """Insert the documents at ``offsets`` into the new graph; returns the offsets inserted."""
        if self._float_vectors is not None:  # a graph over PQ codes: the vector file has every row
            if len(offsets):
                self._add_codes(self.new, self._float_vectors(offsets), offsets)
            return offsets
        unit, offsets = self._read_old_graph(offsets, locked)
        if len(offsets):
            shard_store.make_room(self.new, offsets)
            self.new._index.add_items(unit, ids=offsets, dtables=None)
        return offsets

    def _read_old_graph(self, offsets: np.ndarray, locked: bool) -> tuple[np.ndarray, np.ndarray]:
        """The old graph's (unit) vectors of ``offsets``, skipping any deleted meanwhile (the next
        catch-up sees them gone); returns the vectors and the offsets they belong to."""
        rows, kept = [], []
        for start in range(0, len(offsets), READ_CHUNK):
            chunk = offsets[start : start + READ_CHUNK]
            if locked:
                found = _items(self.old, chunk)
            else:
                with self._write_lock:
                    found = _items(self.old, chunk)
            for offset, row in found:
                kept.append(offset)
                rows.append(row)
        vectors = np.asarray(rows, dtype=np.float32).reshape(len(rows), self.old.dim)
        return vectors, np.asarray(kept, dtype=np.int64)


def _items(graph, offsets: Iterable[int]) -> list[tuple[int, list]]:
    """(offset, vector) of each offset the graph holds (hnswlib raises for a missing or deleted one)."""
    offsets = [int(offset) for offset in offsets]
    try:
        return list(zip(offsets, graph._index.get_items(offsets)))
    except RuntimeError:
        found = []
        for offset in offsets:
            try:
                found.append((offset, graph._index.get_items([offset])[0]))
            except RuntimeError:
                continue
        return found


def empty_graph_like(graph):
    """An empty annlite ``HnswIndex`` with ``graph``'s settings, codec and capacity, one thread."""
    from annlite.hnsw_bind import Index

    new = copy.copy(graph)
    new.__dict__.pop('add_with_ids', None)  # the shard's wrapper of the old graph's inserts
    new.__dict__.pop('_clip_search_lock', None)
    new._index = Index(space=graph.space_name, dim=graph.dim)
    new._index.init_index(
        max_elements=graph.capacity, ef_construction=graph.ef_construction, M=graph.max_connection, pq_codec=graph.pq_codec
    )
    new._set_backend_pq = graph.pq_codec is not None
    new._index.set_ef(graph.ef_search)
    new._index.set_num_threads(1)
    return new


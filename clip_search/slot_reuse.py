"""Reuse the graph slots of deleted documents, so that updates do not grow a shard.

annlite's delete only marks a document's HNSW node deleted, and its cell table lets SQLite pick a new
row id for every insert (``AUTOINCREMENT``; the node's label, the offset, is the row id - 1). A
replace is a delete plus an insert, so without reuse every update leaves a node behind, and the
graph, its snapshot and the float vector file (clip_search.vector_file, by offset) grow forever.

hnswlib's ``addPoint`` with a label already in the graph, even one marked deleted, unmarks it and
updates that node in place (the mechanism of hnswlib's ``replace_deleted``). So an insert here
takes the offsets of deleted rows first: it inserts those rows with an explicit row id, and annlite's
``add_with_ids`` then reuses their nodes. The free offsets are the graph's labels that no row of the
cell table holds; they are derived from the graph and the table whenever those are replaced
(``recompute``: snapshot load; emptied with the graph by a reset), and kept current by every delete
and insert in between.

Not in a graph over PQ codes (clip_search.pq): there the in-place update repairs each neighbour's
links by distances from the new point's PQ table (annlite's PQ distance reads only the query's
table), which rewires the neighbours around the new point; measured, most true neighbours were lost
after one round of updates (docs/design.md). A compressed graph keeps annlite's delete + insert,
and ``/status`` counts its deleted slots, which stay until a rebuild.

Hand-written because annlite 0.5.10 has no way to ask for it: its ``CellTable.insert`` always lets
SQLite choose the row ids, and its index never passes ``replace_deleted`` to hnswlib.
"""

from __future__ import annotations

import heapq


class FreeSlots:
    """The offsets in a shard's graph whose documents were deleted, lowest reused first."""

    def __init__(self, index):
        self._table = index.cell_table(0)
        self._graph = index.vec_index(0)
        self._free: list[int] = []  # a heap

    def __len__(self) -> int:
        return len(self._free)

    def recompute(self) -> None:
        """The graph's labels that no row of the cell table holds (after the graph or table were loaded)."""
        labels = {int(label) for label in self._graph._index.get_ids_list()}
        rows = {row for (row,) in self._table._conn.execute(f'SELECT _id - 1 FROM {self._table.name}')}
        self._free = sorted(labels - rows)  # a sorted list is a heap

    def clear(self) -> None:
        """The graph was emptied: no label exists, so none can be reused."""
        self._free = []

    def freed(self, offset: int) -> None:
        heapq.heappush(self._free, int(offset))

    def take(self, count: int) -> list[int]:
        if self._graph.pq_codec is not None:  # a graph over PQ codes: no in-place update (module note)
            return []
        return [heapq.heappop(self._free) for _ in range(min(count, len(self._free)))]

    def give_back(self, offsets: list[int]) -> None:
        for offset in offsets:
            heapq.heappush(self._free, offset)


def attach(index) -> FreeSlots:
    """Hook a ``FreeSlots`` into annlite's cell table (insert, delete) and graph (reset) of cell 0."""
    from annlite.storage.table import _converting

    slots = FreeSlots(index)
    table, graph = index.cell_table(0), index.vec_index(0)
    insert_new, delete_by_offset, reset_graph = table.insert, table.delete_by_offset, graph.reset

    def insert(docs, commit: bool = True) -> list[int]:
        """annlite's ``CellTable.insert``: the docs' offsets, in order; the first take free offsets."""
        reused = slots.take(len(docs))
        if not reused:
            return insert_new(docs, commit=commit)
        columns = table.columns  # _id, _doc_id, then the filter columns
        sql = f'INSERT INTO {table.name}({", ".join(columns)}) VALUES ({", ".join("?" * len(columns))})'
        rows = [
            (offset + 1, doc.id, *[_converting(doc.tags[c]) if c in doc.tags else None for c in columns[2:]])
            for offset, doc in zip(reused, docs)
        ]
        rest = docs[len(reused) :]
        try:
            with table._conn_lock:
                table._conn.executemany(sql, rows)
            offsets = reused + (insert_new(rest, commit=False) if len(rest) else [])
        except Exception:
            table._conn.rollback()
            slots.give_back(reused)
            raise
        if commit:
            table.commit()
        return offsets

    def delete_offset(offset: int) -> None:
        delete_by_offset(offset)
        slots.freed(offset)

    def reset(*args, **kwargs):
        reset_graph(*args, **kwargs)
        slots.clear()

    table.insert, table.delete_by_offset, graph.reset = insert, delete_offset, reset
    return slots

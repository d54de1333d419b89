"""The exact (brute-force) search a shard falls back on when annlite's graph walk cannot fill its
results: few documents pass a filter, or deletes left the walk short.

It never holds more of the shard than one chunk at a time: the candidates' ids come from annlite's
SQL table a page at a time, their embeddings from the document store a page at a time, a running
top-``limit`` is kept per query, and only the final ``limit`` documents per query are read whole
(with their thumbnails). Written here because annlite's ``filter`` reads every candidate document
whole, in one list.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
from docarray import Document, DocumentArray

CHUNK = 2048  # candidates read at a time: ids, embeddings (and, transiently, their documents' bytes)


def exact_search(
    index,
    queries: DocumentArray,
    search_filter: Optional[dict],
    limit: int,
    chunk: int = CHUNK,
    done: Optional[Callable[[Document], None]] = None,
) -> None:
    """Set each query's ``matches``: the ``limit`` documents passing ``search_filter`` closest by
    cosine distance (ties: the earlier indexed first), with ``scores['cosine']``. ``done`` gets each
    query as soon as its matches are set, before the next query's documents are read."""
    matrix = _unit_rows(np.asarray(queries.embeddings, dtype=np.float32).reshape(len(queries), -1))
    best_distances = np.empty((len(queries), 0), dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=object)
    store = index.doc_store(0)
    for ids in candidate_ids(index, search_filter, chunk):
        stored = store.get(ids)  # the chunk's documents; only their embeddings are kept
        vectors = _unit_rows(np.asarray(stored.embeddings, dtype=np.float32).reshape(len(stored), -1))
        distances = np.concatenate([best_distances, 1.0 - matrix @ vectors.T], axis=1)
        chunk_ids = np.asarray(list(stored[:, 'id']), dtype=object)
        candidates = np.concatenate([best_ids, np.broadcast_to(chunk_ids, (len(queries), len(chunk_ids)))], axis=1)
        order = np.argsort(distances, axis=1, kind='stable')[:, :limit]  # stable: the earlier candidate wins a tie
        best_distances = np.take_along_axis(distances, order, axis=1)
        best_ids = np.take_along_axis(candidates, order, axis=1)
    for query, ids, distances in zip(queries, best_ids, best_distances):
        matches = store.get(list(ids))
        for match, distance in zip(matches, distances):
            match.scores['cosine'].value = float(distance)
        query.matches = matches
        if done is not None:
            done(query)


def candidate_ids(index, search_filter: Optional[dict], chunk: int) -> Iterator[list[str]]:
    """The ids of the documents passing ``search_filter``, in indexing order, ``chunk`` at a time
    (keyset pages of annlite's cell table, so no cursor stays open across writes)."""
    from annlite.filter import Filter
    from annlite.storage.table import _converting

    table = index.cell_table(0)
    where, params = Filter(search_filter or {}).parse_where_clause()
    condition = f'({where}) AND ' if where else ''
    params = tuple(_converting(p) for p in params)
    last = 0
    while True:
        sql = f'SELECT _id, _doc_id FROM {table.name} WHERE {condition}_id > ? ORDER BY _id LIMIT {int(chunk)}'
        rows = table._conn.execute(sql, (*params, last)).fetchall()
        if not rows:
            return
        yield [doc_id for _, doc_id in rows]
        last = rows[-1][0]


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)

"""Updates and deletes leave the graph nodes of the old versions behind (annlite's delete only marks
them); /status reports them per shard as ``unreclaimed_slots``."""

from __future__ import annotations

import numpy as np
from docarray import Document, DocumentArray

from clip_search.executors.annlite_indexer import AnnLiteIndexer


def open_shard(workspace) -> AnnLiteIndexer:
    shard = AnnLiteIndexer(n_dim=4, metas={'workspace': str(workspace)})
    assert shard.wait_loaded(60)
    return shard


def docs(ids: list[str], seed: int) -> DocumentArray:
    vectors = np.random.default_rng(seed).normal(size=(len(ids), 4)).astype(np.float32)
    return DocumentArray(Document(id=i, embedding=v) for i, v in zip(ids, vectors))


def unreclaimed(shard: AnnLiteIndexer) -> tuple[int, int]:
    (entry,) = shard.status()[0].tags['shards']
    return int(entry['documents']), int(entry['unreclaimed_slots'])


def test_status_reports_the_graph_slots_that_updates_and_deletes_left_behind(tmp_path):
    shard = open_shard(tmp_path)
    shard.index(docs([f'u{i}' for i in range(10)], seed=1))
    assert unreclaimed(shard) == (10, 0)
    shard.update(docs(['u1', 'u2', 'u3'], seed=2), parameters={})
    assert unreclaimed(shard) == (10, 3)
    shard.delete(DocumentArray([Document(id='u4'), Document(id='u5')]), parameters={})
    assert unreclaimed(shard) == (8, 5)
    shard.close()
    assert unreclaimed(open_shard(tmp_path)) == (8, 5)  # the snapshot keeps them too

"""Updates and deletes leave the graph nodes of the old versions behind (annlite's delete only marks
them); /status reports them per shard as ``unreclaimed_slots``. These tests count them, so compaction
(tests/test_compaction.py) is off here. After a crash, updates and deletes
come back exactly as acknowledged, with and without PQ."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from docarray import Document, DocumentArray

from clip_search import faults
from clip_search.executors.annlite_indexer import REPLACE_JOURNAL, AnnLiteIndexer

DIM = 16
LOADED = r'loaded snapshot-\d+ \(\d+ documents\) and replayed \d+ changed ids'


def open_shard(workspace, **settings) -> AnnLiteIndexer:
    shard = AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(workspace)}, compact_deleted=None, **settings)
    assert shard.wait_loaded(60)
    return shard


def vectors(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def docs(ids: list[str], seed: int) -> DocumentArray:
    return DocumentArray(Document(id=i, text=f'{i} v{seed}', embedding=v) for i, v in zip(ids, vectors(len(ids), seed)))


def unreclaimed(shard: AnnLiteIndexer) -> tuple[int, int]:
    (entry,) = shard.status()[0].tags['shards']
    return int(entry['documents']), int(entry['unreclaimed_slots'])


def graph_nodes(shard: AnnLiteIndexer) -> int:
    return shard._index.vec_index(0)._index.element_count  # hnswlib counts deleted nodes too


def nearest(shard: AnnLiteIndexer, embeddings: np.ndarray) -> list[tuple[str, str, float]]:
    """Each embedding's top match: id, text and cosine distance (rounded to 5 places)."""
    answers = shard.search(DocumentArray(Document(embedding=e) for e in embeddings), parameters={'limit': 1})
    return [(a.matches[0].id, a.matches[0].text, round(abs(a.matches[0].scores['cosine'].value), 5)) for a in answers]


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


def test_documents_indexed_after_many_deletes_are_each_found_by_their_own_embedding(tmp_path):
    """What the README's demo does after the demo model's tests: most of the graph deleted, then new
    documents. Reusing the deleted nodes in place (hnswlib's update of an existing label) left one of
    32 unreachable here: search never returned it, not even for its own embedding."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(24, 128))

    def around(n: int) -> np.ndarray:
        return (centres[rng.integers(0, 24, n)] + 0.3 * rng.normal(size=(n, 128))).astype(np.float32)

    shard = AnnLiteIndexer(
        n_dim=128, metas={'workspace': str(tmp_path)}, columns=[['color', 'str'], ['shape', 'str']], index_polling='ANY', compact_deleted=None
    )
    assert shard.wait_loaded(60)
    for _ in range(2):
        images = around(48)
        shard.index(DocumentArray(Document(id=f'img-{i}', embedding=v, tags={'color': 'red', 'shape': 'circle'}) for i, v in enumerate(images)))
        shard.search(DocumentArray(Document(embedding=v) for v in around(24)), parameters={'limit': 1})
        shard.index(DocumentArray(Document(id=f'cap-{i}', embedding=v) for i, v in enumerate(around(24))))
        shard.search(DocumentArray(Document(embedding=v) for v in images), parameters={'limit': 49})
        shard.delete(DocumentArray(Document(id=i) for i in [f'img-{i}' for i in range(48)] + [f'cap-{i}' for i in range(24)]), parameters={})
    shard.index(DocumentArray([Document(id='caption', embedding=around(1)[0]), Document(id='photo', embedding=around(1)[0])]))
    shard.delete(DocumentArray([Document(id='caption'), Document(id='photo')]), parameters={})
    new = around(32)
    for start in range(0, 32, 8):
        shard.index(DocumentArray(Document(id=f'n{i}', embedding=new[i]) for i in range(start, start + 8)))
    answers = shard.search(DocumentArray(Document(embedding=v) for v in new), parameters={'limit': 3})
    assert [a.matches[0].id for a in answers] == [f'n{i}' for i in range(32)]
    assert unreclaimed(shard) == (32, 146)
    shard.close()


# acknowledged updates, deletes and re-indexes after the snapshot (only the journal
# has them), then one more update cut short by the fault step, which was never acknowledged
CHILD = '''
import os, sys
from docarray import Document, DocumentArray
sys.path.insert(0, {tests!r})
from test_updates import open_shard, docs
shard = open_shard({workspace!r}, snapshot_every=100000, **{settings!r})
ids = [f'u{{i}}' for i in range({n})]
shard.update(docs(ids, seed=1), parameters={{}})
shard.delete(DocumentArray([Document(id=i) for i in ids[:10]]), parameters={{}})
shard.index(docs([f'n{{i}}' for i in range(8)], seed=2))
shard.update(docs(ids[10:20], seed=3), parameters={{}})
print('acknowledged', flush=True)
os.environ[{variable!r}] = {step!r}
shard.update(docs(ids[20:30], seed=4), parameters={{}})
'''


def crash_after_updates(workspace: Path, n: int, step: str, settings: dict) -> None:
    child = CHILD.format(tests=str(Path(__file__).parent), workspace=str(workspace), n=n, settings=settings,
                         variable=faults.ENVIRONMENT, step=step)  # fmt: skip
    result = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, timeout=300)
    assert (result.returncode, 'acknowledged' in result.stdout.splitlines()) == (faults.EXIT_CODE, True), result.stderr[-2000:]


def acknowledged_state(n: int) -> dict[str, tuple[str, np.ndarray]]:
    """Every id's text and embedding after the child's acknowledged writes."""
    ids = [f'u{i}' for i in range(n)]
    state = {i: (f'{i} v1', v) for i, v in zip(ids, vectors(n, seed=1))}
    for doc_id in ids[:10]:
        del state[doc_id]
    state.update({f'n{i}': (f'n{i} v2', v) for i, v in enumerate(vectors(8, seed=2))})
    state.update({i: (f'{i} v3', v) for i, v in zip(ids[10:20], vectors(10, seed=3))})
    return state


def test_after_a_crash_updates_and_deletes_are_exactly_the_acknowledged_state(tmp_path):
    shard = open_shard(tmp_path)
    shard.index(docs([f'u{i}' for i in range(100)], seed=0))
    shard.close()  # a snapshot of the hundred
    crash_after_updates(tmp_path, 100, 'after-graph', {})  # the last update reached the graph, not the store

    shard = open_shard(tmp_path)
    assert re.fullmatch(LOADED, shard.loaded_how), shard.loaded_how  # the snapshot and the journal, no rebuild
    state = acknowledged_state(100)
    found = nearest(shard, np.stack([v for _, v in state.values()]))
    assert found == [(doc_id, text, 0.0) for doc_id, (text, _) in state.items()]
    assert [hit for hit in nearest(shard, vectors(10, seed=4)) if hit[2] == 0.0] == []  # the cut update is gone
    # the snapshot's 100 nodes stay; the replay of the journalled ids inserts the 98 stored documents again
    assert (graph_nodes(shard), unreclaimed(shard)) == (198, (98, 100))
    assert not list(tmp_path.rglob(REPLACE_JOURNAL))
    shard.close()


def test_a_compressed_shard_keeps_its_recall_and_the_acknowledged_state_after_updates(tmp_path):
    """A graph over PQ codes: its deleted slots stay unreclaimed, and search still finds every document
    at its new place after updates."""
    settings = {'n_subvectors': 4, 'pq_train_size': 256}
    shard = open_shard(tmp_path, **settings)
    shard.index(docs([f'u{i}' for i in range(300)], seed=0))
    assert shard._compression.trained(shard._index)
    shard.close()
    crash_after_updates(tmp_path, 300, 'after-store', settings)  # the last update in the store, unanswered

    shard = open_shard(tmp_path, **settings)
    assert re.fullmatch(LOADED, shard.loaded_how), shard.loaded_how
    state = acknowledged_state(300)
    found = nearest(shard, np.stack([v for _, v in state.values()]))
    assert found == [(doc_id, text, 0.0) for doc_id, (text, _) in state.items()]
    # the snapshot's 300 nodes stay; the replay and the restore of the cut update insert 298 + 10 more
    assert (graph_nodes(shard), unreclaimed(shard)) == (608, (298, 310))
    shard.close()


def test_a_compressed_shard_finds_the_true_neighbours_as_well_after_updates_as_before(tmp_path):
    """The recall@10 of a graph over PQ codes, against brute force on the current embeddings, stays
    what it was before three rounds of updates (an in-place update would rewire its neighbours)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pq import PQ, TRAIN, clustered

    ids = [f'c{i}' for i in range(600)]
    queries = clustered(50, seed=50)
    shard = AnnLiteIndexer(n_dim=64, metas={'workspace': str(tmp_path)}, n_subvectors=PQ, pq_train_size=TRAIN)

    def recall(current: np.ndarray) -> float:
        answers = shard.search(DocumentArray(Document(embedding=q) for q in queries), parameters={'limit': 10})
        truth = np.argsort(1.0 - current @ queries.T, axis=0, kind='stable')[:10].T
        return float(np.mean([len(set(a.matches[:, 'id']) & {ids[t] for t in row}) / 10 for a, row in zip(answers, truth)]))

    current = clustered(600, seed=1)
    shard.index(DocumentArray(Document(id=i, embedding=v) for i, v in zip(ids, current)))
    before = recall(current)
    for round_ in range(3):
        current = clustered(600, seed=10 + round_)
        shard.update(DocumentArray(Document(id=i, embedding=v) for i, v in zip(ids, current)), parameters={})
    assert (before, recall(current)) == (1.0, 1.0)
    shard.close()

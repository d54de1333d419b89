"""A snapshot runs off the request path: the write that makes one due is answered without waiting
for it, searches answer while it runs, and a failed snapshot fails no write and is retried."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import shard_store
from clip_search.executors.annlite_indexer import AnnLiteIndexer


def open_shard(workspace, **settings) -> AnnLiteIndexer:
    shard = AnnLiteIndexer(n_dim=4, metas={'workspace': str(workspace)}, **settings)
    assert shard.wait_loaded(60)
    return shard


def docs(prefix: str, n: int, seed: int) -> DocumentArray:
    vectors = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return DocumentArray(Document(id=f'{prefix}{i}', embedding=v) for i, v in enumerate(vectors))


def newest_snapshot(workspace) -> int:
    """The generation of the newest whole snapshot (its manifest written)."""
    return max(int(p.parent.name[len(shard_store.SNAPSHOT) :]) for p in workspace.rglob(f'snapshot-*/{shard_store.MANIFEST}'))


def wait_for_snapshot(shard: AnnLiteIndexer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while shard._snapshotting.is_set():  # set by the write that started it, cleared when it ends
        assert time.monotonic() < deadline, 'the snapshot never ended'
        time.sleep(0.01)


def test_writes_and_searches_are_answered_while_the_snapshot_they_started_writes_its_files(tmp_path, monkeypatch):
    """The write lock is held only for the snapshot's consistent point (tables copied, the graph's
    child forked): a write arriving while the files are written is applied at once, and lands in
    the next journal, not in the snapshot."""
    shard = open_shard(tmp_path, snapshot_every=10)
    shard.index(docs('a', 5, seed=1))
    started, release = threading.Event(), threading.Event()
    real_finish = shard_store.PendingSnapshot.finish

    def slow_finish(pending):  # files that take until the test lets them finish
        started.set()
        assert release.wait(60)
        return real_finish(pending)

    monkeypatch.setattr(shard_store.PendingSnapshot, 'finish', slow_finish)
    before = newest_snapshot(tmp_path)
    shard.index(docs('b', 10, seed=2))  # past snapshot_every: answered, the snapshot runs on
    assert started.wait(30)
    queries = docs('q', 3, seed=2)  # the b documents' own embeddings
    answers = shard.search(queries, parameters={'limit': 1})
    assert [a.matches[0].id for a in answers] == ['b0', 'b1', 'b2']
    writer = threading.Thread(target=shard.index, args=(docs('c', 3, seed=3),))
    writer.start()
    try:
        writer.join(30)
        assert not writer.is_alive(), 'a write waited for the snapshot to write its files'
        assert shard.search(docs('q', 1, seed=3), parameters={'limit': 1})[0].matches[0].id == 'c0'
        assert newest_snapshot(tmp_path) == before  # the snapshot is still being written
    finally:
        release.set()
        writer.join()
    wait_for_snapshot(shard)
    generation = newest_snapshot(tmp_path)
    assert generation > before
    folder = next(tmp_path.rglob(f'snapshot-{generation}')).parent
    assert json.loads((folder / f'snapshot-{generation}' / shard_store.MANIFEST).read_text())['documents'] == 15
    assert shard_store.journalled_ids(folder, generation) == ['c0', 'c1', 'c2']  # replayed after a crash
    shard.close()


def test_a_failed_snapshot_fails_no_write_is_logged_and_retried(tmp_path, monkeypatch):
    shard = open_shard(tmp_path, snapshot_every=10)
    logged: list[str] = []
    monkeypatch.setattr(shard.logger, 'error', logged.append)
    real_start = shard_store.start_snapshot

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(shard_store, 'start_snapshot', full_disk)
    before = newest_snapshot(tmp_path)
    shard.index(docs('a', 12, seed=1))  # durable and searchable although its snapshot fails
    wait_for_snapshot(shard)
    assert logged == ["shard 0: snapshot failed, retried after the next write: OSError(28, 'No space left on device')"]
    assert newest_snapshot(tmp_path) == before
    assert shard.search(docs('q', 1, seed=1), parameters={'limit': 1})[0].matches[0].id == 'a0'

    monkeypatch.setattr(shard_store, 'start_snapshot', real_start)  # the disk has room again
    shard.index(docs('b', 1, seed=2))  # one write, far below snapshot_every: the retry follows it
    wait_for_snapshot(shard)
    retried = newest_snapshot(tmp_path)
    assert retried > before and len(logged) == 1
    shard.close()  # nothing changed since: no snapshot of its own
    shard = open_shard(tmp_path)
    assert shard.loaded_how == f'loaded snapshot-{retried} (13 documents) and replayed 0 changed ids'

    shard.close()


def test_the_snapshot_files_are_written_by_a_forked_child_and_a_failing_child_fails_the_snapshot(tmp_path, monkeypatch):
    """hnswlib's save_index holds the GIL for the whole write: in the shard's own process every search
    would wait for it. A child forked for it writes the graph the parent holds."""
    shard = open_shard(tmp_path, snapshot_every=10**6)
    shard.index(docs('a', 50, seed=1))
    graph, writers = shard._index.vec_index(0), tmp_path / 'writers'
    dump = graph.dump

    def dump_noting_the_writer(path):
        with open(writers, 'a') as note:
            note.write(f'{os.getpid()}\n')
        dump(path)

    monkeypatch.setattr(graph, 'dump', dump_noting_the_writer)
    shard.close()  # a graceful stop's snapshot
    assert [int(pid) for pid in writers.read_text().split()] != [os.getpid()]
    assert len(writers.read_text().split()) == 1
    reopened = open_shard(tmp_path)
    assert reopened._index.total_docs == 50 and reopened.loaded_how.startswith('loaded snapshot-')
    assert [m.id for m in reopened.search(docs('a', 1, seed=1), parameters={'limit': 1})[0].matches] == ['a0']

    monkeypatch.setattr(reopened._index.vec_index(0), 'dump', lambda path: os._exit(7))  # a child that dies
    with pytest.raises(shard_store.SnapshotError, match=r'the process writing .*/snapshot-\d+ exited with 7$'):
        with reopened._write_lock:
            reopened._snapshot()
    reopened.close()  # nothing written since: the stop takes no snapshot, and the last whole one stays
    assert open_shard(tmp_path).loaded_how.startswith('loaded snapshot-')

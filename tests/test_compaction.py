"""Compaction: once deletes and updates leave more deleted graph nodes than ``compact_deleted`` of a
shard's documents, the shard builds a graph of its live documents in the background, catches it up
with the writes made meanwhile, swaps it in and snapshots it. Searches and writes go on during it;
afterwards every document is found where it is, nothing deleted comes back, and a restart loads the
compacted graph."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import compaction, faults
from clip_search.executors.annlite_indexer import AnnLiteIndexer

DIM = 16
LOADED = r'loaded snapshot-\d+ \(\d+ documents\) and replayed {} changed ids'
FLOAT, COMPRESSED = {}, {'n_subvectors': 4, 'pq_train_size': 256}


def open_shard(workspace, **settings) -> AnnLiteIndexer:
    shard = AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(workspace)}, **settings)
    assert shard.wait_loaded(60)
    return shard


def docs(ids: list[str], seed: int) -> DocumentArray:
    rows = np.random.default_rng(seed).normal(size=(len(ids), DIM)).astype(np.float32)
    return DocumentArray(Document(id=i, text=f'{i} v{seed}', embedding=v) for i, v in zip(ids, rows))


def copied(documents: DocumentArray) -> DocumentArray:
    """What to send: a write answers with the ids alone, emptying the documents it was given."""
    return DocumentArray(Document(d, copy=True) for d in documents)


def deleted(ids: list[str]) -> DocumentArray:
    return DocumentArray(Document(id=i) for i in ids)


def status(shard: AnnLiteIndexer) -> tuple[int, int]:
    (entry,) = shard.status()[0].tags['shards']
    return int(entry['documents']), int(entry['unreclaimed_slots'])


def graph_nodes(shard: AnnLiteIndexer) -> int:
    return int(shard._index.vec_index(0)._index.element_count)


def found_by_own_embedding(shard: AnnLiteIndexer, expected: DocumentArray) -> list[tuple[str, str, float]]:
    answers = shard.search(DocumentArray(Document(embedding=d.embedding) for d in expected), parameters={'limit': 1})
    return [(a.matches[0].id, a.matches[0].text, round(abs(a.matches[0].scores['cosine'].value), 5)) for a in answers]


def all_found(expected: DocumentArray) -> list[tuple[str, str, float]]:
    return [(d.id, d.text, 0.0) for d in expected]


def ids_answering(shard: AnnLiteIndexer, queries: DocumentArray, limit: int) -> set[str]:
    answers = shard.search(DocumentArray(Document(embedding=d.embedding) for d in queries), parameters={'limit': limit})
    return {match.id for answer in answers for match in answer.matches}


@pytest.mark.parametrize('settings, n', [(FLOAT, 100), (COMPRESSED, 400)], ids=['float', 'pq'])
def test_deletes_past_the_share_compact_the_graph_and_a_restart_loads_the_compacted_one(tmp_path, settings, n):
    shard = open_shard(tmp_path, **settings)
    everything = docs([f'd{i}' for i in range(n)], seed=1)
    shard.index(copied(everything))
    gone = [f'd{i}' for i in range(n * 3 // 10)]  # 30% deleted, past the default share of 25%
    shard.delete(deleted(gone), parameters={})
    assert shard.wait_idle(60)
    live = everything[len(gone) :]
    assert (status(shard), graph_nodes(shard)) == ((len(live), 0), len(live))
    assert found_by_own_embedding(shard, live) == all_found(live)
    assert ids_answering(shard, everything[: len(gone)], limit=5) & set(gone) == set()
    shard.close()

    shard = open_shard(tmp_path, **settings)
    assert re.fullmatch(LOADED.format(0), shard.loaded_how), shard.loaded_how  # the compacted graph's snapshot
    assert (status(shard), graph_nodes(shard)) == ((len(live), 0), len(live))
    assert found_by_own_embedding(shard, live) == all_found(live)
    shard.close()


@pytest.mark.parametrize('settings, n', [(FLOAT, 100), (COMPRESSED, 400)], ids=['float', 'pq'])
def test_writes_and_searches_during_a_compaction_are_all_in_the_graph_swapped_in(tmp_path, monkeypatch, settings, n):
    """The compaction is held after building its graph; meanwhile the shard answers searches from the
    old graph and takes new documents, updates and deletes, which the new graph then catches up with."""
    built, go = threading.Event(), threading.Event()
    build = compaction.Rebuild.build

    def build_then_wait(self, stopped):
        done = build(self, stopped)
        built.set()
        assert go.wait(60)
        return done

    monkeypatch.setattr(compaction.Rebuild, 'build', build_then_wait)
    shard = open_shard(tmp_path, **settings)
    first = docs([f'd{i}' for i in range(n)], seed=1)
    shard.index(copied(first))
    third = n * 3 // 10
    shard.delete(deleted(first[:third][:, 'id']), parameters={})
    assert built.wait(60)

    assert found_by_own_embedding(shard, first[third:]) == all_found(first[third:])  # the old graph answers
    new = docs([f'n{i}' for i in range(n // 5)], seed=2)
    shard.index(copied(new))
    updated = docs(first[third : third + n // 10][:, 'id'], seed=3)
    shard.update(copied(updated), parameters={})
    removed = first[third + n // 10 : third + n // 5][:, 'id']
    shard.delete(deleted(removed), parameters={})
    go.set()
    assert shard.wait_idle(60)

    live = DocumentArray([*updated, *first[third + n // 5 :], *new])
    assert found_by_own_embedding(shard, live) == all_found(live)
    assert ids_answering(shard, first[: third + n // 5], limit=5) & {*first[:third][:, 'id'], *removed} == set()
    # the built graph held the live 70%; the catch-up added the new and updated documents and marked
    # the updated documents' old nodes and the ones deleted meanwhile
    assert (status(shard), graph_nodes(shard)) == ((len(live), n // 5), len(live) + n // 5)
    shard.close()


def test_a_compressed_shard_updated_over_and_over_while_it_compacts_keeps_every_document(tmp_path):
    """Writes, searches and compactions at once, as under load: 5 rounds of updates of all 2,000
    documents (64-d, 8 sub-vectors), 500 a request, each followed by a search. None waits forever
    (OpenBLAS's threads hung here when a compaction's matrix product met a write's) and every update
    is found."""
    shard = AnnLiteIndexer(n_dim=64, metas={'workspace': str(tmp_path)}, n_subvectors=8, pq_train_size=256)
    ids = [f'd{i}' for i in range(2000)]
    rng = np.random.default_rng(0)
    latest = {}

    def write_rounds() -> None:
        for round_ in range(6):
            for start in range(0, 2000, 500):
                batch = DocumentArray(Document(id=i, text=f'{i} v{round_}', embedding=rng.normal(size=64)) for i in ids[start : start + 500])
                latest.update({d.id: Document(d, copy=True) for d in batch})
                (shard.update(batch, parameters={}) if round_ else shard.index(batch))
                shard.search(DocumentArray([Document(embedding=rng.normal(size=64))]), parameters={'limit': 1})

    writer = threading.Thread(target=write_rounds, daemon=True)
    writer.start()
    writer.join(120)
    assert not writer.is_alive()
    assert shard.wait_idle(60)
    live = DocumentArray(latest[i] for i in ids)
    assert found_by_own_embedding(shard, live) == all_found(live)
    documents, unreclaimed = status(shard)
    assert documents == 2000 and unreclaimed <= 0.25 * 2000
    shard.close()


def test_a_failed_compaction_leaves_the_graph_answering_and_the_next_write_compacts(tmp_path, monkeypatch):
    logged = []
    catch_up = compaction.Rebuild.catch_up
    failures = iter([OSError('No space left on device')])

    def fail_once(self, under_lock=False):
        failure = next(failures, None)
        if failure:
            raise failure
        return catch_up(self, under_lock)

    monkeypatch.setattr(compaction.Rebuild, 'catch_up', fail_once)
    shard = open_shard(tmp_path)
    monkeypatch.setattr(shard.logger, 'error', logged.append)
    everything = docs([f'd{i}' for i in range(100)], seed=1)
    shard.index(copied(everything))
    shard.delete(deleted([f'd{i}' for i in range(30)]), parameters={})
    assert shard.wait_idle(60)
    assert logged == ["shard 0: compacting the graph failed: OSError('No space left on device')"]
    assert status(shard) == (70, 30)
    assert found_by_own_embedding(shard, everything[30:]) == all_found(everything[30:])

    shard.delete(deleted(['d30']), parameters={})
    assert shard.wait_idle(60)
    assert (status(shard), graph_nodes(shard)) == ((69, 0), 69)
    shard.close()


@pytest.mark.parametrize('value', [0, -0.5, 'often', True])
def test_a_compaction_share_that_is_not_a_positive_number_is_refused_by_name(tmp_path, value):
    with pytest.raises(ValueError) as refused:
        AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(tmp_path)}, compact_deleted=value)
    assert str(refused.value) == f'compact_deleted={value!r} must be a number above 0 (or null: never compact)'


def test_without_compaction_the_deleted_nodes_stay(tmp_path):
    shard = open_shard(tmp_path, compact_deleted=None)
    shard.index(docs([f'd{i}' for i in range(100)], seed=1))
    shard.delete(deleted([f'd{i}' for i in range(90)]), parameters={})
    assert shard.wait_idle(60)
    assert (status(shard), graph_nodes(shard)) == ((10, 90), 100)
    shard.close()


# the deletes past the share start a compaction, which the fault step ends after the swap, before its snapshot
CHILD = """
import sys
from docarray import Document, DocumentArray
sys.path.insert(0, {tests!r})
from test_compaction import open_shard, deleted
shard = open_shard({workspace!r}, **{settings!r})
shard.delete(deleted([f'd{{i}}' for i in range({gone})]), parameters={{}})
print('acknowledged', flush=True)
shard.wait_idle(60)
"""


@pytest.mark.parametrize('settings, n', [(FLOAT, 100), (COMPRESSED, 400)], ids=['float', 'pq'])
def test_a_shard_killed_after_the_swap_of_a_compacted_graph_restarts_with_the_acknowledged_state(tmp_path, settings, n):
    shard = open_shard(tmp_path, **settings)
    everything = docs([f'd{i}' for i in range(n)], seed=1)
    shard.index(copied(everything))
    shard.close()  # a snapshot of all n
    gone = n * 3 // 10
    child = CHILD.format(tests=str(Path(__file__).parent), workspace=str(tmp_path), settings=settings, gone=gone)
    result = subprocess.run([sys.executable, '-c', child], env={**os.environ, faults.ENVIRONMENT: 'mid-compaction'},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (result.returncode, result.stdout.splitlines()[-1:]) == (faults.EXIT_CODE, ['acknowledged']), result.stderr[-2000:]

    shard = open_shard(tmp_path, **settings)  # the snapshot before the compaction and the journal of the deletes
    assert re.fullmatch(LOADED.format(gone), shard.loaded_how), shard.loaded_how
    live = everything[gone:]
    assert status(shard) == (len(live), gone)
    assert found_by_own_embedding(shard, live) == all_found(live)
    assert ids_answering(shard, everything[:gone], limit=5) & set(everything[:gone][:, 'id']) == set()
    shard.delete(deleted([live[0].id]), parameters={})  # still past the share: this write compacts
    assert shard.wait_idle(60)
    assert (status(shard), graph_nodes(shard)) == ((len(live) - 1, 0), len(live) - 1)
    assert found_by_own_embedding(shard, live[1:]) == all_found(live[1:])
    shard.close()

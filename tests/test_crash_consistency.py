"""A shard killed at any step of a write or a snapshot restarts with exactly what that step left
durable, loading its snapshot (no rebuild from the document store); a journal cut at any byte
keeps its whole records and takes new ones after them; a replace journal outlives no later write."""

from __future__ import annotations

import os
import re
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import faults, shard_store
from clip_search.executors import annlite_indexer
from clip_search.executors.annlite_indexer import REPLACE_JOURNAL, AnnLiteIndexer

LOADED = r'loaded snapshot-\d+ \(\d+ documents\) and replayed \d+ changed ids'
# product quantization (2 sub-vectors of the 4-d embeddings) trained on the first 256 documents:
# COMPRESSED_FILLER documents indexed first put the acknowledged ones in a graph over PQ codes
PQ = dict(n_subvectors=2, pq_train_size=256)
COMPRESSED_FILLER = 300


def open_shard(workspace, **settings) -> AnnLiteIndexer:
    shard = AnnLiteIndexer(n_dim=4, metas={'workspace': str(workspace)}, columns=[['color', 'str']], **settings)
    assert shard.wait_loaded(60)
    return shard


def doc(doc_id: str, text: str, seed: int) -> Document:
    embedding = np.random.default_rng(seed).normal(size=4).astype(np.float32)
    return Document(id=doc_id, text=text, tags={'color': 'red'}, embedding=embedding)


def stored_texts(shard: AnnLiteIndexer) -> dict[str, str]:
    """What search finds: every id's text, by asking for each stored embedding's nearest match."""
    everything = shard._index.doc_store(0).get([f'a{i}' for i in range(10)] + ['new'])
    answers = shard.search(DocumentArray(Document(embedding=d.embedding) for d in everything), parameters={'limit': 1})
    found = {answer.matches[0].id: answer.matches[0].text for answer in answers}
    assert set(found) == set(everything[:, 'id'])  # the graph and the store agree
    return found


# one /index that replaces a3 (indexed, acknowledged) and adds 'new', cut short at each step
WRITE = "shard.index(DocumentArray([doc('a3', 'never acknowledged', 99), doc('new', 'never acknowledged', 98)]))"
CHILD = '''
import sys, time
from docarray import DocumentArray
sys.path.insert(0, {tests!r})
from test_crash_consistency import open_shard, doc
shard = open_shard({workspace!r}, snapshot_every={snapshot_every}, **{settings!r})
{write}
while shard._snapshotting.is_set():  # a snapshot runs in the background: let it reach its step
    time.sleep(0.01)
shard.close()  # or, where the write stayed below the background trigger (5% of 310 documents), a stop's
'''


@pytest.mark.parametrize('settings', [{}, PQ], ids=['float', 'pq'])
@pytest.mark.parametrize(
    'step, new_kept',
    [('after-journal', False), ('after-graph', False), ('after-store', True), ('mid-snapshot', True)],
)
def test_a_shard_killed_at_each_step_of_a_write_restarts_with_the_acknowledged_state(tmp_path, step, new_kept, settings):
    shard = open_shard(tmp_path, **settings)
    filler = COMPRESSED_FILLER if settings else 0
    if filler:
        shard.index(DocumentArray(doc(f'filler{i}', 'filler', 1000 + i) for i in range(filler)))
    shard.index(DocumentArray(doc(f'a{i}', f'acknowledged {i}', i) for i in range(10)))
    assert shard._compression is None or shard._compression.trained(shard._index)
    shard.close()  # a snapshot of the ten
    child = CHILD.format(
        tests=str(Path(__file__).parent), workspace=str(tmp_path), write=WRITE, settings=settings,
        snapshot_every=1 if step == 'mid-snapshot' else 20000,  # 1: the write is followed by a snapshot
    )  # fmt: skip
    result = subprocess.run([sys.executable, '-c', child], env={**os.environ, faults.ENVIRONMENT: step},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == faults.EXIT_CODE, result.stderr[-2000:]

    shard = open_shard(tmp_path, **settings)
    assert re.fullmatch(LOADED, shard.loaded_how), shard.loaded_how  # the snapshot, never a rebuild
    expected = {f'a{i}': f'acknowledged {i}' for i in range(10)}
    if step == 'mid-snapshot':  # the write was whole, in the store and the graph, when the snapshot began
        expected.update({'a3': 'never acknowledged', 'new': 'never acknowledged'})
    elif new_kept:  # in the store, not answered: a new id stays, a replaced one goes back to its old version
        expected['new'] = 'never acknowledged'
    assert stored_texts(shard) == expected
    assert shard._index.total_docs == filler + len(expected) and not list(tmp_path.rglob(REPLACE_JOURNAL))
    shard.close()
    assert re.fullmatch(LOADED, open_shard(tmp_path, **settings).loaded_how)  # and the next start too


# the background snapshot's files are written while a write is acknowledged, then the shard dies
# before the snapshot's manifest: that write is in the next journal, replayed after the last whole snapshot
WRITE_DURING_SNAPSHOT = """
from clip_search import shard_store
finish = shard_store.PendingSnapshot.finish
def acknowledge_a_write_first(pending):
    shard.index(DocumentArray([doc('during', 'acknowledged during the snapshot', 97)]))  # the write lock is free
    print('acknowledged', flush=True)
    return finish(pending)
shard_store.PendingSnapshot.finish = acknowledge_a_write_first
shard.index(DocumentArray(doc(f'b{i}', 'acknowledged before', 200 + i) for i in range(16)))  # past 5% of 310: in the background
"""


@pytest.mark.parametrize('settings', [{}, PQ], ids=['float', 'pq'])
def test_a_write_acknowledged_while_a_snapshot_is_written_survives_a_kill_before_its_manifest(tmp_path, settings):
    shard = open_shard(tmp_path, **settings)
    filler = COMPRESSED_FILLER if settings else 0
    if filler:
        shard.index(DocumentArray(doc(f'filler{i}', 'filler', 1000 + i) for i in range(filler)))
    shard.index(DocumentArray(doc(f'a{i}', f'acknowledged {i}', i) for i in range(10)))
    shard.close()
    child = CHILD.format(tests=str(Path(__file__).parent), workspace=str(tmp_path), write=WRITE_DURING_SNAPSHOT, settings=settings, snapshot_every=1)
    result = subprocess.run([sys.executable, '-c', child], env={**os.environ, faults.ENVIRONMENT: 'mid-snapshot'},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == faults.EXIT_CODE, result.stderr[-2000:]
    assert result.stdout.splitlines().count('acknowledged') == 1

    shard = open_shard(tmp_path, **settings)
    assert re.fullmatch(LOADED, shard.loaded_how), shard.loaded_how  # the snapshot before, and both journals
    expected = {f'a{i}': f'acknowledged {i}' for i in range(10)}
    expected.update({f'b{i}': 'acknowledged before' for i in range(16)}, during='acknowledged during the snapshot')
    everything = shard._index.doc_store(0).get(list(expected))
    answers = shard.search(DocumentArray(Document(embedding=d.embedding) for d in everything), parameters={'limit': 1})
    assert {answer.matches[0].id: answer.matches[0].text for answer in answers} == expected
    assert shard._index.total_docs == filler + 27
    shard.close()


def test_a_journal_cut_at_any_byte_keeps_its_whole_records_and_appends_after_them(tmp_path):
    folder = tmp_path / 'whole'
    folder.mkdir()
    journal = shard_store.Journal(folder, 0)
    written = [[f'r{n}-{i}' for i in range(n % 3 + 1)] for n in range(20)]
    ends = []
    for ids in written:
        journal.record('put', ids)
        ends.append(shard_store.journal_path(folder, 0).stat().st_size)
    journal.close()
    data = shard_store.journal_path(folder, 0).read_bytes()
    for cut in sorted(np.random.default_rng(5).choice(len(data), size=25, replace=False).tolist()) + [len(data)]:
        torn = tmp_path / f'cut-{cut}'
        torn.mkdir()
        shard_store.journal_path(torn, 0).write_bytes(data[:cut])
        whole = [ids for ids, end in zip(written, ends) if end <= cut]
        assert shard_store.journalled_ids(torn, 0) == [i for ids in whole for i in ids]
        reopened = shard_store.Journal(torn, 0)  # a restart: the torn tail is cut before appending
        reopened.record('del', ['after-restart'])
        reopened.close()
        assert shard_store.journalled_ids(torn, 0) == [i for ids in whole for i in ids] + ['after-restart']


def test_a_replace_whose_restore_failed_is_restored_before_the_next_write(tmp_path, monkeypatch):
    shard = open_shard(tmp_path)
    shard.index(DocumentArray(doc(f'a{i}', f'acknowledged {i}', i) for i in range(10)))
    real_index, real_restore = shard._index.index, annlite_indexer._restore_interrupted_replace

    def failing(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(shard._index, 'index', failing)  # the insert of the replace fails ...
    monkeypatch.setattr(annlite_indexer, '_restore_interrupted_replace', failing)  # ... and so does its restore
    with pytest.raises(OSError, match='disk full'):
        shard.update(DocumentArray([doc('a1', 'never acknowledged', 97)]), parameters={})
    assert len(list(tmp_path.rglob(REPLACE_JOURNAL))) == 1  # a1's old version waits there
    monkeypatch.setattr(shard._index, 'index', real_index)
    monkeypatch.setattr(annlite_indexer, '_restore_interrupted_replace', real_restore)

    shard.update(DocumentArray([doc('a2', 'updated', 96)]), parameters={})  # the next replace restores a1 first
    expected = {f'a{i}': f'acknowledged {i}' for i in range(10)}
    expected['a2'] = 'updated'
    assert stored_texts(shard) == expected and not list(tmp_path.rglob(REPLACE_JOURNAL))
    shard.close()


def test_annlites_tables_live_in_files_that_a_start_refills_from_the_snapshot(tmp_path):
    shard = open_shard(tmp_path)
    shard.index(DocumentArray(doc(f'a{i}', f'acknowledged {i}', i) for i in range(10)))
    tables = shard._data_path / shard_store.LIVE_TABLES
    files = {connection.execute('PRAGMA database_list').fetchone()[2] for connection in
             (shard._index.cell_table(0)._conn, shard._index.meta_table._conn)}  # fmt: skip
    assert files == {str(tables / 'table_0.db'), str(tables / 'metas.db')}  # not annlite's in-memory tables
    shard.close()
    for live in tables.iterdir():  # what a crash mid-write may leave: the files are scratch
        live.write_bytes(b'torn' * 1000)

    shard = open_shard(tmp_path)
    assert re.fullmatch(LOADED, shard.loaded_how), shard.loaded_how
    assert stored_texts(shard) == {f'a{i}': f'acknowledged {i}' for i in range(10)}


def test_a_store_changed_behind_the_journals_back_is_found_after_the_start_and_the_next_start_rebuilds(tmp_path, monkeypatch):
    """A start takes the index's count from its snapshot and journal (counting every key first slowed
    a start of millions of documents), then counts the store in the background: a document deleted from RocksDB directly is noticed,
    logged in one line, and the next start rebuilds the index from the store."""
    from rocksdict import Options, Rdict

    shard = open_shard(tmp_path)
    shard.index(DocumentArray(doc(f'a{i}', f'acknowledged {i}', i) for i in range(10)))
    shard.close()
    options = Options(raw_mode=True)
    options.set_inplace_update_support(True)  # as the store was made
    options.set_allow_concurrent_memtable_write(False)
    store = Rdict(str(next(tmp_path.rglob('cell_0'))), options=options)
    store.delete(b'a3')  # no journal names it
    store.close()

    verify, started, logged = AnnLiteIndexer._verify_count, [], []
    monkeypatch.setattr(AnnLiteIndexer, '_verify_count', lambda self: started.append(self))  # run below, in the test
    shard = open_shard(tmp_path)
    assert re.fullmatch(LOADED, shard.loaded_how), shard.loaded_how  # loaded at once, counted after
    for _ in range(500):  # the start's background check
        if started:
            break
        time.sleep(0.01)
    assert started == [shard]
    monkeypatch.setattr(shard.logger, 'error', logged.append)
    verify(shard)
    assert logged == ['shard 0: the document store holds 9 documents, the index 10: the next start rebuilds the index from the store']
    shard.close()

    shard = open_shard(tmp_path)
    assert shard.loaded_how == (
        'rebuilt 9 documents from the document store '
        '(asked by the last start: the document store holds 9 documents, the index 10)'
    )
    assert stored_texts(shard) == {f'a{i}': f'acknowledged {i}' for i in range(10) if i != 3}
    shard.close()
    assert re.fullmatch(LOADED, open_shard(tmp_path).loaded_how)  # the ask is done


def test_a_start_counts_the_store_only_in_the_background_after_loading(tmp_path, monkeypatch):
    """annlite's constructor asks for the store's count (a scan of every key); the shard answers it
    without counting, loads, and only then counts, in the background check."""
    import threading

    shard = open_shard(tmp_path)
    shard.index(DocumentArray(doc(f'a{i}', f'acknowledged {i}', i) for i in range(10)))
    shard.close()
    counted, count = [], shard_store.count_keys
    monkeypatch.setattr(shard_store, 'count_keys', lambda scan: counted.append(threading.current_thread().name) or count(scan))
    shard = open_shard(tmp_path)
    for _ in range(500):
        if counted:
            break
        time.sleep(0.01)
    assert (shard.loaded_how, counted) == ('loaded snapshot-2 (10 documents) and replayed 0 changed ids', ['shard-0-verify'])
    assert shard._index.total_docs == 10
    shard.close()

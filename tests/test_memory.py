"""Freed heap memory goes back to the system after a request, so resident memory tracks what is held."""

from __future__ import annotations

import os

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search.memory import FreedMemoryRelease


def resident_mib() -> float:
    with open(f'/proc/{os.getpid()}/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


@pytest.mark.skipif(not FreedMemoryRelease().available, reason='needs glibc (malloc_trim)')
def test_freed_memory_between_live_buffers_is_given_back():
    release = FreedMemoryRelease()
    buffers = [bytes(4000) + i.to_bytes(4, 'little') for i in range(50_000)]  # 200 MB from malloc's heap
    kept = buffers[::50]  # a live buffer every 200 KB keeps the heap from shrinking on its own
    del buffers
    before = resident_mib()
    assert release.now()
    after = resident_mib()
    assert before - after > 100, (before, after)
    assert len(kept) == 1000


def test_a_burst_of_requests_schedules_one_trim_after_it():
    import time

    release = FreedMemoryRelease(delay=0.2)
    if not release.available:
        assert release() is False
        return
    trims = []
    release._trim = trims.append
    assert [release() for _ in range(5)] == [True, False, False, False, False]
    assert trims == []  # not while the request that asked is still being answered
    time.sleep(0.5)
    assert trims == [0]
    assert release() is True  # the next burst gets its own


def test_a_shard_releases_freed_memory_after_every_write(tmp_path):
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    indexer = AnnLiteIndexer(n_dim=8, workspace=str(tmp_path), runtime_args={'shard_id': 0, 'shards': 1})
    calls = []
    indexer._release_freed_memory = lambda: calls.append(1)
    vectors = np.random.default_rng(0).random((3, 8), dtype=np.float32)
    indexer.index(DocumentArray(Document(id=f'd{i}', embedding=v) for i, v in enumerate(vectors)))
    indexer.update(DocumentArray([Document(id='d0', embedding=vectors[1])]), parameters={})
    indexer.delete(DocumentArray([Document(id='d1')]))
    indexer.close()
    assert len(calls) == 3

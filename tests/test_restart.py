"""Restarts load a snapshot of the HNSW graph and replay the journal after it; a bad snapshot is
rebuilt from the documents; a shard that is loading says so; shards never load torch, and return
the request buffers they free to the OS."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search.sharding import ShardError, split_shard_answers
from helpers.service import flow_compressed

DIM = 64  # the tiny model's embedding size: documents sent with an embedding skip the encoder


def vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def embedded(prefix: str, embeddings: np.ndarray, start: int = 0) -> list[Document]:
    return [Document(id=f'{prefix}{start + i}', embedding=v) for i, v in enumerate(embeddings)]


def top_ids(client, embeddings: np.ndarray, limit: int = 1) -> list[list[str]]:
    return [r.matches[:, 'id'] for r in client.search([Document(embedding=v) for v in embeddings], limit=limit)]


def restart_paths(log: str) -> dict[int, str]:
    """Each shard's one line about how it loaded, by shard number (the last start's line wins)."""
    log = re.sub(r'\s*\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\]', '', log)  # the log's time column
    lines = re.sub(r'\n[ \t]+', ' ', log).splitlines()  # the log wraps long lines: join them back
    paths = {}
    for line in lines:
        found = re.search(r'shard (\d+)/\d+: ((?:loaded|rebuilt) .*)', line)
        if found:
            paths[int(found.group(1))] = ' '.join(found.group(2).split())
    return paths


def snapshot_file(workspace: Path, shard: int, name: str) -> Path:
    folder = next(p.parent for p in workspace.rglob('clip_search_index.json') if p.parent.name == str(shard))
    return max(folder.glob(f'snapshot-*/{name}'), key=lambda p: int(p.parent.name.split('-')[1]))


@pytest.mark.slow
@pytest.mark.parametrize('pq', [None, 16], ids=['float', 'pq16'])
def test_a_graceful_restart_loads_the_snapshot_and_a_damaged_one_is_rebuilt(tmp_path, service_factory, pq):
    workspace = tmp_path / 'workspace'
    # --pq 16, trained on 256 documents; rerank_factor 100 re-ranks a whole shard of 1000 exactly, so the
    # rebuilt shard's new codec (trained on other documents) must give the very same answers
    settings = {}
    if pq:
        flow = flow_compressed(tmp_path, pq_train_size=256, rerank_factor=100)
        settings = dict(flow_file=flow, extra_args=('--pq', str(pq)))
    service = service_factory(shards=2, workspace=workspace, **settings)
    torch_processes = [pid for pid in service.processes() if 'libtorch' in Path(f'/proc/{pid}/maps').read_text()]
    assert len(torch_processes) == 1  # the encoder; not the shards, the merger, the gateway or the CLI
    client = service.client()
    docs = embedded('g', vectors(2000, seed=1))
    assert client.index(docs, batch_size=500) == [doc.id for doc in docs]  # the acknowledged ids
    queries = vectors(20, seed=2)
    before = [[(m.id, round(m.scores['cosine'].value, 5)) for m in r.matches] for r in client.search([Document(embedding=q) for q in queries])]
    assert service.stop() == 0

    service = service_factory(shards=2, workspace=workspace, **settings)
    paths = restart_paths(service.log())
    assert sorted(paths) == [0, 1]
    assert all(re.match(r'loaded snapshot-\d+ \(\d+ documents\) and replayed 0 changed ids', p) for p in paths.values()), paths
    client = service.client()
    assert client.status()['documents'] == 2000
    after = [[(m.id, round(m.scores['cosine'].value, 5)) for m in r.matches] for r in client.search([Document(embedding=q) for q in queries])]
    assert after == before
    assert service.stop() == 0

    graph = snapshot_file(workspace, 0, 'hnsw.bin')
    graph.write_bytes(graph.read_bytes()[:-100])  # truncated: a disk that filled up, a copy cut short
    service = service_factory(shards=2, workspace=workspace, **settings)
    paths = restart_paths(service.log())
    assert re.match(r'rebuilt \d+ documents from the document store \(snapshot-\d+/hnsw.bin \(the HNSW graph\) has \d+ bytes, the manifest says \d+\)', paths[0]), paths
    assert paths[1].startswith('loaded snapshot-')
    client = service.client()
    assert client.status()['documents'] == 2000
    assert [[(m.id, round(m.scores['cosine'].value, 5)) for m in r.matches] for r in client.search([Document(embedding=q) for q in queries])] == before


@pytest.mark.slow
@pytest.mark.parametrize('pq', [None, 16], ids=['float', 'pq16'])
def test_after_kill_9_every_acknowledged_write_since_the_snapshot_is_there(tmp_path, service_factory, pq):
    workspace = tmp_path / 'workspace'
    # --pq 16 with pq_train_size 256: each shard's 1000 documents are in a compressed graph before the kill
    settings = dict(flow_file=flow_compressed(tmp_path, pq_train_size=256), extra_args=('--pq', str(pq))) if pq else {}
    first = service_factory(shards=2, workspace=workspace, **settings)
    first.client().index(embedded('k', vectors(2000, seed=1)), batch_size=500)
    assert first.stop() == 0  # the snapshot now holds the 2000

    service = service_factory(shards=2, workspace=workspace, **settings)
    client = service.client()
    new, moved = vectors(100, seed=3), vectors(20, seed=4)
    client.index(embedded('new', new))
    assert sorted(client.delete([f'k{i}' for i in range(50)])) == sorted(f'k{i}' for i in range(50))
    answer = asyncio.run(client.send_batch('/update', DocumentArray(embedded('k', moved, start=100))))  # one request
    assert answer[:, 'id'] == [f'k{i}' for i in range(100, 120)] and answer[0].embedding is None  # ids, not embeddings
    service.kill()  # kill -9 of every process: no snapshot of these writes

    service = service_factory(shards=2, workspace=workspace, **settings)
    paths = restart_paths(service.log())
    replayed = [int(re.search(r'replayed (\d+) changed ids', p).group(1)) for p in paths.values()]
    assert sum(replayed) == 100 + 50 + 20, paths  # each shard replays the ids it journalled, no more
    client = service.client()
    assert client.status()['documents'] == 2000 + 100 - 50
    assert top_ids(client, new) == [[f'new{i}'] for i in range(100)]
    assert top_ids(client, moved) == [[f'k{i}'] for i in range(100, 120)]  # found by the new embedding
    old = vectors(2000, seed=1)
    assert not {f'k{i}' for i in range(50)} & {i for ids in top_ids(client, old[:50], limit=10) for i in ids}
    assert top_ids(client, old[50:100]) == [[f'k{i}'] for i in range(50, 100)]


def indexer(workspace: Path, shard: int = 0, shards: int = 2, **kwargs):
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    return AnnLiteIndexer(n_dim=16, workspace=str(workspace), runtime_args={'shard_id': shard, 'shards': shards}, **kwargs)


def test_a_shard_that_is_loading_says_so_and_a_mismatched_snapshot_is_rebuilt(tmp_path):
    shard = indexer(tmp_path)
    embeddings = vectors(20000, seed=5, dim=16)
    for start in range(0, len(embeddings), 5000):
        shard.index(DocumentArray(embedded('m', embeddings[start : start + 5000], start=start)))
    stored = shard.status()[0].tags['documents']
    shard.close()

    shard = indexer(tmp_path, max_connection=8)  # the snapshot's graph was built with 16 links a node
    with pytest.raises(ShardError, match=r'ShardLoading: shard 0 is loading its index; retry in a few seconds \(shards \[0\]\)'):
        split_shard_answers([shard.status()], 2)  # what the merger answers while the shard rebuilds
    assert shard.wait_loaded(300)
    assert re.match(rf'rebuilt {stored} documents from the document store \(snapshot-\d+ was built with max_connection=16, not 8\)', shard.loaded_how)
    assert split_shard_answers([shard.status()])[0][0].tags['documents'] == stored
    shard.close()

    manifest = snapshot_file(tmp_path, 0, 'manifest.json')
    cells = manifest.parent / 'cells.db'
    damaged = bytearray(cells.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte flipped
    cells.write_bytes(bytes(damaged))
    shard = indexer(tmp_path, max_connection=8)
    assert shard.wait_loaded(300)
    assert re.match(r'rebuilt \d+ documents from the document store \(snapshot-\d+/cells.db \(the offset table\) is damaged: CRC-32 mismatch\)', shard.loaded_how)
    shard.close()

    settings = json.loads(snapshot_file(tmp_path, 0, 'manifest.json').read_text())['settings']
    assert settings['shards'] == 2 and settings['n_dim'] == 16  # what a snapshot must match to be used


SHARD_HEAP_PROBE = '''
import ctypes, sys
from clip_search.executors.annlite_indexer import AnnLiteIndexer

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
if sys.argv[2] == 'shard':
    AnnLiteIndexer(n_dim=16, workspace=sys.argv[1])
libc.free(libc.malloc(8 << 20))  # a request-sized buffer, freed: by default glibc now keeps such blocks in its heap
mappings = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - mappings)  # 1: the next one got a mapping of its own, which free returns to the OS
libc.free(block)
'''


def test_a_shards_process_returns_freed_request_sized_blocks_to_the_os(tmp_path):
    def own_mappings(role: str) -> int:
        probe = [sys.executable, '-c', SHARD_HEAP_PROBE, str(tmp_path / role), role]
        return int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-1])

    assert own_mappings('shard') == 1
    assert own_mappings('plain process') == 0  # glibc's default, which the shard turns off

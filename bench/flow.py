"""End-to-end worker: the real service (``python -m clip_search``) over gRPC, for one shard count.

    python bench/flow.py '{"data": DIR, "shards": 2, "n_queries": 200}' OUT.json

Documents carry the shared clustered 512-d embeddings (the encoder passes them through, so this
measures the Flow and the index, not CLIP); a random model with 512-d embeddings serves queries.
Reports index throughput, search latency (one query per request, p50/p99), recall@10 against the
exact ground truth, and the service's resident memory.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from common import LIMIT, median, percentile, recall_at_k, rss_mib, scratch_dir, worker_main


def run(task: dict) -> dict:
    from helpers.service import TINY_MODEL_CFG, start_service, write_tiny_model

    data = Path(task['data'])
    corpus = np.load(data / 'corpus.npy')
    queries = np.load(data / 'queries.npy')[: task['n_queries']]
    gt = np.load(data / 'gt.npy')[: task['n_queries']]
    workdir = scratch_dir('bench-flow-')
    model_dir = write_tiny_model(workdir / 'model', model_cfg=dict(TINY_MODEL_CFG, embed_dim=corpus.shape[1]))
    started = time.perf_counter()
    service = start_service(model_dir, workdir / 'workspace', shards=task['shards'])
    startup = time.perf_counter() - started
    try:
        measured = asyncio.run(index_and_search(service.address, corpus, queries))
        memory = sum(rss_mib(pid) for pid in service.processes())
    finally:
        service.stop()
    return {
        'shards': task['shards'],
        'docs': len(corpus),
        'startup_s': startup,
        'index_docs_per_s': len(corpus) / measured['index_seconds'],
        'p50_ms': 1000 * median(measured['latencies']),
        'p99_ms': 1000 * percentile(measured['latencies'], 99),
        'recall_at_10': recall_at_k(measured['found'], gt),
        'rss_mib': memory,
    }


async def index_and_search(address: str, corpus: np.ndarray, queries: np.ndarray) -> dict:
    """Index the corpus, then send one query per request, all on one event loop.

    Jina's asyncio client on one loop: its sync client opens a loop per call, and many of those in
    one process can leave grpc.aio hanging, which a benchmark of thousands of requests would hit.
    """
    from docarray import Document, DocumentArray
    from jina import Client

    client = Client(host=address, asyncio=True)
    docs = DocumentArray(Document(id=f'd{i}', embedding=v) for i, v in enumerate(corpus))
    started = time.perf_counter()
    async for _ in client.post('/index', inputs=docs, request_size=1000):
        pass
    index_seconds = time.perf_counter() - started
    latencies, found = [], []
    for query in [queries[0], *queries]:  # the first one warms the channel up and is not counted
        started = time.perf_counter()
        async for answer in client.post('/search', inputs=DocumentArray([Document(embedding=query)]), parameters={'limit': LIMIT}):
            ids = [int(i[1:]) for i in answer[0].matches[:, 'id']]
        latencies.append(time.perf_counter() - started)
        found.append(ids)
    return {'index_seconds': index_seconds, 'latencies': latencies[1:], 'found': found[1:]}


if __name__ == '__main__':
    worker_main(run)

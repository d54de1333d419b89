"""Nearest-neighbour worker: build and query one library on the shared vectors, in this process only.

    python bench/ann.py '{"lib": "hnswlib", "data": DIR, ...}' OUT.json

``lib`` is ``faiss`` (exact flat index; writes the ground truth ``gt.npy``) or ``scaling`` (our
indexer as the collection grows); with ``"serve": true`` and ``lib`` ``hnswlib`` or ``annlite``
(bare annlite and our AnnLiteIndexer on one index) it builds and then answers search commands on
stdin (see :func:`serve`). Searches send one query per call from one thread, as a shard serves a
request; every HNSW uses the same M, ef_construction and ef_search (common.HNSW).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from common import HNSW, LIMIT, clustered_vectors, dir_size_mib, exact_top_k, median, percentile, recall_at_k, rss_mib, scratch_dir, worker_main


def timed_queries(search, queries: np.ndarray) -> tuple[list, list[float]]:
    """Run ``search(query)`` for every query; return the results and each call's seconds."""
    results, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(search(query))
        seconds.append(time.perf_counter() - started)
    return results, seconds


def search_stats(name: str, results: list, seconds: list[float], gt: np.ndarray | None) -> dict:
    return {
        'name': name,
        'qps': len(seconds) / sum(seconds),
        'p50_ms': 1000 * median(seconds),
        'p99_ms': 1000 * percentile(seconds, 99),
        'recall_at_10': recall_at_k(results, gt) if gt is not None else None,
    }


def run_faiss(corpus: np.ndarray, queries: np.ndarray, data: Path) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)
    before = rss_mib()
    started = time.perf_counter()
    index = faiss.IndexFlatIP(corpus.shape[1])  # inner product of unit vectors = cosine similarity
    index.add(corpus)
    build = time.perf_counter() - started
    memory = rss_mib() - before
    _, gt = index.search(queries, LIMIT)
    np.save(data / 'gt.npy', gt)
    results, seconds = timed_queries(lambda q: index.search(q[None], LIMIT)[1][0], queries)
    return [dict(search_stats('faiss flat (exact)', results, seconds, gt), build_s=build, memory_mib=memory)]


def build_hnswlib(corpus: np.ndarray) -> tuple[dict, dict]:
    import hnswlib

    before = rss_mib()
    started = time.perf_counter()
    index = hnswlib.Index(space='cosine', dim=corpus.shape[1])
    index.init_index(max_elements=len(corpus), M=HNSW['M'], ef_construction=HNSW['ef_construction'])
    index.add_items(corpus, np.arange(len(corpus)))  # all cores, as annlite builds
    build = {'build_s': time.perf_counter() - started, 'memory_mib': rss_mib() - before}
    index.set_ef(HNSW['ef_search'])
    index.set_num_threads(1)
    return build, {'hnswlib': lambda q, i: index.knn_query(q, k=LIMIT)[0][0]}


def new_indexer(workspace: Path, dim: int):
    """Our AnnLiteIndexer (one shard), as the Flow configures it but with common.HNSW."""
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    return AnnLiteIndexer(
        n_dim=dim,
        metric='cosine',
        workspace=str(workspace),
        max_connection=HNSW['M'],
        ef_construction=HNSW['ef_construction'],
        ef_search=HNSW['ef_search'],
    )


def index_into(indexer, corpus: np.ndarray, start: int, stop: int, batch: int = 1000) -> None:
    """Index corpus[start:stop] as documents ``d<i>`` in requests of ``batch``, as the Flow sends them."""
    from docarray import Document, DocumentArray

    for first in range(start, stop, batch):
        last = min(stop, first + batch)
        indexer.index(DocumentArray(Document(id=f'd{i}', embedding=corpus[i]) for i in range(first, last)))


def query_docs(queries: np.ndarray) -> list:
    from docarray import Document, DocumentArray

    return [DocumentArray([Document(embedding=q)]) for q in queries]


def executor_search(indexer, docs) -> list[int]:
    indexer.search(docs, parameters={'limit': LIMIT})
    return [int(match.id[1:]) for match in docs[0].matches]


def build_annlite(corpus: np.ndarray, queries: np.ndarray) -> tuple[dict, dict]:
    """Our indexer, and the bare annlite index under it (same graph, same data) called two ways."""
    from docarray import Document, DocumentArray

    import clip_search.executors.annlite_indexer  # noqa: F401  (imported before the baseline: memory is the index's)

    workspace = scratch_dir('bench-annlite-')
    before = rss_mib()
    started = time.perf_counter()
    indexer = new_indexer(workspace, corpus.shape[1])
    index_into(indexer, corpus, 0, len(corpus))
    build = {'build_s': time.perf_counter() - started, 'memory_mib': rss_mib() - before, 'disk_mib': dir_size_mib(workspace)}
    annlite = indexer._index
    docs = query_docs(queries)  # made up front: a request arrives as Documents

    def bare_vectors(q, i):
        return [int(d.id[1:]) for d in annlite.search_by_vectors(q[None], limit=LIMIT, include_metadata=False)[1][0]]

    def bare_docs(q, i):
        query = DocumentArray([Document(embedding=q)])
        annlite.search(query, limit=LIMIT)
        return [int(m.id[1:]) for m in query[0].matches]

    from annlite.math import l2_normalize

    graph = annlite.vec_index(0)._index  # the HNSW index under all three, called as our executor calls it
    graph.set_ef(HNSW['ef_search'])

    def hnsw_call(q, i):  # the offsets are the row numbers: the documents went in in order
        return graph.knn_query(l2_normalize(q[None]), k=LIMIT, num_threads=1)[0][0]

    searches = {
        'annlite HNSW call (offsets only)': hnsw_call,
        'annlite search_by_vectors (ids only)': bare_vectors,
        'annlite search (documents)': bare_docs,
        'ours: AnnLiteIndexer.search': lambda q, i: executor_search(indexer, docs[i]),
    }
    return build, searches


def write_profile(work, path: str) -> None:
    """Profile ``work()`` with pyinstrument and save the call tree as text."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    work()
    profiler.stop()
    Path(path).write_text(profiler.output_text(unicode=False, color=False, show_all=False))


def run_scaling(task: dict) -> list[dict]:
    """Grow our indexer through ``sizes``, measuring search latency, recall, memory and disk at each."""
    sizes = task['sizes']
    queries = clustered_vectors(task['n_queries'], task['clusters'], seed=2)
    corpus = clustered_vectors(sizes[-1], task['clusters'], seed=task.get('seed', 3))
    workspace = scratch_dir('bench-scaling-')
    import clip_search.executors.annlite_indexer  # noqa: F401  (imported before the baseline: memory is the index's)

    baseline = rss_mib()  # after the corpus exists: what follows is the index's own memory
    indexer = new_indexer(workspace, corpus.shape[1])
    docs = query_docs(queries)
    rows, indexed, index_seconds = [], 0, 0.0
    for size in sizes:
        started = time.perf_counter()
        index_into(indexer, corpus, indexed, size)
        index_seconds += time.perf_counter() - started
        indexed = size
        results, seconds = timed_queries(lambda d: executor_search(indexer, d), docs)
        exact = exact_top_k(queries, corpus[:size], LIMIT)
        rows.append({
            'vectors': size,
            'p50_ms': 1000 * median(seconds),
            'p99_ms': 1000 * percentile(seconds, 99),
            'recall_at_10': recall_at_k(results, exact),
            'index_docs_per_s': size / index_seconds,
            'rss_mib': rss_mib() - baseline,
            'disk_mib': dir_size_mib(workspace),
            'deadline_hit': False,
        })
        print(f'scaling: {size} vectors, p50 {rows[-1]["p50_ms"]:.2f} ms, rss {rows[-1]["rss_mib"]:.0f} MiB', flush=True)
        if time.monotonic() > task['deadline']:
            rows[-1]['deadline_hit'] = True
            break
    indexer.close()
    return rows


def serve(task: dict) -> None:
    """Build one library's index, print ``ready``, then answer stdin commands with JSON lines.

    ``search NAME`` times every query through the named search; ``profile PATH`` profiles ours.
    Two of these (hnswlib's and annlite's) are driven turn by turn, so both see the same load.
    """
    data = Path(task['data'])
    corpus, queries, gt = np.load(data / 'corpus.npy'), np.load(data / 'queries.npy'), np.load(data / 'gt.npy')
    build, searches = build_hnswlib(corpus) if task['lib'] == 'hnswlib' else build_annlite(corpus, queries)
    print('ready ' + json.dumps({'build': build, 'searches': list(searches)}), flush=True)
    for line in sys.stdin:
        command, arg = line.rstrip('\n').split(' ', 1)
        if command == 'profile':
            ours = searches['ours: AnnLiteIndexer.search']
            write_profile(lambda: [ours(q, i) for i, q in enumerate(queries[:300])], arg)
            print(json.dumps({'saved': arg}), flush=True)
            continue
        search = searches[arg]
        results, seconds = timed_queries(lambda i: search(queries[i], i), range(len(queries)))
        print(json.dumps(search_stats(arg, results, seconds, gt)), flush=True)


def run(task: dict) -> list[dict]:
    if task['lib'] == 'scaling':
        return run_scaling(task)
    data = Path(task['data'])
    return run_faiss(np.load(data / 'corpus.npy'), np.load(data / 'queries.npy'), data)


if __name__ == '__main__':
    if json.loads(sys.argv[1]).get('serve'):
        serve(json.loads(sys.argv[1]))
    else:
        worker_main(run)

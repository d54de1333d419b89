"""Scale benchmark (issue 13): N 512-d documents through the real Flow in 2 shards, beside bare hnswlib.

    python bench/scale.py --docs 1000000          # about an hour and a half on 2 cores
    python bench/scale.py --docs 1000000 --no-hnswlib   # the service alone: about 45 minutes
    python bench/scale.py --docs 200000           # the outside check's size
    python bench/scale.py --docs 5000 --queries 100   # a smoke run
    python bench/scale.py --docs 100000 --pq 64 --no-hnswlib   # float and --pq 64 side by side
    python bench/scale.py --docs 1000000 --pq 64 --no-hnswlib --float-from bench/results/scale/scale-1000000.json
    python bench/scale.py --docs 10000000 --pq 64 --no-hnswlib --no-float --work /data/scale10m   # hours: run it again to go on

Measures, in one run: indexing docs/s (documents sent with their embeddings, 1,000 a request, so
only the index path counts), resident memory of every process empty and full, search p50/p99 over
the Flow and recall@10 against the exact answer, the restart time until ``/status`` counts every
document after a graceful stop and after ``kill -9`` of every process (with writes, deletes and
updates after the last snapshot), the single-query QPS of one shard in-process, and bare hnswlib
on the same split with the same M and ef (in a process of its own: annlite and hnswlib cannot
share one), and one shard's search latency while it writes a snapshot beside without (the
snapshot runs off the request path: issue 26). Writes ``OUT/scale.json`` and prints a table.

With ``--pq N`` the same corpus then goes through a second Flow started with ``--pq N`` (its own
workspace), and the summary compares the two: anonymous memory a document (the vector file's page
cache beside it, which the kernel may drop), recall@10, single-query p50, indexing rate, restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DIM, HNSW, LIMIT, clustered_vectors, median, percentile, recall_at_k, rss_mib, scratch_dir

BENCH = Path(__file__).resolve().parent
CHUNK = 100_000  # corpus rows generated at a time, and indexed between two records of a run's progress
MILESTONE = 1_000_000  # rows between two measures of memory and disk while indexing


def log(message: str) -> None:
    print(f'[scale {time.strftime("%H:%M:%S")}] {message}', flush=True)


def split(n: int, shards: int) -> list[np.ndarray]:
    """Which rows each shard holds: the Flow's own placement (owner_shard of the id 'd<row>')."""
    from clip_search.sharding import owner_shard

    owners = np.array([owner_shard(f'd{i}', shards) for i in range(n)])
    return [np.flatnonzero(owners == shard) for shard in range(shards)]


class Corpus:
    """The clustered corpus, ``CHUNK`` rows at a time, each chunk drawn again from its own seed: never held
    or stored whole (10M 512-d rows are 20 GB), and the same rows in every process and every run."""

    def __init__(self, n: int, clusters: int):
        self.n, self.clusters = n, clusters

    @classmethod
    def of(cls, data) -> 'Corpus':
        return cls(**json.loads((Path(data) / 'corpus.json').read_text()))

    def save(self, data: Path) -> None:
        (data / 'corpus.json').write_text(json.dumps({'n': self.n, 'clusters': self.clusters}))

    def __len__(self) -> int:
        return self.n

    def chunk(self, number: int) -> np.ndarray:
        start = number * CHUNK
        return clustered_vectors(min(CHUNK, self.n - start), self.clusters, seed=[1, number])

    def chunks(self, start: int = 0):
        """(first row, rows) of every chunk from the one holding row ``start`` on."""
        for number in range(start // CHUNK, -(-self.n // CHUNK)):
            yield number * CHUNK, self.chunk(number)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop``, generating only the chunks that hold them."""
        parts = [self.chunk(number) for number in range(start // CHUNK, -(-stop // CHUNK))]
        return np.concatenate(parts)[start % CHUNK : start % CHUNK + stop - start]


def exact_top_k_streamed(queries: np.ndarray, corpus: Corpus, k: int) -> np.ndarray:
    """Brute-force top-k of every query over the corpus, chunk by chunk (a running top-k of ids)."""
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best = np.empty((len(queries), 0), dtype=np.float32)
    for first, rows in corpus.chunks():
        chunk = queries @ rows.T  # the chunk's similarities, once
        top = np.argpartition(-chunk, k, axis=1)[:, :k]
        sims = np.concatenate([best, np.take_along_axis(chunk, top, axis=1)], axis=1)
        ids = np.concatenate([best_ids, top + first], axis=1)
        order = np.argsort(-sims, axis=1, kind='stable')[:, :k]
        best, best_ids = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
    return best_ids


# -- bare hnswlib, in its own process -------------------------------------------------------------


def run_hnswlib(task: dict) -> dict:
    import hnswlib

    corpus = Corpus.of(task['data'])
    queries = np.load(Path(task['data']) / 'queries.npy')
    shards, found, build_seconds, load_seconds, single = [], [[] for _ in queries], 0.0, 0.0, None
    for shard, rows in enumerate(split(len(corpus), task['shards'])):
        index = hnswlib.Index(space='cosine', dim=DIM)
        index.init_index(max_elements=len(rows), ef_construction=HNSW['ef_construction'], M=HNSW['M'])
        index.set_num_threads(1)  # one thread per shard, as a shard indexes
        for start, vectors in corpus.chunks():
            mine = rows[(rows >= start) & (rows < start + len(vectors))]
            started = time.perf_counter()
            index.add_items(vectors[mine - start], mine)
            build_seconds += time.perf_counter() - started
        index.set_ef(HNSW['ef_search'])
        path = Path(task['data']) / f'hnswlib-{shard}.bin'
        index.save_index(str(path))
        started = time.perf_counter()
        loaded = hnswlib.Index(space='cosine', dim=DIM)
        loaded.load_index(str(path))
        load_seconds += time.perf_counter() - started
        path.unlink()
        del loaded
        seconds = []
        for i, query in enumerate(queries):
            started = time.perf_counter()
            labels, distances = index.knn_query(query[None], k=LIMIT)
            seconds.append(time.perf_counter() - started)
            found[i].extend(zip(distances[0].tolist(), labels[0].tolist()))
        single = single or len(seconds) / sum(seconds)  # shard 0's single-query QPS
        shards.append(len(rows))
        del index
    merged = [[label for _, label in sorted(row)[:LIMIT]] for row in found]
    gt = np.load(Path(task['data']) / 'gt.npy')
    return {
        'build_docs_per_s_one_thread': len(corpus) / build_seconds,
        'load_seconds_all_shards': load_seconds,
        'shard0_single_query_qps': single,
        'recall_at_10': recall_at_k(merged, gt),
        'rss_mib': rss_mib(),
        'shard_sizes': shards,
    }


# -- one shard in-process: single-query QPS of the indexer itself ---------------------------------


def open_shard(task: dict):
    """Shard ``task['shard']`` of a Flow's workspace, in this process, loaded."""
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    folder = Path(task['folder'])
    settings = json.loads((folder / 'clip_search_index.json').read_text())
    indexer = AnnLiteIndexer(n_dim=settings['n_dim'], workspace=str(folder.parent.parent), columns=settings['columns'],
                             n_subvectors=settings.get('n_subvectors'),
                             runtime_args={'shard_id': task['shard'], 'shards': settings['shards']})  # fmt: skip
    indexer.wait_loaded()
    return indexer


def run_snapshot_pause(task: dict) -> dict:
    """Search latency in one shard while it writes a snapshot, beside without (issue 26): a thread
    searches one query at a time; meanwhile the shard takes a snapshot as its background thread does
    (under the write lock only). Latencies of the searches that overlapped a snapshot are compared
    with those of the same length of time without one; and the snapshot as the shard takes it (its
    files written by a forked child) with the files written in the shard's own process, as before."""
    import threading

    from docarray import Document, DocumentArray

    from clip_search import shard_store

    queries = np.load(Path(task['data']) / 'queries.npy')
    indexer = open_shard(task)
    forked = shard_store.ForkedChild

    class InProcess:  # the files written in the shard's process, as before the child
        def __init__(self, work, what):
            self.answer = work()

        def result(self) -> dict:
            return self.answer

    def search_while(busy: threading.Event, stop: threading.Event) -> list[float]:
        latencies, i = [], 0
        while not stop.is_set():
            query = DocumentArray([Document(embedding=queries[i % len(queries)])])
            was_busy, started = busy.is_set(), time.perf_counter()
            indexer.search(query, parameters={'limit': LIMIT})
            if was_busy or busy.is_set():
                latencies.append(time.perf_counter() - started)
            i += 1
        return latencies

    def measure(busy: threading.Event, seconds: float | None) -> float:
        started = time.perf_counter()
        if seconds is None:
            with indexer._write_lock:
                indexer._snapshot()
        else:
            time.sleep(seconds)
        busy.clear()
        return time.perf_counter() - started

    latencies = {'without': [], 'forked': [], 'in_process': []}
    snapshot_seconds = {'forked': [], 'in_process': []}
    for _ in range(task.get('rounds', 3)):
        for kind in ('without', 'forked', 'in_process'):
            shard_store.ForkedChild = forked if kind != 'in_process' else InProcess
            busy, stop, out = threading.Event(), threading.Event(), []
            busy.set()
            searcher = threading.Thread(target=lambda: out.extend(search_while(busy, stop)))
            searcher.start()
            took = measure(busy, None if kind != 'without' else max(snapshot_seconds['forked'], default=5.0))
            if kind != 'without':
                snapshot_seconds[kind].append(round(took, 2))
            stop.set()
            searcher.join()
            latencies[kind].extend(out)
    shard_store.ForkedChild = forked
    folder = sorted(indexer._data_path.glob('snapshot-*'))[-1]
    size = sum(f.stat().st_size for f in folder.iterdir())
    indexer.close()
    result = {'snapshot_mib': round(size / 2**20), 'snapshot_s': snapshot_seconds}
    for kind, values in latencies.items():
        result[kind] = {'searches': len(values), 'p50_ms': round(1000 * median(values), 2), 'p99_ms': round(1000 * percentile(values, 99), 2)}
    for kind in ('forked', 'in_process'):
        result[f'p99_{kind}_vs_without'] = round(result[kind]['p99_ms'] / result['without']['p99_ms'], 2)
    return result


def run_shard(task: dict) -> dict:
    """The shard's single-query QPS, and then (same process, same queries, each once as for hnswlib)
    annlite's HNSW call alone: the ratio of the two is what the document path (ids, store reads,
    docarray) costs. Two loops, not one alternating: a query's second walk would find the caches warm."""
    from annlite.math import l2_normalize
    from docarray import Document, DocumentArray

    queries = np.load(Path(task['data']) / 'queries.npy')
    started = time.perf_counter()
    indexer = open_shard(task)
    loaded = time.perf_counter() - started
    graph = indexer._index.vec_index(0)._index  # the HNSW index the search calls, as it sets it up
    graph.set_ef(max(HNSW['ef_search'], LIMIT))
    seconds, graph_seconds = [], []
    for query in queries:
        docs = DocumentArray([Document(embedding=query)])
        started = time.perf_counter()
        indexer.search(docs, parameters={'limit': LIMIT})
        seconds.append(time.perf_counter() - started)
    compression = indexer._compression if indexer._compression and indexer._compression.trained(indexer._index) else None
    for query in queries:
        started = time.perf_counter()
        if compression:  # a graph over PQ codes takes the query's codes and distance tables: the call and its re-rank
            compression.nearest(indexer._index, query[None], LIMIT)
        else:
            graph.knn_query(l2_normalize(query[None]), k=LIMIT, num_threads=1)
        graph_seconds.append(time.perf_counter() - started)
    batch = DocumentArray(Document(embedding=q) for q in queries)
    started = time.perf_counter()
    indexer.search(batch, parameters={'limit': LIMIT})
    batch_seconds = time.perf_counter() - started
    indexer.close()
    return {
        'single_query_qps': len(seconds) / sum(seconds),
        'hnsw_call_qps': len(graph_seconds) / sum(graph_seconds),
        'batch_qps': len(queries) / batch_seconds,
        'load_s': loaded,
    }


def worker(kind: str, task: dict) -> dict:
    out = Path(tempfile.mkstemp(prefix='bench-scale-result-', suffix='.json')[1])
    try:
        subprocess.run([sys.executable, __file__, '--worker', kind, json.dumps(task), str(out)], check=True)
        return json.loads(out.read_text())
    finally:
        out.unlink()


# -- the Flow --------------------------------------------------------------------------------------


def memory(service) -> dict:
    """Resident MiB of every process of the service, by role (as far as the command line tells)."""
    return {str(pid): round(rss_mib(pid)) for pid in service.processes()}


def memory_kinds(service) -> dict:
    """MiB of the service's processes by kind: anonymous (heap, the graph) and file-backed (mapped files,
    among them the pages of the vector file a compressed shard has read)."""
    total = {'anon_mib': 0.0, 'file_mib': 0.0}
    for pid in service.processes():
        try:
            status = Path(f'/proc/{pid}/status').read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in status:
            if line.startswith('RssAnon:'):
                total['anon_mib'] += int(line.split()[1]) / 1024
            elif line.startswith('RssFile:'):
                total['file_mib'] += int(line.split()[1]) / 1024
    return {key: round(value, 1) for key, value in total.items()}


def page_cache_mib(paths: list[Path]) -> float:
    """MiB of these files in the page cache (util-linux's fincore)."""
    if not paths:
        return 0.0
    out = subprocess.run(['fincore', '--bytes', '--noheadings', '--output', 'RES', *map(str, paths)], capture_output=True, text=True)
    return round(sum(int(line) for line in out.stdout.split()) / 2**20, 1)


def disk_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20, 1)


def wait_documents(service, expected: int, started: float, timeout: float = 1800) -> float:
    """Seconds from ``started`` until /status counts ``expected`` documents."""
    client = service.client()
    while time.monotonic() - started < timeout:
        try:
            if client.status()['documents'] == expected:
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - loading or not up yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f'/status did not count {expected} documents in {timeout} s')


async def index_rows(address: str, rows: dict, request_size: int = 1000, in_flight: int = 4) -> float:
    """Send the rows (row number: vector), ``request_size`` a request, at most ``in_flight`` requests unanswered.

    Without a bound Jina's client streams every request at once, and the gateway, the head and the
    shards queue hundreds of them: gigabytes of resident memory that are the client's doing.
    """
    from docarray import Document
    from jina import Client

    client = Client(host=address, asyncio=True)
    docs = (Document(id=f'd{i}', embedding=vector) for i, vector in rows.items())
    started = time.perf_counter()
    async for answer in client.post('/index', inputs=docs, request_size=request_size, prefetch=in_flight):
        assert answer[0].embedding is None  # answers carry ids only
    return time.perf_counter() - started


async def search_rows(address: str, queries: np.ndarray) -> tuple[list, list[float]]:
    from docarray import Document, DocumentArray
    from jina import Client

    client = Client(host=address, asyncio=True)
    latencies, found = [], []
    for query in [queries[0], *queries]:  # the first warms the channel up
        started = time.perf_counter()
        async for answer in client.post('/search', inputs=DocumentArray([Document(embedding=query)]), parameters={'limit': LIMIT}):
            ids = [corpus_row(i) for i in answer[0].matches[:, 'id']]
        latencies.append(time.perf_counter() - started)
        found.append(ids)
    return found[1:], latencies[1:]


def corpus_row(doc_id: str) -> int:
    """The corpus row of an id ``d<row>``; -1 for another (the restart check's new documents)."""
    return int(doc_id[1:]) if doc_id[:1] == 'd' and doc_id[1:].isdigit() else -1


def start(model_dir: Path, workspace: Path, shards: int, pq: int | None = None):
    from helpers.service import start_service

    extra = ('--pq', str(pq)) if pq else ()
    return start_service(model_dir, workspace, shards=shards, wait_searchable=False, ready_timeout=600, extra_args=extra)


def run_flow(data: Path, work: Path, shards: int, pq: int | None = None) -> dict:
    from helpers.service import TINY_MODEL_CFG, wait_searchable_until, write_tiny_model

    corpus = Corpus.of(data)
    queries = np.load(data / 'queries.npy')
    gt = np.load(data / 'gt.npy')
    n = len(corpus)
    model_dir = write_tiny_model(work / 'model', model_cfg=dict(TINY_MODEL_CFG, embed_dim=DIM))
    workspace = work / 'workspace'
    progress = Progress(work / 'progress.json')
    result: dict = progress.result
    service = start(model_dir, workspace, shards, pq)
    try:
        if result['rows_indexed']:  # resumed: the shards load their snapshots before they answer
            wait_searchable_until(service, time.monotonic() + 1800)
        if 'rss_empty_mib' not in result:
            time.sleep(2)
            result['rss_empty_mib'] = memory(service)
            result['memory_empty'] = memory_kinds(service)
            progress.save()
            log(f'empty service: {sum(result["rss_empty_mib"].values())} MiB {result["rss_empty_mib"]}')
        seconds = index_resumably(service, corpus, progress, workspace)
        result['index_docs_per_s'] = timed_rate(result)
        log(f'indexed {n} in {seconds:.0f} s: {result["index_docs_per_s"]:.0f} docs/s')
        found, latencies = asyncio.run(search_rows(service.address, queries))
        result.update(p50_ms=1000 * median(latencies), p99_ms=1000 * percentile(latencies, 99), recall_at_10=recall_at_k(found, gt))
        time.sleep(2)
        result['rss_full_mib'] = memory(service)
        result['memory_full'] = memory_kinds(service)
        vector_files = sorted(workspace.rglob('vectors.f32'))
        result['vector_files_mib'] = round(sum(f.stat().st_size for f in vector_files) / 2**20, 1)
        result['vector_files_page_cache_mib'] = page_cache_mib(vector_files)
        result['workspace_disk_mib'] = disk_mib(workspace)
        log(f'memory {result["memory_empty"]} -> {result["memory_full"]}; vector files {result["vector_files_mib"]} MiB, {result["vector_files_page_cache_mib"]} MiB cached; disk {result["workspace_disk_mib"]} MiB')
        log(f'full service: {sum(result["rss_full_mib"].values())} MiB; search p50 {result["p50_ms"]:.1f} ms, recall {result["recall_at_10"]:.3f}')
        started = time.monotonic()
        service.stop(timeout=600)
        result['graceful_stop_s'] = time.monotonic() - started
        started = time.monotonic()
        service = start(model_dir, workspace, shards, pq)
        result['graceful_restart_serving_s'] = time.monotonic() - started  # the Flow's own start: processes, imports, model
        result['graceful_restart_s'] = wait_documents(service, n, started)
        after, _ = asyncio.run(search_rows(service.address, queries[:200]))
        result['same_answers_after_graceful_restart'] = after == found[:200]
        log(f'graceful restart: stop {result["graceful_stop_s"]:.1f} s, searchable after {result["graceful_restart_s"]:.1f} s')
        if 'acknowledged_writes' not in result:  # a resumed run does not write them twice
            result.update(kill9_check(service, corpus, queries, n))
            progress.save()
        started = time.monotonic()
        service.kill()
        service = start(model_dir, workspace, shards, pq)
        result['kill9_restart_serving_s'] = time.monotonic() - started
        expected = n + 1000 - 500
        result['kill9_restart_s'] = wait_documents(service, expected, started)
        result['after_kill9'] = check_after_kill9(service, corpus, n)
        log(f'kill -9 restart: searchable after {result["kill9_restart_s"]:.1f} s, {result["after_kill9"]}')
        result['restart_log'] = [line.strip() for line in service.log().splitlines() if 'searchable' in line or 'rebuilt' in line]
        folder = sorted(workspace.rglob('clip_search_index.json'))[0].parent
    finally:
        service.stop(timeout=600)
    result['shard_folder'] = str(folder)
    return result


class Progress:
    """What a run of one Flow has measured so far, on disk: the same command with the same ``--work``
    goes on where a run cut short (a session's end) stopped, instead of indexing hours again."""

    def __init__(self, path: Path):
        self.path = path
        self.result: dict = json.loads(path.read_text()) if path.exists() else {'rows_indexed': 0, 'index_seconds': 0.0}

    def save(self) -> None:
        temporary = self.path.with_suffix('.tmp')
        temporary.write_text(json.dumps(self.result, indent=2))
        os.replace(temporary, self.path)


def index_resumably(service, corpus: Corpus, progress: Progress, workspace: Path) -> float:
    """Index the corpus a chunk at a time, recording after each chunk the rows done and the seconds spent;
    returns the seconds indexing took in all. After a cut, the chunk that was under way is looked up
    first (``/status`` lookup) and only its missing rows are sent: an id is never indexed twice."""
    done = progress.result
    client = service.client()
    for first, vectors in corpus.chunks(done['rows_indexed']):
        rows = {first + i: vector for i, vector in enumerate(vectors) if first + i >= done['rows_indexed']}
        if done.get('chunk_started') == first:  # cut mid-chunk: skip what the service acknowledged
            held = set(client.indexed([f'd{i}' for i in rows]))
            rows = {i: v for i, v in rows.items() if f'd{i}' not in held}
            done['rows_untimed'] = done.get('rows_untimed', 0) + len(held)  # their seconds went with the cut run
            log(f'resuming at row {first}: {len(held)} of the chunk held already')
        done['chunk_started'] = first
        progress.save()
        done['index_seconds'] += asyncio.run(index_rows(service.address, rows))
        done['rows_indexed'] = first + len(vectors)
        if done['rows_indexed'] % MILESTONE == 0 and done['rows_indexed'] < len(corpus):
            done.setdefault('milestones', []).append(milestone(service, done, workspace))
        progress.save()
        log(f'{done["rows_indexed"]} rows indexed, {timed_rate(done):.0f} docs/s')
    return done['index_seconds']


def timed_rate(done: dict) -> float:
    """Documents a second over the rows whose indexing was timed (not those a cut run sent unrecorded)."""
    return (done['rows_indexed'] - done.get('rows_untimed', 0)) / done['index_seconds']


def milestone(service, done: dict, workspace: Path) -> dict:
    """Memory, disk and rate on the way (every ``MILESTONE`` rows): a 10M run's 5M figures."""
    figures = {
        'rows': done['rows_indexed'],
        'index_docs_per_s': round(timed_rate(done)),
        'memory': memory_kinds(service),
        'workspace_disk_mib': disk_mib(workspace),
    }
    empty = done['memory_empty']['anon_mib']
    figures['anon_bytes_per_doc_above_empty'] = round((figures['memory']['anon_mib'] - empty) * 2**20 / done['rows_indexed'])
    log(f'milestone: {figures}')
    return figures


NEW_AFTER_RESTART, DELETED_AFTER_RESTART = 1000, 500  # kill9_check's writes: a finished run holds corpus + 500


def kill9_check(service, corpus, queries, n: int) -> dict:
    """After the graceful restart: 1,000 new documents, 500 deleted, 100 updated (acknowledged)."""
    from docarray import Document

    client = service.client()
    new = [Document(id=f'new{i}', embedding=v) for i, v in enumerate(clustered_vectors(NEW_AFTER_RESTART, 1000, seed=3))]
    client.index(new, batch_size=500)
    client.delete([f'd{i}' for i in range(DELETED_AFTER_RESTART)])
    updated = [Document(id=f'd{i}', embedding=v) for i, v in zip(range(1000, 1100), clustered_vectors(100, 1000, seed=4))]
    client.update(updated)
    return {'acknowledged_writes': f'{NEW_AFTER_RESTART} new, {DELETED_AFTER_RESTART} deleted, 100 updated'}


def check_after_kill9(service, corpus, n: int) -> dict:
    """New and updated documents are found first for their own embedding; deleted ones are gone."""
    client = service.client()
    new = clustered_vectors(1000, 1000, seed=3)[:50]
    updated = clustered_vectors(100, 1000, seed=4)[:50]
    deleted = corpus.rows(0, 50)
    top = lambda vectors: [r.matches[0].id for r in client.search([_doc(v) for v in vectors], limit=1)]  # noqa: E731
    return {
        'new_found_first': top(new) == [f'new{i}' for i in range(50)],
        'updated_found_first': top(updated) == [f'd{i}' for i in range(1000, 1050)],
        'deleted_gone': not ({f'd{i}' for i in range(50)} & set(top(deleted))),
    }


def _doc(vector):
    from docarray import Document

    return Document(embedding=vector)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--docs', type=int, default=1_000_000)
    parser.add_argument('--shards', type=int, default=2)
    parser.add_argument('--queries', type=int, default=1000)
    parser.add_argument('--out', type=Path, default=BENCH / 'results' / 'scale')
    parser.add_argument('--work', type=Path, help='data and workspace folder, kept (default: a temporary one, removed)')
    parser.add_argument('--no-hnswlib', action='store_true',
                        help="skip bare hnswlib (half the 1M run's time): the ratios to it are left out")  # fmt: skip
    parser.add_argument('--pq', type=int, metavar='N', help='also run the Flow with --pq N on the same corpus and compare')
    parser.add_argument('--float-from', type=Path, metavar='JSON',
                        help="with --pq: the float Flow's figures from an earlier scale-N.json of the same --docs, not run again")  # fmt: skip
    parser.add_argument('--no-float', action='store_true', help='with --pq: the compressed Flow alone (10M float documents need 25 GB of RAM)')
    parser.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.float_from or args.no_float) and not args.pq:
        parser.error('--float-from and --no-float go with --pq')
    if args.worker:
        kind, task, out = args.worker
        Path(out).write_text(json.dumps({'hnswlib': run_hnswlib, 'shard': run_shard, 'snapshot': run_snapshot_pause}[kind](json.loads(task))))
        return
    work = args.work or scratch_dir('bench-scale-')  # 1.4 GB at 200k documents: removed at exit
    data = work / 'data'
    data.mkdir(parents=True, exist_ok=True)
    clusters = max(10, args.docs // 100)
    log(f'{args.docs} clustered 512-d vectors ({clusters} clusters), {args.queries} queries in {work}')
    corpus = Corpus(args.docs, clusters)
    if not (data / 'gt.npy').exists():  # a resumed run keeps its data
        queries = clustered_vectors(args.queries, clusters, seed=2)
        corpus.save(data)
        np.save(data / 'queries.npy', queries)
        np.save(data / 'gt.npy', exact_top_k_streamed(queries, corpus, LIMIT))
        log('exact top-10 of every query computed')
    elif Corpus.of(data).n != args.docs:
        parser.error(f'{work} holds a run of {Corpus.of(data).n} documents, not {args.docs}')
    results = {'docs': args.docs, 'shards': args.shards, 'hnsw': HNSW, 'cores': os.cpu_count(), 'load_average_start': os.getloadavg()}
    if args.float_from:
        earlier = json.loads(args.float_from.read_text())
        if earlier['docs'] != args.docs:
            parser.error(f'{args.float_from} holds a run of {earlier["docs"]} documents, not {args.docs}')
        results['flow'], results['float_from'] = earlier['flow'], str(args.float_from)
    elif not args.no_float:
        results['flow'] = run_flow(data, work / 'float', args.shards)
    if args.pq:
        results['flow_pq'] = run_flow(data, work / f'pq{args.pq}', args.shards, pq=args.pq)
    measured = results['flow_pq' if args.float_from or args.no_float else 'flow']
    shard_task = {'data': str(data), 'folder': measured['shard_folder'], 'shard': 0}
    out = args.out / (f'scale-{args.docs}' + (f'-pq{args.pq}' if args.pq else '') + '.json')
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))  # the Flow's figures, whatever happens to the workers
    results['shard'] = worker('shard', shard_task)
    log(f'one shard in-process: {results["shard"]}')
    results['snapshot_pause'] = worker('snapshot', shard_task)
    log(f'searches during a snapshot: {results["snapshot_pause"]}')
    if not args.no_hnswlib:
        results['hnswlib'] = worker('hnswlib', {'data': str(data), 'shards': args.shards})
        log(f'hnswlib: {results["hnswlib"]}')
    results['load_average_end'] = os.getloadavg()
    results['summary'] = summary(results, args.shards)
    if args.pq and not args.no_float:
        results['summary_pq'] = summary_pq(results, args.pq)
    out.write_text(json.dumps(results, indent=2))
    if 'summary_pq' in results:
        print(json.dumps(results['summary_pq'], indent=2))
    print(json.dumps(results['summary'], indent=2))


def summary(results: dict, shards: int) -> dict:
    flow, shard = results['flow_pq' if 'float_from' in results or 'flow' not in results else 'flow'], results['shard']
    empty, full = sum(flow['rss_empty_mib'].values()), sum(flow['rss_full_mib'].values())
    ours = {
        'index_docs_per_s': round(flow['index_docs_per_s']),
        'rss_empty_mib': empty,
        'rss_full_mib': full,
        'kib_per_doc_above_empty': round((full - empty) * 1024 / results['docs'], 2),
        **per_document_costs(flow, results['docs']),
        'largest_empty_process_mib': max(flow['rss_empty_mib'].values()),
        'graceful_restart_s': round(flow['graceful_restart_s'], 1),
        'kill9_restart_s': round(flow['kill9_restart_s'], 1),
        'restart_serving_s': [round(flow['graceful_restart_serving_s'], 1), round(flow['kill9_restart_serving_s'], 1)],
        'same_answers_after_graceful_restart': flow['same_answers_after_graceful_restart'],
        'after_kill9': flow['after_kill9'],
        'search_p50_ms': round(flow['p50_ms'], 1),
        'search_p99_ms': round(flow['p99_ms'], 1),
        'recall_at_10': round(flow['recall_at_10'], 3),
        'shard_single_query_qps': round(shard['single_query_qps']),
        'shard_hnsw_call_qps': round(shard['hnsw_call_qps']),
    }
    if 'hnswlib' not in results:  # --no-hnswlib
        return ours
    bare = results['hnswlib']
    bound = bare['build_docs_per_s_one_thread'] * min(shards, results['cores'])
    return {
        **ours,
        'hnswlib_bound_docs_per_s': round(bound),
        'index_vs_hnswlib_bound': round(flow['index_docs_per_s'] / bound, 2),
        'hnswlib_recall_at_10': round(bare['recall_at_10'], 3),
        'hnswlib_single_query_qps': round(bare['shard0_single_query_qps']),
        'single_query_qps_vs_hnswlib': round(shard['single_query_qps'] / bare['shard0_single_query_qps'], 2),
        'hnsw_call_vs_hnswlib': round(shard['hnsw_call_qps'] / bare['shard0_single_query_qps'], 2),
        'hnswlib_load_s_all_shards': round(bare['load_seconds_all_shards'], 2),
    }


def per_document_costs(flow: dict, n: int) -> dict:
    """Anonymous memory and disk a document, where the run measured them (older runs did not)."""
    costs = {}
    if 'memory_full' in flow:
        costs['anon_bytes_per_doc_above_empty'] = round((flow['memory_full']['anon_mib'] - flow['memory_empty']['anon_mib']) * 2**20 / n)
        costs['vector_files_page_cache_mib'] = flow['vector_files_page_cache_mib']
    if 'workspace_disk_mib' in flow:
        costs['workspace_disk_bytes_per_doc'] = round(flow['workspace_disk_mib'] * 2**20 / n)
    return costs


def summary_pq(results: dict, pq: int) -> dict:
    """The float Flow and the --pq Flow of one run, side by side."""
    n = results['docs']

    def figures(flow: dict) -> dict:
        anon = None
        if 'memory_full' in flow:  # runs before anonymous memory was counted have resident memory only
            anon = round((flow['memory_full']['anon_mib'] - flow['memory_empty']['anon_mib']) * 2**20 / n)
        return {
            'anon_bytes_per_doc_above_empty': anon,
            'rss_bytes_per_doc_above_empty': round((sum(flow['rss_full_mib'].values()) - sum(flow['rss_empty_mib'].values())) * 2**20 / n),
            'vector_files_mib': flow.get('vector_files_mib', 0.0),
            'vector_files_page_cache_mib': flow.get('vector_files_page_cache_mib', 0.0),
            'workspace_disk_bytes_per_doc': round(flow['workspace_disk_mib'] * 2**20 / n) if 'workspace_disk_mib' in flow else None,
            'recall_at_10': round(flow['recall_at_10'], 3),
            'search_p50_ms': round(flow['p50_ms'], 1),
            'search_p99_ms': round(flow['p99_ms'], 1),
            'index_docs_per_s': round(flow['index_docs_per_s']),
            'graceful_restart_s': round(flow['graceful_restart_s'], 1),
            'kill9_restart_s': round(flow['kill9_restart_s'], 1),
            'same_answers_after_graceful_restart': flow['same_answers_after_graceful_restart'],
            'after_kill9': flow['after_kill9'],
        }

    plain, compressed = figures(results['flow']), figures(results['flow_pq'])
    return {
        'float': plain,
        f'pq{pq}': compressed,
        'p50_pq_vs_float': round(compressed['search_p50_ms'] / plain['search_p50_ms'], 2),
        'index_rate_pq_vs_float': round(compressed['index_docs_per_s'] / plain['index_docs_per_s'], 2),
        'anon_memory_pq_vs_float': round(compressed['anon_bytes_per_doc_above_empty'] / plain['anon_bytes_per_doc_above_empty'], 2)
        if plain['anon_bytes_per_doc_above_empty'] else None,
        'rss_pq_vs_float': round(compressed['rss_bytes_per_doc_above_empty'] / plain['rss_bytes_per_doc_above_empty'], 2),
        'float_from': results.get('float_from', 'this run'),
    }


if __name__ == '__main__':
    main()

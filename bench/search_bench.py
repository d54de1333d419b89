"""Speed, recall and memory of the running service, for several shard counts, measured in one run.

    python bench/search_bench.py [--docs 20000] [--queries 200] [--shards 1 3] [--rounds 4]

Documents carry random unit embeddings (so encoding does not dominate) and the tiny test model
serves queries. Reports index throughput, search latency (p50/p95, one query per request),
recall@10 against an exact numpy ranking, and the service's resident memory after each round of
indexing (it grows with what is stored) and then of searching only (it must stay flat, however many
requests come). This machine
is shared and noisy: compare the ratios between shard counts within one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from docarray import Document, DocumentArray

from clip_search.testing import FLOW_FILE, TINY_MODEL_CFG, start_service, write_tiny_model


def rss_mib(pids: list[int]) -> float:
    """Resident memory of the given processes, in MiB."""
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f'/proc/{pid}/status').read_text().splitlines():
                if line.startswith('VmRSS:'):
                    total_kib += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total_kib / 1024


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bench_shards(shards: int, model_dir: Path, workdir: Path, n_docs: int, n_queries: int, rounds: int) -> dict:
    dim = TINY_MODEL_CFG['embed_dim']
    corpus = unit_vectors(n_docs, dim, seed=1)
    queries = unit_vectors(n_queries, dim, seed=2)
    service = start_service(model_dir, workdir / f'ws-{shards}', shards=shards, flow_file=FLOW_FILE)
    try:
        client = service.client()
        memory = [rss_mib(service.processes())]
        per_round = n_docs // rounds
        index_seconds = 0.0
        latencies: list[float] = []
        for r in range(rounds):
            chunk = range(r * per_round, (r + 1) * per_round)
            docs = DocumentArray(Document(id=f'd{i}', embedding=corpus[i]) for i in chunk)
            started = time.perf_counter()
            client.index(docs, batch_size=1000, show_progress=False)
            index_seconds += time.perf_counter() - started
            for q in queries[: n_queries // rounds]:
                started = time.perf_counter()
                client.search([Document(embedding=q)], limit=10, show_progress=False)
                latencies.append(time.perf_counter() - started)
            memory.append(rss_mib(service.processes()))
        indexed = per_round * rounds
        search_memory = [memory[-1]]
        for _ in range(rounds):  # search only: memory must stay flat however many requests come
            batch = DocumentArray(Document(embedding=q) for q in queries)
            client.search(batch, limit=10, batch_size=1, show_progress=False)
            search_memory.append(rss_mib(service.processes()))
        exact = np.argsort(1 - queries @ corpus[:indexed].T, axis=1)[:, :10]
        results = client.search(DocumentArray(Document(embedding=q) for q in queries), limit=10, batch_size=50)
        hits = sum(len({f'd{i}' for i in row} & set(r.matches[:, 'id'])) for row, r in zip(exact, results))
        latencies.sort()
        return {
            'shards': shards,
            'docs': indexed,
            'index_docs_per_s': indexed / index_seconds,
            'search_p50_ms': 1000 * statistics.median(latencies),
            'search_p95_ms': 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            'recall_at_10': hits / (10 * len(queries)),
            'rss_mib': memory,
            'rss_search_only_mib': search_memory,
        }
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--docs', type=int, default=20000)
    parser.add_argument('--queries', type=int, default=200)
    parser.add_argument('--shards', type=int, nargs='+', default=[1, 3])
    parser.add_argument('--rounds', type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = write_tiny_model(workdir / 'model')
        rows = [bench_shards(s, model_dir, workdir, args.docs, args.queries, args.rounds) for s in args.shards]
    base = rows[0]
    print(f'{"shards":>6} {"docs":>7} {"index/s":>9} {"p50 ms":>8} {"p95 ms":>8} {"recall@10":>9}  RSS MiB per index round | per search-only round')
    for row in rows:
        print(
            f'{row["shards"]:>6} {row["docs"]:>7} {row["index_docs_per_s"]:>9.0f} {row["search_p50_ms"]:>8.1f} '
            f'{row["search_p95_ms"]:>8.1f} {row["recall_at_10"]:>9.3f}  {" -> ".join(f"{m:.0f}" for m in row["rss_mib"])} | '
            f'{" -> ".join(f"{m:.0f}" for m in row["rss_search_only_mib"])}'
        )
    for row in rows[1:]:
        print(
            f'{row["shards"]} vs {base["shards"]} shards: index throughput x{row["index_docs_per_s"] / base["index_docs_per_s"]:.2f}, '
            f'search p50 x{row["search_p50_ms"] / base["search_p50_ms"]:.2f}'
        )


if __name__ == '__main__':
    main()

"""Bounded work per request: a shard's peak memory for the largest search it accepts.

    python bench/bounded.py --docs 200000 [--out bench/results/bounded]

Builds one shard (the indexer alone, no Flow) of 64-d documents, each with a 2 KB blob standing in
for its thumbnail, then, each in a fresh process that loads the shard's snapshot, runs one search
of 10 queries x limit 10,000 (the default cap, 100,000 matches) and reports the process's peak
resident memory growth over the loaded shard:

- ``graph``: the usual HNSW search;
- ``exact``: the exact fallback (``clip_search.exact_search``, chunks of candidates);
- ``annlite_filter``: what the fallback did before, annlite's ``filter`` of every document, for comparison;

and that a search of 256 queries x limit 10,000 is refused naming the cap.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import scratch_dir

DIM, QUERIES, LIMIT = 64, 10, 10_000


def open_shard(workspace: Path):
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    shard = AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(workspace)}, columns=[['color', 'str']])
    assert shard.wait_loaded(3600)
    return shard


def build(workspace: Path, docs: int) -> float:
    from docarray import Document, DocumentArray

    shard, rng, started = open_shard(workspace), np.random.default_rng(1), time.monotonic()
    for start in range(0, docs, 10_000):
        n = min(10_000, docs - start)
        vectors = rng.normal(size=(n, DIM)).astype(np.float32)
        batch = DocumentArray(
            Document(id=f'd{start + i}', embedding=v, tags={'color': 'red' if i % 2 else 'blue'}, blob=rng.bytes(2048))
            for i, v in enumerate(vectors)
        )
        shard.index(batch)
    seconds = time.monotonic() - started
    shard.close()
    return seconds


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(workspace: Path, method: str) -> dict:
    """In this process: load the shard, run one search by ``method``, report the peak memory growth."""
    from docarray import Document, DocumentArray

    from clip_search.exact_search import exact_search

    shard = open_shard(workspace)
    rng = np.random.default_rng(2)
    queries = DocumentArray(Document(embedding=v) for v in rng.normal(size=(QUERIES, DIM)).astype(np.float32))
    loaded, started = peak_mib(), time.monotonic()
    if method == 'graph':
        shard.search(queries, parameters={'limit': LIMIT})
    elif method == 'exact':
        exact_search(shard._index, queries, None, LIMIT)
    elif method == 'annlite_filter':
        everything = shard._index.filter(filter={}, limit=shard._index.total_docs)
        assert len(everything) == shard._index.total_docs
    else:
        try:
            shard.search(DocumentArray(Document(embedding=v) for v in rng.normal(size=(256, DIM)).astype(np.float32)), parameters={'limit': LIMIT})
        except ValueError as exc:
            return {'refused': str(exc)}
        return {'refused': None}
    return {'peak_growth_mib': round(peak_mib() - loaded), 'seconds': round(time.monotonic() - started, 2), 'matches': QUERIES * LIMIT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--docs', type=int, default=200_000)
    parser.add_argument('--out', help='write bounded.json into this folder')
    parser.add_argument('--measure', nargs=2, metavar=('WORKSPACE', 'METHOD'), help=argparse.SUPPRESS)  # a worker
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return
    workspace = scratch_dir('bench-bounded-') / 'shard'
    result = {'docs': args.docs, 'build_s': round(build(workspace, args.docs), 1)}
    for method in ('graph', 'exact', 'annlite_filter', 'over_the_cap'):
        worker = subprocess.run(
            [sys.executable, __file__, '--measure', str(workspace), method], capture_output=True, text=True, check=True
        )
        result[method] = json.loads(worker.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / 'bounded.json').write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()

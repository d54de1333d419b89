"""Recall@10 and latency of a finished ``bench/scale.py`` workspace under other search settings.

    python bench/scale_settings.py --work /work/scale5m --pq 64 --set ef_search=800 --set ef_search=1600,rerank_factor=20

For each ``--set`` (and the defaults first), the Flow is started again on the run's workspace with
those settings under the indexer's ``uses_with``, waits until ``/status`` counts the documents
(``start_s``: a restart's time), and searches the run's 1,000 queries one a request, as ``bench/scale.py`` does: recall@10 against
the run's exact answer, p50 and p99. The workspace is read, not written. Ids that are not corpus
rows (the restart check's new documents) count as misses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from common import median, percentile, recall_at_k


def parse_settings(text: str) -> dict:
    """``ef_search=800,rerank_factor=20`` -> {'ef_search': 800, 'rerank_factor': 20}."""
    settings = {}
    for part in text.split(','):
        name, _, value = part.partition('=')
        settings[name.strip()] = int(value)
    return settings


def measure(work: Path, pq: int | None, settings: dict, queries: np.ndarray, truth: np.ndarray) -> dict:
    from helpers.service import flow_compressed, start_service

    from scale import DELETED_AFTER_RESTART, NEW_AFTER_RESTART, search_rows, wait_documents

    flow_dir = work / f'pq{pq}' if pq else work / 'float'
    flow = flow_compressed(work / 'settings-flows', pq_train_size=20000, **settings)
    extra = ('--pq', str(pq)) if pq else ()
    started = time.monotonic()
    service = start_service(flow_dir / 'model', flow_dir / 'workspace', shards=2, flow_file=flow,
                            wait_searchable=False, ready_timeout=600, extra_args=extra)  # fmt: skip
    try:
        documents = json.loads((flow_dir / 'progress.json').read_text())['rows_indexed'] + NEW_AFTER_RESTART - DELETED_AFTER_RESTART
        start_s = wait_documents(service, documents, started)
        found, latencies = asyncio.run(search_rows(service.address, queries))
    finally:
        service.stop()
    return {
        'settings': settings or 'defaults',
        'start_s': round(start_s, 1),
        'recall_at_10': recall_at_k(found, truth),
        'p50_ms': round(1000 * median(latencies), 1),
        'p99_ms': round(1000 * percentile(latencies, 99), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work', type=Path, required=True, help="the finished run's --work folder")
    parser.add_argument('--pq', type=int, help='the run was made with --pq N (its pqN Flow)')
    parser.add_argument('--set', action='append', default=[], metavar='NAME=N,...', help="the indexer's uses_with to try")
    parser.add_argument('--out', type=Path, help='write the rows as JSON into this file')
    args = parser.parse_args()
    queries, truth = np.load(args.work / 'data' / 'queries.npy'), np.load(args.work / 'data' / 'gt.npy')
    rows = []
    for settings in [{}, *map(parse_settings, args.set)]:
        rows.append(measure(args.work, args.pq, settings, queries, truth))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({'work': str(args.work), 'pq': args.pq, 'rows': rows}, indent=2) + '\n')


if __name__ == '__main__':
    main()

"""Updates over and over: does a shard grow and slow down?

    python bench/updates.py --docs 10000 --rounds 5 [--compact-deleted none] [--out bench/results/updates]

One shard (the indexer alone, no Flow) of 64-d documents is indexed, then every document is
updated (a new embedding) ``rounds`` times over, 500 a request. After the first indexing and after
each round it reports the round's updates/s, the process's resident memory, the shard's folder on
disk and ``unreclaimed_slots`` from /status (graph nodes of deleted documents that no compaction has
removed yet). A round ends when its background snapshot and compaction have too, and its time
includes theirs. Rates are wall-clock and, as the machine may be shared, also per CPU-second of the
process (every thread). The issue's target: the last round within 15% of the first indexing in memory and on
disk, and at least 0.8x as fast as the first round (reported against the indexing round and against
the first update round).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import dir_size_mib, rss_mib, scratch_dir

DIM, BATCH = 64, 500


def main() -> None:
    from docarray import Document, DocumentArray

    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--docs', type=int, default=10_000)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--compact-deleted', default='default', metavar='SHARE|none',
                        help="the indexer's compact_deleted: its default, a share, or none (no compaction)")  # fmt: skip
    parser.add_argument('--out', help='write updates.json (updates-no-compaction.json with none) into this folder')
    args = parser.parse_args()
    settings = {} if args.compact_deleted == 'default' else {'compact_deleted': None if args.compact_deleted == 'none' else float(args.compact_deleted)}
    workspace = scratch_dir('bench-updates-') / 'shard'
    shard = AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(workspace)}, **settings)
    rng = np.random.default_rng(1)
    rows = []
    for round_ in range(args.rounds + 1):
        started, cpu_started = time.monotonic(), time.process_time()
        for start in range(0, args.docs, BATCH):
            vectors = rng.normal(size=(min(BATCH, args.docs - start), DIM)).astype(np.float32)
            batch = DocumentArray(Document(id=f'd{start + i}', embedding=v) for i, v in enumerate(vectors))
            if round_ == 0:
                shard.index(batch)
            else:
                shard.update(batch, parameters={})
        assert shard.wait_idle(3600)  # the round's background snapshot and compaction are part of its cost
        seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
        (entry,) = shard.status()[0].tags['shards']
        rows.append({
            'round': round_,
            'what': 'index' if round_ == 0 else 'update every document',
            'docs_per_s': round(args.docs / seconds),
            'docs_per_cpu_s': round(args.docs / cpu_seconds),
            'rss_mib': round(rss_mib(), 1),
            'disk_mib': round(dir_size_mib(workspace), 1),
            'unreclaimed_slots': int(entry['unreclaimed_slots']),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    shard.close()
    first, last = rows[0], rows[-1]
    result = {
        'docs': args.docs,
        'compact_deleted': shard.compact_deleted,
        'rounds': rows,
        'last_over_first': {key: round(last[key] / first[key], 2) for key in ('docs_per_s', 'docs_per_cpu_s', 'rss_mib', 'disk_mib')},
    }
    if len(rows) > 2:
        result['last_over_first_update'] = {key: round(last[key] / rows[1][key], 2) for key in ('docs_per_s', 'docs_per_cpu_s')}
    print(json.dumps({key: value for key, value in result.items() if key.startswith('last')}))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = 'updates-no-compaction.json' if shard.compact_deleted is None else 'updates.json'
        (Path(args.out) / name).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()

"""How long one shard of a finished run takes to start: its constructor, until it is searchable, and
its background count of the document store.

    python bench/shard_start.py --workspace /work/scale5m/pq64/workspace --shard 1 [--times 2] [--out FILE]

The shard is opened in this process with the settings its folder records (clip_search_index.json),
as the Flow would open it, and closed again; nothing in it changes but the snapshot a close takes
when something changed (nothing does). Run it from two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on the path


def start_once(workspace: Path, shard: int) -> dict:
    from clip_search.executors.annlite_indexer import SETTINGS_FILE, AnnLiteIndexer

    folder = workspace / 'AnnLiteIndexer' / str(shard)
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    started = time.monotonic()
    indexer = AnnLiteIndexer(
        n_dim=settings['n_dim'], columns=settings['columns'], index_polling=settings['index_polling'],
        n_subvectors=settings['n_subvectors'], metas={'workspace': str(workspace), 'name': 'AnnLiteIndexer'},
        runtime_args={'shard_id': shard, 'shards': settings['shards']},
    )  # fmt: skip
    constructed = time.monotonic()
    assert indexer.wait_loaded(1800)
    loaded = time.monotonic()
    time.sleep(0.5)  # the count's thread starts after the shard is searchable
    while any(thread.name.endswith('-verify') for thread in threading.enumerate()):
        time.sleep(0.05)
    counted = time.monotonic()
    result = {
        'constructor_s': round(constructed - started, 1),
        'searchable_after_s': round(loaded - started, 1),
        'background_count_s': round(max(counted - loaded - 0.5, 0), 1),
        'documents': indexer._index.total_docs,
        'loaded_how': indexer.loaded_how,
    }
    indexer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workspace', type=Path, required=True, help="the Flow's --workspace")
    parser.add_argument('--shard', type=int, default=0)
    parser.add_argument('--times', type=int, default=2)
    parser.add_argument('--out', type=Path, help='write the rows as JSON into this file')
    args = parser.parse_args()
    rows = []
    for _ in range(args.times):
        rows.append(start_once(args.workspace, args.shard))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({'workspace': str(args.workspace), 'shard': args.shard, 'starts': rows}, indent=2) + '\n')


if __name__ == '__main__':
    main()

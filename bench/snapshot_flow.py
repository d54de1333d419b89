"""Search latency through the Flow while its shards take snapshots, beside without (issue 26).

    python bench/snapshot_flow.py --work /work/snap1m --pq 64 --searchers 2 --rounds 4 [--writes-every 0.5] [--checkout DIR] --out FILE

Runs on the workspace of a finished ``bench/scale.py`` run (``--work``), and writes to it (it
deletes documents): pass a copy. The Flow is started there (2 shards, as the run made it; no
compaction, so the deletes start nothing but snapshots), and
``--searchers`` clients each search the run's queries one a request over gRPC, all along:

- with ``--writes-every S``, a writer also indexes 10 new documents every S seconds, all along (a
  write arriving during a snapshot is what could hold the searches behind it);
- first ``--baseline`` seconds with nothing else running: the searches *without* a snapshot;
- then each round deletes documents, 500 a request, until every shard has started a new snapshot
  (a shard snapshots in the background once it has journalled ``max(snapshot_every, 5% of its
  documents)`` ids since the last), stops deleting, and waits until the snapshots are written and
  ``--settle`` seconds more.

A snapshot's window runs from its folder's appearance to its manifest's, watched on disk every 5 ms
(the manifest is written last). A search that overlaps a delete request is left out; one that
overlaps a window is *during*; the others of the rounds are *between*. Reported: p50 and p99 of each,
the ratio of the p99s during and without, and each window's length. ``--checkout DIR`` runs the
service of another checkout of clip-search (with its own ``.venv``), e.g. the commit before a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np

from common import LIMIT, ROOT, median, percentile

DELETE_BATCH = 500


class SnapshotWatch:
    """Watches the shards' folders for new snapshots; their windows in ``time.monotonic()`` seconds."""

    def __init__(self, shard_folders: list[Path], interval: float = 0.005):
        self.folders, self.interval = shard_folders, interval
        self.windows: list[dict] = []  # {'shard', 'generation', 'start', 'end'}
        self._seen = [self._newest(folder) for folder in shard_folders]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _newest(folder: Path) -> int:
        from clip_search.shard_store import SNAPSHOT, generations

        return max(generations(folder, SNAPSHOT), default=-1)

    def started_since(self, generations: list[int]) -> bool:
        """Whether every shard has started a snapshot newer than ``generations``."""
        return all(seen > before for seen, before in zip(self._seen, generations))

    def newest(self) -> list[int]:
        return list(self._seen)

    def all_written(self) -> bool:
        return all(window['end'] is not None for window in self.windows)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        from clip_search.shard_store import MANIFEST, SNAPSHOT

        while not self._stop.is_set():
            now = time.monotonic()
            for shard, folder in enumerate(self.folders):
                generation = self._seen[shard] + 1
                while (folder / f'{SNAPSHOT}{generation}').exists():  # a journal generation may be skipped: look a few ahead
                    self._seen[shard] = generation
                    self.windows.append({'shard': shard, 'generation': generation, 'start': now, 'end': None})
                    generation += 1
            for window in self.windows:
                if window['end'] is None and (self.folders[window['shard']] / f"{SNAPSHOT}{window['generation']}" / MANIFEST).exists():
                    window['end'] = now
            time.sleep(self.interval)


async def search_until(address: str, queries: np.ndarray, offset: int, stop: asyncio.Event, out: list) -> None:
    """One searcher: one query a request until ``stop``; appends (start, end) of each search."""
    from docarray import Document, DocumentArray
    from jina import Client

    client = Client(host=address, asyncio=True)
    i = offset
    while not stop.is_set():
        query = DocumentArray([Document(embedding=queries[i % len(queries)])])
        started = time.monotonic()
        async for answer in client.post('/search', inputs=query, parameters={'limit': LIMIT}):
            assert len(answer[0].matches) == LIMIT
        out.append((started, time.monotonic()))
        i += 1


async def write_every(address: str, seconds: float, stop: asyncio.Event, writes: list) -> None:
    """Index 10 new documents (random 512-d embeddings) every ``seconds`` until ``stop``; (start, end) of each."""
    from docarray import Document, DocumentArray
    from jina import Client

    client, rng, n = Client(host=address, asyncio=True), np.random.default_rng(7), 0
    while not stop.is_set():
        batch = DocumentArray(Document(id=f'snapflow-{n + i}', embedding=v) for i, v in enumerate(rng.normal(size=(10, 512)).astype(np.float32)))
        started = time.monotonic()
        async for _ in client.post('/index', inputs=batch, request_size=len(batch)):
            pass
        writes.append((started, time.monotonic()))
        n += len(batch)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))


async def delete_until_snapshots(address: str, watch: SnapshotWatch, next_row: int, deletes: list) -> int:
    """Delete documents ``d<row>`` downwards from ``next_row``, one request at a time, until every
    shard has started a snapshot; the (start, end) of each request go to ``deletes``. Returns the next row.

    Jina's client, on this event loop: clip-search's client runs its requests on an event loop of
    its own, and gRPC served that loop no answer while the searchers kept this one busy."""
    from docarray import Document, DocumentArray
    from jina import Client

    client, before = Client(host=address, asyncio=True), watch.newest()
    while not watch.started_since(before):
        ids = DocumentArray(Document(id=f'd{row}') for row in range(next_row, next_row - DELETE_BATCH, -1))
        started = time.monotonic()
        async for _ in client.post('/delete', inputs=ids, request_size=DELETE_BATCH):
            pass
        deletes.append((started, time.monotonic()))
        next_row -= DELETE_BATCH
    return next_row


def overlaps(search: tuple, intervals: list) -> bool:
    return any(search[0] < end and start < search[1] for start, end in intervals)


def latency_row(requests: list, counted: str = 'searches') -> dict:
    seconds = [end - start for start, end in requests]
    return {counted: len(seconds), 'p50_ms': round(1000 * median(seconds), 1), 'p99_ms': round(1000 * percentile(seconds, 99), 1)}


async def run(service, folders: list[Path], queries: np.ndarray, first_row: int, args) -> dict:
    watch = SnapshotWatch(folders)
    watch.start()
    stop, searches = asyncio.Event(), [[] for _ in range(args.searchers)]
    searchers = [asyncio.create_task(search_until(service.address, queries, 100 * k, stop, searches[k])) for k in range(args.searchers)]
    writes: list = []
    if args.writes_every:
        searchers.append(asyncio.create_task(write_every(service.address, args.writes_every, stop, writes)))
    await asyncio.sleep(2)  # channels warmed up
    baseline = (time.monotonic(), time.monotonic() + args.baseline)
    await asyncio.sleep(args.baseline)
    deletes, next_row = [], first_row
    for _ in range(args.rounds):
        next_row = await delete_until_snapshots(service.address, watch, next_row, deletes)
        while not watch.all_written():
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.settle)
    stop.set()
    await asyncio.gather(*searchers)
    watch.stop()
    done = [search for searcher in searches for search in searcher]
    windows = [(window['start'], window['end']) for window in watch.windows]
    rounds = [search for search in done if search[0] > baseline[1]]
    without = [search for search in done if baseline[0] <= search[0] and search[1] <= baseline[1]]
    during = [search for search in rounds if overlaps(search, windows) and not overlaps(search, deletes)]
    between = [search for search in rounds if not overlaps(search, windows) and not overlaps(search, deletes)]
    result = {
        'deleted': first_row - next_row,
        'snapshots': [
            {'shard': window['shard'], 'generation': window['generation'], 'seconds': round(window['end'] - window['start'], 2)}
            for window in watch.windows
        ],
        'without': latency_row(without),
        'during': latency_row(during),
        'between': latency_row(between),
        'left_out_overlapping_deletes': sum(1 for search in rounds if overlaps(search, deletes)),
    }
    if args.writes_every:
        result['writes'] = latency_row(writes, 'writes')
    result['p99_during_vs_without'] = round(result['during']['p99_ms'] / result['without']['p99_ms'], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work', type=Path, required=True, help="a copy of a finished bench/scale.py run's --work folder (written)")
    parser.add_argument('--pq', type=int, help='the run was made with --pq N (its pqN Flow)')
    parser.add_argument('--searchers', type=int, default=2, help='concurrent clients, each one query a request')
    parser.add_argument('--rounds', type=int, default=3, help='snapshots of every shard to search during')
    parser.add_argument('--baseline', type=float, default=60, help='seconds of searches without a snapshot, first')
    parser.add_argument('--settle', type=float, default=3, help='seconds after each round\'s snapshots are written')
    parser.add_argument('--writes-every', type=float, help='seconds between writes of 10 new documents, all along (default: no writes)')
    parser.add_argument('--checkout', type=Path, help="run this checkout's service (its .venv), e.g. the commit before a change")
    parser.add_argument('--out', type=Path, help='write the result as JSON into this file')
    args = parser.parse_args()
    from helpers.service import flow_compressed, start_service

    flow = flow_compressed(args.work / 'snapshot-flows', pq_train_size=20000, compact_deleted=None)  # the rounds' deletes compact nothing
    flow_dir = args.work / f'pq{args.pq}' if args.pq else args.work / 'float'
    queries = np.load(args.work / 'data' / 'queries.npy')
    extra = ('--pq', str(args.pq)) if args.pq else ()
    other = {'python': str(args.checkout / '.venv' / 'bin' / 'python'), 'cwd': args.checkout} if args.checkout else {}
    service = start_service(flow_dir / 'model', flow_dir / 'workspace', shards=2, flow_file=flow, ready_timeout=900, extra_args=extra, **other)
    try:
        documents = service.client().status()['documents']
        first_row = json.loads((flow_dir / 'progress.json').read_text())['rows_indexed'] - 1
        folders = sorted((flow_dir / 'workspace' / 'AnnLiteIndexer').iterdir())
        result = {'work': str(args.work), 'checkout': str(args.checkout or ROOT), 'documents': documents,
                  'searchers': args.searchers, 'writes_every_s': args.writes_every}  # fmt: skip
        result.update(asyncio.run(run(service, folders, queries, first_row, args)))
    finally:
        service.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()

"""Load and faults: searchers, a writer and a mutator against the real service with 2 shards.

    python bench/load.py --docs 20000 --seconds 60 --searchers 8 [--kill shard] [--out bench/results/load]

The service (``python -m clip_search``, a tiny random model: documents carry their 64-d embeddings)
runs under a supervisor loop that starts it again whenever it exits, as Docker's
``restart: unless-stopped`` would. Half the searchers use clip-search's client, half the unmodified
clip_client; each asks for the top 10 of a document's own embedding (from a range nobody changes)
and checks that it comes first. The writer indexes new documents, the mutator updates (new
embedding) and deletes others. With ``--kill shard``, one shard gets ``kill -9`` halfway.

Reported: searches/s, p50/p99, writes/s, errors by kind, wrong answers, when the service exited
after the kill and when it answered again; then every acknowledged write is verified (found at its place, at its
new place after an update, gone after a delete). An id whose request failed is left out of the
check (the failed request may or may not have been applied) and is not touched again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import ROOT, median, percentile, scratch_dir

DIM = 64  # the tiny model's embedding size (tests/helpers/service.py)


class Supervisor:
    """Runs the service and starts it again whenever it exits, until ``stop()``."""

    def __init__(self, model_dir: Path, workspace: Path, port: int, log: Path):
        self.command = [
            sys.executable, '-m', 'clip_search', str(ROOT / 'flows' / 'search_flow.yml'), '--port', str(port),
            '--model', str(model_dir), '--shards', '2', '--workspace', str(workspace), '--host', '127.0.0.1',
        ]  # fmt: skip
        self.log, self.process, self.starts = log, None, 0
        self.exits: list[float] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with open(self.log, 'ab') as log:
                self.process = subprocess.Popen(
                    self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env=dict(os.environ, JINA_HIDE_SURVEY='1'),
                )  # fmt: skip
            self.starts += 1
            self.process.wait()
            if not self._stopping.is_set():
                self.exits.append(time.monotonic())
                time.sleep(0.5)  # a restart policy's pause

    def shard_pid(self, shard: int) -> int:
        found = re.findall(rf'indexer/shard-{shard}/rep-0@(\d+)', self.log.read_text(errors='replace'))
        return int(found[-1])

    def stop(self) -> None:
        self._stopping.set()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if self.process:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# what Jina's gateway answers while the Flow goes down after an executor died (its connections
# reset, and its own TypeError handling that): outage failures, seen with a shard killed
JINAS_OUTAGE_ERRORS = {
    'gateway lost its executors': 'EstablishGrpcConnectionError',
    "gateway's error while losing its executors": 'cannot unpack non-iterable UsageError object',
}


def error_kind(exc: BaseException) -> str:
    """A short name for a failure, its variable parts (ids, numbers) removed."""
    text = str(exc)
    for kind in ('did not answer', 'is loading', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Connection refused', 'timed out'):
        if kind in text:
            return kind
    for kind, said in JINAS_OUTAGE_ERRORS.items():
        if said in text:
            return kind
    return re.sub(r'\d+', 'N', f'{type(exc).__name__}: {text}')[:80]


class Load:
    """The workers' shared record: latencies, successes in time, errors, and the acknowledged writes."""

    def __init__(self, docs: int, seed: int):
        rng = np.random.default_rng(seed)
        self.vectors = rng.normal(size=(docs, DIM)).astype(np.float32)
        self.stable = docs // 2  # d0 .. d{stable-1}: searched, never changed; the rest: mutated
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.successes: list[float] = []  # monotonic times of answered searches
        self.errors: Counter = Counter()
        self.wrong = 0
        self.writes = 0  # documents acknowledged by /index, /update, /delete
        self.expected: dict[str, np.ndarray | None] = {f'd{i}': v for i, v in enumerate(self.vectors)}  # None: deleted
        self.uncertain: set[str] = set()
        self.stop = threading.Event()

    def failed(self, exc: BaseException, ids: list[str] = ()) -> None:
        with self.lock:
            self.errors[error_kind(exc)] += 1
            self.uncertain.update(ids)


def searcher(load: Load, address: str, kind: str, seed: int) -> None:
    from docarray import Document

    if kind == 'clip_client':
        from clip_client import Client as ClipClient

        client = ClipClient(address)
        search = lambda doc: client.search([doc], limit=10)  # noqa: E731
    else:
        from clip_search import Client

        client = Client(address, timeout=30)
        search = lambda doc: client.search([doc], limit=10)  # noqa: E731
    rng = np.random.default_rng(seed)
    while not load.stop.is_set():
        i = int(rng.integers(load.stable))
        started = time.monotonic()
        try:
            matches = search(Document(embedding=load.vectors[i]))[0].matches
        except Exception as exc:  # noqa: BLE001 - counted by kind
            load.failed(exc)
            time.sleep(0.05)
            continue
        with load.lock:
            load.latencies.append(time.monotonic() - started)
            load.successes.append(time.monotonic())
            load.wrong += not len(matches) or matches[0].id != f'd{i}'


def writer(load: Load, address: str) -> None:
    from docarray import Document

    from clip_search import Client

    client, rng, n = Client(address, timeout=30), np.random.default_rng(7), 0
    while not load.stop.is_set():
        batch = {f'w{n + k}': rng.normal(size=DIM).astype(np.float32) for k in range(10)}
        n += 10
        try:
            client.index([Document(id=i, embedding=v) for i, v in batch.items()])
        except Exception as exc:  # noqa: BLE001 - counted by kind; its ids left out of the check
            load.failed(exc, list(batch))
            time.sleep(0.05)
            continue
        with load.lock:
            load.expected.update(batch)
            load.writes += len(batch)


def mutator(load: Load, address: str, docs: int) -> None:
    from docarray import Document

    from clip_search import Client

    client, rng = Client(address, timeout=30), np.random.default_rng(11)
    while not load.stop.is_set():
        with load.lock:
            ids = [f'd{int(i)}' for i in rng.integers(load.stable, docs, size=5)]
            ids = [i for i in dict.fromkeys(ids) if i not in load.uncertain and load.expected[i] is not None]
        if not ids:
            continue
        delete = rng.random() < 0.3
        try:
            if delete:
                client.delete(ids)
                changed = dict.fromkeys(ids)
            else:
                changed = {i: rng.normal(size=DIM).astype(np.float32) for i in ids}
                client.update([Document(id=i, embedding=v) for i, v in changed.items()])
        except Exception as exc:  # noqa: BLE001 - counted by kind; its ids left out of the check
            load.failed(exc, ids)
            time.sleep(0.05)
            continue
        with load.lock:
            load.expected.update(changed)
            load.writes += len(changed)


def wait_serving(address: str, deadline: float) -> None:
    from clip_search import Client

    while True:
        try:
            Client(address, timeout=10).status()
            return
        except Exception:  # noqa: BLE001 - not up yet, or loading
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def preload(address: str, load: Load) -> float:
    from docarray import Document

    from clip_search import Client

    started = time.monotonic()
    Client(address).index([Document(id=f'd{i}', embedding=v) for i, v in enumerate(load.vectors)], batch_size=500)
    return time.monotonic() - started


def verify(address: str, load: Load) -> dict:
    """Every acknowledged write as acknowledged: found first by its embedding, or gone after a delete."""
    from docarray import Document

    from clip_search import Client

    client = Client(address, timeout=120)
    checked = {i: v for i, v in load.expected.items() if i not in load.uncertain}
    present = [(i, v) for i, v in checked.items() if v is not None]
    deleted = {i for i, v in checked.items() if v is None}
    missing = []
    for start in range(0, len(present), 500):
        chunk = present[start : start + 500]
        answers = client.search([Document(embedding=v) for _, v in chunk], limit=1, batch_size=500)
        missing += [i for (i, _), answer in zip(chunk, answers) if not len(answer.matches) or answer.matches[0].id != i]
    deleted_vectors = [load.vectors[int(i[1:])] for i in sorted(deleted)]
    resurrected = set()
    for start in range(0, len(deleted_vectors), 500):
        answers = client.search([Document(embedding=v) for v in deleted_vectors[start : start + 500]], limit=10, batch_size=500)
        resurrected |= {m.id for answer in answers for m in answer.matches} & deleted
    documents = client.status()['documents']
    possible = range(len(present), len(present) + len(load.uncertain) + 1)  # an uncertain write may have landed
    return {
        'acknowledged_checked': len(checked),
        'lost': len(missing),
        'lost_ids': missing[:10],
        'deleted_but_found': sorted(resurrected)[:10],
        'documents': documents,
        'documents_consistent': documents in possible,
    }


def outage(successes: list[float], killed: float, exits: list[float], serving_again: float) -> dict:
    """When the service exited after the kill, and when it answered again: the first search answered
    after its restart, or, if that came after the load stopped, when the service answered /status."""
    exited = next((t for t in exits if t >= killed), None)
    again = next((t for t in successes if exited is not None and t > exited), serving_again)
    return {
        'service_exited_s_after_kill': round(exited - killed, 1) if exited else None,
        'serving_again_s_after_kill': round(again - killed, 1),
    }


def run(args) -> dict:
    from helpers.service import free_port, write_tiny_model

    workdir = Path(args.workdir) if args.workdir else scratch_dir('bench-load-')
    model_dir = write_tiny_model(workdir / 'model')
    port = free_port()
    address = f'grpc://127.0.0.1:{port}'
    supervisor = Supervisor(model_dir, workdir / 'workspace', port, workdir / 'service.log')
    supervisor.start()
    load = Load(args.docs, seed=1)
    try:
        wait_serving(address, time.monotonic() + 300)
        preload_seconds = preload(address, load)
        kinds = ['clip_search' if i % 2 == 0 else 'clip_client' for i in range(args.searchers)]
        threads = [threading.Thread(target=searcher, args=(load, address, kind, i), daemon=True) for i, kind in enumerate(kinds)]
        threads += [threading.Thread(target=writer, args=(load, address), daemon=True)]
        threads += [threading.Thread(target=mutator, args=(load, address, args.docs), daemon=True)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        killed = None
        if args.kill == 'shard':
            time.sleep(args.seconds / 2)
            os.kill(supervisor.shard_pid(1), signal.SIGKILL)
            killed = time.monotonic()
        time.sleep(max(0.0, started + args.seconds - time.monotonic()))
        load.stop.set()
        seconds = time.monotonic() - started
        deadline = time.monotonic() + 30  # a worker's last request may still be under way
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        wait_serving(address, time.monotonic() + 300)
        serving_again = time.monotonic()
        result = {
            'docs': args.docs,
            'seconds': round(seconds, 1),
            'searchers': args.searchers,
            'preload_docs_per_s': round(args.docs / preload_seconds),
            'searches_per_s': round(len(load.latencies) / seconds, 1),
            'p50_ms': round(1000 * median(load.latencies)) if load.latencies else None,
            'p99_ms': round(1000 * percentile(load.latencies, 99)) if load.latencies else None,
            'writes_per_s': round(load.writes / seconds, 1),
            'wrong_answers': load.wrong,
            'errors': dict(load.errors),
            'failed_requests': sum(load.errors.values()),
            'workers_still_waiting_at_the_end': sum(thread.is_alive() for thread in threads),
        }
        if killed is not None:
            result.update(outage(sorted(load.successes), killed, supervisor.exits, serving_again))
        result['verify'] = verify(address, load)
        return result
    finally:
        supervisor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--docs', type=int, default=20000, help='documents indexed before the load (half are searched, half mutated)')
    parser.add_argument('--seconds', type=float, default=60, help='how long the load runs')
    parser.add_argument('--searchers', type=int, default=8, help='concurrent searchers (half clip_search.Client, half clip_client)')
    parser.add_argument('--kill', choices=['shard'], help='kill -9 one shard halfway; a supervisor loop restarts the service')
    parser.add_argument('--workdir', help='keep the workspace and the service log here (default: a temporary folder)')
    parser.add_argument('--out', help='write the result as JSON into this folder (load.json or load-kill-shard.json)')
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ('load-kill-shard.json' if args.kill else 'load.json')).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()

"""Several clients at once: nothing lost, nothing duplicated, counts match what was acknowledged."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from docarray import Document

from clip_search import Client
from helpers.service import flow_polling_index

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_concurrent_clients_lose_and_duplicate_nothing(service_factory, tmp_path):
    service = service_factory(shards=3, flow_file=flow_polling_index(tmp_path, 'ALL'))  # /index an upsert
    seed = [Document(id=f'seed-{i}', text=f'seed sentence {i}') for i in range(10)]
    service.client().index(seed)  # every search below must find 5 matches
    acknowledged: set[str] = {doc.id for doc in seed}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def indexer(worker: int) -> None:
        client = Client(service.address)
        for batch in range(6):
            # every worker also re-sends ids of the shared range: upserts must not duplicate
            docs = [Document(id=f'w{worker}-{batch}-{i}', text=f'worker {worker} batch {batch} item {i}') for i in range(15)]
            docs += [Document(id=f'shared-{batch}-{i}', text=f'shared batch {batch} item {i}') for i in range(5)]
            client.index(docs, batch_size=10)
            with lock:
                acknowledged.update(d.id for d in docs)

    def searcher(worker: int) -> None:
        client = Client(service.address)
        for round_ in range(15):
            for result in client.search([f'worker {worker} batch 1 item {round_}'], limit=5):
                ids = [m.id for m in result.matches]
                assert len(ids) == 5 and len(set(ids)) == 5, ids
                distances = [m.scores['cosine'].value for m in result.matches]
                assert distances == sorted(distances)

    def run(target, worker):
        try:
            target(worker)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(indexer, w), daemon=True) for w in range(3)]
    threads += [threading.Thread(target=run, args=(searcher, w), daemon=True) for w in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300  # for all of them together
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not [thread.name for thread in threads if thread.is_alive()], 'a client hung'
    assert not errors, errors

    client = service.client()
    status = client.status()
    assert status['documents'] == len(acknowledged) == 3 * 6 * 15 + 6 * 5 + len(seed)
    results = client.search([f'worker 2 batch {b} item 7' for b in range(6)] + ['shared batch 3 item 2'], limit=3)
    assert [r.matches[0].id for r in results] == [f'w2-{b}-7' for b in range(6)] + ['shared-3-2']
    shared = client.search(['shared batch 0 item 0'], limit=200)[0].matches[:, 'id']
    assert len(shared) == len(set(shared))


@pytest.mark.slow
def test_the_load_benchmark_loses_nothing_acknowledged_when_a_shard_is_killed(tmp_path):
    """bench/load.py for 20 s: 2 searchers (our client, clip_client), a writer, a mutator; one shard
    gets kill -9 halfway and its supervisor loop starts the service again."""
    run = subprocess.run(
        [sys.executable, 'bench/load.py', '--docs', '2000', '--seconds', '20', '--searchers', '2', '--kill', 'shard',
         '--workdir', str(tmp_path / 'load'), '--out', str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / 'load-kill-shard.json').read_text())
    assert result['wrong_answers'] == 0 and result['searches_per_s'] > 0 and result['writes_per_s'] > 0
    outage = {'did not answer', 'UNAVAILABLE', 'is loading', 'Connection refused',
              'gateway lost its executors', "gateway's error while losing its executors"}  # fmt: skip
    assert set(result['errors']) <= outage, result['errors']  # a request fails only while the service is down
    assert result['service_exited_s_after_kill'] is not None and result['serving_again_s_after_kill'] > 0
    verified = result['verify']
    assert verified['acknowledged_checked'] > 2000 and verified['documents_consistent'], verified
    assert (verified['lost'], verified['deleted_but_found']) == (0, []), verified

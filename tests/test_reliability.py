"""Nothing acknowledged is lost: kill -9 of the whole service, a dead shard, bad input from both clients."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import numpy as np
import pytest
from docarray import Document

from clip_search import RequestError
from helpers.service import flow_polling_index, start_service
from conftest import FLOW_FILE, png_bytes


def shard_pids(service) -> dict[int, int]:
    """Indexer shard number -> pid, read from the service's log lines (``indexer/shard-1/rep-0@PID``)."""
    return {int(s): int(pid) for s, pid in re.findall(r'indexer/shard-(\d+)/rep-0@(\d+)', service.log())}


@pytest.mark.slow
def test_acknowledged_documents_survive_kill_9_of_every_process(tmp_path, service_factory):
    workspace = tmp_path / 'workspace'
    service = service_factory(shards=3, workspace=workspace)
    client = service.client()
    acknowledged = []
    for batch in range(5):
        docs = [Document(id=f'k-{batch}-{i}', text=f'durable sentence {batch} {i}') for i in range(40)]
        client.index(docs, batch_size=40)
        acknowledged += [d.id for d in docs]
    client.delete(['k-0-0'])
    acknowledged.remove('k-0-0')
    assert len(service.processes()) >= 7  # the CLI, gateway, encoder, head, merger and 3 shards
    service.kill()  # no chance to flush anything

    client = service_factory(shards=3, workspace=workspace).client()
    assert client.status()['documents'] == len(acknowledged)
    results = client.search([f'durable sentence {b} {i}' for b in range(5) for i in (1, 39)], limit=1)
    assert [r.matches[0].id for r in results] == [f'k-{b}-{i}' for b in range(5) for i in (1, 39)]
    assert 'k-0-0' not in client.search(['durable sentence 0 0'], limit=20)[0].matches[:, 'id']


@pytest.mark.slow
def test_searches_after_idle_half_minutes_succeed_without_a_goaway_between_processes(service_factory):
    service = service_factory(shards=2)
    client = service.client()
    vectors = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    client.index([Document(id=f'd{i}', embedding=v) for i, v in enumerate(vectors)])
    for _ in range(2):
        time.sleep(35)  # Jina's channels ping every 10 s: three pings into a server's 5 minutes of patience
        assert client.search([Document(embedding=vectors[0])], limit=1)[0].matches[0].id == 'd0'
    assert 'too_many_pings' not in service.log()  # what the servers answered the pings with, and dropped requests


@pytest.mark.slow
def test_ctrl_c_stops_every_process_cleanly_and_keeps_the_index(tmp_path, service_factory):
    workspace = tmp_path / 'workspace'
    service = service_factory(shards=3, workspace=workspace)
    service.client().index([Document(id=f'c-{i}', text=f'interrupted sentence {i}') for i in range(30)])
    os.killpg(service.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    assert service.process.wait(timeout=60) == 0
    assert 'clip-search stopped; the index is saved in its workspace' in service.log()
    assert service.processes() == []  # nothing left behind
    client = service_factory(shards=3, workspace=workspace).client()
    assert client.status()['documents'] == 30
    assert client.search(['interrupted sentence 12'], limit=1)[0].matches[0].id == 'c-12'


@pytest.mark.slow
def test_a_dead_shard_is_named_in_errors_and_serves_again_after_restart(tmp_path, service_factory):
    workspace = tmp_path / 'workspace'
    # /index polled ALL: every shard must answer an /index too (polled ANY, one live shard may take it)
    flow_file = flow_polling_index(tmp_path, 'ALL')
    service = service_factory(shards=3, workspace=workspace, flow_file=flow_file, extra_args=('--no-exit-on-failure',))
    client = service.client()
    client.index([Document(id=f'f-{i}', text=f'fault sentence {i}') for i in range(60)])
    before = client.status()
    os.kill(shard_pids(service)[1], signal.SIGKILL)
    time.sleep(1)

    started = time.monotonic()
    with pytest.raises(RequestError, match=r'shards \[1\] of 3 did not answer'):
        client.search(['fault sentence 3'])
    with pytest.raises(RequestError, match=r'shards \[1\] of 3'):
        client.status()
    with pytest.raises(RequestError, match=r'shards \[1\] of 3'):
        client.index([Document(id='f-new', text='written while a shard is down')])
    with pytest.raises(RequestError, match=r'shards \[1\] of 3'):  # refused by the check pass: nothing changed
        client.update([Document(id='f-3', text='changed while a shard is down')])
    assert time.monotonic() - started < 30  # errors, not hangs
    service.stop()

    client = service_factory(shards=3, workspace=workspace, flow_file=flow_file).client()
    status = client.status()
    assert status['documents'] in (before['documents'], before['documents'] + 1)
    assert status['shards'][1]['documents'] == before['shards'][1]['documents']  # shard 1 serves its data again
    client.index([Document(id='f-new', text='written while a shard is down')])  # a retry is safe: upsert
    assert client.status()['documents'] == before['documents'] + 1
    assert client.search(['fault sentence 7'], limit=1)[0].matches[0].id == 'f-7'
    assert client.search(['fault sentence 3'], limit=1)[0].matches[0].text == 'fault sentence 3'  # the refused update


@pytest.mark.slow
def test_by_default_a_dead_shard_stops_the_service_for_its_manager_to_restart(tmp_path, service_factory):
    workspace = tmp_path / 'workspace'
    service = service_factory(shards=3, workspace=workspace)
    service.client().index([Document(id=f'r-{i}', text=f'restart sentence {i}') for i in range(30)])
    before = service.client().status()
    os.kill(shard_pids(service)[2], signal.SIGKILL)
    killed = time.monotonic()
    assert service.process.wait(timeout=60) == 1  # a service manager would now restart it
    seconds = time.monotonic() - killed
    assert seconds < 3, f'the service exited {seconds:.1f} s after its shard died'
    (line,) = [line for line in service.log().splitlines() if 'exited unexpectedly' in line]
    assert line.startswith('clip-search: indexer/shard-2/rep-0 exited unexpectedly'), line
    assert service.processes() == []  # the rest of the Flow was closed, nothing left behind

    client = service_factory(shards=3, workspace=workspace).client()
    assert client.status() == before
    assert client.search(['restart sentence 4'], limit=1)[0].matches[0].id == 'r-4'


BAD_DOCUMENTS = {
    'server path': (lambda tmp: Document(id='bad-path', uri=str(tmp / 'missing.png')), 'is a path on the server'),
    'corrupt image': (lambda tmp: Document(id='bad-corrupt', blob=png_bytes(1)[:60]), 'not a readable image'),
    'not an image': (lambda tmp: Document(id='bad-bytes', blob=b'%PDF-1.4 definitely not an image'), 'not a readable image'),
    'empty': (lambda tmp: Document(id='bad-empty'), 'empty'),
    'private url': (lambda tmp: Document(id='bad-url', uri='http://10.255.255.1/cat.png'), '--allow-host HOST'),
    'unsupported mime': (lambda tmp: Document(id='bad-mime', uri=str(tmp / 'notes.txt')), "mime type 'text/plain'"),
    'wrong dimension': (lambda tmp: Document(id='bad-dim', embedding=np.ones(7, dtype=np.float32)), 'shape (7,)'),
}


@pytest.fixture(scope='module')
def service(tmp_path_factory, tiny_model):
    allow = ('--allow-host', '127.0.0.1')  # for the silent server on this machine; 10.x stays refused
    service = start_service(tiny_model, tmp_path_factory.mktemp('bad') / 'workspace', shards=2, flow_file=FLOW_FILE, extra_args=allow)
    service.client().index([Document(id=f'keep-{i}', text=f'kept sentence {i}') for i in range(20)])
    yield service
    service.stop()


@pytest.mark.parametrize('case', list(BAD_DOCUMENTS))
def test_a_bad_document_is_refused_by_name_and_nothing_of_its_batch_is_stored(service, tmp_path, case):
    (tmp_path / 'notes.txt').write_text('hello')
    make, reason = BAD_DOCUMENTS[case]
    bad = make(tmp_path)
    client = service.client()
    started = time.monotonic()
    with pytest.raises(RequestError) as error:
        client.index([Document(id=f'good-{case}', text='a good neighbour'), bad])
    assert time.monotonic() - started < 30
    assert bad.id in str(error.value) and reason in str(error.value)
    status = client.status()
    assert status['documents'] == 20  # nothing of the batch, nothing lost
    assert client.search(['kept sentence 3'], limit=1)[0].matches[0].id == 'keep-3'


# what clip_client 0.8.3 does with each bad document: refuse it itself (it reads every uri, checks
# every document, and jina's client then cancels the request: CancelledError, the server sees nothing),
# or send it, and get our server's reason
CLIP_CLIENT_OUTCOMES = {
    'server path': None,  # it opens the file itself (and finds none)
    'corrupt image': "document 'bad-corrupt': its blob is not a readable image",
    'not an image': "document 'bad-bytes': its blob is not a readable image",
    'empty': None,
    'private url': None,  # it fetches the url itself
    'unsupported mime': "document 'bad-mime': its blob is not a readable image",  # it sends the .txt file's bytes
    'wrong dimension': None,
}


def test_the_unmodified_clip_client_gets_the_same_errors(service, tmp_path):
    from clip_client import Client
    from jina.excepts import BadServer

    (tmp_path / 'notes.txt').write_text('hello')
    client = Client(service.address)
    for case, expected in CLIP_CLIENT_OUTCOMES.items():
        bad = BAD_DOCUMENTS[case][0](tmp_path)
        started = time.monotonic()
        with pytest.raises((asyncio.CancelledError, BadServer)) as error:
            client.index([bad])
        assert time.monotonic() - started < 30
        if expected is None:
            assert type(error.value) is asyncio.CancelledError, (case, error.value)
        else:
            assert type(error.value) is BadServer, (case, error.value)
            server_error = error.value.args[0].status.exception
            assert server_error.name == 'BadDocumentError' and server_error.args[0].startswith(expected), server_error
    with pytest.raises(Exception, match='limit'):
        client.search(['kept sentence'], limit=0)
    with pytest.raises(Exception, match=r'unknown columns.*nope'):
        client.search(['kept sentence'], parameters={'filter': {'nope': {'$eq': 1}}})
    with pytest.raises(Exception, match='malformed'):
        client.search(['kept sentence'], parameters={'filter': {'color': {'$like': 'r%'}}})
    assert len(client.search(['kept sentence 3'], limit=3)[0].matches) == 3
    assert service.client().status()['documents'] == 20


def test_a_text_longer_than_the_context_is_truncated_and_indexed(service):
    client = service.client()
    long_text = 'word ' * 2000
    client.index([Document(id='long-text', text=long_text)])
    assert client.search([long_text], limit=1)[0].matches[0].id == 'long-text'
    client.delete(['long-text'])


def test_oversized_requests_are_refused_clearly_and_the_server_stays_up(service):
    client = service.client()
    with pytest.raises(RequestError, match='max_request_docs=2048'):
        client.index([f'tiny text {i}' for i in range(2100)], batch_size=2100)
    with pytest.raises(Exception, match='(?i)larger than max'):
        client.index([Document(id='huge', blob=b'\0' * (65 * 2**20))])
    assert client.status()['documents'] == 20
    assert client.search(['kept sentence 4'], limit=1)[0].matches[0].id == 'keep-4'


def test_an_image_url_that_never_answers_times_out_instead_of_hanging(service):
    import socket

    silent = socket.socket()  # accepts connections (the kernel does) and never says a word
    silent.bind(('127.0.0.1', 0))
    silent.listen(16)
    try:
        url = f'http://127.0.0.1:{silent.getsockname()[1]}/slow.png'
        started = time.monotonic()
        with pytest.raises(RequestError, match=r"bad-silent.*could not be fetched \(it took longer than uri_timeout=5 s\)"):
            service.client().index([Document(id='bad-silent', uri=url)])
        assert 4.5 <= time.monotonic() - started < 10  # the flow's uri_timeout is 5 s, for the whole fetch
    finally:
        silent.close()
    assert service.client().status()['documents'] == 20


def test_a_client_timeout_ends_a_request_to_a_server_that_never_answers():
    import socket

    from clip_search import Client

    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(8)  # accepts connections (the kernel does) and never says a word
    try:
        client = Client(f'grpc://127.0.0.1:{silent.getsockname()[1]}', timeout=2)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match='Deadline Exceeded'):
            client.status()
        assert time.monotonic() - started < 15
    finally:
        silent.close()
    with pytest.raises(ValueError, match='timeout=0'):
        Client('grpc://127.0.0.1:1', timeout=0)

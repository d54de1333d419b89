"""API keys, tried as an outside client would: one service with a read-write and a read-only key,
serving gRPC, HTTP and WebSocket at once (``--protocol grpc,http,websocket``).

Every refused request is answered as specified (gRPC UNAUTHENTICATED / PERMISSION_DENIED, HTTP 401 /
403, WebSocket close 4401 / 4403) and leaves the index as it was; health and readiness need no key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass

import grpc
import pytest
import requests
from docarray import Document, DocumentArray

from clip_search import Client
from clip_search.auth import UNAUTHENTICATED, KeyRing, KeySettingError, permission_denied
from helpers.service import free_port, start_service

FULL_KEY = 'rw-' + secrets.token_hex(16)
READ_KEY = 'ro-' + secrets.token_hex(16)
SEEDS = [Document(id=f'seed-{i}', text=f'a kept sentence number {i}') for i in range(3)]


@dataclass
class Keyed:
    grpc: str
    http: str
    ws: str
    web: str
    service: object

    def stored(self) -> list[str]:
        """The ids the index holds (read with the read-write key)."""
        client = Client(self.grpc, api_key=FULL_KEY)
        assert client.status()['documents'] == 3
        return sorted(m.id for m in client.search(['a kept sentence'], limit=10)[0].matches)


@pytest.fixture(scope='module')
def keyed(tmp_path_factory, tiny_model):
    directory = tmp_path_factory.mktemp('keys')
    (directory / 'read-write').write_text(f'# the operators\n{FULL_KEY}\n')
    (directory / 'read-only').write_text(READ_KEY + '\n')
    web_port = free_port()
    service = start_service(
        tiny_model, directory / 'workspace', shards=2, protocol='grpc,http,websocket',
        extra_args=('--api-key-file', str(directory / 'read-write'), '--read-only-key-file', str(directory / 'read-only'),
                    '--web-port', str(web_port)),
    )  # fmt: skip
    port = service.port  # the next protocols on the next ports
    keyed = Keyed(
        f'grpc://127.0.0.1:{port}', f'http://127.0.0.1:{port + 1}', f'ws://127.0.0.1:{port + 2}', f'http://127.0.0.1:{web_port}', service
    )
    Client(keyed.grpc, api_key=FULL_KEY).index(SEEDS)
    yield keyed
    service.stop()


def grpc_call(address: str, endpoint: str, docs: list, key: str | None = None, unary: bool = False):
    """A raw Jina request over gRPC, as any gRPC client could send it (streamed, or the unary RPC)."""
    from jina.proto import jina_pb2_grpc
    from jina.types.request.data import DataRequest

    request = DataRequest()
    request.header.exec_endpoint = endpoint
    request.data.docs = DocumentArray(docs)
    metadata = (('authorization', key),) if key else None
    with grpc.insecure_channel(address.removeprefix('grpc://')) as channel:
        if unary:
            return jina_pb2_grpc.JinaSingleDataRequestRPCStub(channel).process_single_data(request, metadata=metadata, timeout=60)
        return list(jina_pb2_grpc.JinaRPCStub(channel).Call(iter([request]), metadata=metadata, timeout=60))


def grpc_refusal(address: str, endpoint: str, docs: list, key: str | None = None, unary: bool = False) -> tuple:
    with pytest.raises(grpc.RpcError) as refused:
        grpc_call(address, endpoint, docs, key, unary)
    return refused.value.code(), refused.value.details()


def test_no_key_or_a_wrong_key_is_unauthenticated_on_every_protocol(keyed):
    before = keyed.stored()
    intruder = [Document(id='intruder', text='should never be stored')]
    for key in (None, 'not-a-key-of-this-service', f'Bearer {FULL_KEY}x', READ_KEY[:-1]):
        for endpoint in ('/index', '/delete', '/search', '/status'):
            for unary in (False, True):
                assert grpc_refusal(keyed.grpc, endpoint, intruder, key, unary) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        headers = {'Authorization': key} if key else {}
        for endpoint in ('/index', '/delete', '/search'):
            answer = requests.post(f'{keyed.http}/post', json={'execEndpoint': endpoint, 'data': [{'id': 'intruder', 'text': 'x'}]}, headers=headers, timeout=60)
            assert (answer.status_code, answer.json(), answer.headers['www-authenticate']) == (401, {'error': UNAUTHENTICATED}, 'Bearer')
        assert requests.post(f'{keyed.http}/delete', json={'data': [{'id': 'seed-1'}]}, headers=headers, timeout=60).status_code == 401
        assert requests.get(f'{keyed.http}/openapi.json', headers=headers, timeout=60).status_code == 401
        assert websocket_close(keyed.ws, headers, {'execEndpoint': '/delete', 'data': [{'id': 'seed-1'}]}) == (4401, UNAUTHENTICATED[:120])
    assert keyed.stored() == before == ['seed-0', 'seed-1', 'seed-2']


def test_a_read_only_key_searches_but_cannot_write(keyed):
    before = keyed.stored()
    for endpoint in ('/delete', '/index', '/update'):
        for unary in (False, True):
            refusal = grpc_refusal(keyed.grpc, endpoint, [Document(id='seed-1', text='changed')], READ_KEY, unary)
            assert refusal == (grpc.StatusCode.PERMISSION_DENIED, permission_denied(endpoint))
        for headers in ({'Authorization': READ_KEY}, {'Authorization': f'Bearer {READ_KEY}'}):
            answer = requests.post(f'{keyed.http}/post', json={'execEndpoint': endpoint, 'data': [{'id': 'seed-1', 'text': 'x'}]}, headers=headers, timeout=60)
            assert (answer.status_code, answer.json()) == (403, {'error': permission_denied(endpoint)})
        assert websocket_close(keyed.ws, {'Authorization': READ_KEY}, {'execEndpoint': endpoint, 'data': [{'id': 'seed-1'}]}) == (
            4403, permission_denied(endpoint)[:120]
        )
    answer = requests.delete(f'{keyed.http}/delete', json={'data': [{'id': 'seed-1'}]}, headers={'Authorization': READ_KEY}, timeout=60)
    assert (answer.status_code, answer.json()) == (403, {'error': permission_denied('/delete')})
    assert keyed.stored() == before

    # what it may do, over each protocol
    for address in (keyed.grpc, keyed.http, keyed.ws):
        reader = Client(address, api_key=READ_KEY, timeout=60)
        assert reader.search(['a kept sentence number 2'], limit=1)[0].matches[0].id == 'seed-2', address
        assert reader.status()['documents'] == 3
        assert reader.encode(['a kept sentence']).shape == (1, 64)
    answer = requests.post(f'{keyed.http}/post', json={'execEndpoint': '/search', 'data': [{'text': 'a kept sentence number 1'}]},
                           headers={'Authorization': f'Bearer {READ_KEY}'}, timeout=60)  # fmt: skip
    assert answer.status_code == 200 and answer.json()['data'][0]['matches'][0]['id'] == 'seed-1'
    assert keyed.stored() == before


def test_the_read_write_key_works_over_grpc_http_and_websocket(keyed):
    for address in (keyed.grpc, keyed.http, keyed.ws):
        writer = Client(address, api_key=FULL_KEY, timeout=60)
        writer.index([Document(id='written', text='a sentence written with the key')])
        assert writer.search(['a sentence written with the key'], limit=1)[0].matches[0].id == 'written', address
        assert writer.delete(['written']) == ['written']
    answer = requests.post(f'{keyed.http}/post', json={'execEndpoint': '/status', 'data': [{}]}, headers={'Authorization': f'Bearer {FULL_KEY}'}, timeout=60)
    assert answer.status_code == 200 and answer.json()['data'][0]['tags']['documents'] == 3
    assert keyed.stored() == ['seed-0', 'seed-1', 'seed-2']


def test_the_unmodified_clip_client_sends_its_credential(keyed, monkeypatch):
    from clip_client import Client as UpstreamClient
    from jina.excepts import BadServerFlow

    with pytest.raises(BadServerFlow, match='StatusCode.UNAUTHENTICATED'):
        UpstreamClient(keyed.grpc).index([Document(id='intruder', text='no key')])
    upstream = UpstreamClient(keyed.grpc, credential={'Authorization': FULL_KEY})
    upstream.index([Document(id='upstream', text='indexed by clip_client')])
    assert upstream.search(['indexed by clip_client'], limit=1)[0].matches[0].id == 'upstream'
    monkeypatch.setenv('CLIP_AUTH_TOKEN', READ_KEY)  # the other way clip_client takes a key
    reader = UpstreamClient(keyed.grpc)
    assert reader.search(['indexed by clip_client'], limit=1)[0].matches[0].id == 'upstream'
    with pytest.raises(BadServerFlow, match=re.escape(f'StatusCode.PERMISSION_DENIED {permission_denied("/index")}')):
        reader.index([Document(id='intruder', text='read-only key')])
    Client(keyed.grpc, api_key=FULL_KEY).delete(['upstream'])
    assert keyed.stored() == ['seed-0', 'seed-1', 'seed-2']


def test_health_and_readiness_need_no_key_and_tell_nothing_of_the_index(keyed):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from jina import Client as JinaClient

    with grpc.insecure_channel(keyed.grpc.removeprefix('grpc://')) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service='jina.JinaRPC'), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert JinaClient(host=keyed.grpc).is_flow_ready()  # jina ping: the dry run
    assert JinaClient(host=keyed.http).is_flow_ready()
    assert JinaClient(host=keyed.ws).is_flow_ready()
    assert requests.get(f'{keyed.http}/', timeout=30).json() == {}
    assert requests.get(f'{keyed.http}/dry_run', timeout=30).json()['code'] == 0


def test_the_web_page_asks_its_api_callers_for_a_key_and_calls_the_flow_with_its_own(keyed):
    assert requests.get(f'{keyed.web}/', timeout=30).status_code == 200  # the page, which asks for the key
    for headers in ({}, {'Authorization': 'Bearer not-a-key-of-this-service'}):
        answer = requests.post(f'{keyed.web}/api/search', json={'query': 'a kept sentence'}, headers=headers, timeout=60)
        assert (answer.status_code, answer.json()) == (401, {'error': UNAUTHENTICATED})
    for key in (READ_KEY, FULL_KEY):
        answer = requests.post(f'{keyed.web}/api/search', json={'query': 'a kept sentence number 0', 'limit': 1},
                               headers={'Authorization': f'Bearer {key}'}, timeout=60)  # fmt: skip
        assert answer.status_code == 200 and [m['id'] for m in answer.json()['matches']] == ['seed-0']
    status = requests.get(f'{keyed.web}/api/status', headers={'Authorization': READ_KEY}, timeout=60)
    assert status.json()['documents'] == 3


def test_the_service_says_when_it_needs_no_key(keyed):
    assert 'no API key is set' not in keyed.service.log()  # this one has keys (the one-line warning: test_security)


def test_keys_are_matched_whole_in_either_header_form():
    keys = KeyRing.create(full=['read-write-key-0123456789'], read_only=['read-only-key-0123456789'])
    assert [keys.access(value) for value in (
        'read-write-key-0123456789', 'Bearer read-write-key-0123456789', 'bearer  read-write-key-0123456789 ',
        'Bearer read-only-key-0123456789', None, '', 'Bearer', 'read-write-key-012345678', 'Basic read-write-key-0123456789',
    )] == ['read-write', 'read-write', 'read-write', 'read-only', None, None, None, None, None]  # fmt: skip
    assert not KeyRing.create().enabled and keys.enabled


def test_keys_come_from_options_files_and_the_environment(tmp_path, monkeypatch):
    from clip_search.cli import build_parser, settle_api_keys

    (tmp_path / 'keys').write_text('# ours\nfrom-a-file-0123456789\n\n')
    monkeypatch.setenv('CLIP_SEARCH_API_KEYS', 'from-the-env-0123456789,another-env-key-0123')
    args = build_parser().parse_args(['--api-key', 'on-the-line-0123456789', '--api-key-file', str(tmp_path / 'keys')])
    keys = settle_api_keys(args)
    for key in ('on-the-line-0123456789', 'from-a-file-0123456789', 'from-the-env-0123456789', 'another-env-key-0123'):
        assert keys.access(key) == 'read-write'
    assert keys.read_only == () and os.environ['CLIP_SEARCH_API_KEYS'].count(',') == 3  # handed to the gateway
    for bad, message in (
        (['--api-key', 'short'], '--api-key: a key must be at least 16 printable ASCII characters, without spaces or commas'),
        (['--read-only-key-file', str(tmp_path / 'none')], f'--read-only-key-file {tmp_path / "none"}: cannot be read (No such file or directory)'),
    ):  # fmt: skip
        with pytest.raises(KeySettingError) as refused:
            settle_api_keys(build_parser().parse_args(bad))
        assert str(refused.value) == message
    (tmp_path / 'empty').write_text('\n')
    with pytest.raises(KeySettingError, match='hold no API key'):  # a gateway meant to need keys would accept anyone
        KeyRing.from_environment({'CLIP_SEARCH_API_KEYS_FILE': str(tmp_path / 'empty')})


def websocket_close(url: str, headers: dict, message: dict) -> tuple[int, str]:
    """(close code, reason) the gateway ends a WebSocket with, after ``message`` is sent."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(url, additional_headers=headers, open_timeout=30) as socket:
        try:
            socket.send(json.dumps(message))
            socket.recv(timeout=60)
        except ConnectionClosed as closed:
            return closed.rcvd.code, closed.rcvd.reason
    pytest.fail('the WebSocket was not closed')

"""The server binds where the user says, executors stay on loopback, and gRPC can run over TLS."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def listening_addresses(pids: list[int]) -> list[str]:
    """local address:port of every listening TCP socket owned by ``pids``."""
    out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True, check=True).stdout
    addresses = []
    for line in out.splitlines():
        owners = {int(pid) for pid in re.findall(r'pid=(\d+)', line)}
        if owners & set(pids):
            addresses.append(line.split()[3])
    return addresses


@pytest.fixture(scope='module')
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost."""
    directory = tmp_path_factory.mktemp('tls')
    cert, key = directory / 'cert.pem', directory / 'key.pem'
    subprocess.run(
        ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=localhost',
         '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', str(key), '-out', str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.slow
def test_tls_on_loopback_with_both_clients(service_factory, certificate, tmp_path):
    cert, key = certificate
    service = service_factory(shards=2, extra_args=('--host', '127.0.0.1', '--tls-cert', str(cert), '--tls-key', str(key)))
    addresses = listening_addresses(service.processes())
    assert len(addresses) >= 5 and all('127.0.0.1' in address for address in addresses), addresses

    script = f'''
from clip_search import Client
from clip_client import Client as UpstreamClient
client = Client('grpcs://localhost:{service.port}')
client.index(['a secret sentence'])
assert client.search(['a secret sentence'], limit=1)[0].matches[0].text == 'a secret sentence'
upstream = UpstreamClient('grpcs://localhost:{service.port}')
assert upstream.search(['a secret sentence'], limit=1)[0].matches[0].text == 'a secret sentence'
print('tls ok')
'''
    # gRPC reads its trusted roots from this variable: trust our self-signed certificate
    env = dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(cert))
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
    assert 'tls ok' in result.stdout, result.stderr[-2000:]

    probe = '''
import sys
from clip_search import Client
try:
    Client(sys.argv[1], timeout=20).status()
except ConnectionError as exc:
    print(exc)
'''
    # a plaintext client: the gateway speaks only TLS and closes the connection on it
    result = subprocess.run([sys.executable, '-c', probe, f'grpc://localhost:{service.port}'], capture_output=True, text=True, timeout=120)
    assert 'StatusCode.UNAVAILABLE' in result.stdout and 'Socket closed' in result.stdout, result.stdout + result.stderr[-2000:]
    # a TLS client that does not trust the certificate: the handshake fails on it
    result = subprocess.run([sys.executable, '-c', probe, f'grpcs://localhost:{service.port}'], capture_output=True, text=True, timeout=120)
    assert 'Ssl handshake failed' in result.stdout and 'CERTIFICATE_VERIFY_FAILED' in result.stdout, result.stdout + result.stderr[-2000:]


def test_executors_listen_on_loopback_even_when_the_gateway_is_public(service_factory):
    service = service_factory(shards=2)
    addresses = listening_addresses(service.processes())
    gateway = [a for a in addresses if a.endswith(f':{service.port}')]
    internal = [a for a in addresses if not a.endswith(f':{service.port}')]
    assert gateway and not any('127.0.0.1' in a for a in gateway)  # the public port, on every interface
    assert len(internal) >= 4 and all('127.0.0.1' in a for a in internal), internal
    assert (
        f'clip-search: no API key is set: anyone who can reach grpc://0.0.0.0:{service.port} can search, index and '
        f'delete; start with --api-key KEY (or CLIP_SEARCH_API_KEYS) to require one'
    ) in service.log()


def test_web_port_with_tls_is_refused_before_the_flow_starts(certificate, tiny_model, capsys):
    from clip_search.cli import main
    from conftest import FLOW_FILE
    from helpers.service import free_port

    cert, key = certificate
    args = [str(FLOW_FILE), '--model', str(tiny_model), '--port', str(free_port()), '--host', '127.0.0.1']
    assert main([*args, '--tls-cert', str(cert), '--tls-key', str(key), '--web-port', str(free_port())]) == 2
    assert capsys.readouterr().err == (
        'clip-search: --web-port cannot be combined with --tls-cert yet: serve the page through a TLS proxy\n'
    )


def test_tls_needs_both_files(tmp_path):
    from clip_search.flowconfig import FlowConfigError, load_flow_config
    from conftest import FLOW_FILE

    with pytest.raises(FlowConfigError, match='both --tls-cert and --tls-key'):
        load_flow_config(FLOW_FILE, tls_cert=str(tmp_path / 'cert.pem'))
    with pytest.raises(FlowConfigError, match='no such file'):
        load_flow_config(FLOW_FILE, tls_cert=str(tmp_path / 'cert.pem'), tls_key=str(tmp_path / 'key.pem'))

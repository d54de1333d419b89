"""What a client can make the server read, fetch and decode is bounded by the server itself.

The gateway has no authentication, so these tests talk to it as anyone could: with a raw Jina
client, against 3 shards. One service runs with the defaults (no path is opened, no private host
is fetched), one with ``--allow-path`` and ``--allow-host 127.0.0.1``.
"""

from __future__ import annotations

import http.server
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from docarray import Document, DocumentArray
from PIL import Image

from clip_search import Client
from conftest import png_bytes
from helpers.service import start_service


def raw_post(service, endpoint: str, docs: list, **kwargs):
    """``jina.Client.post`` as an outside client would call it."""
    from jina import Client as JinaClient

    return JinaClient(host=service.address).post(endpoint, inputs=DocumentArray(docs), **kwargs)


def refusal(service, endpoint: str, docs: list) -> str:
    """The reason a raw client is given for a refused request (the exception the executor raised)."""
    from jina.excepts import BadServer

    with pytest.raises(BadServer) as error:
        raw_post(service, endpoint, docs)
    exception = error.value.args[0].status.exception
    return f'{exception.name}: {" ".join(exception.args)}'


class ImageServer:
    """An HTTP server on 127.0.0.1: ``/img.png`` answers a PNG, ``/drip.png`` one byte a second
    (``/drip-fast.png?...`` one every 0.2 s),
    ``/huge.png`` announces a gigabyte, ``/hop.png`` redirects to a private address."""

    def __init__(self):
        image = png_bytes(7)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == '/hop.png':
                    self.send_response(302)
                    self.send_header('Location', 'http://10.1.2.3/internal.png')
                    self.end_headers()
                    return
                if self.path == '/huge.png':
                    self.send_response(200)
                    self.send_header('Content-Length', str(2**30))
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'image/png')
                self.send_header('Content-Length', str(len(image)))
                self.end_headers()
                if not self.path.startswith('/drip'):
                    self.wfile.write(image)
                    return
                pause = 0.2 if self.path.startswith('/drip-fast.png') else 1
                for byte in image:  # each byte within any per-read timeout: only a total deadline ends it
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(pause)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.server.server_port}'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp('allowed')
    (directory / 'inside.png').write_bytes(png_bytes(1))
    outside = tmp_path_factory.mktemp('outside')
    (outside / 'secret.png').write_bytes(png_bytes(2))
    (directory / 'escape.png').symlink_to(outside / 'secret.png')  # a link out of the allowed directory
    os.mkfifo(directory / 'pipe.png')  # opening it would wait for a writer forever
    return directory, outside


@pytest.fixture(scope='module')
def image_server():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope='module')
def closed(tmp_path_factory, tiny_model):
    """The defaults: no path opened, only public addresses fetched."""
    service = start_service(tiny_model, tmp_path_factory.mktemp('closed') / 'workspace', shards=3)
    yield service
    service.stop()


@pytest.fixture(scope='module')
def opened(tmp_path_factory, tiny_model, images):
    allow = ('--allow-path', str(images[0]), '--allow-host', '127.0.0.1')
    service = start_service(tiny_model, tmp_path_factory.mktemp('opened') / 'workspace', shards=3, extra_args=allow)
    yield service
    service.stop()


@pytest.mark.slow
def test_a_server_path_is_refused_until_its_directory_is_allowed(closed, opened, images):
    directory, outside = images
    error = refusal(closed, '/index', [Document(id='by-path', uri=str(directory / 'inside.png'))])
    assert "document 'by-path'" in error and 'is a path on the server' in error and '--allow-path DIR' in error
    missing = refusal(closed, '/index', [Document(id='by-path', uri=str(directory / 'nope.png'))])
    assert 'is a path on the server' in missing  # outside the allowed directories, not even its existence is told
    for endpoint in ('/search', '/encode'):
        assert "document 'by-path'" in refusal(closed, endpoint, [Document(id='by-path', uri=str(directory / 'inside.png'))])
    assert Client(closed.address).status()['documents'] == 0

    raw_post(opened, '/index', [Document(id='by-path', uri=str(directory / 'inside.png'))])
    match = Client(opened.address).search([Document(blob=png_bytes(1))], limit=1)[0].matches[0]
    assert match.id == 'by-path' and match.uri == str(directory / 'inside.png')
    for name, doc_id in (('escape.png', 'by-link'), ('../' + outside.name + '/secret.png', 'by-dots')):
        error = refusal(opened, '/index', [Document(id=doc_id, uri=str(directory / name))])
        assert f"document '{doc_id}'" in error and '--allow-path' in error
    error = refusal(opened, '/index', [Document(id='by-fifo', uri=str(directory / 'pipe.png'))])
    assert "document 'by-fifo'" in error and 'is not a regular file' in error
    assert Client(opened.address).status()['documents'] == 1


@pytest.mark.slow
def test_a_loopback_url_is_refused_until_its_host_is_allowed(closed, opened, image_server):
    url = f'{image_server.url}/img.png'
    error = refusal(closed, '/index', [Document(id='by-url', uri=url)])
    assert "document 'by-url'" in error and '--allow-host HOST' in error
    # a blocked host is never contacted: a closed port and a silent one get the same answer
    with socket.socket() as silent:
        silent.bind(('127.0.0.1', 0))
        silent.listen(1)
        answers = set()
        for port in (silent.getsockname()[1], 1):
            text = refusal(closed, '/index', [Document(id='by-url', uri=f'http://127.0.0.1:{port}/x.png')])
            answers.add(re.sub(r'127\.0\.0\.1:\d+', 'HOST', text))
        assert len(answers) == 1 and '--allow-host' in answers.pop()
    for uri in ('http://localhost:9/x.png', 'http://[::1]:9/x.png', 'http://169.254.169.254/x.png', 'http://10.1.2.3/x.png'):
        assert '--allow-host' in refusal(closed, '/index', [Document(id='private', uri=uri)]), uri

    error = refusal(opened, '/index', [Document(id='huge', uri=f'{image_server.url}/huge.png')])
    assert error.endswith(f"could not be fetched (it is larger than 52428800 bytes ({2**30}))")  # refused before reading
    error = refusal(opened, '/index', [Document(id='hop', uri=f'{image_server.url}/hop.png')])
    assert "document 'hop'" in error and '(or a redirect of it)' in error  # 10.x is not allowed, even by a redirect
    raw_post(opened, '/index', [Document(id='by-url', uri=url)])
    match = Client(opened.address).search([Document(blob=png_bytes(7))], limit=1)[0].matches[0]
    assert (match.id, match.uri) == ('by-url', url)
    Client(opened.address).delete(['by-url'])


DRIPPING_CLIENT = """
import sys, time
from docarray import Document, DocumentArray
from jina import Client
from jina.excepts import BadServer
client = Client(host=sys.argv[1])
client.post('/status', DocumentArray([Document()]))  # connected: the clock starts with the fetch
started = time.monotonic()
try:
    client.post('/index', DocumentArray(Document(id=f'by-drip-{i}', uri=url) for i, url in enumerate(sys.argv[2:])))
except BadServer as exc:
    print(' '.join(exc.args[0].status.exception.args))
print(f'seconds={time.monotonic() - started:.2f}', flush=True)
"""


@pytest.mark.slow
def test_a_dripping_host_is_cut_off_at_the_deadline_while_other_searches_answer(opened, image_server):
    Client(opened.address).index([Document(id='steady', text='a steady sentence')])
    # another client, in a process of its own (as another user's would be)
    dripping = subprocess.Popen(
        [sys.executable, '-c', DRIPPING_CLIENT, opened.address, f'{image_server.url}/drip.png'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    searcher = Client(opened.address, timeout=10)
    latencies = []
    while dripping.poll() is None:
        started = time.monotonic()
        assert searcher.search(['a steady sentence'], limit=1)[0].matches[0].id == 'steady'
        assert searcher.status()['documents'] >= 1 and searcher.delete(['never-indexed']) == []
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    out, err = dripping.communicate()
    assert "document 'by-drip-0'" in out and 'longer than uri_timeout=5 s' in out, err[-2000:]
    seconds = float(re.search(r'seconds=([\d.]+)', out).group(1))
    assert 4.5 <= seconds < 8  # the flow's uri_timeout is 5 s, for the whole fetch (the host drips a byte a second)
    assert len(latencies) >= 20 and max(latencies) < 3, latencies
    assert Client(opened.address).status()['documents'] >= 1


@pytest.mark.slow
def test_four_dripping_urls_in_one_index_hold_no_concurrent_search(opened, image_server):
    """Searches by text and by image, from other clients, answer while one /index waits on 4 slow hosts."""
    Client(opened.address).index([Document(id='steady-text', text='a calm lake'), Document(id='steady-image', blob=png_bytes(11))])
    urls = [f'{image_server.url}/drip-fast.png?n={i}' for i in range(4)]
    dripping = subprocess.Popen(
        [sys.executable, '-c', DRIPPING_CLIENT, opened.address, *urls], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    latencies: dict[str, list[float]] = {'text': [], 'image': []}
    failures: list[BaseException] = []

    def search(kind: str, query, expected: str) -> None:
        client = Client(opened.address, timeout=10)
        try:
            while dripping.poll() is None:
                started = time.monotonic()
                assert client.search([query], limit=1)[0].matches[0].id == expected
                latencies[kind].append(time.monotonic() - started)
                time.sleep(0.05)
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [
        threading.Thread(target=search, args=('text', 'a calm lake', 'steady-text')),
        threading.Thread(target=search, args=('image', Document(blob=png_bytes(11)), 'steady-image')),
    ]
    for thread in threads:
        thread.start()
    out, err = dripping.communicate(timeout=60)
    for thread in threads:
        thread.join(30)
    assert not failures, failures
    assert "document 'by-drip-" in out and 'longer than uri_timeout=5 s' in out, err[-2000:]
    # every search within 1 s on a quiet machine; 3 s leaves room for a shared, busy one
    assert all(len(times) >= 5 and max(times) < 3 for times in latencies.values()), {k: (len(t), sorted(t)[-3:]) for k, t in latencies.items()}


def big_png(width: int, height: int) -> bytes:
    """A PNG of many pixels in few bytes (one colour, 1 bit per pixel)."""
    buffer = io.BytesIO()
    Image.new('1', (width, height)).save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.mark.slow
def test_decompression_bombs_and_oversized_images_are_refused_by_name(closed):
    bomb = big_png(20_000, 10_000)  # 200 megapixels in about 25 KB
    assert len(bomb) < 100_000
    error = refusal(closed, '/index', [Document(id='bomb', blob=bomb)])
    assert "document 'bomb'" in error and 'too many pixels' in error
    error = refusal(closed, '/search', [Document(id='large', blob=big_png(8_000, 7_000))])  # 56 MP: under Pillow's limit
    assert "document 'large': its blob is an image of 8000x7000 pixels, more than the 50000000" in error
    truncated = refusal(closed, '/index', [Document(id='truncated', blob=png_bytes(3, size=200)[:400])])
    assert "document 'truncated'" in truncated and 'is not a readable image' in truncated
    client = Client(closed.address)
    client.index([Document(id='after-bomb', blob=png_bytes(4))])  # the service keeps serving
    assert client.search([Document(blob=png_bytes(4))], limit=1)[0].matches[0].id == 'after-bomb'


@pytest.mark.slow
def test_status_and_delete_run_no_encoder_handler(closed):
    # a document the encoder would refuse (a server path) passes: no handler of the encoder ran on it
    unencodable = Document(id='no-model-here', uri='/etc/hostname.png')
    status = raw_post(closed, '/status', [unencodable])
    assert status[0].tags['documents'] >= 0
    deleted = raw_post(closed, '/delete', [unencodable])
    assert [doc.tags['deleted'] for doc in deleted] == [False]
    assert 'is a path on the server' in refusal(closed, '/search', [unencodable])

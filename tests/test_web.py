"""The web page beside the gRPC API (``--web-port``): its JSON API, its thumbnails, and the page in Chromium.

One Flow with the bundled ``mini::shapes`` model serves the demo shapes for the whole module.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import random
import re
import socket
import time

import pytest
import requests
from docarray import Document
from PIL import Image

from clip_search.cli import main
from clip_search.demo import DEMO_TEXTS
from clip_search.demo_model.shapes import draw_shape_image
from helpers.service import free_port, start_service
from clip_search.web.app import parse_filter
from conftest import FLOW_FILE

# the exact text 'a red circle' would be its own best match: leave it out so the image has to win
TEXTS = [text for text in DEMO_TEXTS if text != 'a red circle']
# a text document may carry any uri; the page must never open it
TEXT_WITH_A_PATH = Document(id='text:with a path', text='a green star', uri='/etc/passwd')


@pytest.fixture(scope='module')
def web(tmp_path_factory):
    """A running service with the web page, the demo shapes and texts indexed; yields the page's URL."""
    from helpers.browser import index_demo_shapes

    tmp = tmp_path_factory.mktemp('web')
    port = free_port()
    service = start_service(
        'mini::shapes', tmp / 'workspace', shards=2, flow_file=FLOW_FILE,
        extra_args=('--host', '127.0.0.1', '--web-port', str(port)),
    )  # fmt: skip
    try:
        client = service.client()
        indexed = index_demo_shapes(client, tmp / 'images', texts=TEXTS)
        client.index([TEXT_WITH_A_PATH])
        url = f'http://127.0.0.1:{port}'
        assert f'clip-search web page on {url}' in service.log()
        yield url, indexed + 1
    finally:
        service.stop()


def png_of(color: str, shape: str, seed: int) -> bytes:
    """A new drawing, not one of the indexed images."""
    buffer = io.BytesIO()
    draw_shape_image(color, shape, random.Random(seed)).save(buffer, format='PNG')
    return buffer.getvalue()


def search(url: str, **body) -> requests.Response:
    return requests.post(f'{url}/api/search', json=body, timeout=60)


@pytest.mark.slow
def test_the_page_is_served_and_fetches_nothing_from_elsewhere(web):
    url, _ = web
    page = requests.get(f'{url}/', timeout=10)
    assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
    assert 'id="query"' in page.text and '/static/app.js' in page.text
    for asset in ('/', '/static/app.js', '/static/style.css'):
        body = requests.get(f'{url}{asset}', timeout=10)
        assert body.status_code == 200
        assert 'http://' not in body.text and 'https://' not in body.text  # no CDN: works offline


@pytest.mark.slow
def test_search_api_ranks_matches_by_ascending_distance(web):
    url, _ = web
    answer = search(url, query='a red circle', limit=5)
    assert answer.status_code == 200, answer.text
    matches = answer.json()['matches']
    assert len(matches) == 5
    assert matches[0]['id'] == 'image:red_circle_0.png'
    assert matches[0]['uri'].endswith('red_circle_0.png') and matches[0]['thumbnail']
    distances = [match['distance'] for match in matches]
    assert distances == sorted(distances) and distances[0] < 0.3
    texts = [match for match in matches if match['id'].startswith('text:')]
    assert texts and all(match['text'] and match['thumbnail'] is None for match in texts)
    fewer = search(url, query='a red circle', limit=2).json()['matches']
    assert [m['id'] for m in fewer] == [m['id'] for m in matches[:2]]


@pytest.mark.slow
def test_search_api_max_distance_cuts_where_it_says(web):
    url, _ = web
    ranked = search(url, query='a green star', limit=12).json()['matches']
    distances = [m['distance'] for m in ranked]
    cut = (distances[2] + distances[3]) / 2
    answer = search(url, query='a green star', limit=12, max_distance=cut).json()
    assert answer['max_distance'] == cut and [m['id'] for m in answer['matches']] == [m['id'] for m in ranked[:3]]
    # 0.0: the indexed text 'a green star' alone (two documents carry it: both are exact)
    exact = search(url, query='a green star', limit=12, max_distance=0).json()['matches']
    assert exact and all(m['text'] == 'a green star' and m['distance'] == pytest.approx(0, abs=1e-6) for m in exact)
    drawing = png_of('blue', 'square', seed=2024)  # a form sends it as a string
    uploaded = requests.post(
        f'{url}/api/search', files={'image': ('q.png', drawing, 'image/png')}, data={'limit': '12', 'max_distance': f'{cut}'}, timeout=60
    ).json()
    assert uploaded['max_distance'] == cut and all(m['distance'] <= cut + 1e-6 for m in uploaded['matches'])


@pytest.mark.slow
def test_search_by_an_uploaded_image(web):
    url, _ = web
    drawing = png_of('blue', 'square', seed=2024)
    uploaded = requests.post(
        f'{url}/api/search', files={'image': ('query.png', drawing, 'image/png')}, data={'limit': '3'}, timeout=60
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()['query'] == '<image>'
    assert [m['id'] for m in uploaded.json()['matches']][0] == 'image:blue_square_0.png'
    as_data_uri = search(url, image='data:image/png;base64,' + base64.b64encode(drawing).decode(), limit=3)
    assert as_data_uri.json()['matches'] == uploaded.json()['matches']


@pytest.mark.slow
def test_tag_filter(web):
    url, _ = web
    squares = search(url, query='a red circle', limit=4, filter='shape=square').json()
    assert squares['filter'] == {'shape': {'$eq': 'square'}}
    assert [m['tags']['shape'] for m in squares['matches']] == ['square'] * 4
    assert squares['matches'][0]['id'] == 'image:red_square_0.png'
    unknown = search(url, query='a red circle', filter='size=large')
    assert unknown.status_code == 400 and "unknown columns ['size']" in unknown.json()['error']
    malformed = search(url, query='a red circle', filter='shape square')
    assert malformed.status_code == 400 and 'filter' in malformed.json()['error']


def test_filter_syntax_maps_to_the_indexer_filters():
    assert parse_filter('color=red, shape!=star') == {'color': {'$eq': 'red'}, 'shape': {'$neq': 'star'}}
    assert parse_filter('price>=10, price<20.5') == {'price': {'$gte': 10, '$lt': 20.5}}
    assert parse_filter('{"color": {"$eq": "red"}}') == {'color': {'$eq': 'red'}}
    assert parse_filter('  ') is None


@pytest.mark.slow
@pytest.mark.parametrize(
    'body, named',
    [
        ({'query': 'a red circle', 'limit': 0}, 'limit'),
        ({'query': 'a red circle', 'limit': 'ten'}, 'limit'),
        ({'query': 'a red circle', 'limit': 10_001}, 'limit'),
        ({'query': '   '}, 'query'),
        ({'image': 'data:image/png;base64,' + base64.b64encode(b'not an image').decode()}, 'image'),
        ({'query': 'a red circle', 'filter': '{"color": '}, 'filter'),
        ({'query': 'a red circle', 'max_distance': -0.5}, 'max_distance=-0.5 must be a number of at least 0'),
        ({'query': 'a red circle', 'max_distance': 'near'}, "max_distance='near' must be a number of at least 0"),
        ({'query': 'a red circle', 'max_distance': True}, 'max_distance=True must be a number of at least 0'),
    ],
)
def test_bad_requests_are_refused_naming_the_parameter(web, body, named):
    answer = search(web[0], **body)
    assert answer.status_code == 400
    assert answer.json()['error'].startswith(named)


@pytest.mark.slow
def test_status(web):
    url, indexed = web
    status = requests.get(f'{url}/api/status', timeout=30).json()
    assert status['documents'] == indexed and len(status['shards']) == 2
    assert status['model'] == 'mini::shapes' and status['index']['columns'] == [['color', 'str'], ['shape', 'str']]


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written: no client normalises '..' or re-encodes it."""
    host, port = url.removeprefix('http://').split(':')
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest('GET', path, skip_accept_encoding=True)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, response.read()


@pytest.mark.slow
def test_thumbnails_only_of_documents_a_search_returned(web):
    url, _ = web
    matches = search(url, query='a green star', limit=12).json()['matches']
    assert 'text:with a path' in [m['id'] for m in matches]  # found, but a text: it has no thumbnail
    first_image = next(m for m in matches if m['thumbnail'])
    status, body = raw_get(url, first_image['thumbnail'])
    assert status == 200
    thumbnail = Image.open(io.BytesIO(body))
    assert thumbnail.format == 'JPEG' and max(thumbnail.size) <= 256
    escapes = [
        '/api/thumbnail?id=text%3Awith%20a%20path',  # the text document whose uri is /etc/passwd
        '/api/thumbnail?id=/etc/passwd',
        '/api/thumbnail?id=../../../../etc/passwd',
        '/api/thumbnail?id=%2e%2e%2f%2e%2e%2fetc%2fpasswd',
        '/api/thumbnail?id=file%3A%2F%2F%2Fetc%2Fpasswd',
        '/api/thumbnail?id=image%3Anever_indexed.png',
        '/api/thumbnail/../../etc/passwd',
        '/api/thumbnail/..%2f..%2fetc%2fpasswd',
        '/static/../app.py',
        '/static/%2e%2e/app.py',
        '/static/..%2fapp.py',
        '/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd',
        '/static//etc/passwd',
        '/../../etc/passwd',
    ]
    for path in escapes:
        status, body = raw_get(url, path)
        assert status in (400, 404), (path, status)
        assert b'root:' not in body and b'import' not in body, path


@pytest.mark.slow
def test_the_page_in_a_real_browser(web, tmp_path):
    """Type a query, see ranked results with thumbnails; filter; upload an image; see an error."""
    if os.environ.get('CLIP_SEARCH_SKIP_BROWSER') == '1':
        pytest.skip('CLIP_SEARCH_SKIP_BROWSER=1')
    from selenium.webdriver.common.by import By

    from helpers.browser import after_search, headless_chromium, search_on_page

    url, _ = web
    with headless_chromium() as browser:  # raises, with the apt-get line, when chromium is missing
        cards = search_on_page(browser, f'{url}/', 'a red circle')
        assert len(cards) == 12  # the page asks for 12 by default
        assert cards[0].get_attribute('data-id') == 'image:red_circle_0.png'
        first_image = cards[0].find_element(By.TAG_NAME, 'img')
        assert browser.execute_script('return arguments[0].naturalWidth', first_image) > 0
        shown = [float(card.find_element(By.CLASS_NAME, 'distance').text) for card in cards]
        assert shown == sorted(shown)
        ranked_ids = [card.get_attribute('data-id') for card in cards]
        exact_distances = [float(card.get_attribute('data-distance')) for card in cards]  # unrounded
        text_card = next(card for card in cards if 'is-text' in card.get_attribute('class'))
        assert text_card.find_element(By.CLASS_NAME, 'caption').text.strip('“”') in TEXTS
        assert browser.current_url.endswith('?q=a%20red%20circle')

        browser.find_element(By.ID, 'filter').send_keys('shape=square')
        cards = after_search(browser, browser.find_element(By.ID, 'search-button').click)
        assert cards[0].get_attribute('data-id') == 'image:red_square_0.png'
        assert all('shape: square' in card.text for card in cards)

        browser.find_element(By.ID, 'filter').send_keys(', size=large')
        after_search(browser, browser.find_element(By.ID, 'search-button').click)
        assert "unknown columns ['size']" in browser.find_element(By.ID, 'error').text

        browser.find_element(By.ID, 'filter').clear()
        # the cut-off beside "Results": only matches at most that distance, fewer than the 12 asked for
        cut = (exact_distances[1] + exact_distances[2]) / 2
        browser.find_element(By.ID, 'max-distance').send_keys(repr(cut))
        cards = after_search(browser, browser.find_element(By.ID, 'search-button').click)
        assert [card.get_attribute('data-id') for card in cards] == ranked_ids[:2]
        browser.find_element(By.ID, 'max-distance').clear()

        drawing = tmp_path / 'a new blue square.png'
        drawing.write_bytes(png_of('blue', 'square', seed=2024))
        pick = browser.find_element(By.ID, 'image-input')
        cards = after_search(browser, lambda: pick.send_keys(str(drawing)))  # picking a file searches at once
        assert cards[0].get_attribute('data-id') == 'image:blue_square_0.png'
        assert not browser.find_element(By.ID, 'error').is_displayed()


def test_web_port_problems_are_reported_before_the_flow_starts(tiny_model, capsys):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = [str(FLOW_FILE), '--model', str(tiny_model), '--host', '127.0.0.1', '--port', str(free_port())]
        assert main([*args, '--web-port', str(port)]) == 2
    assert f'--web-port {port}: cannot listen on 127.0.0.1:{port}' in capsys.readouterr().err
    assert main([*args, '--web-port', '70000']) == 2
    assert '--web-port 70000 must be from 1 to 65535' in capsys.readouterr().err
    grpc_port = free_port()
    assert main([str(FLOW_FILE), '--model', str(tiny_model), '--port', str(grpc_port), '--web-port', str(grpc_port)]) == 2
    assert "is the gateway's gRPC port" in capsys.readouterr().err


def test_the_remembered_images_are_bounded_and_the_latest_answer_wins():
    from clip_search.web.app import SearchedDocuments

    searched = SearchedDocuments(max_documents=2, max_blob_bytes=10)
    for doc_id in ('a', 'b', 'c'):
        searched.remember(Document(id=doc_id, uri=f'/images/{doc_id}.png'))
    assert searched.get('a') is None and searched.get('c').uri == '/images/c.png'
    searched.remember(Document(id='c', blob=b'12345678'))  # indexed again, now as bytes
    assert searched.get('c').uri == '' and searched.get('c').blob == b'12345678'
    searched.remember(Document(id='d', blob=b'123456'))  # 14 bytes in all: the older image goes
    assert searched.get('c') is None and searched.get('d') is not None


@contextlib.contextmanager
def page_for(flow_address: str, **app_options):
    """The web page alone, for a Flow at ``flow_address`` (which may be down or hung); yields its URL."""
    from clip_search.web.server import bind_web_socket, serve_web_page

    with serve_web_page(bind_web_socket('127.0.0.1', free_port()), flow_address, **app_options) as url:
        yield url


def test_an_unreachable_flow_is_a_502_and_a_hung_one_a_504():
    with page_for(f'grpc://127.0.0.1:{free_port()}') as url:  # nothing listens there
        answer = search(url, query='a red circle')
        assert answer.status_code == 502
        error = answer.json()['error']  # what the user can do, and an id for the log; no exception text
        assert re.fullmatch(r'the search service did not answer; try again in a moment \(error [0-9a-f]{12}\)', error), error
        assert requests.get(f'{url}/api/status', timeout=30).status_code == 502
    with socket.socket() as hung:
        hung.bind(('127.0.0.1', 0))
        hung.listen(8)  # accepts connections (the kernel does) and never answers
        with page_for(f'grpc://127.0.0.1:{hung.getsockname()[1]}', timeout=2) as url:
            started = time.monotonic()
            answer = search(url, query='a red circle')
            assert answer.status_code == 504
            assert answer.json() == {'error': 'the search service did not answer within 2 s'}
            assert time.monotonic() - started < 10
            assert requests.get(f'{url}/api/status', timeout=30).status_code == 504


def test_a_body_over_the_cap_is_refused_before_it_is_read():
    from clip_search.web.app import MAX_BODY_BYTES

    with page_for(f'grpc://127.0.0.1:{free_port()}') as url:
        host, port = url.removeprefix('http://').split(':')
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.putrequest('POST', '/api/search')
        connection.putheader('Content-Type', 'application/json')
        connection.putheader('Content-Length', str(MAX_BODY_BYTES + 1))
        connection.endheaders()  # and no body at all: the answer must not wait for it
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())['error'].startswith(f'the body is larger than {MAX_BODY_BYTES} bytes')

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(MAX_BODY_BYTES // 2**20 + 2):
                yield b' ' * 2**20

        answer = requests.post(f'{url}/api/search', data=chunks(), headers={'Content-Type': 'application/json'}, timeout=30)
        assert answer.status_code == 413
        too_many_pixels = io.BytesIO()
        Image.new('1', (8_000, 7_000)).save(too_many_pixels, format='PNG')  # 56 MP in a few KB
        answer = requests.post(f'{url}/api/search', files={'image': too_many_pixels.getvalue()}, timeout=30)
        assert answer.status_code == 400 and answer.json()['error'] == 'image has 56000000 pixels, more than 50000000 (resize it first)'
        big = requests.post(f'{url}/api/search', files={'image': b'\0' * (16 * 2**20 + 1)}, timeout=30)
        assert big.status_code == 400 and big.json()['error'].startswith('image has 16777217 bytes, more than 16777216')


def test_thumbnails_read_only_what_the_encoder_may(tmp_path):
    from clip_search.media import BadDocumentError, MediaPolicy
    from clip_search.web.app import SearchedDocuments

    allowed, elsewhere = tmp_path / 'allowed', tmp_path / 'elsewhere'
    for directory in (allowed, elsewhere):
        directory.mkdir()
        (directory / 'shape.png').write_bytes(png_of('red', 'circle', seed=1))
    searched = SearchedDocuments(MediaPolicy.create(allow_paths=[allowed]))
    inside = Document(id='inside', uri=str(allowed / 'shape.png'))
    assert Image.open(io.BytesIO(searched.thumbnail(inside))).format == 'JPEG'
    for doc_id, path in (('outside', elsewhere / 'shape.png'), ('dots', allowed / '..' / 'elsewhere' / 'shape.png')):
        with pytest.raises(BadDocumentError, match=f"document '{doc_id}': uri .* is a path on the server"):
            searched.thumbnail(Document(id=doc_id, uri=str(path)))
    stored = Document(id='stored', uri=str(elsewhere / 'shape.png'), blob=png_of('blue', 'star', seed=2))
    assert Image.open(io.BytesIO(searched.thumbnail(stored))).format == 'JPEG'  # the index's thumbnail, not the path
    with pytest.raises(BadDocumentError, match='--allow-host HOST'):
        SearchedDocuments().thumbnail(Document(id='private', uri='http://127.0.0.1:9/x.png'))


def eps_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8), 'red').save(buffer, format='EPS')  # Pillow writes EPS without Ghostscript
    return buffer.getvalue()


def test_a_foreign_host_a_foreign_origin_and_an_eps_upload_are_refused():
    with page_for(f'grpc://127.0.0.1:{free_port()}', allowed_hosts=['search.example']) as url:
        port = url.rsplit(':', 1)[1]
        # DNS rebinding: a page of evil.example whose name now points here sends its own Host
        for path in ('/', '/api/status', '/api/thumbnail?id=x'):
            answer = requests.get(f'{url}{path}', headers={'Host': f'evil.example:{port}'}, timeout=30)
            assert (answer.status_code, answer.text) == (400, 'Invalid host header'), path
        assert requests.get(f'{url}/', headers={'Host': f'search.example:{port}'}, timeout=30).status_code == 200
        assert requests.get(f'{url}/', headers={'Host': f'localhost:{port}'}, timeout=30).status_code == 200
        refused = {'error': 'a request from another site is refused: use the search page of this server'}
        for headers in ({'Origin': 'http://evil.example'}, {'Origin': f'http://localhost:{int(port) + 1}'},
                        {'Origin': 'null'}, {'Sec-Fetch-Site': 'cross-site'}):  # fmt: skip
            answer = requests.post(f'{url}/api/search', data='{"query": "a red circle"}', headers={'Content-Type': 'text/plain', **headers}, timeout=30)
            assert (answer.status_code, answer.json()) == (403, refused), headers
        answer = requests.post(f'{url}/api/search', files={'image': ('page.eps', eps_bytes())}, headers={'Origin': url}, timeout=30)
        assert answer.status_code == 400
        assert answer.json()['error'] == (
            'image is not a readable image: EPS is not a supported image format (the server decodes JPEG, PNG, WEBP, GIF, BMP and TIFF)'
        )


def test_with_api_keys_the_page_is_open_and_its_api_asks_for_a_key():
    from clip_search.auth import UNAUTHENTICATED, KeyRing

    key = 'page-key-0123456789abcdef'
    with page_for(f'grpc://127.0.0.1:{free_port()}', keys=KeyRing.create(read_only=[key])) as url:
        assert requests.get(f'{url}/', timeout=30).status_code == 200
        assert requests.get(f'{url}/static/app.js', timeout=30).status_code == 200
        for headers in ({}, {'Authorization': 'Bearer wrong-key-0123456789'}):
            answer = requests.get(f'{url}/api/status', headers=headers, timeout=30)
            assert (answer.status_code, answer.json()) == (401, {'error': UNAUTHENTICATED})
            answer = search(url, query='a red circle') if not headers else requests.post(f'{url}/api/search', json={'query': 'x'}, headers=headers, timeout=30)
            assert answer.status_code == 401
        # past the key check: the Flow behind it is down, which the page says without details
        answer = requests.get(f'{url}/api/status', headers={'Authorization': f'Bearer {key}'}, timeout=30)
        assert answer.status_code == 502 and answer.json()['error'].startswith('the search service did not answer; try again')

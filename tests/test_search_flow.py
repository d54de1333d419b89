"""The sharded search Flow, end to end over gRPC: ranks, scores, placement, update, delete, status."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import Client, RequestError
from helpers.service import start_service
from conftest import FLOW_FILE, png_bytes

WORDS = 'red green blue small large happy sad river mountain city cat dog apple music night'.split()


def corpus(n_texts: int = 240, n_images: int = 60, prefix: str = 'doc') -> DocumentArray:
    """Distinct texts and images, with ids and filterable tags."""
    rng = np.random.default_rng(7)
    docs = DocumentArray()
    for i in range(n_texts):
        words = ' '.join(rng.choice(WORDS, size=4))
        docs.append(Document(id=f'{prefix}-t{i}', text=f'{words} number {i}', tags={'color': WORDS[i % 3]}))
    for i in range(n_images):
        docs.append(Document(id=f'{prefix}-i{i}', blob=png_bytes(i), tags={'color': WORDS[i % 3]}))
    return docs


def brute_force_top(query: np.ndarray, corpus_embeddings: np.ndarray, ids: list[str], k: int):
    distances = 1.0 - corpus_embeddings @ query
    order = np.argsort(distances, kind='stable')[:k]
    return [ids[i] for i in order], distances[order]


def assert_well_formed(matches, limit: int) -> None:
    """Exactly ``limit`` unique matches, each with a cosine score, in ascending order."""
    assert len(matches) == limit
    ids = [m.id for m in matches]
    assert len(set(ids)) == limit
    assert all('cosine' in m.scores for m in matches)
    values = [m.scores['cosine'].value for m in matches]
    assert values == sorted(values)


@pytest.fixture(scope='module')
def service(tmp_path_factory, tiny_model):
    """One 3-shard service shared by the tests of this module (they use distinct ids).

    It may read the tests' temporary files and fetch from this machine (by default it would do neither).
    """
    workspace = tmp_path_factory.mktemp('shared') / 'workspace'
    allow = ('--allow-path', str(tmp_path_factory.getbasetemp()), '--allow-host', '127.0.0.1')
    service = start_service(tiny_model, workspace, shards=3, flow_file=FLOW_FILE, extra_args=allow)
    yield service
    service.stop()


@pytest.mark.slow
@pytest.mark.parametrize('shards', [1, 2, 3, 5])
def test_results_equal_brute_force_ranking_for_any_shard_count(service_factory, shards):
    client = service_factory(shards=shards).client()
    docs = corpus()
    client.index(docs, batch_size=50)
    embeddings = client.encode(DocumentArray(Document(d, copy=True) for d in docs)).embeddings
    ids = docs[:, 'id']

    results = client.search(DocumentArray(Document(d, copy=True) for d in docs), limit=10)

    hits = 0
    for doc, query, result in zip(docs, embeddings, results):
        expected_ids, expected_distances = brute_force_top(query, embeddings, ids, 10)
        assert_well_formed(result.matches, 10)
        assert result.matches[0].id == doc.id  # every text and image finds itself first
        assert result.matches[0].scores['cosine'].value == pytest.approx(0.0, abs=1e-5)
        got = [m.scores['cosine'].value for m in result.matches]
        np.testing.assert_allclose(got, expected_distances, atol=1e-4)
        hits += len(set(expected_ids) & {m.id for m in result.matches})
    assert hits / (10 * len(docs)) >= 0.99
    status = client.status()
    assert status['documents'] == len(docs)
    assert len(status['shards']) == shards
    assert sum(s['documents'] for s in status['shards']) == len(docs)


def test_limit_is_global_not_per_shard(service):
    client = service.client()
    client.index([Document(id=f'limit-{i}', text=f'limit test sentence {i}') for i in range(40)])
    for limit in (1, 3, 10, 25):
        matches = client.search(['limit test sentence 3'], limit=limit)[0].matches
        assert_well_formed(matches, limit)
    assert len(client.search(['anything'])[0].matches) == 10  # the default limit


def test_fewer_documents_than_limit_returns_them_all(tmp_path, tiny_model, service_factory):
    client = service_factory(shards=3).client()
    client.index(['one', 'two', 'three', 'four'])
    matches = client.search(['one'], limit=10)[0].matches
    assert_well_formed(matches, 4)
    assert matches[0].text == 'one'


def test_text_and_image_inputs_of_every_kind_are_encoded_and_found(service, tmp_path):
    client = service.client()
    image_file = tmp_path / 'picture.png'
    image_file.write_bytes(png_bytes(101))
    data_uri = 'data:image/png;base64,' + base64.b64encode(png_bytes(102)).decode()
    tensor = np.random.default_rng(103).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    docs = DocumentArray(
        [
            Document(id='kind-text', text='a sentence about kinds of input'),
            Document(id='kind-path', uri=str(image_file)),
            Document(id='kind-data-uri', uri=data_uri),
            Document(id='kind-blob', blob=png_bytes(104)),
            Document(id='kind-tensor', tensor=tensor),
        ]
    )
    client.index(docs)
    queries = DocumentArray(Document(d, copy=True) for d in docs)
    for query, result in zip(queries, client.search(queries, limit=3)):
        assert result.matches[0].id == query.id
    # the client turns a path string into an image document, like clip_client does
    assert client.search([str(image_file)], limit=1)[0].matches[0].id == 'kind-path'


def test_encode_returns_normalised_float32_embeddings(service):
    client = service.client()
    embeddings = client.encode(['a text', 'another text', 'x' * 5000])  # longer than the context: truncated
    assert embeddings.shape == (3, 64)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])
    again = client.encode(['a text'])
    np.testing.assert_allclose(again[0], embeddings[0], atol=1e-6)


def test_update_replaces_content_and_tags_and_refuses_unknown_ids(service):
    client = service.client()
    client.index([Document(id='upd-1', text='a poem about rain', tags={'color': 'red'})])
    client.update([Document(id='upd-1', text='a song about sunshine', tags={'color': 'blue'})])
    match = client.search(['a song about sunshine'], limit=1)[0].matches[0]
    assert (match.id, match.text, match.tags['color']) == ('upd-1', 'a song about sunshine', 'blue')
    blue = client.search(['a song about sunshine'], limit=50, filter={'color': {'$eq': 'blue'}})[0].matches
    red = client.search(['a song about sunshine'], limit=50, filter={'color': {'$eq': 'red'}})[0].matches
    assert 'upd-1' in blue[:, 'id'] and 'upd-1' not in red[:, 'id']
    with pytest.raises(RequestError, match='never-indexed'):
        client.update([Document(id='never-indexed', text='nothing')])


def test_delete_removes_documents_from_every_shard(service):
    client = service.client()
    client.index([Document(id=f'del-{i}', text=f'to be deleted {i}') for i in range(12)])
    before = client.status()['documents']
    deleted = client.delete([f'del-{i}' for i in range(6)] + ['del-unknown'])
    assert sorted(deleted) == sorted(f'del-{i}' for i in range(6))
    assert client.status()['documents'] == before - 6
    found = client.search(['to be deleted 1'], limit=100)[0].matches[:, 'id']
    assert not {f'del-{i}' for i in range(6)} & set(found)
    assert {f'del-{i}' for i in range(6, 12)} <= set(found)


def test_filters_on_tag_columns(service):
    client = service.client()
    client.index(
        [Document(id=f'flt-{i}', text=f'filter sample {i}', tags={'color': c, 'shape': s})
         for i, (c, s) in enumerate([('red', 'circle'), ('red', 'star'), ('blue', 'circle')] * 4)]
    )  # fmt: skip
    red = client.search(['filter sample'], limit=100, filter={'color': {'$eq': 'red'}})[0].matches
    assert len([m for m in red if m.id.startswith('flt-')]) == 8
    assert all(m.tags['color'] == 'red' for m in red)
    both = client.search(
        ['filter sample'], limit=100, filter={'$and': [{'color': {'$eq': 'red'}}, {'shape': {'$eq': 'circle'}}]}
    )[0].matches
    assert {(m.tags['color'], m.tags['shape']) for m in both} == {('red', 'circle')}
    members = client.search(['filter sample'], limit=100, filter={'shape': {'$in': ['star']}})[0].matches
    assert {m.tags['shape'] for m in members} == {'star'}


def test_status_reports_totals_per_shard_and_settings(service):
    client = service.client()
    client.index([Document(id=f'st-{i}', text=f'status {i}') for i in range(30)], batch_size=5)
    status = client.status()
    assert [s['shard'] for s in status['shards']] == [0, 1, 2]
    assert status['documents'] == sum(s['documents'] for s in status['shards'])
    assert all(s['documents'] > 0 for s in status['shards'])  # /index polled ANY: requests go to the shards in turn
    assert status['index']['n_dim'] == 64
    assert status['index']['metric'] == 'cosine'
    assert status['index']['shards'] == 3 and status['index']['index_polling'] == 'ANY'


def test_bad_search_parameters_are_refused_by_name(service):
    client = service.client()
    client.index([Document(id='param-doc', text='parameters')])
    with pytest.raises(RequestError, match='limit'):
        client.search(['parameters'], limit=0)
    with pytest.raises(RequestError, match="unknown columns \\['price'\\]"):
        client.search(['parameters'], filter={'price': {'$lt': 3}})
    with pytest.raises(RequestError, match='malformed'):
        client.search(['parameters'], filter={'color': {'$like': 'r%'}})
    with pytest.raises(RequestError, match=re.escape('asks for 2,560,000 matches (256 queries x limit 10,000); the cap is 100,000 (max_matches)')):
        client.search([f'query {i}' for i in range(256)], limit=10_000, batch_size=256)
    # and the service still answers afterwards
    assert client.search(['parameters'], limit=1)[0].matches[0].id == 'param-doc'


def test_bad_documents_are_refused_by_id_and_nothing_of_the_batch_is_indexed(service, tmp_path):
    client = service.client()
    before = client.status()['documents']
    batch = [
        Document(id='batch-good', text='a good document'),
        Document(id='batch-missing-file', uri=str(tmp_path / 'nope.png')),
    ]
    with pytest.raises(RequestError, match='batch-missing-file'):
        client.index(batch)
    assert client.status()['documents'] == before
    with pytest.raises(RequestError, match='batch-empty'):
        client.index([Document(id='batch-empty')])
    with pytest.raises(RequestError, match='batch-wrong-dim'):
        client.index([Document(id='batch-wrong-dim', embedding=np.ones(3, dtype=np.float32))])
    assert client.status()['documents'] == before


def test_documents_carrying_their_embedding_are_indexed_as_given(service):
    client = service.client()
    vector = np.random.default_rng(5).normal(size=64).astype(np.float32)
    vector /= np.linalg.norm(vector)
    client.index([Document(id='given-embedding', embedding=vector, tags={'color': 'green'})])
    match = client.search([Document(embedding=vector)], limit=1)[0].matches[0]
    assert match.id == 'given-embedding'
    assert match.scores['cosine'].value == pytest.approx(0.0, abs=1e-5)


def test_a_query_carrying_its_embedding_skips_the_encoder_and_finds_what_its_text_finds(service):
    """The gateway sends /search straight to the encoder and the indexer, and a query that already has
    its embedding past the encoder (clip_search/gateway.py): the routes show it, the answers are the same."""
    from jina import Client as JinaClient

    client = service.client()
    client.index([Document(id=f'direct-{i}', text=f'a direct search for {word}') for i, word in enumerate(WORDS)])
    text = 'a direct search for mountain'
    [embedding] = client.encode([text])
    jina_client = JinaClient(host=service.address)

    def search(query: Document):
        [response] = jina_client.post('/search', inputs=DocumentArray([query]), parameters={'limit': 5}, return_responses=True)
        matches = response.docs[0].matches
        return [route.executor for route in response.routes], [(m.id, m.scores['cosine'].value) for m in matches]

    text_routes, by_text = search(Document(text=text))
    embedding_routes, by_embedding = search(Document(embedding=embedding))
    assert text_routes[:2] == ['gateway', 'encoder'] and 'indexer' in text_routes
    assert embedding_routes[0] == 'gateway' and 'encoder' not in embedding_routes and 'indexer' in embedding_routes
    assert by_embedding == by_text
    assert by_text[0][0] == 'direct-8'  # 'mountain' is WORDS[8]: the query's own text
    with pytest.raises(RequestError, match="document 'empty-query': it is empty"):  # no embedding: the encoder judges it
        client.search([Document(id='empty-query')])


def test_every_process_of_the_flow_runs_its_event_loop_on_uvloop(service):
    """The CLI sets uvloop's policy before Jina forks the gateway and the executors (cli.use_uvloop_in_every_process):
    a runtime on asyncio's own loop shows that loop's Python frames, one on uvloop none."""
    import subprocess

    loops = {}
    for pid in service.processes():
        dump = subprocess.run(['py-spy', 'dump', '--pid', str(pid)], capture_output=True, text=True).stdout
        if 'run (jina/serve/executors/run.py' in dump:  # a pod of the Flow (the CLI process has no such frame)
            loops[pid] = 'asyncio' if 'asyncio/base_events.py' in dump else 'uvloop'
    assert len(loops) == 7 and set(loops.values()) == {'uvloop'}, loops  # gateway, encoder, head, 3 shards, merger


def test_images_are_fetched_from_http_urls(service, tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / 'remote.png').write_bytes(png_bytes(201))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{server.server_port}/remote.png'
        client = service.client()
        client.index([Document(id='from-http', uri=url)])
        match = client.search([Document(blob=png_bytes(201))], limit=1)[0].matches[0]
        assert (match.id, match.uri) == ('from-http', url)
        assert match.scores['cosine'].value == pytest.approx(0.0, abs=1e-5)
        with pytest.raises(RequestError, match="from-http-404.*could not be fetched"):
            client.index([Document(id='from-http-404', uri=url.replace('remote', 'missing'))])
    finally:
        server.shutdown()


def test_long_jobs_show_a_progress_bar_and_accept_generators(service, capfd):
    client = service.client()
    generator = (f'progress sentence {i}' for i in range(60))  # no len(): a generator
    client.index(generator, batch_size=10, show_progress=True)
    assert 'ETA' in capfd.readouterr().out  # rich's progress bar, drawn by Jina's client
    client.index(['one more short job'], show_progress=False)
    assert 'ETA' not in capfd.readouterr().out
    assert client.search(['progress sentence 59'], limit=1)[0].matches[0].text == 'progress sentence 59'


def test_a_generator_is_indexed_as_it_is_read_not_read_first(service):
    client = Client(service.address, in_flight=2)
    before = client.status()['documents']
    indexed_while_reading = {}

    def sentences():
        for i in range(40):
            if i in (0, 15):  # batches of 5, 2 in flight: batch 4 (from 15) is read once batches 1 and 2 are answered
                indexed_while_reading[i] = client.status()['documents'] - before
            yield Document(id=f'lazy-{i}', text=f'lazy sentence {i}')

    assert client.index(sentences(), batch_size=5) == [f'lazy-{i}' for i in range(40)]  # the acknowledged ids
    assert indexed_while_reading[0] == 0 and indexed_while_reading[15] >= 10  # read 40 first: 0 stored at 15
    assert client.status()['documents'] - before == 40


def test_answers_come_back_in_the_order_of_the_inputs(service):
    client = service.client()
    texts = [f'ordered sentence {i}' for i in range(200)]
    embeddings = client.encode(texts, batch_size=7)
    one_by_one = np.stack([client.encode([t])[0] for t in texts[::25]])
    np.testing.assert_allclose(embeddings[::25], one_by_one, atol=1e-5)
    results = client.search(texts, limit=1, batch_size=7)
    assert [r.text for r in results] == texts


def test_the_default_limit_set_in_the_yaml_holds_after_the_merge(tmp_path, tiny_model):
    import yaml

    config = yaml.safe_load(FLOW_FILE.read_text())
    config['executors'][1]['uses_with']['limit'] = 3
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text(yaml.safe_dump(config))
    service = start_service(tiny_model, tmp_path / 'workspace', shards=3, flow_file=flow_file)
    try:
        client = service.client()
        client.index([f'default limit sentence {i}' for i in range(20)])
        from clip_client import Client as UpstreamClient

        jina_client = UpstreamClient(service.address)._client  # a search that sends no limit at all
        result = jina_client.post('/search', [Document(text='default limit sentence 1')])
        assert len(result[0].matches) == 3
    finally:
        service.stop()


def test_an_input_the_client_cannot_convert_fails_at_once_instead_of_hanging():
    """Conversion runs before jina's request loop, which would swallow the error and never answer."""
    client = Client('grpc://127.0.0.1:9', timeout=5)  # nothing listens: the error comes before any request
    with pytest.raises(TypeError, match='cannot index int 42: pass str or Document'):
        client.index([Document(id='fine', text='a text'), 42])


def test_a_document_whose_uri_is_a_data_uri_or_url_is_left_to_the_server():
    from clip_search.client import to_document

    data_uri = 'data:image/png;base64,' + base64.b64encode(png_bytes(7)).decode() * 4  # longer than a file name may be
    for uri in (data_uri, 'https://example.com/a.png', 'file:///tmp/a.png'):
        doc = to_document(Document(uri=uri))
        assert doc.uri == uri and not doc.blob


def test_a_large_search_is_answered_whole_through_the_flow(service):
    """2 queries x limit 600 ask each shard for more than 1,000 matches: the shards answer from a
    thread, each answer parsed straight into Jina's request (``clip_search.wire_answer``). The client
    gets every document once, in ascending distance, starting with what a small search finds."""
    client = service.client()
    client.index([Document(id=f'large-{i}', text=f'large search item {i}') for i in range(30)])
    total = client.status()['documents']
    queries = ['large search item 3', 'large search item 7']
    small, large = client.search(queries, limit=5), client.search(queries, limit=600)
    for few, many in zip(small, large):
        ids = many.matches[:, 'id']
        assert len(ids) == len(set(ids)) == min(600, total)
        distances = [m.scores['cosine'].value for m in many.matches]
        assert distances == sorted(distances)
        assert distances[:5] == pytest.approx([m.scores['cosine'].value for m in few.matches], abs=1e-6)
        assert ids[0] == few.matches[0].id

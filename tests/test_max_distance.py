"""The ``max_distance`` cut-off through a real sharded Flow over gRPC: where it cuts, 0.0, bad values."""

from __future__ import annotations

import pytest
from docarray import Document

from clip_search import RequestError

TEXTS = [f'a note about {topic} number {i}' for i, topic in enumerate(['rivers', 'bread', 'trains', 'owls', 'maps'] * 6)]


@pytest.fixture(scope='module')
def client(tmp_path_factory, tiny_model):
    from conftest import FLOW_FILE
    from helpers.service import start_service

    service = start_service(tiny_model, tmp_path_factory.mktemp('max_distance') / 'workspace', shards=3, flow_file=FLOW_FILE)
    try:
        client = service.client()
        client.index([Document(id=f'n{i}', text=text) for i, text in enumerate(TEXTS)])
        yield client
    finally:
        service.stop()


def matches_of(client, query: str, **parameters) -> list[tuple[str, float]]:
    return [(m.id, m.scores['cosine'].value) for m in client.search([query], **parameters)[0].matches]


@pytest.mark.slow
def test_max_distance_keeps_exactly_the_matches_within_it_across_shards(client):
    for query in (TEXTS[3], 'owls and rivers'):
        ranked = matches_of(client, query, limit=30)  # every document, from all three shards
        distances = [d for _, d in ranked]
        assert len(ranked) == 30 and distances == sorted(distances)
        for k in (1, 4, 12):
            cut = (distances[k - 1] + distances[k]) / 2  # between the k-th and the next
            assert matches_of(client, query, limit=30, max_distance=cut) == ranked[:k]
            # applied before limit: the cut-off leaves k, the limit takes the first 3 of them
            assert matches_of(client, query, limit=3, max_distance=cut) == ranked[: min(k, 3)]
        assert matches_of(client, query, limit=10, max_distance=2.0) == ranked[:10]


@pytest.mark.slow
def test_max_distance_zero_keeps_the_exact_match_alone(client):
    for i in (0, 7, 29):
        exact = matches_of(client, TEXTS[i], limit=10, max_distance=0.0)
        # float32 rounding may leave an exact match at 6e-8: still exact for the cut-off (params.EXACT_DISTANCE)
        assert [doc_id for doc_id, _ in exact] == [f'n{i}'] and exact[0][1] == pytest.approx(0.0, abs=1e-6)
    assert matches_of(client, 'words indexed nowhere', limit=10, max_distance=0) == []
    # the same through asearch
    import asyncio

    answer = asyncio.run(client.asearch([TEXTS[5]], limit=10, max_distance=0.0))
    assert [m.id for m in answer[0].matches] == ['n5']


@pytest.mark.slow
@pytest.mark.parametrize('bad', [-0.1, 'near', True, [0.2]])
def test_bad_max_distance_is_refused_naming_it(client, bad):
    with pytest.raises(RequestError) as error:
        client.search([TEXTS[0]], max_distance=bad)
    assert str(error.value) == (
        f'/search failed: ShardError: ValueError: parameter max_distance={bad!r} must be a number of at least 0 '
        f'(a cosine distance, from 0 for exact matches only to 2) (shards [0, 1, 2])'
    )
    assert [i for i, _ in matches_of(client, TEXTS[0], limit=1)] == ['n0']  # and the service still answers


@pytest.mark.slow
def test_max_distance_in_plain_http_json(tmp_path, tiny_model):
    """POST /post as curl sends it: the parameter in the JSON body's parameters."""
    from conftest import FLOW_FILE
    from helpers.service import start_service
    from test_protocols import post_json

    service = start_service(tiny_model, tmp_path / 'workspace', shards=2, flow_file=FLOW_FILE, protocol='http')
    try:
        data = [{'id': f'n{i}', 'text': text} for i, text in enumerate(TEXTS)]
        post_json(service.port, {'execEndpoint': '/index', 'data': data})
        queries = [{'text': text} for text in TEXTS[:5]]
        exact = post_json(service.port, {'execEndpoint': '/search', 'data': queries, 'parameters': {'max_distance': 0.0}})
        assert [[m['id'] for m in q['matches']] for q in exact['data']] == [[f'n{i}'] for i in range(5)]
        ranked = post_json(service.port, {'execEndpoint': '/search', 'data': queries[:1], 'parameters': {'limit': 30}})
        distances = [m['scores']['cosine']['value'] for m in ranked['data'][0]['matches']]
        cut = (distances[4] + distances[5]) / 2
        within = post_json(service.port, {'execEndpoint': '/search', 'data': queries[:1], 'parameters': {'limit': 30, 'max_distance': cut}})
        assert [m['id'] for m in within['data'][0]['matches']] == [m['id'] for m in ranked['data'][0]['matches'][:5]]
        refused = post_json(service.port, {'execEndpoint': '/search', 'data': queries[:1], 'parameters': {'max_distance': -1}})
        assert 'parameter max_distance=-1.0 must be a number of at least 0' in refused['header']['status']['description']
    finally:
        service.stop()

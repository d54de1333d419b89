"""The unmodified upstream ``clip_client`` works against our server, as in the chapter."""

from __future__ import annotations

import pytest

from conftest import png_bytes


@pytest.fixture
def chapter_service(service_factory):
    return service_factory(shards=3)


def test_chapter_example_index_then_search(chapter_service, tmp_path):
    from clip_client import Client

    apple = tmp_path / 'apple.png'
    apple.write_bytes(png_bytes(11))
    client = Client(chapter_service.address)
    texts = ['she smiled, with pain', 'the cat sat on the mat', 'a quiet night in the city'] + [
        f'filler sentence number {i}' for i in range(20)
    ]
    client.index(texts + [str(apple)])

    results = client.search(texts + [str(apple)], limit=5)

    assert len(results) == len(texts) + 1
    for query, result in zip(texts + [str(apple)], results):
        matches = result.matches
        assert len(matches) == 5
        assert len(set(matches[:, 'id'])) == 5
        distances = [m.scores['cosine'].value for m in matches]
        assert distances == sorted(distances)
        assert (matches[0].text or matches[0].uri) == query  # each indexed item finds itself first
        assert distances[0] == pytest.approx(0.0, abs=1e-5)


def test_clip_client_encode_and_default_limit(chapter_service):
    from clip_client import Client

    client = Client(chapter_service.address)
    embeddings = client.encode(['hello', 'world'])
    assert embeddings.shape == (2, 64)
    client.index([f'sentence {i}' for i in range(15)])
    assert len(client.search(['sentence 1'])[0].matches) == 10


@pytest.mark.slow
def test_the_cards_placement_with_five_shards_holds_after_a_restart(service_factory, tmp_path):
    """/index polled ANY, as the card says: 100 texts in 10 requests, each request stored by one shard."""
    from clip_client import Client
    from docarray import Document

    workspace = tmp_path / 'workspace'
    service = service_factory(shards=5, workspace=workspace)
    texts = [f'card sentence {i} about {topic}' for i, topic in enumerate(['tides', 'kites', 'moss', 'glass'] * 25)]
    Client(service.address).index([Document(id=f'card-{i}', text=t) for i, t in enumerate(texts)], batch_size=10)
    deleted = [f'card-{i}' for i in range(0, 100, 10)]
    assert sorted(service.client().delete(deleted)) == sorted(deleted)

    def holds(service) -> None:
        status = service.client().status()  # clip_client has no status()
        assert status['documents'] == 90 and sum(1 for s in status['shards'] if s['documents']) >= 3
        for i, (text, result) in enumerate(zip(texts, Client(service.address).search(texts, limit=10))):
            ids = result.matches[:, 'id']
            distances = [m.scores['cosine'].value for m in result.matches]
            assert len(set(ids)) == len(ids) == 10 and distances == sorted(distances)
            assert not set(deleted) & set(ids)
            if f'card-{i}' not in deleted:
                assert ids[0] == f'card-{i}'  # every text finds itself first

    holds(service)
    service.stop()
    holds(service_factory(shards=5, workspace=workspace))


def test_encode_answers_without_the_image_bytes_when_asked_as_clip_client_asks(chapter_service):
    from docarray import Document, DocumentArray
    from jina import Client

    client = Client(host=chapter_service.address)
    image = Document(id='apple', blob=png_bytes(11), mime_type='image/png')
    kept = client.post('/encode', inputs=DocumentArray([image]))[0]
    dropped = client.post('/encode', inputs=DocumentArray([image]), parameters={'drop_image_content': True})[0]
    assert kept.blob == image.blob and dropped.blob == b''
    assert dropped.embedding.shape == kept.embedding.shape and (dropped.embedding == kept.embedding).all()

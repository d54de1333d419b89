"""clip-as-service parity: the literal command, rank(), profile() and the asyncio client.

Whatever a user did with clip-as-service must work here the same way, with the unmodified
``clip_client`` and with ours.
"""

from __future__ import annotations

import asyncio
import io
import random
import subprocess
import sys

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import Client
from clip_search.demo_model.shapes import draw_shape_image
from helpers.service import start_service

SHAPES = [('red', 'circle'), ('blue', 'square'), ('green', 'triangle'), ('yellow', 'star')]


def drawing(color: str, shape: str, seed: int = 7) -> bytes:
    buffer = io.BytesIO()
    draw_shape_image(color, shape, random.Random(seed)).save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def literal_service(tmp_path_factory):
    """`python -m clip_search search_flow.yml`, exactly as written, from an empty directory."""
    empty = tmp_path_factory.mktemp('empty_dir')
    service = start_service('mini::shapes', empty / 'workspace', shards=2, flow_file='search_flow.yml', cwd=empty)
    yield service
    service.stop()


def text_with_image_candidates(text: str) -> Document:
    return Document(id=f'query:{text}', text=text, matches=[Document(id=f'{c}-{s}', blob=drawing(c, s)) for c, s in SHAPES])


def image_with_text_candidates(color: str, shape: str) -> Document:
    candidates = [Document(id=f'{c}-{s}', text=f'a {c} {s}') for c, s in SHAPES]
    return Document(id=f'query:{color}-{shape}', blob=drawing(color, shape, seed=99), matches=candidates)


def model_logit_scale(name: str) -> float:
    from clip_search.models import load_model, resolve_model

    return float(load_model(resolve_model(name), 'cpu').model.logit_scale.detach().exp())


def assert_ranked(query: Document, expected_first: str, candidate_count: int) -> None:
    matches = query.matches
    assert len(matches) == candidate_count  # every candidate comes back
    scores = [m.scores['clip_score'].value for m in matches]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert matches[0].id == expected_first
    assert all(m.embedding is None for m in matches)  # candidate embeddings are not sent back


def test_the_literal_command_serves_from_an_empty_directory(literal_service):
    assert 'clip-search is serving on grpc://' in literal_service.log()
    assert (literal_service.log_path.parent / 'workspace').is_dir()  # ./workspace of the YAML, under that directory


def test_clip_client_ranks_images_for_a_text_and_texts_for_an_image(literal_service):
    from clip_client import Client as UpstreamClient

    upstream = UpstreamClient(literal_service.address)
    by_text = upstream.rank([text_with_image_candidates('a red circle')])
    assert_ranked(by_text[0], 'red-circle', len(SHAPES))
    by_image = upstream.rank([image_with_text_candidates('green', 'triangle')])
    assert_ranked(by_image[0], 'green-triangle', len(SHAPES))


def test_rank_scores_are_the_cosine_and_the_softmax_of_the_encoded_pair(literal_service):
    client = literal_service.client()
    query = image_with_text_candidates('blue', 'square')
    texts = [m.text for m in query.matches]
    ranked = client.rank([query])[0]

    image_embedding = client.encode([Document(blob=query.blob)])[0].embedding
    text_embeddings = dict(zip(texts, client.encode(texts)))
    cosines = {m.text: float(text_embeddings[m.text] @ image_embedding) for m in ranked.matches}
    for match in ranked.matches:
        assert match.scores['clip_score_cosine'].value == pytest.approx(cosines[match.text], abs=1e-4)
    logits = model_logit_scale('mini::shapes') * np.array([cosines[m.text] for m in ranked.matches])
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [m.scores['clip_score'].value for m in ranked.matches] == pytest.approx(softmax.tolist(), abs=1e-4)
    assert ranked.matches[0].text == 'a blue square'


def test_rank_never_reaches_the_index(literal_service):
    client = literal_service.client()
    before = client.status()['documents']
    client.rank([text_with_image_candidates('a yellow star')])
    assert client.status()['documents'] == before


def test_rank_without_candidates_is_refused_by_name(literal_service):
    from clip_search import RequestError

    with pytest.raises(RequestError, match="document 'lonely'.*no candidates"):
        literal_service.client().rank([Document(id='lonely', text='a red circle')])


def test_profile_with_both_clients(literal_service):
    from clip_client import Client as UpstreamClient

    for report in (UpstreamClient(literal_service.address).profile(), literal_service.client().profile(show=False)):
        assert set(report) == {'Roundtrip', 'Client-server network', 'Server', 'Gateway-CLIP network', 'CLIP model'}
        assert report['Roundtrip'] >= report['Server'] >= report['CLIP model'] >= 0


def test_the_asyncio_client(literal_service):
    client = literal_service.client()

    async def use_it():
        await client.aindex([Document(id='async-red', text='a red circle'), Document(id='async-blue', text='a blue square')])
        embeddings = await client.aencode(['a red circle'])
        found, ranked = await asyncio.gather(
            client.asearch([Document(blob=drawing('blue', 'square'))], limit=3),
            client.arank([text_with_image_candidates('a blue square')]),
        )
        return embeddings, found, ranked

    embeddings, found, ranked = asyncio.run(use_it())
    assert embeddings.shape == (1, 128)
    assert found[0].matches[0].id == 'async-blue'
    assert ranked[0].matches[0].id == 'blue-square'


def test_no_flow_argument_serves_the_default_flow(tmp_path, tiny_model):
    service = start_service(tiny_model, tmp_path / 'workspace', shards=2, flow_file=None, cwd=tmp_path)
    try:
        service.client().index(['a default flow'])
        assert service.client().search(['a default flow'], limit=1)[0].matches[0].text == 'a default flow'
    finally:
        service.stop()


def test_an_unknown_flow_name_lists_the_shipped_flows(tmp_path):
    run = subprocess.run(
        [sys.executable, '-m', 'clip_search', 'serach_flow.yml'], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    message = run.stderr.strip().splitlines()[-1]
    assert "'serach_flow.yml'" in message and 'search_flow.yml' in message

"""Stop the service, start it again on the same workspace: everything is still there."""

from __future__ import annotations

import pytest
from docarray import Document

from conftest import png_bytes


@pytest.mark.slow
def test_everything_indexed_survives_a_graceful_restart(tmp_path, service_factory):
    workspace = tmp_path / 'workspace'
    docs = [Document(id=f'p-{i}', text=f'persistent sentence {i}', tags={'color': 'red' if i % 2 else 'blue'})
            for i in range(60)] + [Document(id='p-image', blob=png_bytes(3))]  # fmt: skip
    service = service_factory(shards=3, workspace=workspace)
    client = service.client()
    client.index(docs)
    client.delete(['p-0'])
    client.update([Document(id='p-1', text='an updated sentence', tags={'color': 'green'})])
    before = client.status()
    queries = ['persistent sentence 7', 'an updated sentence', Document(blob=png_bytes(3))]
    answers_before = [[(m.id, round(m.scores['cosine'].value, 5)) for m in r.matches] for r in client.search(queries)]
    assert service.stop() == 0  # a graceful stop exits cleanly

    client = service_factory(shards=3, workspace=workspace).client()
    assert client.status() == before
    assert before['documents'] == 60
    answers_after = [[(m.id, round(m.scores['cosine'].value, 5)) for m in r.matches] for r in client.search(queries)]
    assert answers_after == answers_before
    assert answers_after[1][0][0] == 'p-1' and answers_after[2][0][0] == 'p-image'
    green = client.search(['an updated sentence'], filter={'color': {'$eq': 'green'}})[0].matches
    assert green[:, 'id'] == ['p-1']  # filter columns are rebuilt from the stored tags


@pytest.mark.slow
def test_a_workspace_refuses_another_shard_count(tmp_path, service_factory):
    workspace = tmp_path / 'workspace'
    service = service_factory(shards=2, workspace=workspace)
    service.client().index(['a', 'b', 'c'])
    service.stop()
    with pytest.raises(RuntimeError, match='was built with shards=2, not 3'):
        service_factory(shards=3, workspace=workspace)

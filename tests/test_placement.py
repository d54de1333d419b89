"""Placement chosen by the YAML's polling of /index, and writes that are all or nothing across shards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from docarray import Document, DocumentArray

from clip_search import RequestError
from clip_search.executors.annlite_indexer import REPLACE_JOURNAL, SETTINGS_FILE, AnnLiteIndexer
from clip_search.sharding import owner_shard
from helpers.service import flow_polling_index, start_service
from conftest import FLOW_FILE


def shard_counts(client) -> dict[int, int]:
    return {shard['shard']: shard['documents'] for shard in client.status()['shards']}


def gained(before: dict[int, int], after: dict[int, int]) -> list[int]:
    return sorted(after[shard] - before[shard] for shard in after)


def assert_unique_ascending(matches, limit: int) -> None:
    ids = [m.id for m in matches]
    distances = [m.scores['cosine'].value for m in matches]
    assert len(ids) == len(set(ids)) == limit and distances == sorted(distances)


@pytest.fixture(scope='module')
def any_service(tmp_path_factory, tiny_model):
    """The shipped Flow (/index polled ANY) with 3 shards."""
    service = start_service(tiny_model, tmp_path_factory.mktemp('any') / 'workspace', shards=3, flow_file=FLOW_FILE)
    service.client().index([Document(id=f'base-{i}', text=f'base sentence {i}') for i in range(30)], batch_size=10)
    yield service
    service.stop()


@pytest.fixture(scope='module')
def all_service(tmp_path_factory, tiny_model):
    """The same Flow with the one-line alternative, /index polled ALL, and 3 shards."""
    directory = tmp_path_factory.mktemp('all')
    service = start_service(tiny_model, directory / 'workspace', shards=3, flow_file=flow_polling_index(directory, 'ALL'))
    yield service
    service.stop()


def test_polled_any_each_request_is_stored_whole_by_the_shard_that_receives_it(any_service):
    client = any_service.client()
    before = shard_counts(client)
    texts = [f'a spread sentence about item {i}' for i in range(30)]
    client.index([Document(id=f'spread-{i}', text=text) for i, text in enumerate(texts)], batch_size=5)
    assert gained(before, shard_counts(client)) == [10, 10, 10]  # 6 requests of 5, to the 3 shards in turn
    for i, result in enumerate(client.search(texts, limit=10)):
        assert result.matches[0].id == f'spread-{i}'
        assert_unique_ascending(result.matches, 10)


def test_polled_any_indexing_an_id_again_inserts_a_copy_that_update_and_delete_reach(any_service):
    client = any_service.client()
    before = shard_counts(client)
    for _ in range(3):  # three requests: one to each shard
        client.index([Document(id='copied', text='a lighthouse on a cliff', tags={'color': 'red'})])
    copies = shard_counts(client)
    assert gained(before, copies) == [1, 1, 1]  # an insert, as in clip-as-service: /status counts copies
    client.index([Document(id='copied', text='a lighthouse on a cliff', tags={'color': 'red'})])
    assert shard_counts(client) == copies  # the fourth reached a shard holding a copy: it replaced it

    matches = client.search(['a lighthouse on a cliff'], limit=10)[0].matches
    assert matches[0].id == 'copied' and [m.id for m in matches].count('copied') == 1  # never one id twice
    assert_unique_ascending(matches, 10)

    client.update([Document(id='copied', text='a windmill in a field', tags={'color': 'blue'})])
    assert shard_counts(client) == copies
    top = client.search(['a windmill in a field'], limit=1)[0].matches[0]
    assert (top.id, top.text, top.tags['color']) == ('copied', 'a windmill in a field', 'blue')
    red = client.search(['a lighthouse on a cliff'], limit=100, filter={'color': {'$eq': 'red'}})[0].matches
    assert 'copied' not in red[:, 'id']  # no shard kept the old version

    assert client.delete(['copied']) == ['copied']
    assert shard_counts(client) == before  # every copy is gone
    assert 'copied' not in client.search(['a windmill in a field'], limit=100)[0].matches[:, 'id']


def test_polled_all_40_ids_indexed_twice_are_40_documents_and_the_new_content_wins(all_service):
    client = all_service.client()
    before = shard_counts(client)
    ids = [f'twice-{i}' for i in range(40)]
    client.index([Document(id=i, text=f'first version of {i}') for i in ids], batch_size=10)
    client.index([Document(id=i, text=f'second version of {i}') for i in ids], batch_size=10)
    after = shard_counts(client)
    owners = Counter(owner_shard(i, 3) for i in ids)
    assert {shard: after[shard] - before[shard] for shard in after} == {shard: owners[shard] for shard in after}
    for i, result in zip(ids, client.search([f'second version of {i}' for i in ids], limit=10)):
        assert (result.matches[0].id, result.matches[0].text) == (i, f'second version of {i}')
        assert_unique_ascending(result.matches, 10)


@pytest.mark.parametrize('placement', ['any', 'all'])
def test_an_update_naming_an_unknown_id_changes_nothing_on_any_shard(request, placement):
    from jina import Client as JinaClient
    from jina.excepts import BadServer

    service = request.getfixturevalue(f'{placement}_service')
    client = service.client()
    known, unknown = f'mixed-{placement}', f'unknown-{placement}'
    client.index([Document(id=known, text='an old harbour at dawn', tags={'color': 'red'})])
    counts = shard_counts(client)
    refusal = f"cannot update documents that are not indexed: ['{unknown}'] (use /index); nothing was updated"
    update = DocumentArray(
        [Document(id=known, text='a new bridge at night', tags={'color': 'blue'}), Document(id=unknown, text='nothing')]
    )
    with pytest.raises(RequestError) as refused:
        client.update(DocumentArray(Document(d, copy=True) for d in update))
    assert str(refused.value) == f'/update failed: ValueError: {refusal}'
    raw = JinaClient(host='127.0.0.1', port=service.port, protocol='grpc')  # the raw Jina client, no helper
    with pytest.raises(BadServer) as refused_raw:
        raw.post('/update', inputs=DocumentArray(Document(d, copy=True) for d in update))
    assert list(refused_raw.value.args[0].status.exception.args) == [refusal]

    assert shard_counts(client) == counts
    top = client.search(['an old harbour at dawn'], limit=1)[0].matches[0]
    assert (top.id, top.text, top.tags['color']) == (known, 'an old harbour at dawn', 'red')
    blue = client.search(['a new bridge at night'], limit=100, filter={'color': {'$eq': 'blue'}})[0].matches
    assert known not in blue[:, 'id']

    raw.post('/update', inputs=DocumentArray([Document(id=known, text='a new bridge at night', tags={'color': 'blue'})]))
    top = client.search(['a new bridge at night'], limit=1)[0].matches[0]
    assert (top.id, top.text, top.tags['color']) == (known, 'a new bridge at night', 'blue')


# The shard's files, with the indexer on its own (annlite alone, no Flow): settings and the replace journal.


def open_shard(workspace, **settings) -> AnnLiteIndexer:
    return AnnLiteIndexer(n_dim=4, metas={'workspace': str(workspace)}, **settings)


def doc(doc_id: str, text: str, color: str) -> Document:
    return Document(id=doc_id, text=text, tags={'color': color}, embedding=[1.0, 0.5, 0.25, 0.125])


def test_a_change_of_tag_columns_is_refused_by_name(tmp_path):
    open_shard(tmp_path, columns=[['color', 'str']]).close()
    message = (
        "was built with columns=[['color', 'str']], not [['color', 'str'], ['shape', 'str']]: "
        'start with the same setting or a new workspace'
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        open_shard(tmp_path, columns=[['color', 'str'], ['shape', 'str']])


def test_a_workspace_built_polled_any_refuses_all_and_one_built_polled_all_may_switch_to_any(tmp_path):
    open_shard(tmp_path / 'any', index_polling='ANY').close()
    with pytest.raises(ValueError, match=re.escape('was built with index_polling=ANY (an id may be on any shard)')):
        open_shard(tmp_path / 'any', index_polling='ALL')
    open_shard(tmp_path / 'all', index_polling='ALL').close()
    open_shard(tmp_path / 'all', index_polling='ANY').close()
    (settings,) = (tmp_path / 'all').rglob(SETTINGS_FILE)
    assert json.loads(settings.read_text())['index_polling'] == 'ANY'


def crash_in(workspace, setup: str, crash_point: str, action: str) -> None:
    """Run ``action`` on a shard in a process of its own that dies (``os._exit``) at ``crash_point``."""
    script = f'''
import os
from docarray import Document, DocumentArray
from clip_search.executors import annlite_indexer
open_shard = lambda **settings: annlite_indexer.AnnLiteIndexer(n_dim=4, metas={{'workspace': {str(workspace)!r}}}, **settings)
doc = lambda i, text, color: Document(id=i, text=text, tags={{'color': color}}, embedding=[1.0, 0.5, 0.25, 0.125])
{setup}
{crash_point} = lambda *args, **kwargs: os._exit(3)
{action}
'''
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]


def test_the_settings_file_is_replaced_atomically(tmp_path):
    open_shard(tmp_path, columns=[['color', 'str']], index_polling='ALL').close()
    (settings,) = tmp_path.rglob(SETTINGS_FILE)
    written = settings.read_text()
    # a start that records new settings (ALL -> ANY), killed just before the new file takes the old one's place
    crash_in(tmp_path, '', 'os.replace', "open_shard(columns=[['color', 'str']], index_polling='ANY')")
    assert settings.read_text() == written  # the old file, whole: never a half-written one
    open_shard(tmp_path, columns=[['color', 'str']], index_polling='ANY').close()  # and the next start works


def test_a_crash_between_the_delete_and_the_insert_of_a_replace_keeps_the_old_version(tmp_path):
    crash_in(
        tmp_path,
        setup="shard = open_shard(columns=[['color', 'str']])\n"
        "shard.index(DocumentArray([doc('kept', 'the acknowledged version', 'red')]))",
        crash_point='shard._index.index',  # annlite's insert: its delete has run
        action="shard.update(DocumentArray([doc('kept', 'an update never acknowledged', 'blue')]), parameters={})",
    )
    (journal,) = tmp_path.rglob(REPLACE_JOURNAL)
    shard = open_shard(tmp_path, columns=[['color', 'str']])
    assert not journal.exists()
    assert shard._index.total_docs == 1
    (stored,) = shard._index.doc_store(0).get(['kept'])
    assert (stored.text, stored.tags['color']) == ('the acknowledged version', 'red')
    red = shard.search(DocumentArray([doc('q', '', 'red')]), parameters={'filter': {'color': {'$eq': 'red'}}})
    assert red[0].matches[:, 'id'] == ['kept']  # its filter column is back too
    shard.close()


@pytest.mark.slow
def test_a_single_shard_refuses_the_mixed_update_itself(service_factory):
    client = service_factory(shards=1).client()  # no merger after one shard: the shard answers the check pass
    client.index([Document(id='solo', text='a lone tree on a hill')])
    with pytest.raises(RequestError, match=re.escape("not indexed: ['solo-unknown'] (use /index); nothing was updated")):
        client.update([Document(id='solo', text='changed'), Document(id='solo-unknown', text='new')])
    assert client.search(['a lone tree on a hill'], limit=1)[0].matches[0].text == 'a lone tree on a hill'
    client.update([Document(id='solo', text='a forest in the rain')])
    assert client.search(['a forest in the rain'], limit=1)[0].matches[0].text == 'a forest in the rain'


def test_the_exact_filtered_search_agrees_with_annlites_where_annlite_answers(tmp_path):
    """The fallback for annlite's filter search that cannot fill its results (seen with few matches on a shard)."""
    import numpy as np

    from clip_search.executors.annlite_indexer import exact_filtered_search

    shard = open_shard(tmp_path, columns=[['color', 'str']])
    rng = np.random.default_rng(3)
    stored = DocumentArray(
        Document(id=f'v{i}', embedding=rng.normal(size=4).astype(np.float32), tags={'color': ['red', 'blue'][i % 2]})
        for i in range(40)
    )
    shard.index(stored, parameters={})
    shard.delete(DocumentArray([Document(id='v1'), Document(id='v2')]), parameters={})
    search_filter = {'color': {'$eq': 'red'}}
    queries = DocumentArray(Document(embedding=rng.normal(size=4).astype(np.float32)) for _ in range(5))
    expected = shard.search(DocumentArray(Document(q, copy=True) for q in queries), parameters={'filter': search_filter, 'limit': 5})
    exact_filtered_search(shard._index, queries, search_filter, 5)
    for got, want in zip(queries, expected):
        assert got.matches[:, 'id'] == want.matches[:, 'id']
        assert all(m.tags['color'] == 'red' and m.id != 'v2' for m in got.matches)  # v2 was deleted
        assert [m.scores['cosine'].value for m in got.matches] == pytest.approx(
            [m.scores['cosine'].value for m in want.matches], abs=1e-5
        )
    shard.close()


def test_a_graph_walk_that_falls_short_is_answered_by_an_exact_search(tmp_path):
    """hnswlib fails a whole query when its walk finds fewer than k live documents (seen after deletes):
    the shard answers that request by an exact search instead of an error."""
    import numpy as np

    shard = open_shard(tmp_path)
    rng = np.random.default_rng(4)
    stored = DocumentArray(Document(id=f'w{i}', embedding=rng.normal(size=4).astype(np.float32)) for i in range(30))
    shard.index(stored, parameters={})
    queries = DocumentArray(Document(embedding=rng.normal(size=4).astype(np.float32)) for _ in range(3))
    expected = shard.search(DocumentArray(Document(q, copy=True) for q in queries), parameters={'limit': 7})

    class FallingShort:  # hnswlib's index, but every walk falls short
        def __init__(self, graph):
            self.graph = graph

        def set_ef(self, ef):
            self.graph.set_ef(ef)

        def knn_query(self, *args, **kwargs):
            raise RuntimeError('Cannot return the results in a contigious 2D array. Probably ef or M is too small')

    vectors = shard._index.vec_index(0)
    vectors._index = FallingShort(vectors._index)
    got = shard.search(queries, parameters={'limit': 7})
    for answer, want in zip(got, expected):
        assert answer.matches[:, 'id'] == want.matches[:, 'id']
        assert [m.scores['cosine'].value for m in answer.matches] == pytest.approx(
            [m.scores['cosine'].value for m in want.matches], abs=1e-5
        )
        assert all(m.embedding is None for m in answer.matches)
    vectors._index = vectors._index.graph
    shard.close()

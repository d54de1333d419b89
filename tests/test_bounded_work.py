"""One request cannot take a shard's memory: a search asks a shard for at most ``max_matches``
matches (queries x limit), and the exact fallback holds one chunk of candidates at a time."""

from __future__ import annotations

import re

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import exact_search as exact
from clip_search.executors.annlite_indexer import INLINE_SEARCH_MATCHES, AnnLiteIndexer


def open_shard(workspace, **settings) -> AnnLiteIndexer:
    return AnnLiteIndexer(n_dim=8, metas={'workspace': str(workspace)}, columns=[['color', 'str']], **settings)


def queries(n: int, seed: int = 1) -> DocumentArray:
    rng = np.random.default_rng(seed)
    return DocumentArray(Document(embedding=rng.normal(size=8).astype(np.float32)) for _ in range(n))


def named(docs: DocumentArray) -> DocumentArray:
    for i, doc in enumerate(docs):
        doc.id = f'q{i}'
    return docs


def test_a_search_asking_for_more_matches_than_the_cap_is_refused_naming_it(tmp_path):
    shard = open_shard(tmp_path)
    shard.index(DocumentArray(Document(id=f'd{i}', embedding=q.embedding) for i, q in enumerate(queries(20))))
    message = (
        'the request asks for 2,560,000 matches (256 queries x limit 10,000); the cap is 100,000 (max_matches): '
        'send fewer queries per request or a smaller limit'
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        shard.search(queries(256), parameters={'limit': 10_000})
    assert len(shard.search(queries(10), parameters={'limit': 10_000})[0].matches) == 20  # 100,000 exactly: served
    shard.close()

    shard = open_shard(tmp_path, max_matches=50)  # uses_with.max_matches in the YAML
    assert shard.wait_loaded(60)
    with pytest.raises(ValueError, match=re.escape('asks for 60 matches (6 queries x limit 10); the cap is 50 (max_matches)')):
        shard.search(queries(6), parameters={})
    assert [len(q.matches) for q in shard.search(queries(5), parameters={})] == [10] * 5
    shard.close()


def test_the_exact_search_reads_a_chunk_of_candidates_at_a_time_and_then_only_the_matches(tmp_path, monkeypatch):
    shard = open_shard(tmp_path)
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(1000, 8)).astype(np.float32)
    colors = ['red', 'blue', 'green']
    shard.index(DocumentArray(Document(id=f'v{i}', embedding=v, tags={'color': colors[i % 3]}) for i, v in enumerate(vectors)))
    shard.delete(DocumentArray(Document(id=f'v{i}') for i in range(0, 1000, 7)))
    reads: list[int] = []
    store = shard._index.doc_store(0)
    original_get = type(store).get
    monkeypatch.setattr(type(store), 'get', lambda self, ids: reads.append(len(ids)) or original_get(self, ids))
    asked = queries(4, seed=3)
    exact.exact_search(shard._index, asked, {'color': {'$eq': 'red'}}, limit=5, chunk=100)

    passing = [i for i in range(1000) if i % 3 == 0 and i % 7]  # red, not deleted
    assert reads == [100] * (len(passing) // 100) + [len(passing) % 100] + [5] * 4  # chunks, then each query's 5
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for query in asked:
        q = query.embedding / np.linalg.norm(query.embedding)
        distances = {f'v{i}': 1.0 - float(unit[i] @ q) for i in passing}
        expected = sorted(distances, key=lambda i: distances[i])[:5]
        assert query.matches[:, 'id'] == expected
        assert [m.scores['cosine'].value for m in query.matches] == pytest.approx([distances[i] for i in expected], abs=1e-5)
        assert all(m.tags['color'] == 'red' for m in query.matches)
    shard.close()


def test_a_served_search_holds_one_querys_match_documents_at_a_time_and_answers_the_same_bytes(tmp_path, monkeypatch):
    """The /search endpoint serialises each query's matches as soon as they are final (``WireAnswer``):
    when the store is read for a query, no earlier query still holds Python match documents, through
    the graph and through the exact fallback; what Jina sends is what the in-process answer makes."""
    import asyncio

    shard = AnnLiteIndexer(n_dim=8, metas={'workspace': str(tmp_path)}, columns=[['color', 'str']], runtime_args={'shards': 2})
    rng = np.random.default_rng(4)
    shard.index(
        DocumentArray(
            Document(id=f'd{i}', embedding=rng.normal(size=8).astype(np.float32), tags={'color': 'green' if i % 100 == 0 else 'red'}, blob=bytes([i % 256]) * (i % 7))
            for i in range(600)
        )
    )
    store = shard._index.doc_store(0)
    original_get = type(store).get
    for parameters, reads in (
        ({'limit': 300}, 8),  # the graph: one read per query
        ({'limit': 300, 'max_distance': 0.9}, 8),
        ({'limit': 200, 'filter': {'color': {'$eq': 'green'}}}, 6 + 1 + 8),  # 6 pass: annlite's walk reads them and falls short, the exact search reads its candidates, then each query's
    ):
        expected = shard.search(named(queries(8, seed=5)), dict(parameters)).to_protobuf()
        asked, holding = named(queries(8, seed=5)), []
        assert len(asked) * parameters['limit'] > INLINE_SEARCH_MATCHES  # the served path of a large search
        monkeypatch.setattr(type(store), 'get', lambda self, ids: holding.append(sum(1 for q in asked if q.matches)) or original_get(self, ids))
        answer = asyncio.run(shard.serve_search(asked, dict(parameters)))
        monkeypatch.setattr(type(store), 'get', original_get)
        assert holding == [0] * reads, parameters
        assert [len(q.matches) for q in answer] == [0] * 9  # sealed: the matches are in the protobuf only
        assert answer.to_protobuf() == expected  # the 8 queries, their matches and the shard's marker, byte for byte
        assert answer.to_protobuf().SerializeToString() == expected.SerializeToString()
        sent = DocumentArray.from_protobuf(answer.to_protobuf())
        assert [len(q.matches) for q in sent[:8]] == [len(q.matches) for q in DocumentArray.from_protobuf(expected)[:8]]
        assert all(len(q.matches) for q in sent[:8])
    shard.close()


def test_jina_sets_a_served_answer_into_its_request_by_parsing_it_there_not_copying_it(tmp_path, monkeypatch):
    """Jina's own path from an executor's answer to the request it sends (``_set_result``): the
    shard's answer is parsed into the request (``wire_answer.install``), and the request carries
    the same answer, byte for byte. This fails if Jina sets answers another way (then it would call
    ``to_protobuf`` and copy the answer into the request, holding it twice)."""
    import asyncio
    from types import SimpleNamespace

    from jina.proto.serializer import DataRequestProto
    from jina.serve.runtimes.worker.request_handling import WorkerRequestHandler
    from jina.types.request.data import DataRequest

    from clip_search.wire_answer import WireAnswer

    shard = AnnLiteIndexer(n_dim=8, metas={'workspace': str(tmp_path)}, columns=[['color', 'str']], runtime_args={'shards': 2})
    rng = np.random.default_rng(6)
    shard.index(DocumentArray(Document(id=f'd{i}', embedding=rng.normal(size=8).astype(np.float32), tags={'color': 'red'}) for i in range(300)))
    expected = shard.search(named(queries(5, seed=7)), {'limit': 250}).to_protobuf()
    sent = DataRequest()
    sent.data.docs = named(queries(5, seed=7))
    request = DataRequest(DataRequestProto.SerializeToString(sent))  # as it arrives: bytes
    answer = asyncio.run(shard.serve_search(request.docs, {'limit': 250}))
    assert isinstance(answer, WireAnswer)
    monkeypatch.setattr(WireAnswer, 'to_protobuf', lambda self, ndarray_type=None: pytest.fail('the answer was copied'))
    worker = SimpleNamespace(args=SimpleNamespace(output_array_type=None))
    WorkerRequestHandler._set_result(worker, [request], answer, request.docs)
    received = DataRequest(DataRequestProto.SerializeToString(request))  # what the head parses
    assert received.proto.data.docs == expected  # 5 queries with 250 matches each, and the shard's marker
    assert [len(query.matches) for query in received.docs] == [250] * 5 + [0]
    assert received.docs[:5, 'id'] == [f'q{i}' for i in range(5)]
    shard.close()

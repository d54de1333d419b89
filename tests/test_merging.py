"""The merger on its own: global top-k from shard answers, shard errors and missing shards."""

from __future__ import annotations

import pytest
from docarray import Document, DocumentArray

from clip_search.sharding import ShardError, shard_marker, split_shard_answers
from clip_search.executors.shard_merger import ShardMerger


def answer(shard: int, matches: list[tuple[str, float]], query_id: str = 'q') -> DocumentArray:
    query = Document(id=query_id)
    for match_id, distance in matches:
        match = Document(id=match_id)
        match.scores['cosine'].value = distance
        query.matches.append(match)
    return DocumentArray([query, shard_marker(shard)])


def test_matches_are_merged_deduplicated_sorted_and_cut_to_the_limit():
    merger = ShardMerger()
    docs_matrix = [
        answer(0, [('a', 0.30), ('b', 0.10), ('dup', 0.25)]),
        answer(1, [('c', 0.05), ('dup', 0.20), ('d', 0.0)]),
        answer(2, [('e', 0.50), ('f', 0.15)]),
    ]
    merged = merger.merge_matches(docs_matrix, parameters={'limit': 5})
    assert [d.id for d in merged] == ['q']  # the markers are gone
    matches = merged[0].matches
    assert [(m.id, m.scores['cosine'].value) for m in matches] == [
        ('d', 0.0), ('c', 0.05), ('b', 0.10), ('f', 0.15), ('dup', 0.20)
    ]


def test_the_default_limit_applies_when_the_request_gives_none():
    merger = ShardMerger(limit=2)
    merged = merger.merge_matches([answer(0, [('a', 0.3), ('b', 0.1), ('c', 0.2)])], parameters={})
    assert merged[0].matches[:, 'id'] == ['b', 'c']


def test_shard_errors_are_raised_once_with_the_shards_named():
    docs_matrix = [
        DocumentArray([shard_marker(0, error='ValueError: bad limit')]),
        DocumentArray([shard_marker(1, error='ValueError: bad limit')]),
        answer(2, [('a', 0.1)]),
    ]
    with pytest.raises(ShardError, match=r'^ValueError: bad limit \(shards \[0, 1\]\)$'):
        split_shard_answers(docs_matrix, expected_shards=3)


def test_a_shard_that_did_not_answer_is_named():
    with pytest.raises(ShardError, match=r'shards \[1\] of 3 did not answer'):
        split_shard_answers([answer(0, []), answer(2, [])], expected_shards=3)


def test_answers_without_markers_pass_through():
    """An endpoint the indexer does not handle (e.g. /encode) comes back without markers."""
    plain = DocumentArray([Document(id='x')])
    assert split_shard_answers([plain], expected_shards=3)[0][:, 'id'] == ['x']

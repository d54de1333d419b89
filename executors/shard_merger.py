"""ShardMerger: runs after the indexer shards (Jina ``uses_after``) and makes one answer of N.

Jina's built-in reduce concatenates the shards' matches (3 shards x limit 10 = 30 unsorted
matches), so the global top-k has to be computed here.
"""

import heapq
import logging
from typing import Iterable, List, Optional

from docarray import Document, DocumentArray
from jina import Executor, requests

from clip_search.params import DEFAULT_LIMIT, validate_max_distance, within_distance
from clip_search.sharding import (
    DEFAULT_INDEX_POLLING,
    answering_shards,
    check_index_polling,
    is_lookup,
    is_update_check,
    merge_held,
    merge_status,
    refuse_unheld,
    split_shard_answers,
)


class _InheritedSettingsFilter(logging.Filter):
    """Drop Jina's warning that the merger does not take the indexer's settings (n_dim, columns, ...).

    As the indexer's ``uses_after``, the merger receives the indexer's ``uses_with`` (Jina gives it
    no settings of its own) and uses only ``limit`` and ``index_polling``: the warning is expected
    and would only puzzle.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return 'are not defined in `ShardMerger.__init__`' not in record.getMessage()


logging.getLogger('JINA').addFilter(_InheritedSettingsFilter())  # Jina's default_logger


class ShardMerger(Executor):
    """Merge the answers of all indexer shards into the answer one big index would give."""

    def __init__(self, limit: int = DEFAULT_LIMIT, index_polling: str = DEFAULT_INDEX_POLLING, *args, **kwargs):
        """:param limit: matches per query when the request does not say. As the indexer's uses_after,
        the merger inherits the indexer's ``uses_with``, and so its ``limit``.
        :param index_polling: the indexer's polling of /index (inherited too): with ``ANY`` one shard answers an /index
        """
        super().__init__(*args, **kwargs)
        self.default_limit = limit
        self.index_polling = check_index_polling(index_polling)
        self.shards = int(getattr(self.runtime_args, 'shards', 1) or 1)  # the indexer's shard count

    @requests(on='/search')
    async def serve_search(
        self, docs_matrix: Optional[List[DocumentArray]], parameters: dict, **kwargs
    ) -> Optional[DocumentArray]:
        """/search, as ``merge_matches``, on the merger's event loop: the merge takes less time than the
        hand-over to a thread that Jina makes for a plain function (and the merger has no state to lock)."""
        return self.merge_matches(docs_matrix, parameters)

    def merge_matches(
        self, docs_matrix: Optional[List[DocumentArray]], parameters: dict, **kwargs
    ) -> Optional[DocumentArray]:
        """Global top-``limit`` per query: all shards' matches, one per id, ascending distance."""
        if not docs_matrix:
            return None
        docs_matrix = split_shard_answers(docs_matrix, self.shards)
        limit = int(parameters.get('limit') or self.default_limit)
        max_distance = validate_max_distance(parameters.get('max_distance'))
        queries = _first_of_each_id(docs_matrix)
        for query in queries:
            candidates = [m for answer in docs_matrix if query.id in answer for m in answer[query.id].matches]
            candidates = [m for m in candidates if within_distance(_distance(m), max_distance)]
            query.matches = DocumentArray(_top_unique(candidates, limit))
        return queries

    @requests(on='/status')
    def merge_statuses(
        self, docs_matrix: Optional[List[DocumentArray]], parameters: dict, **kwargs
    ) -> Optional[DocumentArray]:
        """Total and per-shard document counts; for a lookup, whether any shard holds each id."""
        if not docs_matrix:
            return None
        docs_matrix = split_shard_answers(docs_matrix, self.shards)
        if is_lookup(parameters):
            return DocumentArray(Document(id=i, tags={'held': h}) for i, h in merge_held(docs_matrix).items())
        return DocumentArray([merge_status(doc for answer in docs_matrix for doc in answer)])

    @requests(on='/delete')
    def merge_deleted(self, docs_matrix: Optional[List[DocumentArray]], **kwargs) -> Optional[DocumentArray]:
        """A document was deleted when any shard held it."""
        if not docs_matrix:
            return None
        docs_matrix = split_shard_answers(docs_matrix, self.shards)
        merged = _first_of_each_id(docs_matrix)
        for doc in merged:
            doc.tags['deleted'] = any(
                bool(answer[doc.id].tags.get('deleted')) for answer in docs_matrix if doc.id in answer
            )
        return merged

    @requests(on='/index')  # no default handler: /rank and / never reach the shards
    def take_one(self, docs_matrix: Optional[List[DocumentArray]], **kwargs) -> Optional[DocumentArray]:
        """/index: every shard saw the same documents (one shard did, when polled ANY); return them once."""
        if not docs_matrix:
            return None
        expected = answering_shards('/index', self.index_polling, self.shards)
        return _first_of_each_id(split_shard_answers(docs_matrix, expected))

    @requests(on='/update')
    def merge_update(
        self, docs_matrix: Optional[List[DocumentArray]], parameters: dict, **kwargs
    ) -> Optional[DocumentArray]:
        """The update's answer; for its check pass, a refusal when an id is held by no shard."""
        if not docs_matrix:
            return None
        answers = split_shard_answers(docs_matrix, self.shards)
        if is_update_check(parameters):
            return DocumentArray(Document(id=doc_id) for doc_id in refuse_unheld(answers))
        return _first_of_each_id(answers)


def _first_of_each_id(docs_matrix: List[DocumentArray]) -> DocumentArray:
    seen: dict[str, Document] = {}
    for answer in docs_matrix:
        for doc in answer:
            seen.setdefault(doc.id, doc)
    return DocumentArray(seen.values())


def _top_unique(matches: Iterable[Document], limit: int) -> list[Document]:
    """The ``limit`` closest matches, one per id (its closest copy), ascending distance then id."""
    best: dict[str, tuple[float, str, Document]] = {}
    for match in matches:
        distance = _distance(match)
        kept = best.get(match.id)
        if kept is None or distance < kept[0]:
            best[match.id] = (distance, match.id, match)
    return [match for _distance_, _id, match in heapq.nsmallest(limit, best.values(), key=lambda kept: kept[:2])]


def _distance(match: Document) -> float:
    return float(match.scores['cosine'].value or 0.0)

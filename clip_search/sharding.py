"""What the indexer shards and the merger after them agree on: placement and the shard protocol
(status format, in-band shard markers)."""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

from docarray import Document

STATUS_ID = 'status'


def owner_shard(doc_id: str, shards: int) -> int:
    """The shard that stores ``doc_id``: a stable hash, the same in every process and run."""
    digest = hashlib.blake2b(doc_id.encode('utf-8'), digest_size=8).digest()
    return int.from_bytes(digest, 'big') % shards


def shard_status(shard_id: int, documents: int, settings: dict, unreclaimed_slots: int = 0) -> Document:
    """One shard's status, in the same shape as the merged status of many shards.

    ``unreclaimed_slots``: graph nodes of deleted or replaced documents that still take memory.
    """
    return Document(
        id=STATUS_ID,
        tags={
            'documents': documents,
            'shards': [{'shard': shard_id, 'documents': documents, 'unreclaimed_slots': unreclaimed_slots}],
            'index': settings,
        },
    )


def merge_status(statuses: Iterable[Document]) -> Document:
    """Sum the shards' statuses into one: total documents and a per-shard list."""
    shards: list[dict] = []
    index: dict = {}
    for status in statuses:
        shards.extend(status.tags['shards'])
        index = index or dict(status.tags['index'])
    shards.sort(key=lambda shard: shard['shard'])
    total = sum(int(shard['documents']) for shard in shards)
    return Document(id=STATUS_ID, tags={'documents': total, 'shards': shards, 'index': index})


# Jina's head hands the merger only the shards' documents, not their error statuses, and it passes
# on the first shard's status alone: an error raised on shard 2 of 3 would be lost. So a sharded
# indexer answers in-band: one marker document per shard, carrying the error if it failed.
SHARD_MARKER_ID = '__clip_search_shard__'


def shard_marker(shard_id: int, error: Optional[str] = None) -> Document:
    """The document a shard adds to its answer: which shard answered, and its error if any."""
    tags: dict = {'shard': shard_id}
    if error is not None:
        tags['error'] = error
    return Document(id=SHARD_MARKER_ID, tags=tags)


class ShardError(RuntimeError):
    """One or more shards failed or did not answer; the message names them."""


def split_shard_answers(docs_matrix, expected_shards: Optional[int] = None) -> list:
    """Drop the marker documents and return the shards' answers; raise if a shard failed or is missing."""
    answers, errors, answered = [], {}, set()
    for answer in docs_matrix:
        kept = [doc for doc in answer if doc.id != SHARD_MARKER_ID]
        for marker in (doc for doc in answer if doc.id == SHARD_MARKER_ID):
            shard = int(marker.tags['shard'])
            answered.add(shard)
            if 'error' in marker.tags:
                errors.setdefault(marker.tags['error'], []).append(shard)
        answers.append(type(answer)(kept))
    if errors:  # a bad request fails alike on every shard: say it once
        raise ShardError('; '.join(f'{error} (shards {sorted(shards)})' for error, shards in errors.items()))
    if answered and expected_shards and len(answered) < expected_shards:  # no marker: not an indexer endpoint
        missing = sorted(set(range(expected_shards)) - answered)
        raise ShardError(f'shards {missing} of {expected_shards} did not answer (down or restarting); retry later')
    return answers


# Placement follows the indexer's polling of /index (docs/design.md#placement); the CLI copies it
# into the indexer's uses_with, and so the merger's. Jina polls a sharded executor ANY by default.
ANY, ALL = 'ANY', 'ALL'
DEFAULT_INDEX_POLLING = ANY


def check_index_polling(index_polling: str) -> str:
    """``ANY`` or ``ALL``, whatever the case it is written in; anything else is refused by name."""
    polling = str(index_polling).upper()
    if polling not in (ANY, ALL):
        raise ValueError(f'index_polling={index_polling!r}: expected ANY or ALL (the polling of /index)')
    return polling


def answering_shards(endpoint: str, index_polling: str, shards: int) -> int:
    """How many shards answer a request: one for an /index polled ANY, every shard otherwise."""
    return 1 if endpoint == '/index' and index_polling == ANY else shards


# /update is all-or-nothing across shards: the gateway first sends the ids alone with this parameter
# (the check pass), each shard says which it holds, the merger refuses the request if any id is held
# nowhere; only then does the gateway send the update itself (the apply pass). clip_search/gateway.py
UPDATE_CHECK = 'clip_search_update_check'


def is_update_check(parameters: Optional[dict]) -> bool:
    return bool((parameters or {}).get(UPDATE_CHECK))


def held_answer(doc_ids: Iterable[str], held: set) -> list:
    """A shard's answer to the check pass: every id, tagged with whether this shard holds it."""
    return [Document(id=doc_id, tags={'held': doc_id in held}) for doc_id in doc_ids]


def merge_held(answers: Iterable) -> dict[str, bool]:
    """The shards' ``held_answer``s as one: every id in request order, held when any shard holds it."""
    held: dict[str, bool] = {}
    for answer in answers:
        for doc in answer:
            held[doc.id] = held.get(doc.id, False) or bool(doc.tags.get('held'))
    return held


def refuse_unheld(answers: Iterable) -> list:
    """The merger's half of the check pass: the ids in request order; raise if one is held by no shard."""
    held = merge_held(answers)
    missing = [doc_id for doc_id, is_held in held.items() if not is_held]
    if missing:
        raise ValueError(
            f'cannot update documents that are not indexed: {missing[:10]} (use /index); '
            f'nothing was updated'
        )
    return list(held)


# A read-only lookup of ids, for a client resuming an interrupted /index (which of the ids it sent are
# stored?): /status with this parameter and the ids as documents. /status is polled ALL in every Flow
# (the CLI refuses other polling), so each shard answers ``held_answer`` and the merger ``merge_held``,
# whatever the polling of /index, and the Flow YAML needs no new endpoint.
LOOKUP = 'clip_search_lookup'


def is_lookup(parameters: Optional[dict]) -> bool:
    return bool((parameters or {}).get(LOOKUP))

"""Jina's ``prefetch`` limit without its busy wait.

Jina 3 bounds the requests of one stream in flight (the gateway's ``prefetch``, a client's
``prefetch``) with ``while count >= prefetch: await asyncio.sleep(0)`` (``jina/serve/stream/helper.py``):
while the limit is reached, the event loop spins a whole core. During bulk indexing that is always
(the shards are the slow part), so the gateway and the client each burnt a core that the shards
needed: on 2 cores the gateway took as much CPU as a shard (``bench/scale.py``). Jina has no
setting for it, so ``install()`` swaps in a counter that wakes the waiting iterator when a request
is answered; the limit and the order of requests are Jina's own.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import jina.serve.stream
from jina.serve.stream.helper import AsyncRequestsIterator, _RequestsCounter


class SignallingCounter(_RequestsCounter):
    """Jina's count of requests in flight, which wakes whoever waits for it to drop."""

    def __init__(self) -> None:
        self._count = 0
        self._changed: Optional[asyncio.Event] = None  # made in the running loop, on the first wait

    @property
    def count(self) -> int:
        return self._count

    @count.setter
    def count(self, value: int) -> None:  # Jina changes it on the stream's event loop, never from a thread
        self._count = value
        if self._changed is not None:
            self._changed.set()

    async def wait_below(self, limit: int) -> None:
        """Return once fewer than ``limit`` requests are in flight, sleeping (not spinning) until then."""
        while self._count >= limit:
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            await self._changed.wait()


class WaitingRequestsIterator(AsyncRequestsIterator):
    """Jina's request iterator, waiting for room under ``prefetch`` on the counter instead of spinning."""

    def __init__(self, iterator, request_counter=None, prefetch: int = 0, iterate_sync_in_thread: bool = True) -> None:
        waits = isinstance(request_counter, SignallingCounter)  # another counter: Jina's own (spinning) wait
        super().__init__(iterator, request_counter, 0 if waits else prefetch, iterate_sync_in_thread)
        self._limit = prefetch if waits else 0

    async def __anext__(self):
        request = await super().__anext__()
        if self._limit > 0:
            await self._request_counter.wait_below(self._limit)
        return request


def install() -> None:
    """Use the waiting iterator in every Jina request stream of this process (gateway or client)."""
    jina.serve.stream.AsyncRequestsIterator = WaitingRequestsIterator
    jina.serve.stream._RequestsCounter = SignallingCounter

"""Executors that do nothing, for bench/throughput.py --floor: the cost of the Flow's topology alone.

Coroutines, so that Jina runs them on the event loop without a hand-over to a thread: what remains
is the gRPC hops, the protobuf and docarray conversions and Jina's own bookkeeping of a request.
"""

from jina import Executor, requests


class NoopEncoder(Executor):
    """Stands for the encoder: returns the request's documents untouched."""

    @requests
    async def pass_through(self, docs, **kwargs):
        return None


class NoopShard(Executor):
    """Stands for an indexer shard: answers each query with no matches."""

    @requests
    async def answer(self, docs, **kwargs):
        return None


class NoopMerger(Executor):
    """Stands for the merger: returns the first shard's answer."""

    @requests
    async def first_answer(self, docs_matrix, **kwargs):
        return docs_matrix[0] if docs_matrix else None

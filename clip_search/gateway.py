"""The gateway ``python -m clip_search`` serves: Jina's own, plus an all-or-nothing /update.

An /update must change nothing on any shard when one of its ids is indexed nowhere, but no shard
knows what the others hold (with /index polled ANY, a copy may be on any shard). The gateway is the
one place that can ask them all before any applies: for an /update it first sends the ids alone to
the indexer as a check pass (``UPDATE_CHECK``: each shard says which ids it holds, the merger
refuses the request if one is held nowhere), and only then the request itself, through the encoder
as usual. A refusal is answered with the merger's error, as any failed request is.

Jina has no hook for this; its custom-gateway classes are the documented extension point, so one
subclass per protocol wraps the request handler every protocol shares (``RequestStreamer``).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from docarray import Document, DocumentArray
from jina.proto import jina_pb2
from jina.serve.runtimes.gateway.grpc import GRPCGateway
from jina.serve.runtimes.gateway.http import HTTPGateway
from jina.serve.runtimes.gateway.websocket import WebSocketGateway
from jina.types.request.data import DataRequest

from clip_search import prefetch
from clip_search.sharding import UPDATE_CHECK


class _UpdateCheck:
    """Mixin for a Jina gateway class: every /update is preceded by a check pass on ``indexer``."""

    def __init__(self, indexer: str = 'indexer', **kwargs):
        """:param indexer: the name of the indexer's deployment in the Flow (the CLI sets it from the YAML)"""
        self.indexer = indexer  # before Jina's __init__, which builds the request handler
        prefetch.install()  # the gateway's prefetch limit waits instead of spinning a core
        super().__init__(**kwargs)

    def _get_request_handler(self):
        # here, not in a shard or the merger: only the gateway sees every shard before any applies, in one client call
        handler = super()._get_request_handler()
        streamer = handler.streamer  # Jina's GatewayStreamer; its RequestStreamer serves every protocol
        streamer._streamer._request_handler = checked_update_handler(
            streamer._streamer._request_handler, streamer._connection_pool, self.indexer
        )
        return handler


def checked_update_handler(handle: Callable, connection_pool, indexer: str) -> Callable:
    """Jina's request handler with the check pass of /update in front; other endpoints unchanged."""

    def handle_request(request: DataRequest, return_type=DocumentArray):
        if request.header.exec_endpoint != '/update':
            return handle(request=request, return_type=return_type)

        async def check_then_apply() -> DataRequest:
            refusal = await _check_pass(connection_pool, indexer, request)
            if refusal is not None:
                return refusal
            # our Flow has no floating executors: the second future (theirs) is always None
            response, _floating = handle(request=request, return_type=return_type)
            return await response

        return asyncio.ensure_future(check_then_apply()), None

    return handle_request


async def _check_pass(connection_pool, indexer: str, request: DataRequest):
    """Send the request's ids to the indexer as a check; its error response if refused, else None."""
    check = DataRequest()
    check.header.exec_endpoint = '/update'
    check.header.request_id = request.header.request_id
    check.parameters = {**request.parameters, UPDATE_CHECK: True}
    check.data.docs = DocumentArray(Document(id=doc.id) for doc in request.docs)
    response, _metadata = await connection_pool.send_requests_once(
        requests=[check], deployment=indexer, head=True, endpoint='/update'
    )
    if response.header.status.code != jina_pb2.StatusProto.ERROR:
        return None
    request.header.status.CopyFrom(response.header.status)
    request.data.docs = DocumentArray()
    return request


class CheckedGRPCGateway(_UpdateCheck, GRPCGateway):
    """Jina's gRPC gateway with an all-or-nothing /update."""


class CheckedHTTPGateway(_UpdateCheck, HTTPGateway):
    """Jina's HTTP gateway with an all-or-nothing /update."""


class CheckedWebSocketGateway(_UpdateCheck, WebSocketGateway):
    """Jina's WebSocket gateway with an all-or-nothing /update."""


GATEWAYS = {'grpc': CheckedGRPCGateway, 'http': CheckedHTTPGateway, 'websocket': CheckedWebSocketGateway}

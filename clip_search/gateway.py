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
from jina.serve.runtimes.gateway.composite import CompositeGateway
from jina.serve.runtimes.gateway.grpc import GRPCGateway
from jina.serve.runtimes.gateway.http import HTTPGateway
from jina.serve.runtimes.gateway.websocket import WebSocketGateway
from jina.types.request.data import DataRequest

from clip_search import prefetch
from clip_search.auth import KeyMiddleware, KeyRing, grpc_interceptor
from clip_search.sharding import UPDATE_CHECK


class _UpdateCheck:
    """Mixin for a Jina gateway class: every /update is preceded by a check pass on ``indexer``;
    with API keys in the environment (clip_search/auth.py), every request but health needs one."""

    def __init__(self, indexer: str = 'indexer', **kwargs):
        """:param indexer: the name of the indexer's deployment in the Flow (the CLI sets it from the YAML)"""
        self.indexer = indexer  # before Jina's __init__, which builds the request handler
        self.keys = KeyRing.from_environment()  # from the environment only: never in a YAML or a command line
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
    """Jina's gRPC gateway with an all-or-nothing /update (and API keys)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.keys.enabled:
            # Jina builds its grpc.aio server with these interceptors (tracing's, none by default) and takes no others
            self.grpc_tracing_server_interceptors = [*(self.grpc_tracing_server_interceptors or []), grpc_interceptor(self.keys)]


class CheckedHTTPGateway(_UpdateCheck, HTTPGateway):
    """Jina's HTTP gateway with an all-or-nothing /update (and API keys)."""

    @property
    def app(self):
        app = super().app  # Jina builds a new FastAPI app at each call and serves the one its setup takes
        if self.keys.enabled:
            app.add_middleware(KeyMiddleware, keys=self.keys)
        return app


class CheckedWebSocketGateway(_UpdateCheck, WebSocketGateway):
    """Jina's WebSocket gateway with an all-or-nothing /update (and API keys)."""

    @property
    def app(self):
        return self._app

    @app.setter
    def app(self, app) -> None:  # Jina's setup assigns its FastAPI app, then serves self.app
        if self.keys.enabled:
            app.add_middleware(KeyMiddleware, keys=self.keys)
        self._app = app


GATEWAYS = {'grpc': CheckedGRPCGateway, 'http': CheckedHTTPGateway, 'websocket': CheckedWebSocketGateway}


class CheckedCompositeGateway(_UpdateCheck, CompositeGateway):
    """Several protocols on one gateway (``--protocol grpc,http,websocket``), each served by its checked class.

    Jina's composite builds its servers from its own table of classes; they are rebuilt here from
    ours, with the same arguments and the composite's request handler (which has the /update check).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.servers = [GATEWAYS[_protocol_name(server.runtime_args.protocol)](**server_kwargs)
                        for server, server_kwargs in zip(self.servers, self._server_kwargs)]  # fmt: skip
        self.gateways = self.servers


def _protocol_name(protocol) -> str:
    """'grpc', 'http' or 'websocket', from Jina's GatewayProtocolType or a string."""
    return str(getattr(protocol, 'name', protocol)).lower()

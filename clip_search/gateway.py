"""The gateway ``python -m clip_search`` serves: Jina's own, plus an all-or-nothing /update and a direct /search.

An /update must change nothing on any shard when one of its ids is indexed nowhere, but no shard
knows what the others hold (with /index polled ANY, a copy may be on any shard). The gateway is the
one place that can ask them all before any applies: for an /update it first sends the ids alone to
the indexer as a check pass (``UPDATE_CHECK``: each shard says which ids it holds, the merger
refuses the request if one is held nowhere), and only then the request itself, through the encoder
as usual. A refusal is answered with the merger's error, as any failed request is.

A /search goes straight to the encoder and then the indexer (``direct_search_handler``): Jina's path
deep-copies the whole topology graph and re-parses the parameters at every node of every request,
which cost more CPU than the search itself. A query that already carries its embedding skips the
encoder, which would pass it through untouched.

Jina has no hook for either; its custom-gateway classes are the documented extension point, so one
subclass per protocol wraps the request handler every protocol shares (``RequestStreamer``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Callable

from docarray import Document, DocumentArray
from jina.proto import jina_pb2
from jina.serve.runtimes.gateway.composite import CompositeGateway
from jina.serve.runtimes.gateway.grpc import GRPCGateway
from jina.serve.runtimes.helper import _is_param_for_specific_executor
from jina.serve.runtimes.gateway.http import HTTPGateway
from jina.serve.runtimes.gateway.websocket import WebSocketGateway
from jina.types.request.data import DataRequest

from clip_search import prefetch
from clip_search.auth import KeyMiddleware, KeyRing, grpc_interceptor
from clip_search.sharding import UPDATE_CHECK


class _UpdateCheck:
    """Mixin for a Jina gateway class: every /update is preceded by a check pass on ``indexer``, a
    /search goes straight through ``encoder`` and ``indexer``, and with API keys in the environment
    (clip_search/auth.py) every request but health needs one."""

    def __init__(self, indexer: str = 'indexer', encoder: str = 'encoder', **kwargs):
        """:param indexer: the name of the indexer's deployment in the Flow (the CLI sets it from the YAML)
        :param encoder: the name of the encoder's deployment (likewise)
        """
        self.indexer = indexer  # before Jina's __init__, which builds the request handler
        self.encoder = encoder
        self.keys = KeyRing.from_environment()  # from the environment only: never in a YAML or a command line
        prefetch.install()  # the gateway's prefetch limit waits instead of spinning a core
        super().__init__(**kwargs)

    def _get_request_handler(self):
        # here, not in a shard or the merger: only the gateway sees every shard before any applies, in one client call
        handler = super()._get_request_handler()
        streamer = handler.streamer  # Jina's GatewayStreamer; its RequestStreamer serves every protocol
        pool, graph = streamer._connection_pool, streamer.topology_graph
        route = checked_update_handler(streamer._streamer._request_handler, pool, self.indexer)
        streamer._streamer._request_handler = direct_search_handler(route, pool, graph, self.encoder, self.indexer)
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


def direct_search_handler(handle: Callable, connection_pool, graph, encoder: str, indexer: str) -> Callable:
    """Jina's request handler with /search sent straight to the encoder, then the indexer.

    Only for the Flow it was written for (encoder -> indexer, nothing else); a request aimed at one
    executor (``target_executor``, ``executor__key`` parameters) and anything that fails on the way
    take Jina's own path, which also words the network errors (a search can be sent twice).
    """
    nodes = {node.name: node for node in graph.all_nodes if node.name != '__end_gateway__'}
    if set(nodes) != {encoder, indexer} or [n.name for n in nodes[encoder].outgoing_nodes] != [indexer]:
        return handle
    send_to = {name: _sender(connection_pool, node) for name, node in nodes.items()}

    def handle_request(request: DataRequest, return_type=DocumentArray):
        if request.header.exec_endpoint != '/search' or not _plain_request(request):
            return handle(request=request, return_type=return_type)

        async def search() -> DataRequest:
            try:
                return await _direct_search(request, send_to[encoder], send_to[indexer])
            except Exception:  # noqa: BLE001 - Jina's path answers, with Jina's own error
                response, _floating = handle(request=request, return_type=return_type)
                return await response

        return asyncio.ensure_future(search()), None

    return handle_request


def _sender(connection_pool, node) -> Callable:
    """Send requests to one deployment as Jina's graph node would (its timeout, retries and metadata)."""

    async def send(request: DataRequest):
        result = await connection_pool.send_requests_once(
            requests=[request], deployment=node.name, metadata=node._metadata, head=True, endpoint='/search',
            timeout=node._timeout_send, retries=node._retries,
        )  # fmt: skip
        if isinstance(result, BaseException):
            raise result
        return result

    send.deployment = node.name
    return send


async def _direct_search(request: DataRequest, encoder: Callable, indexer: Callable) -> DataRequest:
    """The encoder (unless every query has its embedding), then the indexer; an error answer stops there.

    The answer's routes are made as Jina's graph makes them: the gateway's, then one per deployment
    with the times it took (the executors' own entries are dropped, as Jina drops them).
    """
    gateway = jina_pb2.RouteProto(executor='gateway')
    gateway.start_time.GetCurrentTime()
    response, metadata, visited = request, {}, []
    for send in (indexer,) if queries_carry_embeddings(request) else (encoder, indexer):
        started = datetime.utcnow()
        response, metadata = await send(response)
        visited.append((send.deployment, started, datetime.utcnow()))
        if 'is-error' in metadata:
            break
    del response.routes[:]
    gateway.end_time.GetCurrentTime()
    response.routes.append(gateway)
    for deployment, started, ended in visited:
        route = response.routes.add(executor=deployment)
        route.start_time.FromDatetime(started)
        route.end_time.FromDatetime(ended)
    return response


def _plain_request(request: DataRequest) -> bool:
    """Not aimed at one executor: no ``target_executor`` and no ``executor__key`` parameter."""
    keys = request.proto_wo_data.parameters.fields.keys()  # not request.parameters, which converts them all
    return not request.header.target_executor and not any(_is_param_for_specific_executor(key) for key in keys)


def queries_carry_embeddings(request: DataRequest) -> bool:
    """Whether every document of the request is an embedding alone (no text, blob, tensor or uri), read
    from the protobuf without making Documents: the encoder would pass such documents through untouched."""
    data = request.proto_with_data.data
    if data.WhichOneof('documents') != 'docs' or not data.docs.docs:
        return False
    return all(doc.HasField('embedding') and doc.WhichOneof('content') is None and not doc.uri for doc in data.docs.docs)


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

"""API keys: who may call the gateway (and the web page's API), and which endpoints a read-only key reaches.

A request carries its key as ``Authorization: <key>`` or ``Authorization: Bearer <key>``: gRPC metadata
``authorization`` (what clip_client sends for ``credential={'Authorization': KEY}`` or ``CLIP_AUTH_TOKEN``),
or the HTTP header of an HTTP request or of a WebSocket's opening handshake. The keys reach the gateway
process through the environment (``CLIP_SEARCH_API_KEYS`` or ``CLIP_SEARCH_API_KEYS_FILE``, the same for
``CLIP_SEARCH_READ_ONLY_KEYS``), never through the Flow's YAML or a command line: an export carries them as
a secret. Jina's gateways have no authentication, so the checks are a gRPC server interceptor and an ASGI
middleware, installed by ``clip_search.gateway``.

Health and readiness stay open, as Docker, Kubernetes and ``jina ping`` call them without a key: gRPC
health, Jina's dry run and ``_status`` (its version), the HTTP gateway's ``GET /`` and ``/dry_run``. They
answer nothing of the index.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

API_KEYS_ENV = 'CLIP_SEARCH_API_KEYS'
READ_ONLY_KEYS_ENV = 'CLIP_SEARCH_READ_ONLY_KEYS'
FILE_SUFFIX = '_FILE'  # CLIP_SEARCH_API_KEYS_FILE=/run/secrets/api_keys: one key a line
READ_ENDPOINTS = frozenset({'/search', '/encode', '/rank', '/status', '/'})
FULL, READ_ONLY = 'read-write', 'read-only'

UNAUTHENTICATED = (
    'unauthenticated: this service needs an API key, sent as "Authorization: <key>" or "Authorization: Bearer <key>"; '
    'none was sent or it is not valid'
)


def permission_denied(endpoint: str) -> str:
    return (
        f'permission denied: {endpoint} needs a read-write API key; this key is read-only '
        f'(it may call {", ".join(sorted(READ_ENDPOINTS))})'
    )


class KeySettingError(ValueError):
    """A key setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys, kept as SHA-256 digests: every check compares fixed-length digests with all of them."""

    full: tuple[bytes, ...] = ()
    read_only: tuple[bytes, ...] = ()

    @classmethod
    def create(cls, full: Iterable[str] = (), read_only: Iterable[str] = ()) -> 'KeyRing':
        return cls(tuple(_digest(key) for key in _clean(full)), tuple(_digest(key) for key in _clean(read_only)))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> 'KeyRing':
        """The keys the CLI or a container's secret put in the environment; key files that hold no key at all
        are refused (a gateway meant to need keys would accept anyone)."""
        keys = cls.create(keys_from_environment(API_KEYS_ENV, environ), keys_from_environment(READ_ONLY_KEYS_ENV, environ))
        files = [environ[name + FILE_SUFFIX] for name in (API_KEYS_ENV, READ_ONLY_KEYS_ENV) if environ.get(name + FILE_SUFFIX)]
        if files and not keys.enabled:
            raise KeySettingError(f'{" and ".join(files)} hold no API key: write one a line (or unset {API_KEYS_ENV}{FILE_SUFFIX})')
        return keys

    @property
    def enabled(self) -> bool:
        return bool(self.full or self.read_only)

    def access(self, authorization: Optional[str]) -> Optional[str]:
        """FULL, READ_ONLY, or None for a missing or unknown key; in the same time whichever key matches."""
        presented = _digest(_strip_scheme(authorization or ''))
        found = None
        for role, digests in ((FULL, self.full), (READ_ONLY, self.read_only)):
            for digest in digests:  # no early exit: every key is compared
                if hmac.compare_digest(presented, digest) and found is None:
                    found = role
        return found if authorization else None


def allows(access: Optional[str], endpoint: str) -> bool:
    """Whether a caller of ``access`` may call ``endpoint`` (Jina's empty endpoint is '/')."""
    return access == FULL or (access == READ_ONLY and (endpoint or '/') in READ_ENDPOINTS)


def keys_from_environment(name: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Keys of ``name`` (comma- or line-separated) and of the file ``name``_FILE names (one a line)."""
    keys = _split(environ.get(name, ''))
    path = environ.get(name + FILE_SUFFIX)
    if path:  # a secret's file may be empty (no read-only keys, say)
        keys += read_key_file(path, name + FILE_SUFFIX, required=False)
    return keys


def read_key_file(path: str, option: str, required: bool = True) -> list[str]:
    """The keys of a file, one a line (blank lines and ``#`` comments skipped)."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise KeySettingError(f'{option} {path}: cannot be read ({exc.strerror or exc})') from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith('#')]
    if required and not keys:
        raise KeySettingError(f'{option} {path}: holds no key')
    return keys


def check_keys(keys: Iterable[str], option: str) -> list[str]:
    """Refuse keys that a header cannot carry or that are too short to be secret."""
    checked = []
    for key in keys:
        key = key.strip()
        if len(key) < 16 or any(ch.isspace() or ord(ch) < 33 or ord(ch) > 126 for ch in key) or ',' in key:
            raise KeySettingError(f'{option}: a key must be at least 16 printable ASCII characters, without spaces or commas')
        checked.append(key)
    return checked


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode('utf-8', 'surrogateescape')).digest()


def _strip_scheme(value: str) -> str:
    value = value.strip()
    scheme, _, rest = value.partition(' ')
    return rest.strip() if scheme.lower() == 'bearer' and rest else value


def _split(text: str) -> list[str]:
    return [part.strip() for line in text.splitlines() for part in line.split(',') if part.strip()]


def _clean(keys: Iterable[str]) -> list[str]:
    return [key.strip() for key in keys if key and key.strip()]


# -- gRPC ------------------------------------------------------------------------------------------

OPEN_GRPC_METHODS = frozenset({
    '/grpc.health.v1.Health/Check',
    '/grpc.health.v1.Health/Watch',
    '/jina.JinaGatewayDryRunRPC/dry_run',
    '/jina.JinaInfoRPC/_status',
})  # fmt: skip
# methods that carry no endpoint and reveal nothing stored: a read-only key may call them
READ_ONLY_GRPC_METHODS = frozenset({
    '/jina.JinaDiscoverEndpointsRPC/endpoint_discovery',
    '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo',
})  # fmt: skip
# methods whose requests name their endpoint (DataRequest or SingleDocumentRequest)
ENDPOINT_GRPC_METHODS = frozenset({
    '/jina.JinaRPC/Call',
    '/jina.JinaSingleDataRequestRPC/process_single_data',
    '/jina.JinaSingleDocumentRequestRPC/stream_doc',
})  # fmt: skip


def grpc_interceptor(keys: KeyRing):
    """A grpc.aio server interceptor that asks every call but health and readiness for a key."""
    import grpc

    class KeyInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            if handler is None or details.method in OPEN_GRPC_METHODS:
                return handler
            metadata = {key.lower(): value for key, value in (details.invocation_metadata or ())}
            access = keys.access(metadata.get('authorization'))
            if access is None:
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            if access == FULL or details.method in READ_ONLY_GRPC_METHODS:
                return handler
            if details.method in ENDPOINT_GRPC_METHODS:
                return _endpoint_checked(handler, access)
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED, permission_denied(details.method))

    return KeyInterceptor()


def _endpoint_of(request) -> str:
    return request.header.exec_endpoint or '/'


def _refusing(handler, code, message: str):
    """A handler of the same shape as ``handler`` that answers ``code`` and runs nothing."""
    import grpc

    async def refuse(request, context):
        await context.abort(code, message)

    factory = _handler_factory(handler)
    return factory(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


def _handler_factory(handler):
    import grpc

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler
    return grpc.stream_stream_rpc_method_handler


def _endpoint_checked(handler, access: str):
    """``handler`` for a read-only key: each request's endpoint is checked before the gateway sees it."""
    import grpc

    async def check(request, context) -> None:
        endpoint = _endpoint_of(request)
        if not allows(access, endpoint):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, permission_denied(endpoint))

    kinds = {'request_deserializer': handler.request_deserializer, 'response_serializer': handler.response_serializer}
    if handler.unary_unary:

        async def unary_unary(request, context):
            await check(request, context)
            return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kinds)
    if handler.unary_stream:

        async def unary_stream(request, context):
            await check(request, context)
            async for response in handler.unary_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kinds)

    async def stream_stream(requests, context):
        requests = requests.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        await check(first, context)  # refused before the gateway sees the stream (the usual case: one endpoint)

        async def checked():
            yield first
            async for request in requests:  # a write later in the stream is refused too (the gateway logs it)
                await check(request, context)
                yield request

        async for response in handler.stream_stream(checked(), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kinds)


# -- HTTP and WebSocket (ASGI) ---------------------------------------------------------------------

OPEN_HTTP_PATHS = frozenset({'/', '/dry_run'})  # GET: the HTTP gateway's health route and Jina's readiness (WebSocket: /dry_run)
READ_ONLY_HTTP_PATHS = frozenset({'/docs', '/openapi.json', '/redoc', '/docs/oauth2-redirect'})
WS_UNAUTHENTICATED, WS_PERMISSION_DENIED = 4401, 4403  # close codes: 4000 + the HTTP status


class KeyMiddleware:
    """ASGI middleware: every HTTP request and WebSocket but health and readiness needs a key.

    Over HTTP the answer is 401 or 403 with ``{"error": reason}``. A WebSocket has no status once it is
    open, and uvicorn cannot refuse the handshake with one: it is accepted and closed at once with code
    4401 (no valid key), or, for a read-only key, 4403 at the first message to a write endpoint.
    """

    def __init__(self, app, keys: KeyRing, open_paths: frozenset = OPEN_HTTP_PATHS):
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope, receive, send):
        if scope['type'] not in ('http', 'websocket') or self._is_open(scope):
            return await self.app(scope, receive, send)
        access = self.keys.access(_header(scope, b'authorization'))
        if scope['type'] == 'websocket':
            return await self._websocket(scope, receive, send, access)
        if access is None:
            return await _json_error(send, 401, UNAUTHENTICATED, {b'www-authenticate': b'Bearer'})
        if access == FULL:
            return await self.app(scope, receive, send)
        if scope['path'] in READ_ONLY_HTTP_PATHS and scope['method'] == 'GET':
            return await self.app(scope, receive, send)
        body, receive = await _buffered(receive)
        endpoint = _http_endpoint(scope['path'], body)
        if not allows(access, endpoint):
            return await _json_error(send, 403, permission_denied(endpoint))
        return await self.app(scope, receive, send)

    def _is_open(self, scope) -> bool:
        if scope['type'] == 'websocket':
            return scope['path'] == '/dry_run'  # '/' is the WebSocket of requests
        return scope['path'] in self.open_paths and scope['method'] in ('GET', 'HEAD')

    async def _websocket(self, scope, receive, send, access):
        if access is None:
            await receive()  # websocket.connect
            await send({'type': 'websocket.accept'})
            await send({'type': 'websocket.close', 'code': WS_UNAUTHENTICATED, 'reason': UNAUTHENTICATED[:120]})
            return
        if access == FULL:
            return await self.app(scope, receive, send)

        async def checked_receive():
            message = await receive()
            if message['type'] == 'websocket.receive':
                endpoint = _websocket_endpoint(message)
                if endpoint is not None and not allows(access, endpoint):
                    await send({'type': 'websocket.close', 'code': WS_PERMISSION_DENIED, 'reason': permission_denied(endpoint)[:120]})
                    return {'type': 'websocket.disconnect', 'code': WS_PERMISSION_DENIED}
            return message

        return await self.app(scope, checked_receive, send)


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get('headers') or ():
        if key.lower() == name:
            return value.decode('latin-1')
    return None


async def _buffered(receive):
    """The request body read whole, and a ``receive`` that replays it."""
    chunks = []
    while True:
        message = await receive()
        if message['type'] != 'http.request':
            break
        chunks.append(message.get('body', b''))
        if not message.get('more_body'):
            break
    body = b''.join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {'type': 'http.request', 'body': body, 'more_body': False}
        return await receive()

    return body, replay


def _http_endpoint(path: str, body: bytes) -> str:
    """The Jina endpoint an HTTP request calls: its path, or for ``/post`` its body's ``execEndpoint``."""
    if path != '/post':
        return path
    try:
        payload = json.loads(body or b'{}')
    except (ValueError, UnicodeDecodeError):
        return '/post'  # unreadable: treated as a write
    if not isinstance(payload, dict):
        return '/post'
    return str(payload.get('execEndpoint') or payload.get('exec_endpoint') or '/')


def _websocket_endpoint(message: dict) -> Optional[str]:
    """The endpoint of one WebSocket message of Jina's (JSON or protobuf); None for its end-of-stream marks."""
    if message.get('bytes') is not None:
        data = message['bytes']
        if data == bytes(True):
            return None
        from jina.types.request.data import DataRequest

        try:
            return DataRequest(data).header.exec_endpoint or '/'
        except Exception:  # not a request: treated as a write
            return '/post'
    try:
        payload = json.loads(message.get('text') or '{}')
    except ValueError:
        return '/post'
    if payload == {}:
        return None
    return _http_endpoint('/post', json.dumps(payload).encode()) if isinstance(payload, dict) else '/post'


async def _json_error(send, status: int, message: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({'error': message}).encode()
    extra = list((headers or {}).items())
    await send({
        'type': 'http.response.start',
        'status': status,
        'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()), *extra],
    })  # fmt: skip
    await send({'type': 'http.response.body', 'body': body})

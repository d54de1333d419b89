"""The search page's HTTP side: a Starlette app that answers JSON and talks to the Flow over gRPC.

Routes: ``GET /`` the page, ``/static/*`` its script and style, ``POST /api/search`` (JSON or a
multipart upload), ``GET /api/status``, ``GET /api/thumbnail?id=DOC_ID``. Calls to the Flow use
the client's asyncio methods with a deadline (a hung Flow is a 504, not a hung page); thumbnails are
made in a small thread pool (PIL work would block the loop), reading only what the encoder may read.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import urllib.parse
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from docarray import Document
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clip_search.client import Client, RequestError
from clip_search.auth import UNAUTHENTICATED, KeyRing
from clip_search.media import (
    IMAGE_FORMATS,
    MAX_IMAGE_PIXELS,
    BadDocumentError,
    MediaPolicy,
    decode_data_uri,
    load_image,
    unidentified_reason,
)
from clip_search.params import DEFAULT_LIMIT, validate_limit, validate_max_distance

STATIC_DIR = Path(__file__).resolve().parent / 'static'
MAX_UPLOAD_BYTES = 16 * 2**20
MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 2**20  # an upload as a base64 data URI, and the form around it
FLOW_TIMEOUT = 30.0  # seconds a search or status call to the Flow may take
THUMBNAIL_SIZE = 256
THUMBNAIL_THREADS = 2
LOCAL_HOSTS = ('localhost', '127.0.0.1', '::1')  # the names a page on this machine is reached by
LOGGER = logging.getLogger('clip_search.web')
FILTER_OPERATORS = {'!=': '$neq', '<=': '$lte', '>=': '$gte', '=': '$eq', '<': '$lt', '>': '$gt'}


class BadRequest(ValueError):
    """A request the page or an API user got wrong; the message names the parameter."""

    status = 400


class BodyTooLarge(BadRequest):
    """A body over MAX_BODY_BYTES, refused before more of it is read."""

    status = 413


class SearchedDocuments:
    """The image documents that searches returned, by id: the only images ``/api/thumbnail`` serves.

    The Flow has no "get document by id" endpoint, so the page remembers what the index answered
    (uri or blob, never anything a request names) and serves thumbnails of those alone. Bounded
    by count and by bytes of image blobs, least recently used first out.
    """

    def __init__(self, media: MediaPolicy = MediaPolicy(), max_documents: int = 4096, max_blob_bytes: int = 64 * 2**20):
        self._media = media  # the encoder's: no path outside --allow-path, no private host outside --allow-host
        self._docs: OrderedDict[str, Document] = OrderedDict()
        self._thumbnails: dict[str, bytes] = {}
        self._blob_bytes = 0
        self._max_documents = max_documents
        self._max_blob_bytes = max_blob_bytes
        self._lock = threading.Lock()

    def remember(self, match: Document) -> None:
        """Keep an image match's source (uri or blob), replacing what an older answer said."""
        kept = Document(id=match.id, uri=match.uri or None, blob=match.blob or None, mime_type=match.mime_type or None)
        with self._lock:
            self._drop(match.id)
            self._docs[match.id] = kept
            self._blob_bytes += _size(kept)
            while len(self._docs) > self._max_documents or self._blob_bytes > self._max_blob_bytes:
                self._drop(next(iter(self._docs)))

    def get(self, doc_id: str) -> Optional[Document]:
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                self._docs.move_to_end(doc_id)
            return doc

    def thumbnail(self, doc: Document) -> bytes:
        """A JPEG of at most THUMBNAIL_SIZE pixels, made once per document: always re-encoded, never the raw file."""
        with self._lock:
            cached = self._thumbnails.get(doc.id)
        if cached is not None:
            return cached
        image = load_image(doc, self._media)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format='JPEG', quality=90)
        with self._lock:
            if doc.id in self._docs:
                self._thumbnails[doc.id] = buffer.getvalue()
        return buffer.getvalue()

    def _drop(self, doc_id: str) -> None:
        doc = self._docs.pop(doc_id, None)
        if doc is not None:
            self._blob_bytes -= _size(doc)
        self._thumbnails.pop(doc_id, None)


def _size(doc: Document) -> int:
    """Bytes an image takes in memory: its blob, or a data URI."""
    return len(doc.blob or b'') + (len(doc.uri) if doc.uri.startswith('data:') else 0)


def parse_filter(text: Any) -> Optional[dict]:
    """``color=red, shape!=star`` (or the indexer's own dict, or its JSON) -> ``{'color': {'$eq': 'red'}, ...}``."""
    if text is None or isinstance(text, dict):
        return text or None
    if not isinstance(text, str):
        raise BadRequest(f'filter={text!r} must be a string like "color=red" or a dict like {{"color": {{"$eq": "red"}}}}')
    text = text.strip()
    if not text:
        return None
    if text.startswith('{'):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f'filter {text!r} is not valid JSON: {exc}') from None
        return parse_filter(parsed)
    conditions: dict = {}
    for clause in (part.strip() for part in text.split(',')):
        column, operator, value = _split_condition(clause)
        conditions.setdefault(column, {})[FILTER_OPERATORS[operator]] = _typed(value)
    return conditions


def _split_condition(clause: str) -> tuple[str, str, str]:
    for operator in FILTER_OPERATORS:  # two-character operators first, so '<=' is not read as '<'
        column, found, value = clause.partition(operator)
        if found and column.strip().isidentifier() and value.strip():
            return column.strip(), operator, value.strip().strip('"\'')
    raise BadRequest(
        f'filter condition {clause!r} must look like column=value (also !=, <, <=, >, >=), '
        f'several separated by commas, e.g. "color=red, shape=circle"'
    )


def _typed(value: str) -> Any:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def parse_limit(value: Any) -> int:
    """The number of matches asked for: an integer from 1 to MAX_LIMIT (a form sends a numeric string)."""
    if value is None or value == '':
        return DEFAULT_LIMIT
    if isinstance(value, str) and value.strip().lstrip('-').isdigit():
        value = int(value)
    try:
        return validate_limit(value)
    except ValueError as exc:
        raise BadRequest(str(exc).removeprefix('parameter ')) from None


def parse_max_distance(value: Any) -> Optional[float]:
    """The cut-off: a cosine distance of at least 0, or None (a form sends a numeric string, '' for none)."""
    if value is None or value == '':
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass  # refused below, by name
    try:
        return validate_max_distance(value)
    except ValueError as exc:
        raise BadRequest(str(exc).removeprefix('parameter ')) from None


def image_query(data: bytes, source: str = 'image') -> Document:
    """An uploaded image as a query Document; refuse what is empty, too big or not an image (it decodes: run it off the loop)."""
    if not data:
        raise BadRequest(f'{source} is empty')
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest(f'{source} has {len(data)} bytes, more than {MAX_UPLOAD_BYTES} (resize it first)')
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # the encoder's decoders, no others
            pixels = image.size[0] * image.size[1]
            image.verify()
    except Image.UnidentifiedImageError:  # EPS, PDF, PSD ...: named, never decoded
        raise BadRequest(f'{source} {unidentified_reason(data)}') from None
    except Exception as exc:  # truncated, a decompression bomb: the caller's fault
        raise BadRequest(f'{source} is not a readable image ({exc})') from None
    if pixels > MAX_IMAGE_PIXELS:
        raise BadRequest(f'{source} has {pixels} pixels, more than {MAX_IMAGE_PIXELS} (resize it first)')
    return Document(blob=data)


def create_app(
    server: str,
    model: Optional[str] = None,
    thumbnail_threads: int = THUMBNAIL_THREADS,
    media: MediaPolicy = MediaPolicy(),
    timeout: float = FLOW_TIMEOUT,
    allowed_hosts: Sequence[str] = LOCAL_HOSTS,
    keys: KeyRing = KeyRing(),
    gateway_key: Optional[str] = None,
) -> Starlette:
    """The web app for the clip-search Flow at ``server`` (``grpc://host:port``).

    ``media`` is what the thumbnails may read (the encoder's policy); ``timeout`` bounds each call to the Flow.
    ``allowed_hosts`` are the Host names it answers (others get 400: DNS rebinding); with ``keys``, its API
    asks each request for one of them, and it calls the Flow with ``gateway_key``.
    """
    pool = ThreadPoolExecutor(max_workers=thumbnail_threads, thread_name_prefix='clip-search-thumbnails')
    client = Client(server, timeout=timeout, api_key=gateway_key)
    searched = SearchedDocuments(media)

    async def in_pool(function: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / 'index.html', headers={'Cache-Control': 'no-cache'})

    async def search(request: Request) -> Response:
        try:
            query, limit, search_filter, max_distance = await _read_search_request(request)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        try:
            results = await client.asearch([query], limit=limit, filter=search_filter, max_distance=max_distance)
        except RequestError as exc:  # the indexer's reason names the parameter; a web query names no server path
            return _error(400, exc.reason)
        except Exception as exc:  # the Flow is down, unreachable or hung: not the caller's fault
            return _service_error(exc, timeout)
        matches = []
        for match in results[0].matches:
            is_image = not match.text and bool(match.uri or match.blob)
            if is_image:
                searched.remember(match)
            matches.append(_match_json(match, is_image))
        return JSONResponse({
            'query': query.text or '<image>',
            'limit': limit,
            'filter': search_filter,
            'max_distance': max_distance,
            'matches': matches,
        })  # fmt: skip

    async def status(request: Request) -> Response:
        try:
            answer = await client.astatus()
        except Exception as exc:
            return _service_error(exc, timeout)
        return JSONResponse({**answer, 'model': model, 'server': server})

    async def thumbnail(request: Request) -> Response:
        doc_id = request.query_params.get('id', '')
        doc = searched.get(doc_id)
        if doc is None:  # never a path: only ids the index returned are looked up
            return _error(404, f'no indexed image with id {doc_id!r} was found by a search')
        try:
            data = await in_pool(searched.thumbnail, doc)
        except BadDocumentError as exc:  # a path outside --allow-path, a private host, a file gone: logged, not told
            return _error(404, f'the image of {doc_id!r} cannot be shown (error {_logged(exc.reason)})')
        return Response(data, media_type='image/jpeg', headers={'Cache-Control': 'private, max-age=300'})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route('/', page),
        Route('/api/search', search, methods=['POST']),
        Route('/api/status', status),
        Route('/api/thumbnail', thumbnail),
        Mount('/static', StaticFiles(directory=STATIC_DIR), name='static'),
    ]
    middleware = [
        Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)),
        Middleware(SameSitePosts),
        Middleware(ApiKeys, keys=keys),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


class SameSitePosts:
    """Refuse a POST that another site's page sends (its Origin names another host, or the browser says
    Sec-Fetch-Site: cross-site): a simple cross-site POST needs no CORS preflight. Starlette has no such check."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and scope['method'] not in ('GET', 'HEAD', 'OPTIONS'):
            headers = {key.decode('latin-1').lower(): value.decode('latin-1') for key, value in scope['headers']}
            origin, host = headers.get('origin'), headers.get('host', '')
            cross_site = headers.get('sec-fetch-site') == 'cross-site'
            if cross_site or (origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != host.lower()):
                message = 'a request from another site is refused: use the search page of this server'
                return await _error(403, message)(scope, receive, send)
        return await self.app(scope, receive, send)


class ApiKeys:
    """With keys, every /api/ request needs one (``Authorization: Bearer KEY``); the page itself and its
    script are open, so that it can ask for the key. Every key may use the API: it only reads."""

    def __init__(self, app, keys: KeyRing):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if self.keys.enabled and scope['type'] == 'http' and scope['path'].startswith('/api/'):
            authorization = dict(scope['headers']).get(b'authorization', b'').decode('latin-1')
            if self.keys.access(authorization) is None:
                return await _error(401, UNAUTHENTICATED)(scope, receive, send)
        return await self.app(scope, receive, send)


async def _read_search_request(request: Request) -> tuple[Document, int, Optional[dict], Optional[float]]:
    """(query, limit, filter, max_distance) from a multipart form (the page's image upload) or else a JSON body."""
    request = await _capped(request)
    content_type = request.headers.get('content-type', '')
    if content_type.startswith('multipart/form-data'):
        form = await request.form(max_files=1, max_fields=10)
        fields = {key: value for key, value in form.items()}
    else:
        try:
            fields = json.loads(await request.body() or b'{}')
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f'the body is not JSON ({exc}): send {{"query": "...", "limit": 5}}') from None
        if not isinstance(fields, dict):
            raise BadRequest('the body must be a JSON object like {"query": "...", "limit": 5}')
    limit = parse_limit(fields.get('limit'))
    search_filter = parse_filter(fields.get('filter'))
    max_distance = parse_max_distance(fields.get('max_distance'))
    return await _query_document(fields), limit, search_filter, max_distance


async def _capped(request: Request) -> Request:
    """The request with its body read, refused past MAX_BODY_BYTES: by its Content-Length, or as it streams."""
    length = request.headers.get('content-length', '')
    too_large = f'the body is larger than {MAX_BODY_BYTES} bytes (an image may have {MAX_UPLOAD_BYTES})'
    if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise BodyTooLarge(too_large)
    body = bytearray()
    async for chunk in request.stream():  # a chunked body announces no length
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge(too_large)

    async def replay() -> dict:
        return {'type': 'http.request', 'body': bytes(body), 'more_body': False}

    return Request(request.scope, replay)


async def _query_document(fields: dict) -> Document:
    image, text = fields.get('image'), fields.get('query')
    if isinstance(image, UploadFile):
        return await run_in_threadpool(image_query, await image.read())
    if isinstance(image, str) and image:
        return await run_in_threadpool(image_query, _decode_data_uri(image))
    if image not in (None, ''):
        raise BadRequest('image must be an uploaded file or a data URI (data:image/png;base64,...)')
    if not isinstance(text, str) or not text.strip():
        raise BadRequest('query must be a non-empty text (or send an image)')
    # always a text, even 'photo.png': a web request never makes the server read a path
    return Document(text=text.strip())


def _decode_data_uri(uri: str) -> bytes:
    if not uri.startswith('data:image/'):
        raise BadRequest('image must be a base64 data URI like data:image/png;base64,...')
    try:
        return decode_data_uri(uri)
    except ValueError as exc:
        raise BadRequest(f'image: {exc}') from None


def _match_json(match: Document, is_image: bool) -> dict:
    return {
        'id': match.id,
        'text': match.text or None,
        'uri': _public_uri(match.uri),
        'distance': float(match.scores['cosine'].value or 0.0),
        'tags': dict(match.tags),
        'thumbnail': f'/api/thumbnail?id={_quote(match.id)}' if is_image else None,
    }


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe='')


def _public_uri(uri: str) -> Optional[str]:
    """What the browser is told of a match's uri: a web address whole, of a server path its file name only."""
    if not uri or uri.startswith('data:'):
        return None
    if urllib.parse.urlsplit(uri).scheme.lower() in ('http', 'https'):
        return uri
    return Path(urllib.parse.urlsplit(uri).path if uri.startswith('file:') else uri).name or None


def _service_error(exc: Exception, timeout: float) -> JSONResponse:
    """504 when the Flow did not answer in time, 502 when it could not be reached; the details go to the log."""
    if isinstance(exc, TimeoutError) or 'deadline exceeded' in str(exc).lower():
        return _error(504, f'the search service did not answer within {timeout:g} s')
    if 'unauthenticated' in str(exc).lower() or 'permission_denied' in str(exc).lower():
        return _error(502, f'the search service refused the web page\'s key; ask its operator (error {_logged(exc)})')
    return _error(502, f'the search service did not answer; try again in a moment (error {_logged(exc)})')


def _logged(detail: Any) -> str:
    """Log what the browser must not see (exception text, server paths) under a new id; return the id."""
    error_id = uuid.uuid4().hex[:12]
    LOGGER.warning('clip-search web error %s: %s', error_id, detail)
    return error_id


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({'error': message}, status_code=status)

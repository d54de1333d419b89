"""The Python client: ``Client('grpc://host:61000')`` with encode, index, search, rank, update, delete, status.

A thin layer over ``jina.Client`` (which does the streaming, batching and the progress bar for
gRPC, HTTP and WebSocket): it turns strings, paths and URLs into Documents the way ``clip_client``
does, and turns answers into plain Python values. Every method has an ``a``-prefixed coroutine
twin (``await client.asearch(...)``) for asyncio code.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Coroutine, Iterable, Iterator, Optional, TypeVar, Union

import numpy as np
from docarray import Document, DocumentArray

from clip_search.params import DEFAULT_LIMIT

Input = Union[str, Document]
Inputs = Union[Input, DocumentArray, Iterable[Input]]
DEFAULT_BATCH_SIZE = 64
PROTOCOLS = ('grpc', 'grpcs', 'http', 'https', 'ws', 'wss', 'websocket')
T = TypeVar('T')


class Client:
    """Talk to a clip-search server over gRPC (``grpc://``, ``grpcs://``), HTTP or WebSocket (``http://``, ``ws://``).

    >>> client = Client('grpc://localhost:61000')
    >>> client.index(['she smiled, with pain', 'apple.png'])
    >>> client.search(['smile'], limit=3)[0].matches[:, ('text', 'scores__cosine__value')]
    """

    def __init__(self, server: str = 'grpc://localhost:61000', timeout: Optional[float] = None, **client_kwargs: Any):
        """:param server: ``scheme://host:port`` with scheme grpc, grpcs (TLS), http, https, ws or wss
        :param timeout: seconds one request (one batch) may take before it fails; default: no limit
        :param client_kwargs: passed to ``jina.Client``
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f'timeout={timeout} must be positive seconds (or None for no limit)')
        self.timeout = timeout
        from jina import Client as JinaClient

        from clip_search import prefetch

        prefetch.install()  # a long index() waits for room under prefetch instead of spinning a core

        scheme = server.split('://', 1)[0] if '://' in server else ''
        if scheme not in PROTOCOLS:
            raise ValueError(f'server={server!r}: expected {"|".join(PROTOCOLS)}://host:port')
        self.server = server
        self._client = JinaClient(host=server.replace('websocket://', 'ws://'), asyncio=True, **client_kwargs)

    # -- synchronous API: each call runs its coroutine twin on the client's event loop --------

    def encode(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> Union[np.ndarray, DocumentArray]:
        """Embed texts and images. Strings in give an ``[N, dim]`` array; Documents in give Documents."""
        return _run(self.aencode(inputs, batch_size, show_progress))

    def index(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """Encode and store documents; an id that is already indexed is replaced."""
        return _run(self.aindex(inputs, batch_size, show_progress))

    def search(
        self,
        inputs: Inputs,
        limit: int = DEFAULT_LIMIT,
        filter: Optional[dict] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        show_progress: Optional[bool] = None,
        max_distance: Optional[float] = None,
    ) -> DocumentArray:
        """Find the ``limit`` nearest indexed documents of each query, closest first.

        ``match.scores['cosine'].value`` is the cosine distance; ``filter`` uses the indexer's tag
        columns, e.g. ``{'color': {'$eq': 'red'}}``; ``max_distance`` keeps only matches at most
        that distance (``0.0``: exact matches only), so a query may get fewer than ``limit``.
        """
        return _run(self.asearch(inputs, limit, filter, batch_size, show_progress, max_distance))

    def rank(
        self, docs: Iterable[Document], batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """Re-rank each document's ``.matches`` (candidates of the other modality) by CLIP, best first.

        Every candidate comes back with ``scores['clip_score']`` (softmax over the query's candidates)
        and ``scores['clip_score_cosine']`` (cosine similarity), as clip-as-service's ``rank()``.
        """
        return _run(self.arank(docs, batch_size, show_progress))

    def update(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """Replace indexed documents by id (content, tags and embedding); unknown ids are an error."""
        return _run(self.aupdate(inputs, batch_size, show_progress))

    def delete(self, ids: Union[str, Iterable[Union[str, Document]]], batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
        """Delete documents by id; returns the ids that were indexed (and are now gone)."""
        return _run(self.adelete(ids, batch_size))

    def status(self) -> dict:
        """Documents in total and per shard, and the index settings."""
        return _run(self.astatus())

    def profile(self, content: str = '', show: bool = True) -> dict[str, float]:
        """Latency of one encode request, in ms: round trip, network, gateway and model (like clip_client)."""
        return _run(self.aprofile(content, show))

    # -- asyncio API ---------------------------------------------------------------------------

    async def aencode(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> Union[np.ndarray, DocumentArray]:
        """``encode`` for asyncio code."""
        all_strings = isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs)
        docs = await self._post('/encode', inputs, batch_size, show_progress)
        return docs.embeddings if all_strings else docs

    async def aindex(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """``index`` for asyncio code."""
        return await self._post('/index', inputs, batch_size, show_progress)

    async def asearch(
        self,
        inputs: Inputs,
        limit: int = DEFAULT_LIMIT,
        filter: Optional[dict] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        show_progress: Optional[bool] = None,
        max_distance: Optional[float] = None,
    ) -> DocumentArray:
        """``search`` for asyncio code."""
        parameters: dict = {'limit': limit}
        if filter is not None:
            parameters['filter'] = filter
        if max_distance is not None:
            parameters['max_distance'] = max_distance
        return await self._post('/search', inputs, batch_size, show_progress, parameters)

    async def arank(
        self, docs: Iterable[Document], batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """``rank`` for asyncio code."""
        return await self._post('/rank', _with_candidates(docs), batch_size, show_progress)

    async def aupdate(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """``update`` for asyncio code."""
        return await self._post('/update', inputs, batch_size, show_progress)

    async def adelete(
        self, ids: Union[str, Iterable[Union[str, Document]]], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[str]:
        """``delete`` for asyncio code."""
        ids = [ids] if isinstance(ids, str) else ids
        docs = (Document(id=x.id if isinstance(x, Document) else str(x)) for x in ids)
        answers = await self._post('/delete', docs, batch_size, show_progress=False)
        return [doc.id for doc in answers if doc.tags.get('deleted')]

    async def astatus(self) -> dict:
        """``status`` for asyncio code."""
        answer = await self._post('/status', [Document()], 1, show_progress=False)
        tags = answer[0].tags
        return {
            'documents': int(tags['documents']),
            'shards': [
                {'shard': int(s['shard']), 'documents': int(s['documents']), 'unreclaimed_slots': int(s.get('unreclaimed_slots', 0))}
                for s in tags['shards']
            ],
            'index': {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in tags['index'].items()},
        }

    async def aprofile(self, content: str = '', show: bool = True) -> dict[str, float]:
        """``profile`` for asyncio code."""
        started = time.perf_counter()
        responses = await self._post('/', [content], 1, show_progress=False, responses=True)
        round_trip = (time.perf_counter() - started) * 1000
        report = latency_breakdown(round_trip, responses[0].routes)
        if show:
            print_latency_tree(report)
        return report

    async def _post(
        self,
        endpoint: str,
        inputs: Inputs,
        batch_size: int,
        show_progress: Optional[bool],
        parameters: Optional[dict] = None,
        responses: bool = False,
    ) -> Any:
        """Send ``inputs`` in batches to ``endpoint``; the answers' documents in input order."""
        if batch_size < 1:
            raise ValueError(f'batch_size={batch_size} must be at least 1')
        if show_progress is None:
            show_progress = sys.stderr.isatty() and _longer_than(inputs, batch_size)
        return await _on_client_loop(self._stream(endpoint, inputs, batch_size, show_progress, parameters, responses))

    async def _stream(self, endpoint, inputs, batch_size, show_progress, parameters, responses) -> Any:
        from jina.excepts import BadServer

        collected: Any = [] if responses else DocumentArray()
        # converted here, not inside jina's request loop, which swallows a conversion error and never answers
        documents = DocumentArray(_documents(inputs))
        try:
            async for answer in self._client.post(
                endpoint,
                inputs=documents,
                request_size=batch_size,
                parameters=parameters or {},
                show_progress=show_progress,
                results_in_order=True,  # answers line up with the inputs, batch after batch
                return_responses=responses,
                stream=False,
                **({'timeout': self.timeout} if self.timeout else {}),
            ):
                collected.append(answer) if responses else collected.extend(answer)
        except BadServer as exc:
            raise RequestError(endpoint, _server_reason(exc)) from None
        return collected


class RequestError(RuntimeError):
    """The server refused a request; the message is the server's reason (it names the document)."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f'{endpoint} failed: {reason}')
        self.endpoint = endpoint
        self.reason = reason


def latency_breakdown(round_trip_ms: float, routes: Any) -> dict[str, float]:
    """clip_client's profile figures from a response's routes: [0] is the gateway, [1] the encoder."""
    gateway = _route_ms(routes[0])
    model = _route_ms(routes[1])
    return {
        'Roundtrip': round_trip_ms,
        'Client-server network': round_trip_ms - gateway,
        'Server': gateway,
        'Gateway-CLIP network': gateway - model,
        'CLIP model': model,
    }


def print_latency_tree(report: dict[str, float]) -> None:
    """The profile as a tree with shares, as clip_client prints it."""
    from rich import print as rich_print
    from rich.tree import Tree

    def row(name: str, part: str, whole: str) -> str:
        share = report[part] / report[whole] if report[whole] else 0.0
        return f'{name}  [b]{report[part]:.0f}[/b]ms  [dim]{share * 100:.0f}%[/dim]'

    tree = Tree(row('Roundtrip', 'Roundtrip', 'Roundtrip'))
    tree.add(row('Client-server network', 'Client-server network', 'Roundtrip'))
    server = tree.add(row('Server', 'Server', 'Roundtrip'))
    server.add(row('Gateway-CLIP network', 'Gateway-CLIP network', 'Server'))
    server.add(row('CLIP model', 'CLIP model', 'Server'))
    rich_print(tree)


def _route_ms(route: Any) -> float:
    return float(route.end_time.ToMilliseconds() - route.start_time.ToMilliseconds())


def _server_reason(exc: Exception) -> str:
    header = exc.args[0] if exc.args else None
    status = getattr(header, 'status', None)
    exception = getattr(status, 'exception', None)
    if exception is not None and exception.args:
        return f'{exception.name}: {" ".join(exception.args)}'
    return getattr(status, 'description', '') or str(exc)


def to_document(item: Input) -> Document:
    """A string becomes an image Document when it names an image (path, URL, data URI), else text.

    A local file, named by a string or by a Document's uri, is sent as bytes (as clip_client does):
    the server opens no path a request names unless it was started with ``--allow-path``.
    """
    if isinstance(item, Document):
        if item.uri and not (item.blob or item.text or item.tensor is not None) and _local_image(item):
            item.blob = Path(item.uri).expanduser().read_bytes()
        return item
    if not isinstance(item, str):
        raise TypeError(f'cannot index {type(item).__name__} {item!r}: pass str or Document')
    if item.startswith('data:image/'):
        return Document(uri=item)
    mime = mimetypes.guess_type(item.split('?')[0])[0] or ''
    if not mime.startswith('image/'):
        return Document(text=item)
    doc = Document(uri=item, mime_type=mime)
    path = Path(item).expanduser()
    if path.is_file():  # the server may be elsewhere: send the bytes, keep the path for display
        doc.blob = path.read_bytes()
    return doc


def _local_image(doc: Document) -> bool:
    """Whether the document's uri is a file here that may be an image (a .txt is left for the server to refuse)."""
    if urllib.parse.urlparse(doc.uri).scheme:  # data:, http(s):, file: are the server's to read
        return False
    mime = doc.mime_type or mimetypes.guess_type(doc.uri)[0] or 'image/'
    try:
        return mime.startswith('image/') and Path(doc.uri).expanduser().is_file()
    except OSError:  # not a name this file system can hold: the server will say what it is
        return False


def _documents(inputs: Inputs) -> Iterator[Document]:
    if isinstance(inputs, (str, Document)):
        inputs = [inputs]
    for item in inputs:
        yield to_document(item)


def _with_candidates(docs: Iterable[Document]) -> Iterator[Document]:
    """rank() inputs: Documents whose candidates (plain strings allowed) are in ``.matches``."""
    if isinstance(docs, (str, Document)):
        docs = [docs]
    for doc in docs:
        if not isinstance(doc, Document):
            raise TypeError(f'rank() takes Documents with candidates in .matches, not {type(doc).__name__}')
        doc.matches = DocumentArray(to_document(m) for m in doc.matches)
        yield doc


def _longer_than(inputs: Inputs, batch_size: int) -> bool:
    try:
        return len(inputs) > batch_size  # type: ignore[arg-type]
    except TypeError:
        return True  # a generator: could be long


# -- the client's event loop ---------------------------------------------------------------------
# Written by hand because jina's synchronous client runs each request in a new event loop, and grpc.aio
# state bound to a closed loop can leave a later request waiting forever: every Client in a process
# runs its requests as unary calls on one long-lived loop in a daemon thread.

_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_pid: Optional[int] = None
_loop_lock = threading.Lock()


def _client_loop() -> asyncio.AbstractEventLoop:
    """The event loop all requests of this process run on (started on first use, again after fork)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():
            _loop, _loop_pid = asyncio.new_event_loop(), os.getpid()
            threading.Thread(target=_loop.run_forever, name='clip-search-client', daemon=True).start()
        return _loop


async def _on_client_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the client's loop, from whichever loop the caller is on."""
    loop = _client_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one of the client's coroutines to its end from synchronous code."""
    loop = _client_loop()
    if threading.current_thread().name == 'clip-search-client':
        coro.close()
        raise RuntimeError('a synchronous Client method was called on the client loop: await its a-twin instead')
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise

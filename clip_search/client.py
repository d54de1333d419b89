"""The Python client: ``Client('grpc://host:61000')`` with encode, index, search, rank, update, delete, status.

A layer over ``jina.Client`` (which speaks gRPC, HTTP and WebSocket): it turns strings, paths and
URLs into Documents the way ``clip_client`` does, streams them in batches with a bounded number in
flight (``pipeline``), and turns answers into plain Python values. Every method has an
``a``-prefixed coroutine twin (``await client.asearch(...)``) for asyncio code.
"""

from __future__ import annotations

import asyncio
import functools
import mimetypes
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from collections import deque
from typing import Any, Awaitable, Callable, Coroutine, Iterable, Iterator, Optional, ParamSpec, TypeVar, Union

import numpy as np
from docarray import Document, DocumentArray

from clip_search.params import DEFAULT_LIMIT
from clip_search.progress import JobProgress
from clip_search.sharding import LOOKUP

Input = Union[str, Document]
Inputs = Union[Input, DocumentArray, Iterable[Input]]
DEFAULT_BATCH_SIZE = 64
BATCH_BYTES = 16 * 2**20  # content (blobs, texts) of one request, at most (a single larger document goes alone)
PROTOCOLS = ('grpc', 'grpcs', 'http', 'https', 'ws', 'wss', 'websocket')
T = TypeVar('T')
P = ParamSpec('P')


def _synchronous(coroutine_function: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """The blocking twin of a ``Client`` coroutine (``aindex`` -> ``index``), with its docstring and signature."""

    @functools.wraps(coroutine_function)
    def method(*args: P.args, **kwargs: P.kwargs) -> T:
        return _run(coroutine_function(*args, **kwargs))

    method.__name__ = method.__qualname__ = coroutine_function.__name__[1:]
    return method


class Client:
    """Talk to a clip-search server over gRPC (``grpc://``, ``grpcs://``), HTTP or WebSocket (``http://``, ``ws://``).

    >>> client = Client('grpc://localhost:61000')
    >>> client.index(['she smiled, with pain', 'apple.png'])
    >>> client.search(['smile'], limit=3)[0].matches[:, ('text', 'scores__cosine__value')]

    Inputs are streamed: a generator is read a batch at a time (in a worker thread, so reading files
    does not hold the requests in flight), at most ``in_flight`` batches wait for an answer, and
    ``index``/``update`` keep only the acknowledged ids. Every method has an ``a``-prefixed coroutine
    twin (``await client.asearch(...)``) for asyncio code; the synchronous methods are made from them.
    """

    def __init__(
        self,
        server: str = 'grpc://localhost:61000',
        timeout: Optional[float] = None,
        in_flight: int = 4,
        api_key: Optional[str] = None,
        **client_kwargs: Any,
    ):
        """:param server: ``scheme://host:port`` with scheme grpc, grpcs (TLS), http, https, ws or wss
        :param timeout: seconds one request (one batch) may take before it fails; default: no limit
        :param in_flight: batches sent and not yet answered, at most (the next batch is read meanwhile)
        :param api_key: the service's API key (``--api-key``), sent as ``Authorization`` with every request
        :param client_kwargs: passed to ``jina.Client``
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f'timeout={timeout} must be positive seconds (or None for no limit)')
        if in_flight < 1:
            raise ValueError(f'in_flight={in_flight} must be at least 1')
        self.timeout = timeout
        self.in_flight = in_flight
        from jina import Client as JinaClient

        from clip_search import prefetch

        prefetch.install()  # a long index() waits for room under prefetch instead of spinning a core

        scheme = server.split('://', 1)[0] if '://' in server else ''
        if scheme not in PROTOCOLS:
            raise ValueError(f'server={server!r}: expected {"|".join(PROTOCOLS)}://host:port')
        self.server = server
        self._client = JinaClient(host=server.replace('websocket://', 'ws://'), asyncio=True, **client_kwargs)
        if api_key:  # jina.Client takes the key per call only: gRPC metadata, or an HTTP/WebSocket header
            auth = {'metadata': (('authorization', api_key),)} if scheme.startswith('grpc') else {'headers': {'Authorization': api_key}}
            self._client.post = functools.partial(self._client.post, **auth)

    # -- asyncio API; the synchronous API below is made from it --------------------------------

    async def aencode(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> Union[np.ndarray, DocumentArray]:
        """Embed texts and images. A list of strings gives an ``[N, dim]`` array; anything else gives Documents."""
        all_strings = isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs)
        docs = DocumentArray()
        await self._post('/encode', inputs, batch_size, show_progress, on_answer=lambda _sent, answer: docs.extend(answer))
        return docs.embeddings if all_strings else docs

    async def aindex(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> list[str]:
        """Encode and store documents; returns the acknowledged ids, in input order.

        Under the shipped ``/index: ANY`` polling, indexing an id that is already indexed adds a copy
        (on the shard that receives it; a search still shows each id once): use ``update`` to change
        a document. Under ``ALL`` the document is replaced. Inputs are streamed, so a generator is read
        as it is sent: when an item cannot be converted (the error names it), the batches before it
        were already indexed.
        """
        return await self._acknowledged('/index', inputs, batch_size, show_progress)

    async def asearch(
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
        parameters: dict = {'limit': limit}
        if filter is not None:
            parameters['filter'] = filter
        if max_distance is not None:
            parameters['max_distance'] = max_distance
        return await self._collected('/search', inputs, batch_size, show_progress, parameters)

    async def arank(
        self, docs: Iterable[Document], batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """Re-rank each document's ``.matches`` (candidates of the other modality) by CLIP, best first.

        Every candidate comes back with ``scores['clip_score']`` (softmax over the query's candidates)
        and ``scores['clip_score_cosine']`` (cosine similarity), as clip-as-service's ``rank()``.
        """
        return await self._collected('/rank', _with_candidates(docs), batch_size, show_progress)

    async def aupdate(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> list[str]:
        """Replace indexed documents by id (content, tags and embedding); unknown ids are an error.

        Returns the acknowledged ids, in input order; each batch is all-or-nothing.
        """
        return await self._acknowledged('/update', inputs, batch_size, show_progress)

    async def adelete(
        self, ids: Union[str, Iterable[Union[str, Document]]], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[str]:
        """Delete documents by id; returns the ids that were indexed (and are now gone)."""
        ids = [ids] if isinstance(ids, str) else ids
        docs = (Document(id=x.id if isinstance(x, Document) else str(x)) for x in ids)
        answers = await self._collected('/delete', docs, batch_size, show_progress=False)
        return [doc.id for doc in answers if doc.tags.get('deleted')]

    async def aindexed(self, ids: Iterable[str], batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
        """Which of ``ids`` are indexed, on any shard, in the order given (a read-only lookup)."""
        held: list[str] = []
        await self._post(
            '/status',
            (Document(id=doc_id) for doc_id in ids),
            batch_size,
            show_progress=False,
            on_answer=lambda _sent, answer: held.extend(doc.id for doc in answer if doc.tags.get('held')),
            parameters={LOOKUP: True},
        )
        return held

    async def astatus(self) -> dict:
        """Documents in total and per shard, and the index settings."""
        answer = await self._collected('/status', [Document()], 1, show_progress=False)
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
        """Latency of one encode request, in ms: round trip, network, gateway and model (like clip_client)."""
        started = time.perf_counter()
        responses: list = []
        await self._post('/', [content], 1, False, on_answer=lambda _sent, answer: responses.append(answer), responses=True)
        round_trip = (time.perf_counter() - started) * 1000
        report = latency_breakdown(round_trip, responses[0].routes)
        if show:
            print_latency_tree(report)
        return report

    # -- streaming --------------------------------------------------------------------------------

    async def _acknowledged(self, endpoint: str, inputs: Inputs, batch_size: int, show_progress: Optional[bool]) -> list[str]:
        ids: list[str] = []
        await self._post(endpoint, inputs, batch_size, show_progress, on_answer=lambda _sent, answer: ids.extend(answer[:, 'id']))
        return ids

    async def _collected(
        self, endpoint: str, inputs: Inputs, batch_size: int, show_progress: Optional[bool], parameters: Optional[dict] = None
    ) -> DocumentArray:
        docs = DocumentArray()
        await self._post(endpoint, inputs, batch_size, show_progress, lambda _sent, answer: docs.extend(answer), parameters)
        return docs

    async def _post(
        self,
        endpoint: str,
        inputs: Inputs,
        batch_size: int,
        show_progress: Optional[bool],
        on_answer: Callable[[DocumentArray, Any], None],
        parameters: Optional[dict] = None,
        responses: bool = False,
    ) -> None:
        """Send ``inputs`` in batches to ``endpoint``; ``on_answer(batch, answer)`` for each batch, in input order."""
        if batch_size < 1:
            raise ValueError(f'batch_size={batch_size} must be at least 1')
        if show_progress is None:
            show_progress = sys.stderr.isatty() and _longer_than(inputs, batch_size)
        total = len(inputs) if isinstance(inputs, (list, tuple, DocumentArray)) else None

        async def send(batch: DocumentArray) -> Any:
            return await self._send(endpoint, batch, parameters, responses)

        with JobProgress(endpoint, total, bar=show_progress, log_to=sys.stdout) as progress:

            def answered(batch: DocumentArray, answer: Any) -> None:
                on_answer(batch, answer)
                progress.advance(len(batch))

            await _on_client_loop(pipeline(batches(_documents(inputs), batch_size), send, answered, self.in_flight))

    async def send_batch(self, endpoint: str, batch: DocumentArray, parameters: Optional[dict] = None) -> DocumentArray:
        """One request of ``batch`` as it is: the answer's documents; ``RequestError`` with the server's reason."""
        return await _on_client_loop(self._send(endpoint, batch, parameters))

    async def _send(
        self, endpoint: str, batch: DocumentArray, parameters: Optional[dict] = None, responses: bool = False
    ) -> Any:
        from jina.excepts import BadServer

        answers: list = []
        try:
            async for answer in self._client.post(
                endpoint,
                inputs=batch,
                request_size=len(batch),  # one request: the pipeline does the batching
                parameters=parameters or {},
                show_progress=False,
                return_responses=responses,
                stream=False,
                **({'timeout': self.timeout} if self.timeout else {}),
            ):
                answers.append(answer)
        except BadServer as exc:
            raise RequestError(endpoint, _server_reason(exc)) from None
        if responses:
            return answers[0]
        return answers[0] if len(answers) == 1 else DocumentArray(doc for answer in answers for doc in answer)

    # -- synchronous API: each method runs its coroutine twin on the client's event loop ---------

    encode = _synchronous(aencode)
    index = _synchronous(aindex)
    search = _synchronous(asearch)
    rank = _synchronous(arank)
    update = _synchronous(aupdate)
    delete = _synchronous(adelete)
    indexed = _synchronous(aindexed)
    status = _synchronous(astatus)
    profile = _synchronous(aprofile)


async def pipeline(
    batches: Iterator[DocumentArray],
    send: Callable[[DocumentArray], Awaitable[T]],
    on_answer: Callable[[DocumentArray, T], None],
    in_flight: int,
) -> None:
    """Send ``batches`` with at most ``in_flight`` unanswered; ``on_answer`` in send order.

    The next batch is taken from ``batches`` in a worker thread while earlier ones are in flight, so
    a generator is read as it is sent. When taking a batch or sending one fails, the batches already
    sent are answered (and passed to ``on_answer``) before the error is raised.
    Written by hand: jina's client reads its inputs in the event loop and keeps no bound of its own
    on requests in flight across a generator of our batches with per-batch handling.
    """
    pending: deque[tuple[DocumentArray, asyncio.Task]] = deque()
    try:
        while True:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            pending.append((batch, asyncio.ensure_future(send(batch))))
            if len(pending) >= in_flight:
                sent, task = pending.popleft()
                on_answer(sent, await task)
        while pending:
            sent, task = pending.popleft()
            on_answer(sent, await task)
    finally:
        # an error (or a cancel, e.g. Ctrl-C): let the requests already sent finish, report what they acknowledged
        for sent, task in pending:
            try:
                on_answer(sent, await asyncio.shield(task))
            except Exception:
                pass


def batches(docs: Iterator[Document], batch_size: int, max_bytes: int = BATCH_BYTES) -> Iterator[DocumentArray]:
    """``docs`` in DocumentArrays of ``batch_size``, or fewer when their content reaches ``max_bytes``, read lazily.

    The byte bound keeps a batch of large photos under the gateway's request limit (64 MiB in the
    shipped YAML) and bounds what the requests in flight hold in memory.
    """
    batch, size = DocumentArray(), 0
    for doc in docs:
        doc_size = len(doc.blob or b'') + len(doc.text or '')
        if batch and (len(batch) >= batch_size or size + doc_size > max_bytes):
            yield batch
            batch, size = DocumentArray(), 0
        batch.append(doc)
        size += doc_size
    if batch:
        yield batch


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

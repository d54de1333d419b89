"""The Python client: ``Client('grpc://host:61000')`` with encode, index, search, update, delete, status.

A thin layer over ``jina.Client`` (which does the gRPC streaming, batching and the progress bar):
it turns strings, paths and URLs into Documents the way ``clip_client`` does, and turns answers
into plain Python values.
"""

from __future__ import annotations

import mimetypes
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
from docarray import Document, DocumentArray

from clip_search.sharding import DEFAULT_LIMIT

Input = Union[str, Document]
Inputs = Union[Input, DocumentArray, Iterable[Input]]
DEFAULT_BATCH_SIZE = 64


class Client:
    """Talk to a clip-search server over gRPC.

    >>> client = Client('grpc://localhost:61000')
    >>> client.index(['she smiled, with pain', 'apple.png'])
    >>> client.search(['smile'], limit=3)[0].matches[:, ('text', 'scores__cosine__value')]
    """

    def __init__(self, server: str = 'grpc://localhost:61000', **client_kwargs: Any):
        """:param server: ``grpc://host:port`` (``grpcs://`` for TLS)
        :param client_kwargs: passed to ``jina.Client`` (e.g. ``timeout``-related options)
        """
        from jina import Client as JinaClient

        self.server = server
        self._client = JinaClient(host=server, **client_kwargs)

    def encode(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> Union[np.ndarray, DocumentArray]:
        """Embed texts and images. Strings in give an ``[N, dim]`` array; Documents in give Documents."""
        all_strings = isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs)
        docs = self._post('/encode', inputs, batch_size, show_progress)
        return docs.embeddings if all_strings else docs

    def index(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """Encode and store documents; an id that is already indexed is replaced."""
        return self._post('/index', inputs, batch_size, show_progress)

    def search(
        self,
        inputs: Inputs,
        limit: int = DEFAULT_LIMIT,
        filter: Optional[dict] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        show_progress: Optional[bool] = None,
    ) -> DocumentArray:
        """Find the ``limit`` nearest indexed documents of each query, closest first.

        ``match.scores['cosine'].value`` is the cosine distance; ``filter`` uses the indexer's tag
        columns, e.g. ``{'color': {'$eq': 'red'}}``.
        """
        parameters: dict = {'limit': limit}
        if filter is not None:
            parameters['filter'] = filter
        return self._post('/search', inputs, batch_size, show_progress, parameters)

    def update(
        self, inputs: Inputs, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: Optional[bool] = None
    ) -> DocumentArray:
        """Replace indexed documents by id (content, tags and embedding); unknown ids are an error."""
        return self._post('/update', inputs, batch_size, show_progress)

    def delete(self, ids: Union[str, Iterable[Union[str, Document]]], batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
        """Delete documents by id; returns the ids that were indexed (and are now gone)."""
        ids = [ids] if isinstance(ids, str) else ids
        docs = (Document(id=x.id if isinstance(x, Document) else str(x)) for x in ids)
        answers = self._post('/delete', docs, batch_size, show_progress=False)
        return [doc.id for doc in answers if doc.tags.get('deleted')]

    def status(self) -> dict:
        """Documents in total and per shard, and the index settings."""
        answer = self._post('/status', [Document()], 1, show_progress=False)
        tags = answer[0].tags
        return {
            'documents': int(tags['documents']),
            'shards': [{'shard': int(s['shard']), 'documents': int(s['documents'])} for s in tags['shards']],
            'index': {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in tags['index'].items()},
        }

    def _post(
        self,
        endpoint: str,
        inputs: Inputs,
        batch_size: int,
        show_progress: Optional[bool],
        parameters: Optional[dict] = None,
    ) -> DocumentArray:
        if batch_size < 1:
            raise ValueError(f'batch_size={batch_size} must be at least 1')
        if show_progress is None:
            show_progress = sys.stderr.isatty() and _longer_than(inputs, batch_size)
        from jina.excepts import BadServer

        try:
            return self._client.post(
                endpoint,
                inputs=_documents(inputs),
                request_size=batch_size,
                parameters=parameters or {},
                show_progress=show_progress,
                results_in_order=True,  # answers line up with the inputs, batch after batch
            )
        except BadServer as exc:
            raise RequestError(endpoint, _server_reason(exc)) from None


class RequestError(RuntimeError):
    """The server refused a request; the message is the server's reason (it names the document)."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f'{endpoint} failed: {reason}')
        self.endpoint = endpoint
        self.reason = reason


def _server_reason(exc: Exception) -> str:
    header = exc.args[0] if exc.args else None
    status = getattr(header, 'status', None)
    exception = getattr(status, 'exception', None)
    if exception is not None and exception.args:
        return f'{exception.name}: {" ".join(exception.args)}'
    return getattr(status, 'description', '') or str(exc)


def to_document(item: Input) -> Document:
    """A string becomes an image Document when it names an image (path, URL, data URI), else text."""
    if isinstance(item, Document):
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


def _documents(inputs: Inputs) -> Iterator[Document]:
    if isinstance(inputs, (str, Document)):
        inputs = [inputs]
    for item in inputs:
        yield to_document(item)


def _longer_than(inputs: Inputs, batch_size: int) -> bool:
    try:
        return len(inputs) > batch_size  # type: ignore[arg-type]
    except TypeError:
        return True  # a generator: could be long

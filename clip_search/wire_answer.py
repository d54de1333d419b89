"""A shard's search answer that leaves as protobuf without being held twice (issue 26).

Jina sets an executor's answer into its request with ``CopyFrom(answer.to_protobuf())``
(``DataRequest._DataContent.set_docs_convert_arrays``), then serialises the request. Built the
usual way, the Python documents of every match (about 1 KB each beyond their bytes) are alive
beside two parsed messages: the answer's and the request's copy of it (upb holds a match in about
0.9 KB). A ``WireAnswer`` keeps each query as bytes once its matches are final, and ``install()``
makes Jina parse those bytes straight into the request, so the answer exists once. Jina has no
hook for it; ``tests/test_bounded_work.py`` fails if Jina stops setting answers this way.
"""

from __future__ import annotations

from typing import Optional

from docarray import Document, DocumentArray
from docarray.array.memory import DocumentArrayInMemory
from jina.types.request.data import DataRequest


class WireAnswer(DocumentArrayInMemory):
    """The queries of a search, each ``seal``-ed once its matches are final: serialised then (the
    bytes a client will receive, nothing more) and its Python matches dropped, so at most one query's
    match documents exist at a time. Its protobuf equals what ``DocumentArray.to_protobuf`` makes;
    only the in-process view differs (sealed queries have no ``matches``), which is why the shard
    answers this way only to Jina (``AnnLiteIndexer.serve_search``)."""

    def __init__(self, docs: DocumentArray):
        super().__init__()
        self.extend(docs)  # the same Document objects, not copies (``seal`` knows a query by identity)
        self._sealed: dict[int, bytes] = {}  # id(query) -> its serialised DocumentProto, matches included
        self._proto = None  # the message the answer was parsed into, once it was

    def seal(self, query: Document) -> None:
        """Serialise the query now and drop its Python matches (the bytes carry them)."""
        self._sealed[id(query)] = query.to_protobuf().SerializeToString()
        query.pop('matches')

    def write_into(self, message, ndarray_type: Optional[str] = None) -> None:
        """Make ``message`` (a ``DocumentArrayProto``, a request's own) what ``to_protobuf`` makes,
        parsing each sealed query's bytes into it and freeing them as it goes.

        The sealed queries were made with ``ndarray_type=None``, Jina's default ``output_array_type``
        (their matches carry no embedding; only the query's own may differ by type)."""
        if self._proto is not None:  # parsed already, and its bytes freed
            message.CopyFrom(self._proto)
            return
        message.Clear()
        for doc in self:
            sealed = self._sealed.pop(id(doc), None)
            if sealed is None:
                message.docs.append(doc.to_protobuf(ndarray_type))
            else:
                message.docs.add().MergeFromString(sealed)
                del sealed
        self._proto = message

    def to_protobuf(self, ndarray_type: Optional[str] = None):
        """What ``DocumentArray.to_protobuf`` makes of the answer (made once, then the same message)."""
        if self._proto is None:
            from docarray.proto.docarray_pb2 import DocumentArrayProto

            self.write_into(DocumentArrayProto(), ndarray_type)
        return self._proto


def install() -> None:
    """In this process, Jina sets a ``WireAnswer`` into its request by parsing it there, not by
    copying a parsed message; any other answer as before."""
    content = DataRequest._DataContent
    if getattr(content.set_docs_convert_arrays, 'writes_wire_answers', False):
        return
    jinas_own = content.set_docs_convert_arrays

    def set_docs_convert_arrays(self, value: DocumentArray, ndarray_type: Optional[str] = None) -> None:
        if not isinstance(value, WireAnswer):
            return jinas_own(self, value, ndarray_type)
        self._loaded_doc_array = None
        self._content.docs.SetInParent()  # present even when empty, as CopyFrom leaves it
        value.write_into(self._content.docs, ndarray_type)

    set_docs_convert_arrays.writes_wire_answers = True
    content.set_docs_convert_arrays = set_docs_convert_arrays

"""Turning a document's content into something the model can eat: a text or a PIL image.

docarray can load URIs too, but without a timeout for http(s) and with errors that do not say
which document failed; a search service needs both, so loading is done here.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_URI_TIMEOUT = 5.0  # seconds to connect to and read an http(s) image
MAX_IMAGE_BYTES = 50 * 2**20


class BadDocumentError(ValueError):
    """A document that cannot be encoded; the message names the document and the reason."""

    def __init__(self, doc_id: str, reason: str):
        super().__init__(f'document {doc_id!r}: {reason}')
        self.doc_id = doc_id
        self.reason = reason


def content_kind(doc, empty_as_text: bool = False) -> str:
    """Which modality a document carries: 'text', 'image' or 'embedding'; raise if none (or call it text)."""
    if doc.text:
        return 'text'
    if doc.blob or doc.tensor is not None or doc.uri:
        return 'image'
    if doc.embedding is not None:
        return 'embedding'
    if empty_as_text:
        return 'text'
    raise BadDocumentError(doc.id, 'it is empty (no text, uri, blob, tensor or embedding)')


def load_image(doc, timeout: float = DEFAULT_URI_TIMEOUT) -> Image.Image:
    """Return the document's image as RGB, from its tensor, blob or uri (in that order)."""
    if doc.tensor is not None:
        return _image_from_tensor(doc)
    data = doc.blob or _read_uri(doc, timeout)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        what = 'its blob' if doc.blob else f'uri {_short(doc.uri)}'
        raise BadDocumentError(doc.id, f'{what} is not a readable image ({exc})') from None
    return image.convert('RGB')


def _image_from_tensor(doc) -> Image.Image:
    array = np.asarray(doc.tensor)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise BadDocumentError(
            doc.id, f'its tensor of shape {array.shape} is not an image (H x W x 3 or H x W)'
        )
    if array.dtype != np.uint8:
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert('RGB')


def _read_uri(doc, timeout: float) -> bytes:
    uri = doc.uri
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme == 'data':
        return _read_data_uri(doc)
    _check_mime(doc)
    if scheme in ('http', 'https'):
        return _read_http(doc, timeout)
    if scheme in ('', 'file'):
        path = Path(urllib.parse.urlparse(uri).path if scheme == 'file' else uri).expanduser()
        if not path.is_file():
            raise BadDocumentError(doc.id, f'file {_short(uri)} does not exist')
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise BadDocumentError(doc.id, f'file {_short(uri)} is larger than {MAX_IMAGE_BYTES} bytes')
        return path.read_bytes()
    raise BadDocumentError(doc.id, f'uri scheme {scheme!r} is not supported (use a path, http(s) or data:)')


def _check_mime(doc) -> None:
    """Refuse a uri whose declared type is known and is not an image (e.g. .txt, .mp4)."""
    _refuse_non_image(doc, doc.mime_type or mimetypes.guess_type(urllib.parse.urlparse(doc.uri).path)[0])


def _refuse_non_image(doc, mime: str | None) -> None:
    if mime and not mime.startswith('image/'):
        raise BadDocumentError(doc.id, f'mime type {mime!r} is not supported (only images and text)')


def _read_data_uri(doc) -> bytes:
    try:
        return decode_data_uri(doc.uri)
    except ValueError as exc:
        raise BadDocumentError(doc.id, str(exc)) from None


def decode_data_uri(uri: str) -> bytes:
    """The bytes of an image ``data:`` URI (base64 or percent-encoded); ValueError says what is wrong."""
    header, sep, payload = uri.partition(',')
    if not sep:
        raise ValueError('data uri has no comma-separated payload')
    mime = header[5:].split(';')[0]
    if mime and not mime.startswith('image/'):
        raise ValueError(f'mime type {mime!r} is not supported (only images and text)')
    try:
        if header.endswith(';base64'):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except ValueError as exc:
        raise ValueError(f'data uri payload is not valid base64 ({exc})') from None


def _read_http(doc, timeout: float) -> bytes:
    request = urllib.request.Request(doc.uri, headers={'User-Agent': 'clip-search'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_IMAGE_BYTES + 1)
    except Exception as exc:  # URLError, HTTPError, timeouts, connection resets
        raise BadDocumentError(doc.id, f'uri {_short(doc.uri)} could not be fetched ({exc})') from None
    if len(data) > MAX_IMAGE_BYTES:
        raise BadDocumentError(doc.id, f'uri {_short(doc.uri)} is larger than {MAX_IMAGE_BYTES} bytes')
    return data


def _short(uri: str, limit: int = 80) -> str:
    return repr(uri if len(uri) <= limit else uri[: limit - 3] + '...')

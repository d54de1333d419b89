"""Turning a document's content into something the model can eat: a text or a PIL image.

docarray can load URIs too, but it opens any path and fetches any URL with no deadline, and its
errors do not say which document failed; a service that anyone on its port can call needs
bounds and names, so loading is done here, under a ``MediaPolicy``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import errno
import http.client
import io
import ipaddress
import mimetypes
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

DEFAULT_URI_TIMEOUT = 5.0  # seconds for a whole http(s) fetch: DNS, connect, headers and body
MAX_IMAGE_BYTES = 50 * 2**20  # bytes of one image file or download
MAX_IMAGE_PIXELS = 50_000_000  # pixels of one decoded image (150 MB as RGB); Pillow's own bomb check is at 179M
MAX_REDIRECTS = 5
# the decoders a request can reach; Pillow's others run external programs (EPS: Ghostscript) or are rarely vetted
IMAGE_FORMATS = ('JPEG', 'PNG', 'WEBP', 'GIF', 'BMP', 'TIFF')
# getaddrinfo has no timeout of its own: it runs here so that a fetch can stop waiting for it
_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix='clip-search-dns')


class BadDocumentError(ValueError):
    """A document that cannot be encoded; the message names the document and the reason."""

    def __init__(self, doc_id: str, reason: str):
        super().__init__(f'document {doc_id!r}: {reason}')
        self.doc_id = doc_id
        self.reason = reason


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read when a document names a uri instead of carrying its bytes.

    By default nothing: no path is opened and only public http(s) addresses are fetched.
    ``allow_paths`` are directories (resolved after symlinks) whose files may be read;
    ``allow_hosts`` are host names, IP addresses or networks (``10.0.0.0/8``) that may be fetched
    although they are loopback, private, link-local or unspecified.
    """

    allow_paths: tuple[Path, ...] = ()
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple = field(default=(), repr=False)
    uri_timeout: float = DEFAULT_URI_TIMEOUT

    @classmethod
    def create(
        cls, allow_paths: Iterable[str] = (), allow_hosts: Iterable[str] = (), uri_timeout: float = DEFAULT_URI_TIMEOUT
    ) -> 'MediaPolicy':
        """A policy from the settings as the YAML or the command line give them."""
        hosts, networks = set(), []
        for host in allow_hosts or ():
            try:
                networks.append(ipaddress.ip_network(str(host).strip('[]'), strict=False))
            except ValueError:
                hosts.add(str(host).lower().rstrip('.'))
        paths = tuple(Path(p).expanduser().resolve() for p in allow_paths or ())
        return cls(paths, frozenset(hosts), tuple(networks), float(uri_timeout))

    def allows_path(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.allow_paths)

    def allows_address(self, host: str, address: str) -> bool:
        """Whether ``host``, resolved to ``address``, may be fetched: public, or allowed by name or network.

        An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4, Teredo ...) is judged by the IPv4
        address(es) it carries: 64:ff9b::7f00:1 reaches 127.0.0.1 through a NAT64 gateway.
        """
        ip = ipaddress.ip_address(address.split('%')[0])
        if self._allows_by_setting(host, ip):
            return True
        if ip.version == 6:
            carried = embedded_ipv4(ip)
            if carried is not None:
                return bool(carried) and all(self.allows_address(host, str(inner)) for inner in carried)
        return is_public_address(ip)

    def _allows_by_setting(self, host: str, ip) -> bool:
        return host.lower().rstrip('.') in self.allow_hosts or any(ip in net for net in self.allow_networks)


# IPv6 forms that carry an IPv4 address. ipaddress knows the mapped, 6to4 and Teredo ones, yet calls
# NAT64, IPv4-compatible and ::ffff:0:a.b.c.d addresses global whatever IPv4 address they carry.
_NAT64 = ipaddress.ip_network('64:ff9b::/96')  # RFC 6052 well-known prefix: the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network('64:ff9b:1::/48')  # RFC 8215, local use only: never public
_IPV4_COMPATIBLE = ipaddress.ip_network('::/96')  # ::a.b.c.d (deprecated, still routed by some stacks)
_IPV4_TRANSLATED = ipaddress.ip_network('::ffff:0:0:0/96')  # ::ffff:0:a.b.c.d (SIIT, RFC 2765)
_SITE_LOCAL = ipaddress.ip_network('fec0::/10')  # deprecated, still private where used


def embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[tuple]:
    """The IPv4 addresses an IPv6 address carries (both of a Teredo one); () to refuse it; None if it carries none."""
    if ip in _NAT64_LOCAL:
        return ()
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED:
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo  # (server, client): the client's is the last 32 bits inverted
    return None


def is_public_address(ip) -> bool:
    """Global unicast, and not IPv6 site-local (which Python's ipaddress calls global)."""
    return ip.is_global and not ip.is_multicast and not (ip.version == 6 and ip in _SITE_LOCAL)


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


def load_image(doc, policy: MediaPolicy = MediaPolicy()) -> Image.Image:
    """Return the document's image as RGB, from its tensor, blob or uri (in that order).

    Every failure (a refused uri, a fetch, a file, a decoder, a decompression bomb) is a
    ``BadDocumentError`` naming the document.
    """
    if doc.tensor is not None:
        return _image_from_tensor(doc)
    data = doc.blob or _read_uri(doc, policy)
    try:
        return decode_image(data)
    except UnreadableImage as exc:
        what = 'its blob' if doc.blob else f'uri {_short(doc.uri)}'
        raise BadDocumentError(doc.id, f'{what} {exc}') from None


class UnreadableImage(ValueError):
    """Bytes that are no image the server decodes; the message says why (``is not a readable image ...``)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; refuse what Pillow cannot read and more than MAX_IMAGE_PIXELS."""
    image = open_image(data)
    try:
        image.load()
        return image.convert('RGB')
    except Exception as exc:  # truncated data, a decoder error, memory
        raise UnreadableImage(f'is not a readable image ({type(exc).__name__}: {exc})') from None


def open_image(data: bytes) -> Image.Image:
    """Read an image's header with the decoders of IMAGE_FORMATS only; refuse more than MAX_IMAGE_PIXELS."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # the header only: the size before any pixel
        width, height = image.size
    except Image.DecompressionBombError as exc:  # sizes Pillow refuses before ours is checked
        raise UnreadableImage(f'is an image of too many pixels ({exc})') from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(unidentified_reason(data)) from None
    except Exception as exc:  # a truncated header: refused, never a traceback
        raise UnreadableImage(f'is not a readable image ({exc})') from None
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f'is an image of {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} the server decodes')
    return image


def unidentified_reason(data: bytes) -> str:
    """Why bytes no allowed decoder reads are refused: a known document format is named, never decoded."""
    known = _sniffed_format(data)
    if known is None:
        return 'is not a readable image (no image format recognised)'
    return (
        f'is not a readable image: {known} is not a supported image format '
        f'(the server decodes {", ".join(IMAGE_FORMATS[:-1])} and {IMAGE_FORMATS[-1]})'
    )


def _sniffed_format(data: bytes) -> Optional[str]:
    """The format Pillow's other plugins recognise by their signature check alone (no decoder runs), or PDF."""
    if data[:5] == b'%PDF-':  # Pillow writes PDF but has no reader for it
        return 'PDF'
    Image.init()
    prefix = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        if name in IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # a plugin's check that wants more bytes: not its format
            continue
    return None


def jpeg_thumbnail(image: Image.Image, size: int) -> bytes:
    """A JPEG of at most ``size`` pixels a side (about 4 KB at 128): what the index keeps of an image's bytes."""
    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format='JPEG', quality=85)
    return buffer.getvalue()


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
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise BadDocumentError(doc.id, f'its tensor of shape {array.shape} has more than {MAX_IMAGE_PIXELS} pixels')
    if array.dtype != np.uint8:
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert('RGB')


def _read_uri(doc, policy: MediaPolicy) -> bytes:
    uri = doc.uri
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme == 'data':
        return _read_data_uri(doc)
    _check_mime(doc)
    if scheme in ('http', 'https'):
        return _read_http(doc, policy)
    if scheme in ('', 'file'):
        return _read_path(doc, urllib.parse.unquote(urllib.parse.urlparse(uri).path) if scheme == 'file' else uri, policy)
    raise BadDocumentError(doc.id, f'uri scheme {scheme!r} is not supported (use a path, http(s) or data:)')


def _read_path(doc, path_text: str, policy: MediaPolicy) -> bytes:
    """A regular file under an allowed directory, checked by name before it is opened and as opened after.

    The name is resolved and checked, then opened without following a symlink in its last part and
    without waiting (a FIFO opens at once and is refused); what was opened is checked again, so a
    link swapped in between (of the file or of a directory above it) cannot lead out.
    """
    path = Path(path_text).expanduser().resolve()  # after symlinks: a link cannot lead out of an allowed directory
    if not policy.allows_path(path):
        raise BadDocumentError(doc.id, _outside_allowed_paths(doc))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    except FileNotFoundError:
        raise BadDocumentError(doc.id, f'file {_short(doc.uri)} does not exist') from None
    except OSError as exc:  # ELOOP: the last part became a symlink; permission denied; an I/O error
        if exc.errno == errno.ELOOP:
            raise BadDocumentError(doc.id, f'file {_short(doc.uri)} is a symbolic link that changed while it was opened') from None
        raise BadDocumentError(doc.id, f'file {_short(doc.uri)} cannot be read ({exc.strerror or exc})') from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a FIFO, a device, a directory
        os.close(fd)
        raise BadDocumentError(doc.id, f'file {_short(doc.uri)} is not a regular file')
    with open(fd, 'rb', closefd=True) as file:
        opened = _opened_path(fd, info, path_text)
        if opened is None or not policy.allows_path(opened):
            raise BadDocumentError(doc.id, _outside_allowed_paths(doc))
        if info.st_size > MAX_IMAGE_BYTES:
            raise BadDocumentError(doc.id, f'file {_short(doc.uri)} is larger than {MAX_IMAGE_BYTES} bytes')
        try:
            return file.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:  # an I/O error
            raise BadDocumentError(doc.id, f'file {_short(doc.uri)} cannot be read ({exc.strerror or exc})') from None


def _opened_path(fd: int, info: os.stat_result, path_text: str) -> Optional[Path]:
    """Where the open file really is: /proc's link of the descriptor, or else the name resolved again if it
    is still the very file opened (same device and inode); None when it is not."""
    try:
        return Path(os.readlink(f'/proc/self/fd/{fd}'))
    except OSError:  # no /proc (macOS)
        pass
    path = Path(path_text).expanduser().resolve()
    try:
        now = os.stat(path)
    except OSError:
        return None
    return path if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino) else None


def _outside_allowed_paths(doc) -> str:
    return (
        f'uri {_short(doc.uri)} is a path on the server, which opens no path a request names: send the '
        f'image bytes (clip_search.Client and clip_client send local files so), or start the service '
        f'with --allow-path DIR to let it read files under DIR'
    )


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


# -- http(s) ------------------------------------------------------------------------------------
# urllib resolves and connects by itself (no check of the address it reaches, redirects included)
# and its timeout bounds each socket read, not the fetch: hence http.client on a checked address.


class _FetchError(Exception):
    """A fetch failed; the text is what the user is told."""


class _DeadlinePassed(_FetchError):
    """The fetch did not end within ``uri_timeout``."""


class _BlockedHost(Exception):
    """The host resolves to an address the policy does not allow."""


def _read_http(doc, policy: MediaPolicy) -> bytes:
    """The body of an http(s) uri, within ``uri_timeout`` in total, at most MAX_IMAGE_BYTES."""
    deadline = time.monotonic() + policy.uri_timeout
    url = doc.uri
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = _fetch_once(url, policy, deadline)
            if location is None:
                if status != 200:
                    raise _FetchError(f'the server answered HTTP {status}')
                return body
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme.lower() not in ('http', 'https'):
                raise _FetchError(f'it redirects to a {urllib.parse.urlsplit(url).scheme!r} uri')
        raise _FetchError(f'it redirects more than {MAX_REDIRECTS} times')
    except _BlockedHost:
        # the same text whatever the host would have done: it is never contacted
        raise BadDocumentError(
            doc.id,
            f'uri {_short(doc.uri)} was not fetched: the server fetches only public addresses, and this one '
            f'(or a redirect of it) is loopback, private, link-local or unspecified; start the service with '
            f'--allow-host HOST to allow such a host',
        ) from None
    except _DeadlinePassed:
        raise BadDocumentError(
            doc.id, f'uri {_short(doc.uri)} could not be fetched (it took longer than uri_timeout={policy.uri_timeout:g} s)'
        ) from None
    except _FetchError as exc:
        raise BadDocumentError(doc.id, f'uri {_short(doc.uri)} could not be fetched ({exc})') from None


def _fetch_once(url: str, policy: MediaPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One request: (status, redirect location or None, body of a 200)."""
    parts = urllib.parse.urlsplit(url)
    host, https = parts.hostname or '', parts.scheme.lower() == 'https'
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        raise _FetchError('its port is not a number') from None
    address = _resolve(host, port, policy, deadline)
    connection_class = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    connection = connection_class(host, port, address, timeout=_remaining(deadline))
    # a watchdog ends the fetch at the deadline, however slowly the host drips its bytes
    watchdog = threading.Timer(_remaining(deadline), _abort, args=(connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        path = parts.path or '/'
        connection.request('GET', path + (f'?{parts.query}' if parts.query else ''), headers={'User-Agent': 'clip-search'})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader('Location'):
            return response.status, response.getheader('Location'), b''
        if response.status != 200:
            return response.status, None, b''
        return 200, None, _read_body(response, connection, deadline)
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        if time.monotonic() >= deadline:
            raise _DeadlinePassed() from None
        raise _FetchError(str(exc) or type(exc).__name__) from None
    finally:
        watchdog.cancel()
        connection.close()


def _read_body(response, connection, deadline: float) -> bytes:
    length = response.getheader('Content-Length')
    if length and length.strip().isdigit() and int(length) > MAX_IMAGE_BYTES:
        raise _FetchError(f'it is larger than {MAX_IMAGE_BYTES} bytes ({int(length)})')
    chunks, total = [], 0
    while True:
        connection.raw_sock.settimeout(_remaining(deadline))
        chunk = response.read1(2**16)
        if not chunk:
            if time.monotonic() >= deadline:  # the watchdog's shutdown reads as an end of file
                raise _DeadlinePassed()
            return b''.join(chunks)
        total += len(chunk)
        if total > MAX_IMAGE_BYTES:
            raise _FetchError(f'it is larger than {MAX_IMAGE_BYTES} bytes')
        chunks.append(chunk)


def _resolve(host: str, port: int, policy: MediaPolicy, deadline: float) -> str:
    """The address to connect to: every address of the host must be allowed (no pick of a private one)."""
    if not host:
        raise _FetchError('it has no host')
    lookup = _DNS_POOL.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=_remaining(deadline))
    except concurrent.futures.TimeoutError:
        raise _DeadlinePassed() from None
    except OSError as exc:
        raise _FetchError(f'its host name does not resolve ({exc.strerror or exc})') from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not all(policy.allows_address(host, address) for address in addresses):
        raise _BlockedHost(host)
    return addresses[0]


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _DeadlinePassed()
    return remaining


def _abort(connection) -> None:
    """Unblock any read or handshake on the connection's socket (a close alone would not wake it)."""
    sock = connection.raw_sock  # http.client drops .sock once a closing response is under way
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Pinned:
    """An HTTP(S) connection to an address checked beforehand (no second DNS lookup to rebind)."""

    raw_sock = None

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def _connect_to_checked_address(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPConnection(_Pinned, http.client.HTTPConnection):
    def connect(self) -> None:
        self._connect_to_checked_address()


class _PinnedHTTPSConnection(_Pinned, http.client.HTTPSConnection):
    """The certificate is checked against the host name, as usual."""

    def connect(self) -> None:
        self._connect_to_checked_address()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def _short(uri: str, limit: int = 80) -> str:
    return repr(uri if len(uri) <= limit else uri[: limit - 3] + '...')

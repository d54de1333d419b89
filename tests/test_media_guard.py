"""What a document's uri or bytes can make the server reach, in-process and without a Flow.

The SSRF guard is driven through a resolver stub (``socket.getaddrinfo`` answering what a hostile
DNS record would), the decoders with files made here, the path checks with a symlink or a FIFO
swapped in between the check and the open.
"""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest
from docarray import Document
from PIL import Image

from clip_search import media
from clip_search.media import BadDocumentError, MediaPolicy, load_image
from conftest import png_bytes

BLOCKED = (
    "document 'hostile': uri 'http://hostile.example/x.png' was not fetched: the server fetches only public "
    "addresses, and this one (or a redirect of it) is loopback, private, link-local or unspecified; start the "
    "service with --allow-host HOST to allow such a host"
)

# every IPv6 form that carries 127.0.0.1 (or a private IPv4 address), and site-local
HOSTILE_ADDRESSES = {
    'IPv4-mapped': '::ffff:127.0.0.1',
    'IPv4-compatible': '::127.0.0.1',
    'IPv4-translated': '::ffff:0:7f00:1',
    'NAT64 well-known prefix': '64:ff9b::7f00:1',
    'NAT64 to a private address': '64:ff9b::a01:203',  # 10.1.2.3
    'NAT64 local-use prefix': '64:ff9b:1::8.8.8.8',
    '6to4': '2002:7f00:1::',
    '6to4 of a private address': '2002:c0a8:101::1',  # 192.168.1.1
    'Teredo client': '2001:0:4136:e378:8000:63bf:80ff:fffe',  # client 127.0.0.1 (inverted bits), server public
    'Teredo server': '2001:0:a01:203:8000:63bf:f7f7:f7f7',  # server 10.1.2.3, client 8.8.8.8
    'site-local': 'fec0::1',
    'loopback': '::1',
}


def resolving_to(monkeypatch, address: str) -> None:
    """Every host name resolves to ``address`` alone, as a hostile DNS answer would make it."""
    family = socket.AF_INET6 if ':' in address else socket.AF_INET

    def getaddrinfo(host, port, *args, **kwargs):
        return [(family, socket.SOCK_STREAM, 6, '', (address, port) if family == socket.AF_INET else (address, port, 0, 0))]

    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)


@pytest.mark.parametrize('address', HOSTILE_ADDRESSES.values(), ids=HOSTILE_ADDRESSES.keys())
def test_an_ipv6_address_carrying_a_private_ipv4_one_is_never_contacted(monkeypatch, address):
    resolving_to(monkeypatch, address)
    monkeypatch.setattr(socket, 'create_connection', lambda *a, **k: pytest.fail(f'{address} was contacted'))
    with pytest.raises(BadDocumentError) as refused:
        load_image(Document(id='hostile', uri='http://hostile.example/x.png'), MediaPolicy())
    assert str(refused.value) == BLOCKED


@pytest.mark.parametrize(
    'address', ['::ffff:8.8.8.8', '64:ff9b::808:808', '2002:808:808::1', '2606:4700:4700::1111', '8.8.8.8']
)
def test_an_address_carrying_a_public_ipv4_one_passes_the_guard(monkeypatch, address):
    resolving_to(monkeypatch, address)
    assert media._resolve('public.example', 80, MediaPolicy(), time.monotonic() + 5) == address


def test_the_carried_ipv4_address_is_judged_by_the_allow_list_too(monkeypatch):
    resolving_to(monkeypatch, '64:ff9b::7f00:1')
    allowed = MediaPolicy.create(allow_hosts=['127.0.0.1'])
    assert media._resolve('hostile.example', 80, allowed, time.monotonic() + 5) == '64:ff9b::7f00:1'
    assert MediaPolicy.create(allow_hosts=['fec0::/10']).allows_address('any.example', 'fec0::1')


def eps_bytes() -> bytes:
    """An EPS file as Pillow writes it (no Ghostscript needed to write one; opening it would run gs)."""
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8), 'red').save(buffer, format='EPS')
    assert buffer.getvalue().startswith(b'%!PS-Adobe-3.0 EPSF-3.0')
    return buffer.getvalue()


def psd_header() -> bytes:
    """The start of a Photoshop file: signature, version 1, 3 channels of 8x8 at 8 bits, RGB."""
    return b'8BPS' + (1).to_bytes(2, 'big') + bytes(6) + (3).to_bytes(2, 'big') + (8).to_bytes(4, 'big') * 2 + (8).to_bytes(2, 'big') + (3).to_bytes(2, 'big')


SUPPORTED = '(the server decodes JPEG, PNG, WEBP, GIF, BMP and TIFF)'


@pytest.mark.parametrize(
    'data, expected',
    [
        (eps_bytes, f"document 'doc': its blob is not a readable image: EPS is not a supported image format {SUPPORTED}"),
        (lambda: b'%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj', f"document 'doc': its blob is not a readable image: PDF is not a supported image format {SUPPORTED}"),
        (psd_header, f"document 'doc': its blob is not a readable image: PSD is not a supported image format {SUPPORTED}"),
        (lambda: b'plain words, no image', "document 'doc': its blob is not a readable image (no image format recognised)"),
    ],
    ids=['eps', 'pdf', 'psd', 'text'],
)
def test_documents_of_other_formats_are_refused_without_decoding(monkeypatch, data, expected):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, 'Ghostscript', lambda *a, **k: pytest.fail('Ghostscript ran'))
    with pytest.raises(BadDocumentError) as refused:
        load_image(Document(id='doc', blob=data()), MediaPolicy())
    assert str(refused.value) == expected


@pytest.mark.parametrize('image_format', media.IMAGE_FORMATS)
def test_every_supported_format_decodes(image_format):
    buffer = io.BytesIO()
    Image.new('RGB', (9, 7), 'blue').save(buffer, format=image_format)
    assert load_image(Document(id='ok', blob=buffer.getvalue()), MediaPolicy()).size == (9, 7)


@pytest.fixture
def allowed(tmp_path):
    """An allowed directory with an image in a sub-directory, and a secret image outside it."""
    inside, outside = tmp_path / 'allowed', tmp_path / 'outside'
    (inside / 'sub').mkdir(parents=True)
    outside.mkdir()
    (inside / 'sub' / 'image.png').write_bytes(png_bytes(1))
    (outside / 'image.png').write_bytes(png_bytes(2))
    (outside / 'secret.png').write_bytes(png_bytes(2))
    return inside, outside, MediaPolicy.create(allow_paths=[inside])


def swapped_before_open(monkeypatch, swap) -> None:
    """Run ``swap()`` after the path is checked, just before it is opened (the race an attacker would win)."""
    real_open = os.open

    def open_after_swap(path, flags, *args, **kwargs):
        swap()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(media.os, 'open', open_after_swap)


def test_a_file_under_an_allowed_directory_is_read(allowed):
    inside, _outside, policy = allowed
    image = load_image(Document(id='ok', uri=str(inside / 'sub' / 'image.png')), policy)
    assert image.size == (40, 40)


def test_a_symlink_swapped_in_for_the_file_is_refused(monkeypatch, allowed):
    inside, outside, policy = allowed
    target = inside / 'sub' / 'image.png'

    def swap():
        target.unlink()
        target.symlink_to(outside / 'secret.png')

    swapped_before_open(monkeypatch, swap)
    with pytest.raises(BadDocumentError) as refused:
        load_image(Document(id='swapped', uri=str(target)), policy)
    assert str(refused.value) == f"document 'swapped': file {media._short(str(target))} is a symbolic link that changed while it was opened"


def test_a_symlink_swapped_in_for_a_directory_above_is_refused(monkeypatch, allowed):
    inside, outside, policy = allowed
    target = inside / 'sub' / 'image.png'

    def swap():
        (inside / 'sub').rename(inside / 'moved')
        (inside / 'sub').symlink_to(outside)  # sub/image.png now names outside/image.png

    swapped_before_open(monkeypatch, swap)
    with pytest.raises(BadDocumentError) as refused:
        load_image(Document(id='swapped-dir', uri=str(target)), policy)
    assert str(refused.value) == f"document 'swapped-dir': {media._outside_allowed_paths(Document(uri=str(target)))}"


def test_without_proc_the_opened_file_must_be_the_one_the_name_resolves_to(monkeypatch, allowed):
    inside, outside, policy = allowed
    target = inside / 'sub' / 'image.png'
    real_readlink = os.readlink
    monkeypatch.setattr(media.os, 'readlink', lambda p: (_ for _ in ()).throw(OSError('no /proc')) if '/proc/' in str(p) else real_readlink(p))
    assert load_image(Document(id='ok', uri=str(target)), policy).size == (40, 40)

    def swap():
        (inside / 'sub').rename(inside / 'moved')
        (inside / 'sub').symlink_to(outside)

    swapped_before_open(monkeypatch, swap)
    with pytest.raises(BadDocumentError, match='is a path on the server'):
        load_image(Document(id='swapped-dir', uri=str(target)), policy)


def test_a_fifo_swapped_in_is_refused_without_waiting_for_a_writer(monkeypatch, allowed):
    inside, _outside, policy = allowed
    target = inside / 'sub' / 'image.png'

    def swap():
        target.unlink()
        os.mkfifo(target)

    swapped_before_open(monkeypatch, swap)
    started = time.monotonic()
    with pytest.raises(BadDocumentError) as refused:
        load_image(Document(id='fifo', uri=str(target)), policy)
    assert str(refused.value) == f"document 'fifo': file {media._short(str(target))} is not a regular file"
    assert time.monotonic() - started < 1


def test_a_directory_is_not_a_regular_file(allowed):
    inside, _outside, policy = allowed
    with pytest.raises(BadDocumentError) as refused:
        load_image(Document(id='dir', uri=str(inside / 'sub')), policy)
    assert str(refused.value) == f"document 'dir': file {media._short(str(inside / 'sub'))} is not a regular file"


def test_a_path_outside_is_refused_before_it_is_opened(monkeypatch, allowed):
    _inside, outside, policy = allowed
    monkeypatch.setattr(media.os, 'open', lambda *a, **k: pytest.fail('opened'))
    with pytest.raises(BadDocumentError, match='is a path on the server'):
        load_image(Document(id='out', uri=str(Path(outside) / 'secret.png')), policy)

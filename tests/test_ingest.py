"""``python -m clip_search index``: a folder with bad files and a table, refusals reported, kill -9 and --resume.

One Flow (2 shards, the card's YAML: /index polled ANY, where a resent document would be a second
copy) serves every test here; each test indexes ids of its own and counts by /status differences.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from clip_search.cli import main
from conftest import png_bytes
from helpers.service import start_service

COLORS, SHAPES = ['red', 'green', 'blue', 'yellow'], ['circle', 'square', 'triangle', 'star', 'heart']


@pytest.fixture(scope='module')
def service(tmp_path_factory, tiny_model):
    service = start_service(tiny_model, tmp_path_factory.mktemp('ingest') / 'workspace', shards=2)
    yield service
    service.stop()


def index_command(service, *args: str) -> list[str]:
    return [sys.executable, '-m', 'clip_search', 'index', *args, '--server', service.address, '--timeout', '60']


def run_index(service, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(index_command(service, *args), cwd=cwd, capture_output=True, text=True, timeout=300)


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: a few kB that decode to 60 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    rows = zlib.compress(bytes(height * (1 + (width + 7) // 8)), 9)
    header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', rows) + chunk(b'IEND', b'')


def image_folder(root: Path, count: int, prefix: str) -> list[str]:
    """``count`` small PNGs, a third of them in subfolders; their ids (paths relative to ``root``)."""
    ids = []
    for i in range(count):
        rel = f'{["", "sub/", "sub/deeper/"][i % 3]}{prefix}-{i:04d}.png'
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(10_000 + i, size=16))
        ids.append(rel)
    return ids


def test_a_folder_with_bad_files_and_a_table_of_texts_index_all_good_documents_once(service, tmp_path):
    client = service.client()
    before = client.status()['documents']
    photos = tmp_path / 'photos'
    good_images = image_folder(photos, 295, 'photo')
    for name in ('corrupt-1.jpg', 'sub/corrupt-2.png', 'sub/deeper/corrupt-3.jpeg', 'truncated.png'):
        data = b'not an image at all' if 'corrupt' in name else png_bytes(1, size=64)[:60]
        (photos / name).write_bytes(data)
    (photos / 'sub' / 'bomb.png').write_bytes(png_declaring(10_000, 6_000))
    (photos / 'notes.md').write_text('not an image, not a text document: skipped')
    (photos / 'sub' / 'caption.txt').write_text('skipped too: no --texts')
    with (tmp_path / 'captions.csv').open('w', newline='') as file:
        writer = csv.writer(file)
        writer.writerow(['key', 'caption', 'color', 'shape'])
        for i in range(200):
            color, shape = COLORS[i % 4], SHAPES[i % 5]
            writer.writerow([f'caption-{i}', f'a {color} {shape}, number {i}', color, shape])

    ran = run_index(
        service, 'photos', 'captions.csv', '--text-column', 'caption', '--id-column', 'key',
        '--tag-columns', 'color,shape', '--failures', 'out/failures.jsonl', cwd=tmp_path,
    )  # fmt: skip

    assert ran.returncode == 1, ran.stderr
    assert re.fullmatch(
        r'indexed 495 of 500 \(5 refused: see out/failures.jsonl\) in \d+ m \d+ s, \d+ docs/s; 2 other files skipped\n',
        ran.stdout,
    ), ran.stdout + ran.stderr
    failures = {f['id']: f for f in map(json.loads, (tmp_path / 'out' / 'failures.jsonl').read_text().splitlines())}
    assert sorted(failures) == ['corrupt-1.jpg', 'sub/bomb.png', 'sub/corrupt-2.png', 'sub/deeper/corrupt-3.jpeg', 'truncated.png']
    assert failures['sub/bomb.png'] == {
        'source': 'photos: sub/bomb.png',
        'id': 'sub/bomb.png',
        'reason': "BadDocumentError: document 'sub/bomb.png': its blob is an image of 10000x6000 pixels, "
        'more than the 50000000 the server decodes',
    }
    assert failures['corrupt-1.jpg']['reason'].startswith("BadDocumentError: document 'corrupt-1.jpg': its blob is not a readable image (")
    assert client.status()['documents'] - before == 495  # every good document once
    good = good_images + [f'caption-{i}' for i in range(200)]
    assert client.indexed(good) == good
    found = client.search(['a red circle'], limit=5, filter={'shape': {'$eq': 'star'}})[0].matches
    assert len(found) == 5 and {m.tags['shape'] for m in found} == {'star'}


def test_ctrl_c_then_kill_9_mid_run_then_resume_stores_every_image_exactly_once(service, tmp_path):
    """A folder of 2,000 images: Ctrl-C, then kill -9 of the client mid-run, then --resume stores each once."""
    client = service.client()
    before = client.status()['documents']
    ids = image_folder(tmp_path / 'album', 2000, 'album')
    args = ('album', '--failures', 'run/failures.jsonl', '--batch-size', '8')
    checkpoint = tmp_path / 'run' / 'failures.checkpoint'

    interrupted = start_index_until_acked(service, args, tmp_path, checkpoint, batches=5)
    interrupted.send_signal(signal.SIGINT)  # Ctrl-C: stop reading, let the batches in flight be answered
    out, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err
    assert err.decode().endswith(
        'clip-search index: stopped by Ctrl-C after the batches in flight were answered; '
        'run the same command with --resume to continue where it stopped\n'
    )
    stored = client.status()['documents'] - before
    assert 0 < stored < 2000 and len(acked_ids(checkpoint)) == stored  # nothing stored that is not checkpointed

    killed = start_index_until_acked(service, (*args, '--resume'), tmp_path, checkpoint, batches=5)
    killed.kill()  # kill -9: the batches in flight may be stored, unacknowledged
    killed.wait()
    assert stored < client.status()['documents'] - before < 2000

    ran = run_index(service, *args, '--resume', cwd=tmp_path)

    assert ran.returncode == 0, ran.stderr
    assert re.fullmatch(r'indexed 2,000 of 2,000 in \d+ m \d+ s, \d+ docs/s; \d+ of them before --resume\n', ran.stdout), ran.stdout
    assert client.status()['documents'] - before == 2000  # exactly one copy of each
    assert client.indexed(ids) == ids


def start_index_until_acked(service, args, cwd: Path, checkpoint: Path, batches: int) -> subprocess.Popen:
    """Start the command and return once ``batches`` more batches are acknowledged in its checkpoint."""
    known = len(acked_ids(checkpoint))
    process = subprocess.Popen(index_command(service, *args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(acked_ids(checkpoint)) < known + 8 * batches:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


def acked_ids(checkpoint: Path) -> set[str]:
    try:
        lines = checkpoint.read_text().splitlines()
    except OSError:
        return set()
    return {i for line in lines if line.endswith('}') for i in json.loads(line).get('acked', ())}


def test_resume_asks_the_server_about_batches_sent_but_never_acknowledged(service, tmp_path, monkeypatch, capsys):
    """A batch may be stored although the client died before the answer: --resume sends only what is missing."""
    monkeypatch.chdir(tmp_path)
    client = service.client()
    before = client.status()['documents']
    ids = image_folder(tmp_path / 'shots', 30, 'shot')
    (tmp_path / 'run').mkdir()
    client.index([_image_doc(tmp_path / 'shots', i) for i in ids[:20]])  # stored, but the client never heard it
    (tmp_path / 'run' / 'failures.checkpoint').write_text(
        json.dumps({'acked': []}) + '\n' + json.dumps({'sent': ids[:25]}) + '\n{"acked": ["sho'  # cut by the kill
    )
    assert main(['index', 'shots', '--failures', 'run/failures.jsonl', '--resume', '--server', service.address]) == 0
    out, err = capsys.readouterr()
    assert out.startswith('indexed 30 of 30 in ') and out.endswith('; 20 of them before --resume\n'), out + err
    assert client.status()['documents'] - before == 30
    assert client.indexed(['shot-never-made.png', ids[3], 'shot-missing.png']) == [ids[3]]  # the lookup --resume uses


def test_a_missing_source_a_missing_column_and_an_unreachable_server_are_one_line_errors(service, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'table.csv').write_text('url,caption\nx.png,a text\n')
    cases = {
        ('nowhere',): 'clip-search index: nowhere: no such file or folder\n',
        ('table.csv', '--text-column', 'text'): "clip-search index: table.csv has no column 'text' (its columns: url, caption)\n",
        ('table.csv',): 'clip-search index: table.csv: a table needs --uri-column or --text-column\n',
    }
    for args, error in cases.items():
        assert main(['index', *args, '--server', service.address]) == 2
        assert capsys.readouterr() == ('', error), args
    assert main(['index', 'table.csv', '--text-column', 'caption', '--server', 'grpc://127.0.0.1:9']) == 2
    out, err = capsys.readouterr()
    assert out == '' and err.startswith('clip-search index: cannot reach the server at grpc://127.0.0.1:9: ') and err.count('\n') == 1


def test_search_status_and_delete_from_the_shell(service, tmp_path, monkeypatch, capsys):
    from docarray import Document

    monkeypatch.chdir(tmp_path)
    client = service.client()
    client.index([
        Document(id='shell-red', text='a red circle typed in a shell', tags={'color': 'red'}),
        Document(id='shell-blue', text='a blue square typed in a shell', tags={'color': 'blue'}),
    ])  # fmt: skip

    def command(*args: str) -> tuple[int, str, str]:
        code = main([*args, '--server', service.address, '--timeout', '30'])
        return (code, *capsys.readouterr())

    code, out, err = command('search', 'a red circle typed in a shell', '--limit', '1', '--json')
    assert code == 0, err
    (match,) = json.loads(out)
    assert (match['id'], match['text'], match['tags']) == ('shell-red', 'a red circle typed in a shell', {'color': 'red'})
    assert match['distance'] == pytest.approx(0.0, abs=1e-5)
    code, out, err = command('search', 'a red circle typed in a shell', '--limit', '1', '--filter', '{"color": {"$eq": "blue"}}')
    assert re.fullmatch(r"'a red circle typed in a shell':\n    0\.\d{3}  a blue square typed in a shell\n", out), out + err
    code, out, err = command('status', '--json')
    assert json.loads(out) == client.status()
    (tmp_path / 'ids.txt').write_text('shell-blue\nshell-never-indexed\n')
    assert command('delete', 'shell-red', '--from', 'ids.txt') == (0, 'deleted 2 of 3 ids (1 were not indexed)\n', '')
    assert client.indexed(['shell-red', 'shell-blue']) == []
    code, out, err = command('search', 'x', '--filter', '{"color": ')
    assert (code, out) == (2, '')
    assert err.startswith('clip-search search: --filter is not JSON (') and err.count('\n') == 1


def _image_doc(root: Path, rel: str):
    from docarray import Document

    return Document(id=rel, uri=str((root / rel).resolve()), blob=(root / rel).read_bytes())


def test_a_batch_of_large_photos_closes_at_its_byte_bound_not_its_count():
    from docarray import Document

    from clip_search.client import BATCH_BYTES, batches

    photos = [Document(id=f'p{i}', blob=bytes(BATCH_BYTES // 3)) for i in range(7)]  # a third of the bound each
    huge = Document(id='huge', blob=bytes(BATCH_BYTES + 1))  # alone, the server says whether it is too large
    ids = [b[:, 'id'] for b in batches(iter([*photos, huge, Document(id='t', text='a caption')]), batch_size=64)]
    assert ids == [['p0', 'p1', 'p2'], ['p3', 'p4', 'p5'], ['p6'], ['huge'], ['t']]


@pytest.mark.skipif(importlib.util.find_spec('pyarrow') is not None, reason='pyarrow is installed: Parquet is read')
def test_a_parquet_table_without_pyarrow_is_refused_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'captions.parquet').write_bytes(b'PAR1')  # never opened: the reader is missing
    assert main(['index', 'captions.parquet', '--text-column', 'caption', '--server', 'grpc://127.0.0.1:9']) == 2
    assert capsys.readouterr() == (
        '',
        'clip-search index: captions.parquet: reading Parquet needs pyarrow (pip install "clip-search[parquet]")\n',
    )

"""What ``python -m clip_search index`` reads: folders, files, globs, tables and stdin, as lazy entries.

A source yields ``Entry``s (a stable id, where it came from, and how to load its Document); nothing
is read until the entry is loaded, and ``load_ahead`` loads a few at a time in a small thread pool.
Ids are stable, so a second run names the same documents: the path relative to the folder (or the
glob's base), the path as given for a file, the URL or id column of a table row, the line on stdin.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import mimetypes
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from docarray import Document

TABLE_SUFFIXES = ('.csv', '.tsv', '.jsonl', '.parquet')


class SourceError(ValueError):
    """A source cannot be read at all (missing, a table without the named column): the run cannot start."""


@dataclass(frozen=True)
class Columns:
    """Which table columns make a document: its image (uri), its text, its tags and its id."""

    uri: Optional[str] = None
    text: Optional[str] = None
    tags: tuple[str, ...] = ()
    id: Optional[str] = None

    def named(self) -> list[str]:
        return [c for c in (self.uri, self.text, *self.tags, self.id) if c]


@dataclass(frozen=True)
class Entry:
    """One document to be: ``load()`` reads it (raising ``OSError``/``ValueError`` when it cannot)."""

    source: str
    id: str
    load: Callable[[], Document] = field(compare=False, repr=False)


@dataclass
class Tally:
    """What the sources passed over: files that are neither images nor (with ``--texts``) texts."""

    skipped: int = 0


@dataclass
class Failure:
    """An entry that could not be loaded here; it is reported like a document the server refused."""

    source: str
    id: str
    reason: str


def entries(sources: Iterable[str], columns: Columns, texts: bool, tally: Tally, stdin=sys.stdin) -> Iterator[Entry]:
    """Every source's entries, one source after another; ``check_sources`` first for an error before the run."""
    for source in sources:
        yield from _entries_of(source, columns, texts, tally, stdin)


def check_sources(sources: Iterable[str], columns: Columns) -> None:
    """Raise ``SourceError`` naming the first source that cannot be read, or a column a table lacks."""
    for source in sources:
        if source == '-':
            continue
        if glob.has_magic(source):
            if not glob.glob(source, recursive=True):
                raise SourceError(f'{source}: no file matches')
            continue
        path = Path(source)
        if not path.exists():
            raise SourceError(f'{source}: no such file or folder')
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            if not (columns.uri or columns.text):
                raise SourceError(f'{source}: a table needs --uri-column or --text-column')
            missing = [c for c in columns.named() if c not in table_columns(path)]
            if missing:
                raise SourceError(
                    f'{source} has no column {", ".join(map(repr, missing))} (its columns: {", ".join(table_columns(path))})'
                )


def count_estimate(sources: Iterable[str]) -> Optional[int]:
    """About how many entries the sources give (files and table rows; skipped files included), for an ETA.

    None when a source is stdin. Reads names and lines only, not contents.
    """
    total = 0
    for source in sources:
        path = Path(source)
        if source == '-':
            return None
        if glob.has_magic(source):
            total += sum(1 for name in glob.iglob(source, recursive=True) if os.path.isfile(name))
        elif path.is_dir():
            total += sum(len(files) for _root, _dirs, files in os.walk(path))
        elif path.suffix.lower() == '.parquet':
            total += _parquet(path).metadata.num_rows
        elif path.suffix.lower() in TABLE_SUFFIXES:
            with path.open('rb') as file:
                lines = sum(1 for line in file if line.strip())
            total += lines - (path.suffix.lower() != '.jsonl')  # a CSV's header
        else:
            total += 1
    return total


def _entries_of(source: str, columns: Columns, texts: bool, tally: Tally, stdin) -> Iterator[Entry]:
    if source == '-':
        yield from _stdin_entries(stdin)
    elif glob.has_magic(source):
        base = _glob_base(source)
        for name in sorted(glob.iglob(source, recursive=True)):
            if Path(name).is_file():
                yield from _file_entries(Path(name), Path(name).relative_to(base).as_posix(), source, texts, tally)
    elif Path(source).is_dir():
        yield from _folder_entries(Path(source), texts, tally)
    elif Path(source).suffix.lower() in TABLE_SUFFIXES:
        yield from _table_entries(Path(source), columns)
    else:
        yield from _file_entries(Path(source), Path(source).as_posix(), source, texts, tally)


def _folder_entries(folder: Path, texts: bool, tally: Tally) -> Iterator[Entry]:
    """The folder's files, recursively, in a stable order; ids are paths relative to the folder."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            yield from _file_entries(path, path.relative_to(folder).as_posix(), str(folder), texts, tally)


def _file_entries(path: Path, doc_id: str, source: str, texts: bool, tally: Tally) -> Iterator[Entry]:
    """An image (by extension or content), a text (``.txt`` with ``texts``), else skipped and counted."""
    where = f'{source}: {doc_id}' if doc_id != source else source
    if texts and path.suffix.lower() == '.txt':
        yield Entry(where, doc_id, lambda: Document(id=doc_id, text=path.read_text(encoding='utf-8')))
    elif path.suffix.lower() in image_extensions() or _looks_like_an_image(path):
        yield Entry(where, doc_id, lambda: _image_document(doc_id, path))
    else:
        tally.skipped += 1


def _image_document(doc_id: str, path: Path) -> Document:
    """The bytes are sent, the path kept for display; the server decodes (and refuses what does not)."""
    mime = mimetypes.guess_type(path.name)[0] or 'image/*'
    return Document(id=doc_id, uri=str(path.resolve()), blob=path.read_bytes(), mime_type=mime)


def image_extensions() -> frozenset[str]:
    """The extensions Pillow decodes (the encoder decodes with Pillow)."""
    global _IMAGE_EXTENSIONS
    if _IMAGE_EXTENSIONS is None:
        from PIL import Image

        Image.init()
        _IMAGE_EXTENSIONS = frozenset(ext for ext in Image.registered_extensions() if ext not in ('.pdf', '.eps', '.ps'))
    return _IMAGE_EXTENSIONS


_IMAGE_EXTENSIONS: Optional[frozenset[str]] = None


def _looks_like_an_image(path: Path) -> bool:
    """Whether Pillow recognises the file's header (it reads the header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ids are relative to it."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path('.')


def _stdin_entries(stdin) -> Iterator[Entry]:
    """Each non-empty line is a document: an image path or URL (by extension), else a text; the line is its id."""
    from clip_search.client import to_document

    for number, line in enumerate(stdin, 1):
        line = line.rstrip('\r\n')
        if line.strip():
            yield Entry(f'-: line {number}', line, lambda line=line: _with_id(to_document(line), line))


def _with_id(doc: Document, doc_id: str) -> Document:
    doc.id = doc_id
    return doc


# -- tables ------------------------------------------------------------------------------------


def table_columns(path: Path) -> list[str]:
    """The column names of a CSV/TSV (its header), JSONL (its first row) or Parquet table."""
    suffix = path.suffix.lower()
    if suffix == '.parquet':
        return list(_parquet(path).schema_arrow.names)
    with path.open(newline='', encoding='utf-8') as file:
        if suffix == '.jsonl':
            first = next((line for line in file if line.strip()), '{}')
            return list(json.loads(first))
        return next(csv.reader(file, delimiter='\t' if suffix == '.tsv' else ','), [])


def _table_entries(path: Path, columns: Columns) -> Iterator[Entry]:
    for number, row in enumerate(_rows(path), 1):
        yield _row_entry(path, number, row, columns)


def _rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == '.parquet':
        for batch in _parquet(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with path.open(newline='', encoding='utf-8') as file:
        if suffix == '.jsonl':
            yield from (json.loads(line) for line in file if line.strip())
        else:
            yield from csv.DictReader(file, delimiter='\t' if suffix == '.tsv' else ',')


def _row_entry(path: Path, number: int, row: dict, columns: Columns) -> Entry:
    uri = _cell(row, columns.uri)
    doc_id = _cell(row, columns.id) or uri or f'{path.name}:{number}'
    where = f'{path}: row {number}'

    def load() -> Document:
        tags = {name: row[name] for name in columns.tags if row.get(name) not in (None, '')}
        if uri:
            local = Path(uri) if Path(uri).is_absolute() else path.parent / uri
            if '://' not in uri and not uri.startswith('data:') and local.is_file():
                return Document(id=doc_id, uri=str(local.resolve()), blob=local.read_bytes(), tags=tags)
            return Document(id=doc_id, uri=uri, tags=tags)  # a URL: the server fetches it
        text = _cell(row, columns.text)
        if not text:
            raise ValueError(f'row {number} has no {" or ".join(repr(c) for c in (columns.uri, columns.text) if c)} value')
        return Document(id=doc_id, text=text, tags=tags)

    return Entry(where, doc_id, load)


def _cell(row: dict, column: Optional[str]) -> str:
    value = row.get(column) if column else None
    return '' if value is None else str(value).strip()


def _parquet(path: Path):
    if importlib.util.find_spec('pyarrow') is None:
        raise SourceError(f'{path}: reading Parquet needs pyarrow (pip install "clip-search[parquet]")')
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


# -- loading ahead -----------------------------------------------------------------------------


def load_ahead(items: Iterable[Entry], threads: int = 4) -> Iterator[tuple[Entry, Union[Document, Failure]]]:
    """``(entry, its Document)`` in order, loaded by ``threads`` threads at most ``4 * threads`` entries
    ahead (a few large photos, not a folder, in memory); an entry that cannot be loaded comes with a
    ``Failure`` instead.

    Written by hand: ``ThreadPoolExecutor.map`` submits every item at once, which would read a whole
    folder into memory.
    """
    pending: deque[tuple[Entry, Future]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix='clip-search-read') as pool:
        for entry in items:
            pending.append((entry, pool.submit(entry.load)))
            if len(pending) >= 4 * threads:
                yield _loaded(*pending.popleft())
        while pending:
            yield _loaded(*pending.popleft())


def _loaded(entry: Entry, future: Future) -> tuple[Entry, Union[Document, Failure]]:
    try:
        return entry, future.result()
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, a row without content
        reason = f'{type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}'
        return entry, Failure(entry.source, entry.id, reason)

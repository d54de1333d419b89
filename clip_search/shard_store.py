"""What an indexer shard keeps on disk beside annlite's document store, so that a restart takes
seconds instead of rebuilding the HNSW graph: snapshots of the graph and of annlite's tables, and a
journal of the ids each write touched since the last snapshot.

annlite's document store (RocksDB, written with ``sync=True``) stays the truth. A start loads the
newest snapshot and re-reads from the store only the ids the journal names; it rebuilds everything
from the store when the snapshot is missing, damaged (size or CRC-32) or built with other settings.
It takes the store's count from the index it loaded and counts the store afterwards, in the
background; should they disagree, the next start rebuilds.

Layout of a shard's folder::

    snapshot-<g>/   hnsw.bin, cells.db, meta.db, [pq_codec.params,] manifest.json (written last: the snapshot is complete)
    tables/         annlite's two SQL tables (offset -> id, id -> offset), live: in a file instead of in
                    memory, read through SQLite's memory map, so they cost page cache, not the process's
                    memory; scratch, emptied at every start and filled from the snapshot (or a rebuild)
    vectors.f32     with n_subvectors: the float vectors by offset (clip_search.vector_file), fsynced per write
    journal-<g>.rec one record per write: {"op": "put"|"del", "ids": [...]}, framed by length and CRC-32
                    (clip_search/journal.py), fsynced before the write; a torn tail is cut at open
    rebuild-at-start only when a start's count of the store disagreed with the index (``ask_rebuild``)

A snapshot ``snapshot-<g>`` holds every write journalled before generation ``g``; the journals
``g, g+1, ...`` hold what came after it.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from clip_search import faults, journal

SNAPSHOT = 'snapshot-'
JOURNAL = 'journal-'
JOURNAL_SUFFIX = '.rec'
LEGACY_JOURNAL_SUFFIX = '.log'  # JSON lines, written before records were framed: still replayed
FILES = {'hnsw.bin': 'the HNSW graph', 'cells.db': 'the offset table', 'meta.db': 'the id table'}
CODEC = {'pq_codec.params': 'the PQ codec'}  # in the snapshot of a graph over PQ codes (clip_search.pq)
MANIFEST = 'manifest.json'
REBUILD_ASKED = 'rebuild-at-start'  # the store and the index disagreed: the next start rebuilds (``ask_rebuild``)
# RocksDB memory per shard: annlite opens its store with a 256 MB memtable and a 1 GB block cache
# (optimize_for_point_lookup), which a full read at start fills; the graph lives in HNSW, the store
# only answers the matches' multi-get, so small buffers cost nothing measurable (bench/scale.py).
# Matches are scattered over the whole store: 16 MB of cache held 6% of a 100k shard's blocks and
# filled within 1,000 searches (+16 MiB resident), for as few hits; the OS page cache serves the rest
WRITE_BUFFER_BYTES = 16 << 20
BLOCK_CACHE_BYTES = 2 << 20
LIVE_TABLES = 'tables'
# annlite keeps its tables in memory, a share of every document's cost (bench/memory.py). In a file,
# SQLite's own cache stays small and the rest is the OS's page cache (a memory map)
TABLE_PRAGMAS = ('journal_mode=MEMORY', 'synchronous=OFF', 'cache_size=-2048', f'mmap_size={1 << 40}')


# the document store is compacted once its files hold this share more than its live data: overwritten
# and deleted values stay in RocksDB's files until a compaction merges them, and on a store smaller
# than its first level target (256 MB) RocksDB's own compactions leave several times the live data
STORE_GARBAGE = 0.10


class SnapshotError(RuntimeError):
    """A snapshot that cannot be used; the message says why (the shard then rebuilds)."""


def open_index(**annlite_kwargs):
    """annlite's ``AnnLite`` with a lean document store, its SQL tables in files (``LIVE_TABLES``),
    and without its rebuild at construction."""
    import annlite.container
    from annlite import AnnLite
    from annlite.storage.kv import DocStorage
    from annlite.storage.table import CellTable, MetaTable
    from rocksdict import BlockBasedOptions, Cache, Options, Rdict

    class LeanDocStorage(DocStorage):
        def insert(self, docs):  # annlite writes the graph and tables first, then the store
            faults.reach('after-graph')
            len(self)  # annlite's insert adds to the count
            super().insert(docs)
            faults.reach('after-store')

        def _init_db(self, create_if_missing: bool = True, **kwargs):
            options = Options(raw_mode=True)  # raw_mode and in-place updates as annlite opens it
            options.set_inplace_update_support(True)
            options.set_allow_concurrent_memtable_write(False)
            options.set_write_buffer_size(WRITE_BUFFER_BYTES)
            options.set_max_write_buffer_number(2)
            table = BlockBasedOptions()
            table.set_block_cache(Cache(BLOCK_CACHE_BYTES))
            options.set_block_based_table_factory(table)
            options.create_if_missing(create_if_missing)
            self._db = Rdict(path=self._path, options=options)
            self._size = 0  # annlite's constructor asks, to restore (the shard does that): counted lazily after it
            self._is_closed = False

        def __len__(self) -> int:
            if self._size is None:
                self._size = count_keys(self._db.iter(read_only_scan()))
            return self._size

        def delete(self, doc_ids):
            len(self)  # annlite's delete subtracts from the count
            super().delete(doc_ids)

    tables = _empty_folder(Path(annlite_kwargs['data_path']) / LIVE_TABLES)  # a start fills them again

    class FileCellTable(CellTable):
        def __init__(self, name, columns=None, in_memory=True, data_path=None, lazy_create=False):
            super().__init__(name, columns=columns, in_memory=False, data_path=tables, lazy_create=lazy_create)
            _tune(self._conn)

    class FileMetaTable(MetaTable):
        def __init__(self, name='metas', data_path=None, in_memory=True):
            super().__init__(name, data_path=tables, in_memory=False)
            _tune(self._conn)

    class ShardAnnLite(AnnLite):
        def restore(self, *args, **kwargs):  # the shard loads its own snapshot (load_or_rebuild)
            pass

    # annlite builds its store and tables inside CellContainer.__init__ with no hook for options: swap the classes there
    swapped = {'DocStorage': LeanDocStorage, 'CellTable': FileCellTable, 'MetaTable': FileMetaTable}
    originals = {name: getattr(annlite.container, name) for name in swapped}
    for name, cls in swapped.items():
        setattr(annlite.container, name, cls)
    try:
        index = ShardAnnLite(**annlite_kwargs)
    finally:
        for name, cls in originals.items():
            setattr(annlite.container, name, cls)
    index.doc_store(0)._size = None  # counted when first asked: a start takes the count from its snapshot
    single_threaded(index)
    _drop_time_index(index)
    return index


def read_only_scan():
    """RocksDB read options for a scan of every key: no block of it kept in the cache."""
    from rocksdict import ReadOptions

    read = ReadOptions()
    read.fill_cache(False)
    return read


def count_keys(iterator) -> int:
    """The keys from a RocksDB iterator's place to the end (it sees the store as it was when made)."""
    count = 0
    iterator.seek_to_first()
    while iterator.valid():
        count += 1
        iterator.next()
    return count


def store_is_empty(index) -> bool:
    """Whether the document store holds no document, without counting them."""
    iterator = index.doc_store(0)._db.iter(read_only_scan())
    iterator.seek_to_first()
    return not iterator.valid()


def trust_count(index, documents: int) -> None:
    """Take ``documents`` as the store's count, instead of counting every key before the shard can load
    (README: restart at 5M): after a snapshot and its journal the index holds exactly the store's ids,
    which the shard's background check (``_verify_count``) confirms."""
    index.doc_store(0)._size = documents


def ask_rebuild(folder: Path, why: str) -> None:
    """Have the next start rebuild the index from the store instead of loading a snapshot."""
    write_atomically(folder / REBUILD_ASKED, why.encode())


def check_no_rebuild_asked(folder: Path) -> None:
    """Raise SnapshotError, naming why, when a rebuild was asked (``ask_rebuild``)."""
    path = folder / REBUILD_ASKED
    if path.exists():
        raise SnapshotError(f'asked by the last start: {path.read_text(errors="replace")}')


def forget_rebuild_asked(folder: Path) -> None:
    """After a start's rebuild (and its snapshot): the ask is done."""
    if (folder / REBUILD_ASKED).exists():
        remove_durably(folder / REBUILD_ASKED)


def _empty_folder(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _tune(connection) -> None:
    """A live table is scratch (the snapshot and the journal are what a restart trusts): no fsync,
    no journal file; reads through a memory map."""
    for pragma in TABLE_PRAGMAS:
        connection.execute(f'PRAGMA {pragma}')


def tidy_store(index) -> bool:
    """Flush the document store's memtable (its write-ahead log goes with it) and compact the store
    when old values take more than ``STORE_GARBAGE`` of its files; True when it compacted.

    Safe beside writes and searches (RocksDB's own locking), and RocksDB leaves Python's lock while it works.
    """
    db = index.doc_store(0)._db
    db.flush(wait=True)
    files = db.property_int_value('rocksdb.total-sst-files-size') or 0
    live = db.property_int_value('rocksdb.estimate-live-data-size') or 0
    if files <= live * (1 + STORE_GARBAGE):
        return False
    db.compact_range(None, None)
    return True


def single_threaded(index) -> None:
    """One HNSW thread per shard: annlite's default (all cores) makes shards on one machine fight."""
    index.vec_index(0)._index.set_num_threads(1)


def _drop_time_index(index) -> None:
    """annlite's id table indexes its write time for its own snapshot naming, which the shard does not use."""
    index.meta_table.execute('DROP INDEX IF EXISTS idx_time_at_')


def unreclaimed_slots(index) -> int:
    """Graph nodes of deleted or replaced documents: annlite's delete only marks them, and nothing reuses
    them (hnswlib's in-place update of a deleted node, its ``replace_deleted``, lost live documents
    from search here: tests/test_updates.py)."""
    return int(index.vec_index(0)._index.element_count) - indexed_count(index)


def live_offsets(index) -> np.ndarray:
    """The HNSW offsets of every indexed document, ascending (annlite's offset table)."""
    table = index.cell_table(0)
    rows = table._conn.execute(f'SELECT _id - 1 FROM {table.name} ORDER BY _id')
    return np.fromiter((row[0] for row in rows), dtype=np.int64)  # streamed: no list of a million tuples


def make_room(graph, offsets: np.ndarray) -> None:
    """Grow the graph's capacity to hold ``offsets`` by annlite's rule (the highest offset, in its
    expansion steps), for inserts that bypass annlite's ``add_with_ids``."""
    needed = int(offsets.max()) + 1
    if needed > graph.capacity:
        steps = -(-needed // graph.expand_step_size)
        graph._expand_capacity(steps * graph.expand_step_size)


def indexed_count(index) -> int:
    """Ids in the HNSW graph's id table (what search can find)."""
    return int(index.meta_table._conn.execute(f'SELECT count(*) FROM {index.meta_table.name}').fetchone()[0])


def journal_path(folder: Path, generation: int) -> Path:
    return folder / f'{JOURNAL}{generation}{JOURNAL_SUFFIX}'


class Journal:
    """Append-only record of the ids each write touches, fsynced before the write reaches annlite."""

    def __init__(self, folder: Path, generation: int):
        self.folder = folder
        self.generation = generation
        self.changes = 0  # ids recorded since the last snapshot
        self._file = self._open()

    def _open(self):
        """Open this generation's journal for appending, after cutting a record torn by a crash."""
        path = journal_path(self.folder, self.generation)
        journal.truncate_to_whole_records(path)
        file = open(path, 'ab')
        fsync_directory(self.folder)
        return file

    def record(self, op: str, ids: list[str]) -> None:
        self._file.write(journal.encode({'op': op, 'ids': ids}))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.changes += len(ids)
        faults.reach('after-journal')

    def rotate(self) -> None:
        """Start the next generation: what follows is not in the snapshot about to be taken."""
        self._file.close()
        self.generation += 1
        self.changes = 0
        self._file = self._open()

    def close(self) -> None:
        self._file.close()


def generations(folder: Path, prefix: str) -> list[int]:
    """The generation numbers of the snapshots or journals in ``folder``, ascending."""
    found = []
    for path in folder.glob(f'{prefix}*'):
        number = path.name[len(prefix) :].split('.')[0]
        if number.isdigit():
            found.append(int(number))
    return sorted(found)


def start_snapshot(index, folder: Path, generation: int, settings: dict) -> 'PendingSnapshot':
    """Take ``snapshot-<generation>``'s consistent point: copy annlite's tables into it and fork a
    child that writes the graph as it is now. Writes must be held out until this returns, and only
    that long: the child's image of the graph is copy-on-write, and the tables are copied already."""
    target = folder / f'{SNAPSHOT}{generation}'
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    tables = {'cells.db': index.cell_table(0), 'meta.db': index.meta_table}
    if any(table._conn.in_transaction for table in tables.values()):  # every write commits: never seen
        raise SnapshotError('a table has a transaction open: its file is not whole')
    for name, table in tables.items():  # whole: writes are held out, each one committed
        shutil.copyfile(table._conn_name, target / name)
    graph = index.vec_index(0)
    child = ForkedChild(lambda: _write_data_files(graph, target), f'writing {target}')
    return PendingSnapshot(target, generation, child, index.total_docs, graph.pq_codec, settings)


class PendingSnapshot:
    """A snapshot whose consistent point is taken; ``finish`` (no lock needed) waits for the child's
    files, adds the codec, and vouches for them with the manifest."""

    def __init__(self, target: Path, generation: int, child: 'ForkedChild', documents: int, codec, settings: dict):
        self.target, self.generation = target, generation
        self._child, self._documents, self._codec, self._settings = child, documents, codec, settings

    def finish(self) -> Path:
        files = self._child.result()
        faults.reach('mid-snapshot')
        if self._codec is not None:
            name = next(iter(CODEC))
            self._codec.dump(self.target / name)
            fsync_file(self.target / name)
            files[name] = _size_and_crc(self.target / name)
        fsync_directory(self.target)  # the data on disk before the manifest that vouches for it (SQLite's rule)
        manifest = {'settings': self._settings, 'documents': self._documents, 'files': files}
        write_atomically(self.target / MANIFEST, json.dumps(manifest, indent=2).encode())
        fsync_directory(self.target.parent)  # the snapshot's folder entry too, before anything older is deleted
        return self.target


def _write_data_files(graph, target: Path) -> dict:
    """The graph beside the tables' copies, each fsynced; their sizes and CRC-32s."""
    graph.dump(target / 'hnsw.bin')
    for name in FILES:
        fsync_file(target / name)
    return {name: _size_and_crc(target / name) for name in FILES}


def _size_and_crc(path: Path) -> dict:
    return {'size': path.stat().st_size, 'crc32': _crc32(path)}


class ForkedChild:
    """``work()`` in a forked child, a copy-on-write image of this process; ``result()`` waits for
    its JSON answer.

    hnswlib's ``save_index`` holds the GIL for the whole write (a gigabyte at 500k float documents),
    and checksumming the files takes the GIL back at every chunk, each time for up to Python's
    switch interval: in the shard's own process every search waited behind them. The child sees
    the graph as it was at the fork, whatever the parent does meanwhile, while the parent goes on
    answering. It runs nothing of the parent's: it leaves by ``_exit``.
    """

    def __init__(self, work: Callable[[], dict], what: str):
        self.what = what
        readable, writable = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:
            os.close(readable)
            status = 1
            try:
                os.write(writable, json.dumps(work()).encode())
                status = 0
            except BaseException:  # noqa: BLE001 - said on stderr, and by the exit status to the parent
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(writable)
        self._readable = readable

    def result(self) -> dict:
        with os.fdopen(self._readable, 'rb') as answer:
            data = answer.read()
        _, status = os.waitpid(self._pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SnapshotError(f'the process {self.what} exited with {code}')
        return json.loads(data)


def load_snapshot(index, folder: Path, settings: dict) -> tuple[int, int]:
    """Load the newest complete snapshot; returns (its generation, its documents).

    Raises SnapshotError naming why when there is none, or it is damaged or does not match.
    """
    complete = [g for g in generations(folder, SNAPSHOT) if (folder / f'{SNAPSHOT}{g}' / MANIFEST).exists()]
    if not complete:
        raise SnapshotError('no snapshot')
    generation = complete[-1]
    source = folder / f'{SNAPSHOT}{generation}'
    try:
        manifest = json.loads((source / MANIFEST).read_text())
        stored, files = manifest['settings'], manifest['files']
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f'{source.name}: unreadable manifest ({exc})') from exc
    for key in sorted(set(settings) | set(stored)):
        if stored.get(key) != settings.get(key):
            raise SnapshotError(f'{source.name} was built with {key}={stored.get(key)!r}, not {settings.get(key)!r}')
    compressed = any(name in files for name in CODEC)
    for name, what in _files(compressed).items():
        path = source / name
        size = path.stat().st_size if path.exists() else None
        expected = files.get(name, {}).get('size')
        if size != expected:
            raise SnapshotError(f'{source.name}/{name} ({what}) has {size} bytes, the manifest says {expected}')
        if _crc32(path) != files[name]['crc32']:
            raise SnapshotError(f'{source.name}/{name} ({what}) is damaged: CRC-32 mismatch')
    vectors = index.vec_index(0)
    if compressed:
        from clip_search.pq import load_graph

        load_graph(vectors, source / 'hnsw.bin', source / next(iter(CODEC)))
    else:
        vectors.load(source / 'hnsw.bin')
    vectors._capacity = vectors._index.get_max_elements()  # annlite keeps its own count of the capacity
    single_threaded(index)
    index.cell_table(0).load(source / 'cells.db')
    index.meta_table.load(source / 'meta.db')
    _drop_time_index(index)
    return generation, int(manifest['documents'])


def _files(compressed: bool) -> dict:
    return {**FILES, **CODEC} if compressed else FILES


def journalled_ids(folder: Path, from_generation: int) -> list[str]:
    """The ids the journals since ``from_generation`` touched, each once, in order of last touch.

    A record cut short by a crash is the write that was not acknowledged: it is not read.
    """
    touched: dict[str, None] = {}
    for generation in generations(folder, JOURNAL):
        if generation < from_generation:
            continue
        for record in _journal_records(folder, generation):
            for doc_id in record.get('ids', []):
                touched.pop(doc_id, None)
                touched[doc_id] = None
    return list(touched)


def _journal_records(folder: Path, generation: int) -> list[dict]:
    """The whole records of one generation's journal (framed; or JSON lines from an older version)."""
    records, _ = journal.read(journal_path(folder, generation))
    legacy = folder / f'{JOURNAL}{generation}{LEGACY_JOURNAL_SUFFIX}'
    if legacy.exists():
        for line in legacy.read_text(encoding='utf-8', errors='replace').splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def replay(index, ids: Iterable[str], batch_size: int = 1024) -> int:
    """Bring the graph and tables in line with the document store for ``ids``; returns how many."""
    ids = list(ids)
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        unindex(index, batch)
        stored = index.doc_store(0).get(batch)
        if len(stored):
            _index_stored(index, stored)
    return len(ids)


def unindex(index, ids: Iterable[str]) -> list[str]:
    """Remove ids from the graph and annlite's tables, leaving the document store alone; returns
    the ids that were indexed."""
    found = []
    for doc_id in ids:
        cell_id, offset = index.meta_table.get_address(doc_id)
        if cell_id is not None:
            index.vec_index(cell_id).delete([offset])
            index.cell_table(cell_id).delete_by_offset(offset)
            index.meta_table.delete_address(doc_id)
            found.append(doc_id)
    return found


def delete(index, ids: Iterable[str]) -> None:
    """annlite's delete, with one synced write to the document store for all ids (annlite's syncs each)."""
    found = unindex(index, ids)
    if found:
        index.doc_store(0).delete(found)


def reset(index) -> None:
    """Empty the graph and annlite's tables (before a rebuild from the document store)."""
    index.vec_index(0).reset()
    single_threaded(index)
    index.cell_table(0).clear()
    index.meta_table.clear()
    _drop_time_index(index)


def rebuild(index, batch_size: int = 10240) -> int:
    """Index every stored document again (annlite's rebuild, without its own snapshot lookup)."""
    total = 0
    for docs in index.documents_generator(0, batch_size=batch_size):
        _index_stored(index, docs)
        total += len(docs)
    return total


def _index_stored(index, docs) -> None:
    """Put documents the store already holds into the graph and the tables of cell 0 (the only one)."""
    embeddings = np.asarray(docs.embeddings, dtype=np.float32)
    index.insert(embeddings, np.zeros(len(docs), dtype=np.int64), docs, only_index=True)


def remove_older(folder: Path, keep_snapshot: int) -> None:
    """Delete snapshots other than ``keep_snapshot`` and the journals it already contains."""
    for generation in generations(folder, SNAPSHOT):
        if generation != keep_snapshot:
            shutil.rmtree(folder / f'{SNAPSHOT}{generation}', ignore_errors=True)
    for generation in generations(folder, JOURNAL):
        if generation < keep_snapshot:
            journal_path(folder, generation).unlink(missing_ok=True)
            (folder / f'{JOURNAL}{generation}{LEGACY_JOURNAL_SUFFIX}').unlink(missing_ok=True)


def _crc32(path: Path, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, 'rb') as file:
        while block := file.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves the old content or the new, never a part: temp file, fsync, rename."""
    temporary = path.with_name(path.name + '.tmp')
    with open(temporary, 'wb') as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)  # the rename itself survives a power cut


def fsync_file(path: Path) -> None:
    with open(path, 'rb') as file:
        os.fsync(file.fileno())


def remove_durably(path: Path) -> None:
    path.unlink()
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

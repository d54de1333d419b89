"""AnnLiteIndexer: one shard of the index (annlite: HNSW in memory, documents in RocksDB).

Unlike annlite's bundled executor, every write is applied before the request returns (no
background buffer): an acknowledged document is searchable at once and survives a crash, because
annlite writes its document store with ``sync=True``. A restart loads the last snapshot of the
graph and replays the journalled writes after it (``clip_search.shard_store``) in a background
thread; until then every request fails fast with "shard k is loading".

Placement (docs/design.md) follows the Flow's polling of /index: polled ``ANY``, the shard that
receives a document stores it; polled ``ALL``, each shard keeps the ids that hash to it (``owner_shard``).
"""

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import threadpoolctl
from docarray import Document, DocumentArray
from jina import Executor, requests

from clip_search import allocator, compaction, faults, shard_store, wire_answer  # annlite itself is imported late, inside shard_store
from clip_search.exact_search import exact_search
from clip_search.params import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    check_match_budget,
    validate_max_distance,
    validate_search_parameters,
    within_distance,
)
from clip_search.pq import Compression, check_settings as check_compression
from clip_search.sharding import (
    ALL,
    ANY,
    DEFAULT_INDEX_POLLING,
    check_index_polling,
    held_answer,
    is_lookup,
    is_update_check,
    owner_shard,
    refuse_unheld,
    shard_marker,
    shard_status,
)

SETTINGS_FILE = 'clip_search_index.json'
# the old versions of a replace in progress, one file per request (clip_search_replace-<time_ns>.journal)
REPLACE_JOURNAL = 'clip_search_replace-*.journal'
INLINE_SEARCH_MATCHES = 1000  # a search asking for more matches (queries x limit) runs in a thread


class AnnLiteIndexer(Executor):
    """Index, search, update, delete and report on the documents of one shard."""

    def __init__(
        self,
        n_dim: Optional[int] = None,
        metric: str = 'cosine',
        limit: int = DEFAULT_LIMIT,
        columns: Optional[list] = None,
        ef_construction: int = 200,
        ef_search: int = 400,
        max_connection: int = 16,
        index_polling: str = DEFAULT_INDEX_POLLING,
        snapshot_every: int = 2000,
        max_matches: int = 100_000,
        n_subvectors: Optional[int] = None,
        pq_train_size: int = 20000,
        rerank_factor: int = 10,
        max_candidates: int = MAX_LIMIT,
        compact_deleted: Optional[float] = 0.25,
        *args,
        **kwargs,
    ):
        """:param n_dim: embedding size; ``python -m clip_search`` sets it from the model
        :param metric: ``cosine`` (the score is the cosine distance, smaller is closer)
        :param limit: matches per query when the request does not say
        :param columns: tag columns to filter on, e.g. ``[['color', 'str'], ['price', 'float']]``
        :param ef_construction: HNSW build-time beam width
        :param ef_search: HNSW query-time beam width (raised to ``limit`` when smaller); 400 gives
            recall@10 0.99 on 20k random vectors where 100 gives 0.85 (bench/)
        :param max_connection: HNSW graph degree
        :param index_polling: the Flow's polling of /index, which decides placement: ``ANY``, the shard
            that receives a document stores it (re-indexing an id adds a copy); ``ALL``, the shard its id
            hashes to (re-indexing replaces). ``python -m clip_search`` sets it from the YAML's polling
        :param snapshot_every: snapshot the graph after this many written ids (or 5% of the shard,
            whichever is more), bounding what a restart after a crash replays (README: Durability);
            the snapshot runs in the background; a graceful stop always snapshots
        :param max_matches: the most matches one search may ask this shard for (queries x limit);
            a request above it is refused, naming the cap: one request cannot take the shard's memory
        :param n_subvectors: compress the graph with product quantization, this many bytes a document
            (must divide n_dim; ``--pq N`` on the command line); None keeps float vectors. The float
            vectors go to a file on disk that re-ranks the graph's candidates exactly (docs/design.md)
        :param pq_train_size: with n_subvectors, the first this many documents of an empty shard are
            indexed as floats, then train the codec and move into the compressed graph
        :param rerank_factor: with n_subvectors, the compressed graph returns ``limit x rerank_factor``
            candidates, re-scored with their float vectors
        :param max_candidates: with n_subvectors, the most candidates a query may ask of the graph
            (``limit x rerank_factor``); a larger limit is refused
        :param compact_deleted: once the graph's deleted nodes (left by deletes and updates) exceed this
            share of its documents, build a new graph of the live ones in the background and swap it in
            (``clip_search.compaction``); null never compacts
        """
        super().__init__(*args, **kwargs)
        allocator.return_large_blocks_to_os()  # this process is the shard's: its freed request buffers leave
        wire_answer.install()  # a large search's answer is parsed straight into Jina's request, not copied there
        # one BLAS thread, as one HNSW thread: OpenBLAS's own threads hung here when a compaction's
        # matrix products (PQ codes) met a write's in another thread (tests/test_compaction.py)
        threadpoolctl.threadpool_limits(1, user_api='blas')
        if not n_dim:
            raise ValueError(
                'AnnLiteIndexer needs n_dim: start the Flow with `python -m clip_search`, '
                'which sets it from the model, or set uses_with.n_dim to the model embedding size'
            )
        check_compression(int(n_dim), n_subvectors, pq_train_size, rerank_factor)
        compaction.check_setting(compact_deleted)
        self.compact_deleted = compact_deleted
        self.shard_id = int(getattr(self.runtime_args, 'shard_id', 0) or 0)
        self.shards = int(getattr(self.runtime_args, 'shards', 1) or 1)
        self.default_limit = limit
        self.snapshot_every = snapshot_every
        self.max_matches = max_matches
        self.columns = [tuple(column) for column in (columns or [])]
        self.index_polling = check_index_polling(index_polling)
        self.settings = {
            'n_dim': int(n_dim),
            'metric': metric,
            'shards': self.shards,
            'columns': [list(column) for column in self.columns],
            'index_polling': self.index_polling,
            'n_subvectors': n_subvectors,
        }
        self.max_candidates = max_candidates
        # a snapshot is used only when the graph was built exactly as this shard would build it
        self._snapshot_settings = dict(
            self.settings, shard=self.shard_id, max_connection=max_connection, ef_construction=ef_construction
        )
        self._data_path = Path(self.workspace)
        _check_or_write_settings(self._data_path, self.settings)
        self._index = shard_store.open_index(
            n_dim=int(n_dim),
            metric=metric,
            columns=self.columns or None,
            data_path=self._data_path,
            ef_construction=ef_construction,
            ef_search=ef_search,
            max_connection=max_connection,
        )
        self._compression: Optional[Compression] = None
        if n_subvectors:
            self._compression = Compression(self._data_path, int(n_dim), n_subvectors, pq_train_size, rerank_factor)
            self._compression.attach(self._index.vec_index(0))
        self._write_lock = threading.Lock()  # one write or snapshot at a time, journal order = store order
        self._loaded = threading.Event()
        self._load_error: Optional[str] = None
        self.loaded_how: Optional[str] = None  # the start's path: snapshot + replay, or rebuild and why
        self._journal = None
        self._unfinished_replaces = True  # replace journals may be left by a crash: look before the first write
        self._snapshotting = threading.Event()  # a background snapshot is running
        self._compacting = threading.Event()  # a background compaction of the graph is running
        self._snapshot_failed = False  # the last snapshot failed: the next write starts another
        self._snapshot_finished = threading.Event()  # clear while a background snapshot writes its files
        self._snapshot_finished.set()
        self._store_lock = threading.Lock()  # held by a tidy of the document store, which close waits for
        self._closed = False
        if shard_store.store_is_empty(self._index):
            self._start_empty()
        else:
            self.logger.info(f'shard {self.shard_id}/{self.shards}: loading its index')
            threading.Thread(target=self._load, name=f'shard-{self.shard_id}-loading', daemon=True).start()

    def wait_loaded(self, timeout: Optional[float] = None) -> bool:
        """Block until the shard is searchable (True) or ``timeout`` seconds passed (False)."""
        return self._loaded.wait(timeout)

    @requests(on='/index')
    def index(self, docs: DocumentArray, **kwargs) -> DocumentArray:
        """Store (or replace) the documents this shard owns; every shard checks every document."""
        return self._answer(self._index_docs, docs)

    @requests(on='/update')
    def update(self, docs: DocumentArray, parameters: dict, **kwargs) -> DocumentArray:
        """Replace every copy of documents that are indexed; an id that is not indexed anywhere is an error.

        The gateway first sends the ids alone as a check pass (``is_update_check``): the shard then
        only says which it holds, so that the merger can refuse the update before any shard applies it.
        """
        if is_update_check(parameters):
            return self._answer(self._held, docs)
        return self._answer(self._update_docs, docs)

    @requests(on='/delete')
    def delete(self, docs: DocumentArray, **kwargs) -> DocumentArray:
        """Delete by id; ``tags['deleted']`` tells whether this shard held the document."""
        return self._answer(self._delete_docs, docs)

    @requests(on='/search')
    async def serve_search(self, docs: DocumentArray, parameters: dict, **kwargs) -> DocumentArray:
        """/search, as ``search`` below, under Jina's executor lock, which every write holds too.

        A search of a few queries runs on the shard's event loop: it takes less time than handing it
        to a thread and back (as Jina does for a plain function). A larger one runs in a thread, so
        the loop stays free for health checks meanwhile.
        """
        async with self._lock:
            if len(docs) * _requested_limit(parameters, self.default_limit) <= INLINE_SEARCH_MATCHES:
                return self.search(docs, parameters)
            return await asyncio.get_running_loop().run_in_executor(None, self._search_for_the_wire, docs, parameters)

    def _search_for_the_wire(self, docs: DocumentArray, parameters: dict) -> DocumentArray:
        """``search``, answered as a ``WireAnswer``: each query's matches become protobuf as soon as
        they are final, so the answer is never held as Python documents and protobuf at once."""
        return self._answer(self._search_docs, docs, parameters, True)

    def search(self, docs: DocumentArray, parameters: dict, **kwargs) -> DocumentArray:
        """Attach this shard's top-``limit`` matches, ascending cosine distance, to every query."""
        return self._answer(self._search_docs, docs, parameters)

    @requests(on='/status')
    def status(
        self, docs: Optional[DocumentArray] = None, parameters: Optional[dict] = None, **kwargs
    ) -> DocumentArray:
        """This shard's document count and the index settings, in the merged status format.

        With the ``LOOKUP`` parameter, which of the documents' ids this shard holds (read-only).
        """
        if is_lookup(parameters):
            return self._answer(self._lookup, docs)
        return self._answer(self._status)

    def close(self) -> None:
        """A graceful stop: snapshot what changed, so the next start loads instead of replaying."""
        with self._store_lock, self._write_lock:  # after a running tidy of the store (_tidy_store)
            self._closed = True  # a background snapshot still waiting for the lock has nothing to do
            self._snapshot_finished.wait()  # one writing its files ends first
            if self._loaded.is_set():
                if self._journal.changes or self._snapshot_failed:
                    self._snapshot()
                self._journal.close()
                self._index.close()  # while loading, the loader thread still uses it: the process exit closes it
                if self._compression:
                    self._compression.close()
        super().close()

    def _answer(self, handler: Callable, *args) -> DocumentArray:
        """Run a handler; in a sharded index, report the outcome in-band for the merger to read."""
        if self.shards == 1:
            self._check_loaded()
            return handler(*args)
        try:
            self._check_loaded()
            answer = handler(*args)
        except Exception as exc:
            self.logger.error(f'shard {self.shard_id}: {exc!r}')
            return DocumentArray([shard_marker(self.shard_id, error=f'{type(exc).__name__}: {exc}')])
        answer.append(shard_marker(self.shard_id))
        return answer

    def _check_loaded(self) -> None:
        if self._load_error:
            raise RuntimeError(f'shard {self.shard_id} failed to load its index: {self._load_error}')
        if not self._loaded.is_set():
            raise ShardLoading(f'shard {self.shard_id} is loading its index; retry in a few seconds')

    def _start_empty(self) -> None:
        """No documents: forget any old snapshot or journal and start at an empty snapshot."""
        shard_store.remove_older(self._data_path, keep_snapshot=-1)
        self._journal = shard_store.Journal(self._data_path, 0)
        self._snapshot()
        self._restore_after_crash()
        self._loaded.set()
        self.logger.info(f'shard {self.shard_id}/{self.shards}: empty index in {self._data_path}')

    def _load(self) -> None:
        """Load the snapshot and replay the journal, or rebuild from the store; log which, in one line."""
        folder, started = self._data_path, time.monotonic()
        try:
            try:
                shard_store.check_no_rebuild_asked(folder)
                generation, documents = shard_store.load_snapshot(self._index, folder, self._snapshot_settings)
                replayed = shard_store.replay(self._index, shard_store.journalled_ids(folder, generation))
                shard_store.trust_count(self._index, shard_store.indexed_count(self._index))
                verify = True
                path = f'loaded snapshot-{generation} ({documents} documents) and replayed {replayed} changed ids'
            except Exception as exc:  # noqa: BLE001 - any unusable snapshot: the store still has everything
                shard_store.reset(self._index)
                if self._compression:  # a new codec from the stored documents (the snapshot's may be the damage)
                    self._compression.train_from_store(self._index)
                path = f'rebuilt {shard_store.rebuild(self._index)} documents from the document store ({exc})'
                replayed, verify = 1, False
            seen = [*shard_store.generations(folder, shard_store.JOURNAL), *shard_store.generations(folder, shard_store.SNAPSHOT)]
            self._journal = shard_store.Journal(folder, max(seen, default=0))
            if self._compress_when_ready() or replayed:  # the next start loads this one, not replaying again
                self._snapshot()
            self._restore_after_crash()
            shard_store.forget_rebuild_asked(folder)
            self.loaded_how = path
            self._loaded.set()
            seconds = time.monotonic() - started
            self.logger.info(f'shard {self.shard_id}/{self.shards}: {path} in {seconds:.1f} s; searchable')
            if verify:
                threading.Thread(target=self._verify_count, name=f'shard-{self.shard_id}-verify', daemon=True).start()
        except Exception as exc:  # noqa: BLE001 - reported to every request instead of "loading" forever
            self._load_error = f'{type(exc).__name__}: {exc}'
            self.logger.error(f'shard {self.shard_id}/{self.shards}: loading failed: {self._load_error}')

    def _verify_count(self) -> None:
        """After a start from a snapshot, which took the index's count for the store's, count the store in
        the background: the two must agree. If not (the store was changed behind the journal's back), log
        it in one line and have the next start rebuild the index from the store."""
        try:
            with self._write_lock:  # the count and the store's view at one point
                indexed = shard_store.indexed_count(self._index)
                scan = self._index.doc_store(0)._db.iter(shard_store.read_only_scan())
            stored = shard_store.count_keys(scan)
            if stored != indexed:
                why = f'the document store holds {stored} documents, the index {indexed}'
                shard_store.ask_rebuild(self._data_path, why)
                self.logger.error(f'shard {self.shard_id}: {why}: the next start rebuilds the index from the store')
        except Exception as exc:  # noqa: BLE001 - a check that could not run changes nothing
            if not self._closed:
                self.logger.error(f'shard {self.shard_id}: counting the document store failed: {exc!r}')

    def _restore_after_crash(self) -> None:
        """Put back the old versions of the replaces that a crash cut short, journalled like any write."""
        with self._write_lock:
            self._restore_unfinished_replaces()

    def _restore_unfinished_replaces(self) -> None:
        """Under the write lock, before any later write: restore each replace journal left, oldest first
        (a crash, or a restore that itself failed inside its request), so none outlives a later write."""
        if not self._unfinished_replaces:
            return
        for path in sorted(self._data_path.glob(REPLACE_JOURNAL)):
            old = DocumentArray.from_bytes(path.read_bytes())
            self._journal.record('put', old[:, 'id'])
            _restore_interrupted_replace(self._index, path, old, self.logger)
        self._unfinished_replaces = False

    def _snapshot(self) -> None:
        """Snapshot now, whole (under the write lock, or before the shard serves)."""
        self._finish_snapshot(self._start_snapshot())

    def _start_snapshot(self) -> shard_store.PendingSnapshot:
        """A snapshot's consistent point (under the write lock, held only this long): a new journal
        generation, the tables copied, the graph in a forked child's image."""
        self._snapshot_finished.wait()  # a background snapshot still writing its files: one at a time
        self._journal.rotate()
        return shard_store.start_snapshot(self._index, self._data_path, self._journal.generation, self._snapshot_settings)

    def _finish_snapshot(self, pending: shard_store.PendingSnapshot) -> None:
        """The snapshot's files written and its manifest in; then drop what it holds."""
        started = time.monotonic()
        pending.finish()
        shard_store.remove_older(self._data_path, keep_snapshot=pending.generation)
        self._snapshot_failed = False
        self.logger.debug(f'shard {self.shard_id}: snapshot-{pending.generation} written in {time.monotonic() - started:.1f} s')

    def _write(self, op: str, ids: list, apply: Callable[[], None]) -> None:
        """Journal the ids, apply the write; past the checkpoint, start a snapshot in the background."""
        with self._write_lock:
            self._restore_unfinished_replaces()
            self._journal.record(op, list(ids))
            apply()
            due = self._compress_when_ready() or self._journal.changes >= max(self.snapshot_every, self._index.total_docs // 20)
            if (due or self._snapshot_failed) and not self._snapshotting.is_set():
                self._snapshotting.set()
                threading.Thread(target=self._snapshot_in_background, name=f'shard-{self.shard_id}-snapshot', daemon=True).start()
            if self._compaction_due() and not self._compacting.is_set():
                self._compacting.set()
                threading.Thread(target=self._compact_in_background, name=f'shard-{self.shard_id}-compaction', daemon=True).start()

    def _compaction_due(self) -> bool:
        """Deleted graph nodes above ``compact_deleted`` of the documents (a compressed shard: once trained,
        as its float graph is replaced by training anyway)."""
        if self._compression and not self._compression.trained(self._index):
            return False
        return compaction.is_due(self._index, self.compact_deleted)

    def _compact_in_background(self) -> None:
        """Compact the graph, again while the writes made meanwhile leave it past the share; a failure
        is logged in one line, and the next write past the share tries again."""
        try:
            while self._compact_once():
                pass
        except Exception as exc:  # noqa: BLE001 - the old graph still answers
            if not self._closed:
                self.logger.error(f'shard {self.shard_id}: compacting the graph failed: {exc!r}')
        finally:
            self._compacting.clear()

    def _compact_once(self) -> bool:
        """Build a graph of the live documents beside the shard's, catch it up with the writes made
        meanwhile, swap it in under the write lock and snapshot it; searches and writes go on meanwhile.
        Returns whether another compaction is due already."""
        started = time.monotonic()
        rebuild = compaction.Rebuild(
            self._index,
            self._write_lock,
            float_vectors=self._compression.vectors.read if self._compression else None,
            add_codes=self._compression.add_codes if self._compression else None,
        )
        built, caught_up = rebuild.build(stopped=lambda: self._closed), 0
        for _ in range(compaction.CATCH_UP_ROUNDS):
            changed = 0 if self._closed else rebuild.catch_up()
            caught_up += changed
            if not changed:
                break
        with self._write_lock:
            if self._closed:
                return False
            nodes = int(rebuild.old._index.element_count)
            caught_up += rebuild.catch_up(under_lock=True)
            if self._compression:
                self._compression.attach(rebuild.new)
            rebuild.swap_in()
            faults.reach('mid-compaction')
            self._try_snapshot('snapshot after compaction')  # a restart loads the compacted graph
            again = self._compaction_due()
        self.logger.info(
            f'shard {self.shard_id}: compacted the graph from {nodes} nodes to {len(rebuild.present)} '
            f'({built} built, {caught_up} changed meanwhile) in {time.monotonic() - started:.1f} s'
        )
        return again

    def _try_snapshot(self, what: str, step: Optional[Callable] = None):
        """A snapshot, whole (under the write lock), or one ``step`` of one; a failure is logged in one
        line and retried after the next write (None is returned), failing no write: the journal and the
        store still hold every write since the last snapshot."""
        try:
            return (step or self._snapshot)()
        except Exception as exc:  # noqa: BLE001 - a full disk, say
            self._snapshot_failed = True
            self.logger.error(f'shard {self.shard_id}: {what} failed, retried after the next write: {exc!r}')
            return None

    def wait_idle(self, timeout: float = 60) -> bool:
        """Block until no background snapshot or compaction runs (True) or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while self._snapshotting.is_set() or self._compacting.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _snapshot_in_background(self) -> None:
        """Snapshot off the request: the write lock holds writes back only while the tables are copied
        and the child that writes the graph is forked; searches go on all along. A failure is logged
        in one line and retried after the next write; the writes stay durable in the journal and the
        store, so none is failed for it."""
        try:
            with self._write_lock:
                if self._closed or not (self._journal.changes or self._snapshot_failed):
                    return
                pending = self._try_snapshot('snapshot', self._start_snapshot)
                if pending is None:
                    return
                self._snapshot_finished.clear()
            try:
                self._try_snapshot('snapshot', lambda: self._finish_snapshot(pending))
            finally:
                self._snapshot_finished.set()
            self._tidy_store()
        finally:
            self._snapshotting.clear()

    def _tidy_store(self) -> None:
        """After a snapshot, outside the write lock (writes and searches go on): flush the document store
        and compact it if old values pile up in its files, so that updates do not grow it on disk."""
        with self._store_lock:
            if self._closed:
                return
            started = time.monotonic()
            try:
                if shard_store.tidy_store(self._index):
                    self.logger.debug(f'shard {self.shard_id}: compacted the document store in {time.monotonic() - started:.1f} s')
            except Exception as exc:  # noqa: BLE001 - the store stays correct, only larger: tried again next time
                self.logger.error(f'shard {self.shard_id}: tidying the document store failed: {exc!r}')

    def _compress_when_ready(self) -> bool:
        """With n_subvectors: once the shard holds ``pq_train_size`` documents, train the codec and
        compress the graph (True: the caller snapshots, the codec is part of the snapshot)."""
        done = self._compression.train_when_ready(self._index) if self._compression else None
        if done:
            self.logger.info(f'shard {self.shard_id}/{self.shards}: {done}')
        return bool(done)

    def _index_docs(self, docs: DocumentArray) -> DocumentArray:
        mine = self._owned(docs) if self.index_polling == ALL else self._all_checked(docs)
        if mine:
            self._write('put', mine[:, 'id'], lambda: self._replace(mine))
        return _ids_only(docs)

    def _update_docs(self, docs: DocumentArray) -> DocumentArray:
        if self.index_polling == ANY:  # any shard may hold a copy: update the ones held here
            mine = DocumentArray(doc for doc in self._all_checked(docs) if self._contains(doc.id))
        else:
            mine = self._owned(docs)
            missing = [doc.id for doc in mine if not self._contains(doc.id)]
            if missing:
                raise ValueError(f'cannot update documents that are not indexed: {missing[:10]} (use /index)')
        if mine:
            self._write('put', mine[:, 'id'], lambda: self._replace(mine))
        return _ids_only(docs)

    def _held(self, docs: DocumentArray) -> DocumentArray:
        """The check pass of /update: which of the ids this shard holds (the documents need no embedding)."""
        answer = self._lookup(docs)
        if self.shards == 1:  # no merger runs after a single shard: refuse here
            refuse_unheld([answer])
        return answer

    def _lookup(self, docs: DocumentArray) -> DocumentArray:
        """Which of the documents' ids this shard holds (``held_answer``), read-only."""
        return DocumentArray(held_answer(docs[:, 'id'], {doc.id for doc in docs if self._contains(doc.id)}))

    def _delete_docs(self, docs: DocumentArray) -> DocumentArray:
        present = [doc.id for doc in docs if self._contains(doc.id)]
        if present:
            self._write('del', present, lambda: shard_store.delete(self._index, present))
        present_ids = set(present)
        return DocumentArray(Document(id=doc.id, tags={'deleted': doc.id in present_ids}) for doc in docs)

    def _search_docs(self, docs: DocumentArray, parameters: dict, for_the_wire: bool = False) -> DocumentArray:
        """The search; ``for_the_wire``: answer a ``WireAnswer``, each query sealed once its matches are final."""
        limit, search_filter = validate_search_parameters(
            parameters, self.default_limit, [name for name, _ in self.columns]
        )
        max_distance = validate_max_distance(parameters.get('max_distance'))
        check_match_budget(len(docs), limit, self.max_matches)
        self._check_candidates(limit)
        self._check_embeddings(docs)
        answer = wire_answer.WireAnswer(docs) if for_the_wire else docs

        def done(query: Document) -> None:  # the query's matches are final: filter by distance, seal
            _keep_within(query, max_distance)
            if for_the_wire:
                answer.seal(query)

        if self._index.total_docs == 0:
            for doc in docs:
                doc.matches = DocumentArray()
            return answer
        try:
            if search_filter or self._index.n_cells != 1:
                compressed = self._compression and self._compression.trained(self._index)
                self._index.search(docs, filter=search_filter, limit=self._compression.candidates(limit) if compressed else limit)
                if compressed:  # the matches carry their stored embeddings: exact distances from them
                    self._compression.rerank_matches(docs, limit)
                for doc in docs:
                    _finish_matches(doc)
                    done(doc)
            else:
                self._search_unfiltered(docs, limit, done)
        except RuntimeError as exc:
            if not _graph_walk_fell_short(exc):  # raised before any query is done (the graph walk comes first)
                raise
            exact_filtered_search(self._index, docs, search_filter, limit, lambda query: (_finish_matches(query), done(query)))
        return answer

    def _search_unfiltered(self, docs: DocumentArray, limit: int, done: Callable[[Document], None]) -> None:
        """annlite's search without its per-query overheads, for the common case of no filter.

        Same graph, same ef, same answer as ``AnnLite.search``, but the profile of that call
        (bench/results/*/profile_search.txt) shows it spending more time around the HNSW query than
        in it: one HNSW call and a SQL ``count`` of the whole table per query, a throwaway
        ``Document`` per match, and one key-value lookup per match. Here all queries go to HNSW as
        one matrix, the offsets become ids in one SQL query, and each query's matches come from one
        multi-get. ``done`` gets each query as soon as its matches are set, before the next query's
        documents are read.
        """
        from annlite.math import l2_normalize

        vectors, store = self._index.vec_index(0), self._index.doc_store(0)
        k = min(limit, self._index.total_docs)
        queries = np.asarray(docs.embeddings, dtype=np.float32).reshape(len(docs), -1)
        if self._compression and self._compression.trained(self._index):
            offsets, distances = self._compression.nearest(self._index, queries, k)
        else:
            vectors._index.set_ef(max(vectors.ef_search, k))
            offsets, distances = vectors._index.knn_query(l2_normalize(queries), k=k, num_threads=1)
        id_of = self._ids_of_offsets(np.unique(offsets).tolist())
        for doc, row_offsets, row_distances in zip(docs, offsets, distances):
            ids = [id_of.get(int(offset)) for offset in row_offsets]
            distance_of = dict(zip(ids, row_distances))
            matches = store.get([i for i in ids if i is not None])
            for match in matches:
                _finish_match(match, distance_of[match.id])
            doc.matches = matches
            done(doc)

    def _check_candidates(self, limit: int) -> None:
        if self._compression and self._compression.candidates(limit) > self.max_candidates:
            factor = self._compression.rerank_factor
            raise ValueError(
                f'parameter limit={limit} asks the compressed index for {limit} x rerank_factor {factor} = '
                f'{limit * factor} candidates, above max_candidates={self.max_candidates}: '
                f'ask for at most {self.max_candidates // factor} matches'
            )

    def _ids_of_offsets(self, offsets: list) -> dict:
        """HNSW offsets to document ids, one SQL query per 900 offsets (annlite asks one per offset)."""
        table, id_of = self._index.cell_table(0), {}
        for start in range(0, len(offsets), 900):  # SQLite's limit of bound parameters is 999 in old builds
            chunk = [offset + 1 for offset in offsets[start : start + 900]]  # annlite's row id is offset + 1
            sql = f'SELECT _id - 1, _doc_id FROM {table.name} WHERE _id IN ({",".join("?" * len(chunk))})'
            id_of.update(table._conn.execute(sql, chunk).fetchall())
        return id_of

    def _status(self) -> DocumentArray:
        unreclaimed = shard_store.unreclaimed_slots(self._index)
        return DocumentArray([shard_status(self.shard_id, self._index.total_docs, self.settings, unreclaimed)])

    def _owned(self, docs: DocumentArray) -> DocumentArray:
        """Check every document (so all shards refuse a bad batch alike), keep the ones this shard owns."""
        self._check_embeddings(docs)
        return _last_of_each_id(doc for doc in docs if owner_shard(doc.id, self.shards) == self.shard_id)

    def _all_checked(self, docs: DocumentArray) -> DocumentArray:
        """Check every document, keep one per id: a shard holds one copy of an id."""
        self._check_embeddings(docs)
        return _last_of_each_id(docs)

    def _contains(self, doc_id: str) -> bool:
        return self._index.meta_table.get_address(doc_id)[0] is not None

    def _replace(self, docs: DocumentArray) -> None:
        # annlite's own update keeps stale filter columns in its SQL table, so replace = delete + insert;
        # the old versions are journalled first, so a crash between the two cannot lose them
        existing = [doc.id for doc in docs if self._contains(doc.id)]
        if not existing:
            self._index.index(DocumentArray(_storable(doc) for doc in docs))
            return
        old = self._index.doc_store(0).get(existing)
        journal = self._data_path / REPLACE_JOURNAL.replace('*', f'{time.time_ns():020d}')  # unique, in time order
        shard_store.write_atomically(journal, old.to_bytes())
        try:
            shard_store.delete(self._index, existing)
            self._index.index(DocumentArray(_storable(doc) for doc in docs))
        except Exception:
            self._unfinished_replaces = True  # should the restore fail too, the next write retries it first
            _restore_interrupted_replace(self._index, journal, old, self.logger)  # the old versions, at once
            self._unfinished_replaces = False
            raise
        shard_store.remove_durably(journal)  # before the answer: an acknowledged replace stays

    def _check_embeddings(self, docs: DocumentArray) -> None:
        n_dim = self.settings['n_dim']
        if _all_finite_rows(docs, n_dim):  # one check of the stacked matrix; the loop below names the culprit
            return
        for doc in docs:
            embedding = doc.embedding
            if embedding is None:
                raise ValueError(f'document {doc.id!r}: it has no embedding (send text, an image or an embedding)')
            shape = np.shape(embedding)
            if shape != (n_dim,):
                raise ValueError(f'document {doc.id!r}: embedding has shape {shape}, the index needs ({n_dim},)')
            if not np.all(np.isfinite(embedding)):
                raise ValueError(f'document {doc.id!r}: embedding has NaN or infinite values')


class ShardLoading(RuntimeError):
    """The shard is loading its index after a start; the request can be retried in seconds."""


def _requested_limit(parameters: dict, default: int) -> int:
    """The request's ``limit`` as a number, for sizing only (``validate_search_parameters`` judges it)."""
    try:
        return max(int(parameters.get('limit') or default), 1)
    except (TypeError, ValueError):
        return default


def _ids_only(docs: DocumentArray) -> DocumentArray:
    """What /index and /update answer: the ids, not the embeddings and bytes the client just sent."""
    for doc in docs:  # emptied in place: 10x cheaper than a new Document per id (docarray's constructor)
        doc.pop(*[field for field in doc.non_empty_fields if field != 'id'])
    return docs


def _all_finite_rows(docs: DocumentArray, n_dim: int) -> bool:
    """Whether every document has a finite embedding of ``n_dim`` values (False: look closer)."""
    try:
        matrix = docs.embeddings
    except Exception:  # noqa: BLE001 - missing or ragged embeddings: the per-document check explains
        return False
    return isinstance(matrix, np.ndarray) and matrix.shape == (len(docs), n_dim) and bool(np.isfinite(matrix).all())


def _storable(doc: Document) -> Document:
    """What is kept of a document: id, text/uri, tags, embedding, and its image bytes (the encoder's thumbnail)."""
    kept = Document(
        id=doc.id,
        text=doc.text or None,
        uri=doc.uri or None,
        tags=doc.tags,
        mime_type=doc.mime_type or None,
        embedding=np.asarray(doc.embedding, dtype=np.float32),
    )
    if doc.blob:
        kept.blob = doc.blob
    return kept


def _last_of_each_id(docs) -> DocumentArray:
    """One document per id, the last one sent winning, like successive writes would."""
    by_id = {}
    for doc in docs:
        by_id.pop(doc.id, None)
        by_id[doc.id] = doc
    return DocumentArray(by_id.values())


def _keep_within(query: Document, max_distance: Optional[float]) -> None:
    """Drop the query's matches farther than the request's ``max_distance`` (None keeps them all)."""
    if max_distance is not None:
        query.matches = DocumentArray(m for m in query.matches if within_distance(m.scores['cosine'].value, max_distance))


def _finish_match(match: Document, distance: float) -> None:
    """Set the match's cosine distance and drop its embedding (nobody needs 512 floats per match over the wire)."""
    # An exact match's distance is 0.0, proto3's default value, which travels as nothing at all:
    # op_name keeps the score itself on the wire, and 0.0 is sent as -0.0 (equal to 0.0, but with a
    # set sign bit protobuf serialises it), because Jina's HTTP gateway turns a missing value into null
    score = match.scores['cosine']
    score.value = max(float(distance), 0.0) or -0.0
    score.op_name = 'cosine'
    match.embedding = None


def _graph_walk_fell_short(exc: RuntimeError) -> bool:
    """hnswlib's error when a graph walk finds fewer than the asked matches (seen with few documents
    passing a filter on a shard, and after deletes): an exact search answers instead."""
    return 'contigious 2D array' in str(exc)


def _finish_matches(query: Document) -> None:
    for match in query.matches:
        _finish_match(match, match.scores['cosine'].value)


def exact_filtered_search(
    index, docs: DocumentArray, search_filter: Optional[dict], limit: int, done: Optional[Callable[[Document], None]] = None
) -> None:
    """Top-``limit`` matches by cosine distance among every document that passes the filter (brute
    force, a chunk of candidates at a time: ``clip_search.exact_search``); ``done`` gets each query
    as soon as its matches are set."""
    exact_search(index, docs, search_filter, limit, done=done)


def _check_or_write_settings(data_path: Path, settings: dict) -> None:
    """Refuse to open a shard built with another dimension, metric, shard count, tag columns or placement."""
    data_path.mkdir(parents=True, exist_ok=True)
    settings_file = data_path / SETTINGS_FILE
    if settings_file.exists():
        stored = json.loads(settings_file.read_text())
        for key in ('n_dim', 'metric', 'shards', 'columns', 'n_subvectors'):
            if stored.get(key) != settings[key]:
                raise ValueError(
                    f'workspace {data_path} was built with {key}={stored.get(key)!r}, '
                    f'not {settings[key]!r}: start with the same setting or a new workspace'
                )
        _check_placement(data_path, stored.get('index_polling', ALL), settings['index_polling'])
    shard_store.write_atomically(settings_file, json.dumps(settings, indent=2).encode())


def _check_placement(data_path: Path, stored: str, wanted: str) -> None:
    """ALL -> ANY is allowed (hash-placed ids are where ANY looks too); ANY -> ALL is not.

    A workspace written before placement was recorded was placed by hash (ALL).
    """
    if stored == ANY and wanted == ALL:
        raise ValueError(
            f'workspace {data_path} was built with index_polling=ANY (an id may be on any shard), '
            f'not ALL (an id on the shard it hashes to): poll /index ANY or use a new workspace'
        )


def _restore_interrupted_replace(index, journal: Path, old: DocumentArray, logger) -> None:
    """Put back ``old``, the versions a replace journalled before it was cut short, and drop the journal.

    The replace was never acknowledged, so the acknowledged state is the one before it.
    """
    shard_store.delete(index, old[:, 'id'])  # the ids the interrupted replace left indexed
    index.index(old)
    shard_store.remove_durably(journal)
    logger.warning(f'restored {len(old)} documents of a replace interrupted by a crash: {old[:, "id"][:10]}')

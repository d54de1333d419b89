"""Where a shard's memory goes, a document at a time: the graph, annlite's SQL tables, RocksDB, the rest.

    python bench/memory.py --docs 100000 [--pq 64] [--out bench/results/memory]

One shard (the indexer alone, in this process) indexes ``docs`` clustered 512-d documents, 1,000 a
write. It then reports the process's anonymous memory above the empty shard, per document, beside
what each part says it holds:

- the HNSW graph: the snapshot's ``hnsw.bin`` (the graph's level 0 and upper layers, as hnswlib
  saves them) plus hnswlib's per-node overhead that is not saved (a mutex and a label-map entry);
- annlite's SQL tables (offsets to ids, ids to offsets): the pages SQLite holds in memory when the
  tables live in memory, or its page cache when they live in a file (``live_tables``);
- RocksDB: its memtables and block cache, as RocksDB reports them;
- the rest (Python objects, malloc slack).

The vector file of a compressed shard is a memory-mapped file: page cache, not the process's own
memory, reported beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DIM, clustered_vectors, scratch_dir

BATCH = 1000
HNSW_NODE_OVERHEAD_BYTES = 40 + 48  # a std::mutex per node, an unordered_map<label, id> entry (libstdc++)


def anon_mib() -> float:
    """This process's anonymous resident memory (heap and anonymous maps), in MiB."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) / 1024
    return 0.0


def sqlite_bytes(connection) -> int:
    """What one SQLite connection holds: its database pages when in memory, else its page cache."""
    page_size = connection.execute('PRAGMA page_size').fetchone()[0]
    in_memory = not connection.execute('PRAGMA database_list').fetchone()[2]
    if in_memory:
        return page_size * connection.execute('PRAGMA page_count').fetchone()[0]
    cache_pages = connection.execute('PRAGMA cache_size').fetchone()[0]
    return -cache_pages * 1024 if cache_pages < 0 else cache_pages * page_size


def rocksdb_bytes(store) -> int:
    db = store._db
    return sum(db.property_int_value(name) or 0 for name in ('rocksdb.cur-size-all-mem-tables', 'rocksdb.block-cache-usage'))


def main() -> None:
    from docarray import Document, DocumentArray

    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--docs', type=int, default=100_000)
    parser.add_argument('--pq', type=int, help='n_subvectors (product quantization)')
    parser.add_argument('--pq-train-size', type=int, default=20_000)
    parser.add_argument('--out', type=Path, help='write memory-<docs>[-pq<N>].json into this folder')
    args = parser.parse_args()
    workspace = scratch_dir('bench-memory-') / 'shard'
    corpus = clustered_vectors(args.docs, max(10, args.docs // 100), seed=1)
    settings = dict(n_subvectors=args.pq, pq_train_size=args.pq_train_size) if args.pq else {}
    shard = AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(workspace)}, **settings)
    assert shard.wait_loaded(600)
    empty = anon_mib()
    started = time.monotonic()
    for start in range(0, args.docs, BATCH):
        rows = range(start, min(start + BATCH, args.docs))
        shard.index(DocumentArray(Document(id=f'd{i}', embedding=corpus[i]) for i in rows))
    seconds = time.monotonic() - started
    del corpus
    shard._snapshot_in_background()  # the graph as saved, to size it (and so no snapshot runs while measuring)
    time.sleep(1)
    full = anon_mib()
    index, n = shard._index, args.docs
    folder = sorted(shard._data_path.glob('snapshot-*'))[-1]
    per_doc = lambda size: round(size / n)  # noqa: E731
    graph = (folder / 'hnsw.bin').stat().st_size + HNSW_NODE_OVERHEAD_BYTES * index.vec_index(0)._index.element_count
    tables = sqlite_bytes(index.cell_table(0)._conn) + sqlite_bytes(index.meta_table._conn)
    rocksdb = rocksdb_bytes(index.doc_store(0))
    anon = (full - empty) * 2**20
    result = {
        'docs': n,
        'n_subvectors': args.pq,
        'index_docs_per_s': round(n / seconds),
        'anon_mib_empty': round(empty, 1),
        'anon_mib_full': round(full, 1),
        'bytes_per_doc': {
            'anonymous memory above empty': per_doc(anon),
            'HNSW graph': per_doc(graph),
            'SQL tables (annlite: offsets and ids)': per_doc(tables),
            'RocksDB memtables and block cache': per_doc(rocksdb),
            'the rest (Python objects, malloc slack)': per_doc(anon - graph - tables - rocksdb),
        },
        'vector_file_mib': round(shard._compression.vectors.rows * DIM * 4 / 2**20, 1) if args.pq else 0,
    }
    shard.close()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f'memory-{n}' + (f'-pq{args.pq}' if args.pq else '')
        (args.out / f'{name}.json').write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()

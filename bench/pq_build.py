"""Why annlite's PQ graph builds slower than its float graph, and what clip-search's path costs instead.

    python bench/pq_build.py --docs 20000      # about 2 minutes on one core

One process, one thread, the same clustered 512-d unit vectors, M=16, ef_construction=200, batches
of 512 rows. Measures CPU seconds (the machine is shared) of:

* the codec's training: faiss's k-means (clip_search.pq.train_codec); annlite's own
  (scikit-learn, ``n_init=4``) is timed on a slice only with ``--annlite-training``;
* the float graph's build (annlite's ``HnswIndex.add_with_ids``);
* annlite's PQ build (the same call with a trained ``PQCodec``), split into its distance tables
  (``PQCodec.get_dist_mat``), its encoding (``PQCodec.encode``, scipy's ``vq``) and the graph insert;
* clip-search's PQ build: codes and tables from one matrix product (clip_search.pq.codes_and_tables),
  then the same graph insert.

Writes ``OUT/pq_build-N.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import HNSW, clustered_vectors

BENCH = Path(__file__).resolve().parent
BATCH = 512


def cpu(run) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def graph(dim: int, codec=None):
    from annlite.core.index.hnsw import HnswIndex

    index = HnswIndex(dim, ef_construction=HNSW['ef_construction'], max_connection=HNSW['M'], pq_codec=codec)
    index._index.set_num_threads(1)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--docs', type=int, default=20000)
    parser.add_argument('--subvectors', type=int, default=64)
    parser.add_argument('--out', type=Path, default=BENCH / 'results' / 'pq')
    args = parser.parse_args()

    from clip_search.pq import codes_and_tables, train_codec, unit_rows

    vectors = unit_rows(clustered_vectors(args.docs, max(10, args.docs // 100), seed=1))
    batches = [(vectors[s : s + BATCH], np.arange(s, min(s + BATCH, args.docs))) for s in range(0, args.docs, BATCH)]
    result: dict = {'docs': args.docs, 'dim': vectors.shape[1], 'n_subvectors': args.subvectors, 'batch': BATCH}

    codec = None

    def train():
        nonlocal codec
        codec = train_codec(vectors, args.subvectors)

    result['train_faiss_cpu_s'] = cpu(train)
    print(result, flush=True)

    float_graph = graph(vectors.shape[1])
    result['float_build_cpu_s'] = cpu(lambda: [float_graph.add_with_ids(x, ids) for x, ids in batches])
    del float_graph

    annlite_graph = graph(vectors.shape[1], codec)
    result['annlite_pq_build_cpu_s'] = cpu(lambda: [annlite_graph.add_with_ids(x, ids) for x, ids in batches])
    result['annlite_dist_tables_cpu_s'] = cpu(lambda: [codec.get_dist_mat(x) for x, _ in batches])
    result['annlite_encode_cpu_s'] = cpu(lambda: [codec.encode(x) for x, _ in batches])
    del annlite_graph

    ours = graph(vectors.shape[1], codec)
    ours._expand_capacity(args.docs)  # annlite's add_with_ids grows it; the bare insert below does not
    prepared = []
    result['ours_codes_and_tables_cpu_s'] = cpu(lambda: prepared.extend(codes_and_tables(codec, x) for x, _ in batches))

    def insert():
        for (codes, tables), (_, ids) in zip(prepared, batches):
            ours._index.add_items(codes, ids=ids, dtables=tables)

    result['pq_graph_insert_cpu_s'] = cpu(insert)
    for key in ('float_build', 'annlite_pq_build'):
        result[f'{key}_docs_per_cpu_s'] = round(args.docs / result[f'{key}_cpu_s'])
    ours_total = result['ours_codes_and_tables_cpu_s'] + result['pq_graph_insert_cpu_s']
    result['ours_pq_build_docs_per_cpu_s'] = round(args.docs / ours_total)
    result['annlite_pq_vs_float'] = round(result['float_build_cpu_s'] / result['annlite_pq_build_cpu_s'], 2)
    result['ours_pq_vs_float'] = round(result['float_build_cpu_s'] / ours_total, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'pq_build-{args.docs}.json').write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()

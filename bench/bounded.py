"""Bounded work per request: a shard's peak memory for the largest search it accepts.

    python bench/bounded.py --docs 200000 [--blob-bytes 2048] [--shard DIR] [--out bench/results/bounded]

Builds one shard (the indexer alone, no Flow) of 64-d documents, each with a blob of
``--blob-bytes`` standing in for its thumbnail (0: none), in ``--shard`` (kept there and reused by a
later run with the same ``--docs`` and ``--blob-bytes``: a 200k build takes minutes). Then, each in
a fresh process that loads the shard's snapshot, it runs one search of 10 queries x limit 10,000
(the default cap, 100,000 matches) as Jina serves it: the request arrives as bytes, the shard's
``/search`` endpoint answers, Jina sets the answer into the request (``to_protobuf`` and a copy)
and serialises it. It reports the process's peak resident memory over the loaded shard
(``peak_growth_mib``), the serialised answer (``payload_mib``: what the client receives, the
matches) and the growth beyond it:

- ``graph``: the usual HNSW search, as served (``serve_search``: each query's matches serialised
  as soon as they are final, then parsed straight into Jina's request: ``clip_search.wire_answer``);
- ``graph_copied``: the same, but the answer parsed on its own and copied into the request, as
  Jina does for any answer (what the shard did until the answer was parsed into the request);
- ``graph_as_before``: the same search answered as before, all matches as Python documents
  (``search``, what ``serve_search`` returned until issue 26), then Jina's serialisation;
- ``exact``: the exact fallback as served (``clip_search.exact_search``, chunks of candidates;
  forced by making the graph walk report a shortfall, as hnswlib does after deletes);
- ``annlite_filter``: what the fallback did before, annlite's ``filter`` of every document, for
  comparison (its documents only, not serialised);

and that a search of 256 queries x limit 10,000 is refused naming the cap.

The peak is the kernel's high-water mark (``VmHWM``), reset once the shard is loaded
(``/proc/self/clear_refs``), so loading's own peak is not counted; gRPC's copy of the bytes it
sends is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import scratch_dir

DIM, QUERIES, LIMIT = 64, 10, 10_000
RESULT = 'RESULT '  # a worker's answer line


def open_shard(workspace: Path):
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    shard = AnnLiteIndexer(n_dim=DIM, metas={'workspace': str(workspace)}, columns=[['color', 'str']])
    assert shard.wait_loaded(3600)
    return shard


BUILT = 'bounded-build.json'  # in a built shard's folder: what it holds, so a later run can reuse it


def build(workspace: Path, docs: int, blob_bytes: int) -> float:
    """Index ``docs`` documents into a shard at ``workspace`` (seconds taken), or reuse the one a
    previous run built there with the same ``docs`` and ``blob_bytes`` (its build's seconds)."""
    from docarray import Document, DocumentArray

    wanted = {'docs': docs, 'blob_bytes': blob_bytes}
    marker = workspace / BUILT
    if marker.exists():
        built = json.loads(marker.read_text())
        if {key: built.get(key) for key in wanted} != wanted:
            raise SystemExit(f'{workspace} holds a shard of {built}, not {wanted}: pass another --shard')
        return built['build_s']
    if workspace.exists() and any(workspace.iterdir()):
        raise SystemExit(f'{workspace} is not empty and was not built by this script: pass another --shard')
    shard, rng, started = open_shard(workspace), np.random.default_rng(1), time.monotonic()
    for start in range(0, docs, 10_000):
        n = min(10_000, docs - start)
        vectors = rng.normal(size=(n, DIM)).astype(np.float32)
        batch = DocumentArray(
            Document(id=f'd{start + i}', embedding=v, tags={'color': 'red' if i % 2 else 'blue'})
            for i, v in enumerate(vectors)
        )
        if blob_bytes:
            for doc in batch:
                doc.blob = rng.bytes(blob_bytes)
        shard.index(batch)
    seconds = round(time.monotonic() - started, 1)
    shard.close()
    marker.write_text(json.dumps(dict(wanted, build_s=seconds)) + '\n')
    return seconds


def _status_mib(field: str) -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f'no {field} in /proc/self/status')


def reset_peak() -> float:
    """Collect garbage, reset the high-water mark to the current resident memory, return it (MiB)."""
    gc.collect()
    Path('/proc/self/clear_refs').write_text('5')
    return _status_mib('VmRSS')


def measure(workspace: Path, method: str) -> dict:
    """In this process: load the shard, run one search by ``method`` as Jina serves it, report the
    peak memory growth and the serialised answer."""
    from docarray import Document, DocumentArray
    from jina.proto.serializer import DataRequestProto
    from jina.serve.runtimes.worker.request_handling import WorkerRequestHandler
    from jina.types.request.data import DataRequest

    shard = open_shard(workspace)
    rng = np.random.default_rng(2)
    if method == 'over_the_cap':
        try:
            shard.search(DocumentArray(Document(embedding=v) for v in rng.normal(size=(256, DIM)).astype(np.float32)), parameters={'limit': LIMIT})
        except ValueError as exc:
            return {'refused': str(exc)}
        return {'refused': None}
    sent = DataRequest()  # what a client sends: the queries, as bytes
    sent.data.docs = DocumentArray(Document(embedding=v) for v in rng.normal(size=(QUERIES, DIM)).astype(np.float32))
    request = DataRequest(DataRequestProto.SerializeToString(sent))
    parameters = {'limit': LIMIT}
    if method == 'exact':  # hnswlib's error when a walk falls short: the shard answers by the exact search
        def fell_short(*args):
            raise RuntimeError('Cannot return the results in a contigious 2D array. Probably ef or M is too small')

        shard._search_unfiltered = fell_short
    loaded = reset_peak()
    started = time.monotonic()
    if method == 'annlite_filter':
        everything = shard._index.filter(filter={}, limit=shard._index.total_docs)
        assert len(everything) == shard._index.total_docs
        return {'peak_growth_mib': round(_status_mib('VmHWM') - loaded), 'seconds': round(time.monotonic() - started, 2)}
    docs = request.docs
    if method == 'graph_as_before':
        answer = shard.search(docs, parameters)
    else:
        answer = asyncio.run(shard.serve_search(docs, parameters))
    searched = round(time.monotonic() - started, 2)
    matches = sum(len(query.matches) for query in answer if query.matches)
    if method == 'graph_copied':
        request.data._content.docs.CopyFrom(answer.to_protobuf())  # Jina's own set_docs_convert_arrays
    else:
        WorkerRequestHandler.replace_docs(request, answer, None)  # Jina's _set_result
    del answer, docs  # the handler returns: its answer goes, the request stays until sent
    wire = DataRequestProto.SerializeToString(request)  # what gRPC sends
    peak, seconds = _status_mib('VmHWM') - loaded, time.monotonic() - started
    sent_matches = sum(len(query.matches) for query in request.proto.data.docs.docs)
    payload = len(wire) / 2**20
    return {
        'peak_growth_mib': round(peak),
        'payload_mib': round(payload, 1),
        'growth_beyond_payload_mib': round(peak - payload),
        'seconds': round(seconds, 2),
        'search_seconds': searched,
        'matches': sent_matches if method != 'graph_as_before' else matches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--docs', type=int, default=200_000)
    parser.add_argument('--blob-bytes', type=int, default=2048, help='bytes of blob (the stand-in thumbnail) per document')
    parser.add_argument('--shard', help='build the shard here, or reuse the one a run with the same --docs and --blob-bytes built')
    parser.add_argument('--out', help='write bounded-blob<N>.json into this folder')
    parser.add_argument('--measure', nargs=2, metavar=('WORKSPACE', 'METHOD'), help=argparse.SUPPRESS)  # a worker
    args = parser.parse_args()
    if args.measure:
        print(RESULT + json.dumps(measure(Path(args.measure[0]), args.measure[1])))  # beside the shard's log lines
        return
    workspace = Path(args.shard) if args.shard else scratch_dir('bench-bounded-') / 'shard'
    result = {'docs': args.docs, 'blob_bytes': args.blob_bytes, 'build_s': build(workspace, args.docs, args.blob_bytes)}
    for method in ('graph', 'graph_copied', 'graph_as_before', 'exact', 'annlite_filter', 'over_the_cap'):
        worker = subprocess.run(
            [sys.executable, __file__, '--measure', str(workspace), method], capture_output=True, text=True, check=True
        )
        result[method] = json.loads(next(line for line in worker.stdout.splitlines() if line.startswith(RESULT))[len(RESULT) :])
        print(method, result[method], flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f'bounded-blob{args.blob_bytes}.json').write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()

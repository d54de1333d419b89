"""Helpers shared by the benchmark workers: data, timing, memory, and talking to the orchestrator.

Each worker runs in a process of its own (annlite and hnswlib cannot share one, and each encoder
must own its torch threads), reads its task as JSON from argv and writes its result as JSON.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / 'tests'):  # workers run as scripts: clip_search, and the test kit (helpers)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

DIM = 512  # ViT-B-32's embedding size
HNSW = {'M': 16, 'ef_construction': 200, 'ef_search': 400}  # the indexer's defaults, used by every HNSW
LIMIT = 10


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when this process exits (a 200k run's workspace is 1.4 GB)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def clustered_vectors(n: int, n_clusters: int, seed: int, dim: int = DIM, spread: float = 0.6) -> np.ndarray:
    """Unit vectors drawn around ``n_clusters`` random centres, like embeddings of a real collection.

    The centres depend on ``n_clusters`` and a fixed seed only, so a corpus and its queries (drawn
    with other seeds) come from the same clusters.
    """
    centres = np.random.default_rng(12345).normal(size=(n_clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):  # in chunks: 1M vectors at once would need 3x the memory
        m = min(50_000, n - start)
        chunk = centres[rng.integers(n_clusters, size=m)] + spread * rng.normal(size=(m, dim)).astype(np.float32)
        out[start : start + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process (default: this one), in MiB."""
    try:
        for line in Path(f'/proc/{pid or os.getpid()}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of the values, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def recall_at_k(found: list[list], truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found, over queries (ids compared as ints)."""
    k = truth.shape[1]
    hits = sum(len({int(i) for i in row[:k]} & set(true_row.tolist())) for row, true_row in zip(found, truth))
    return hits / (k * len(truth))


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most similar corpus rows per query (exact, by inner product), in blocks."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 16):  # 16 x 1M similarities at a time, not all of them
        sims = queries[start : start + 16] @ corpus.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + 16] = np.take_along_axis(top, order, axis=1)
    return out


def dir_size_mib(path: Path) -> float:
    """Bytes on disk under a directory, in MiB."""
    return sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file()) / 2**20


def worker_main(run) -> None:
    """Entry point of a worker script: ``script.py TASK_JSON OUT_JSON``."""
    task = json.loads(sys.argv[1])
    result = run(task)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))

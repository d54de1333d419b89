"""Product quantization for a shard: annlite's HNSW graph over PQ codes, with an exact re-rank.

``n_subvectors`` turns it on (docs/design.md, "Compression"). A shard that starts empty indexes its
first ``pq_train_size`` documents as float vectors (exact search); the write that reaches that count
trains the codec on them and moves them into a graph over PQ codes, at the same offsets. From then
on the graph holds ``n_subvectors`` bytes a document, returns ``limit x rerank_factor`` candidates,
and their float vectors, read from ``clip_search.vector_file``, re-score them exactly: every
distance a client sees is the exact cosine distance.

What is done here rather than by annlite, and why (measured by bench/pq_build.py, figures in
bench/results/pq and the README):

* the codec is trained with faiss's k-means and kept as annlite's ``PQCodec``: annlite's own
  (scikit-learn, ``n_init=4``) is far too slow for a training inside a write;
* codes and distance tables for inserts come from one batched matrix product: annlite's Cython
  tables and scipy's ``vq`` encoding cost more than the whole insert into the graph;
* a graph over PQ codes is loaded codec first, then graph: annlite's ``HnswIndex.load`` loads the
  graph and then ``loadPQ``, which replaces it with an empty one.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np

from clip_search import shard_store
from clip_search.vector_file import VectorFile

N_CLUSTERS = 256  # one byte a sub-vector: annlite's default and the only code size faiss trains in 8 bits
INSERT_CHUNK = 512  # rows per graph insert: the distance tables take 64 KiB a row at 64 sub-vectors


def check_settings(n_dim: int, n_subvectors: Optional[int], pq_train_size: int, rerank_factor: int) -> None:
    """Refuse, by name, compression settings the codec cannot use."""
    if n_subvectors is None:
        return
    if isinstance(n_subvectors, bool) or not isinstance(n_subvectors, int) or n_subvectors < 1 or n_dim % n_subvectors:
        raise ValueError(
            f'n_subvectors={n_subvectors!r} must divide n_dim={n_dim} '
            f'(product quantization cuts each vector into equal sub-vectors)'
        )
    if pq_train_size < N_CLUSTERS:
        raise ValueError(f'pq_train_size={pq_train_size} must be at least {N_CLUSTERS} (the codewords of a sub-vector)')
    if rerank_factor < 1:
        raise ValueError(f'rerank_factor={rerank_factor} must be at least 1')


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def train_codec(vectors: np.ndarray, n_subvectors: int):
    """An annlite ``PQCodec`` (cosine) trained with faiss's k-means on ``vectors``."""
    import faiss
    from annlite.core.codec.pq import PQCodec
    from annlite.enums import Metric

    faiss.omp_set_num_threads(1)  # the shard's one core: the other shards on the machine keep theirs
    vectors = np.ascontiguousarray(unit_rows(vectors))
    n_dim = vectors.shape[1]
    quantizer = faiss.ProductQuantizer(n_dim, n_subvectors, 8)
    quantizer.cp.min_points_per_centroid = 1  # pq_train_size decides; no warning below faiss's 39 a centroid
    quantizer.train(vectors)
    codec = PQCodec(n_dim, n_subvectors=n_subvectors, n_clusters=N_CLUSTERS, metric=Metric.COSINE)
    codec._codebooks = faiss.vector_to_array(quantizer.centroids).reshape(n_subvectors, N_CLUSTERS, -1).astype(np.float32)
    codec._is_trained = True
    return codec


def codes_and_tables(codec, unit_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PQ codes (N, M) and annlite's cosine distance tables (N, M, 256) of unit vectors, from one product."""
    codebooks = codec.codebooks  # (M, 256, d)
    n, m = len(unit_vectors), codec.n_subvectors
    parts = unit_vectors.reshape(n, m, -1).transpose(1, 0, 2)  # (M, N, d)
    products = np.matmul(parts, codebooks.transpose(0, 2, 1))  # (M, N, 256)
    squared = np.einsum('mkd,mkd->mk', codebooks, codebooks)[:, None, :]
    codes = np.argmin(squared - 2 * products, axis=2).T.astype(np.uint8)  # nearest codeword per sub-vector
    tables = np.ascontiguousarray((1.0 / codec.n_clusters - products).transpose(1, 0, 2), dtype=np.float32)
    return np.ascontiguousarray(codes), tables


class Compression:
    """One shard's PQ state: the codec (None until trained), the float vector file, the re-rank."""

    def __init__(self, folder, n_dim: int, n_subvectors: int, pq_train_size: int, rerank_factor: int):
        self.n_subvectors = n_subvectors
        self.train_size = pq_train_size
        self.rerank_factor = rerank_factor
        self.vectors = VectorFile(folder, n_dim)

    def attach(self, graph) -> None:
        """Every insert into the graph (index, replay, rebuild) also writes the float vector file."""
        add_float = graph.add_with_ids

        def add_with_ids(x: np.ndarray, ids) -> None:
            unit = unit_rows(np.asarray(x).reshape(len(ids), -1))
            offsets = np.asarray(ids, dtype=np.int64)
            self.vectors.write(offsets, unit)
            if graph.pq_codec is None:
                add_float(unit, offsets)
            else:
                self.add_codes(graph, unit, offsets)

        graph.add_with_ids = add_with_ids

    @staticmethod
    def trained(index) -> bool:
        return index.vec_index(0).pq_codec is not None

    def train_when_ready(self, index) -> Optional[str]:
        """Once the float graph holds ``pq_train_size`` documents: train and move them into a PQ graph."""
        if self.trained(index) or index.total_docs < self.train_size:
            return None
        started = time.monotonic()
        offsets = shard_store.live_offsets(index)
        if len(offsets) < self.train_size:
            return None
        unit = self.vectors.read(offsets)
        codec = train_codec(unit[: self.train_size], self.n_subvectors)
        self.install(index, codec)
        for start in range(0, len(offsets), INSERT_CHUNK):
            self.add_codes(index.vec_index(0), unit[start : start + INSERT_CHUNK], offsets[start : start + INSERT_CHUNK])
        return (
            f'trained the PQ codec ({self.n_subvectors} sub-vectors) on {self.train_size} documents and moved '
            f'{len(offsets)} into the PQ graph in {time.monotonic() - started:.1f} s'
        )

    def train_from_store(self, index) -> None:
        """Before a rebuild from the document store: a new codec from its first documents, if it has enough."""
        if index.total_docs < self.train_size:
            self.install(index, None)  # a float graph: the store's documents are still the training set to be
            return
        sample = []
        for docs in index.documents_generator(0, batch_size=min(self.train_size, 10240)):
            sample.append(np.asarray(docs.embeddings, dtype=np.float32))
            if sum(len(part) for part in sample) >= self.train_size:
                break
        self.install(index, train_codec(np.concatenate(sample)[: self.train_size], self.n_subvectors))

    @staticmethod
    def install(index, codec) -> None:
        """An empty graph over ``codec``'s codes (None: over floats), in place of whatever the shard's graph held."""
        graph = index.vec_index(0)
        graph.pq_codec = codec
        graph.reset()  # annlite's init_index with a trained codec: a PQ space
        shard_store.single_threaded(index)

    def nearest(self, index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest offsets and exact cosine distances of each query: ``k x rerank_factor``
        candidates from the PQ graph, re-scored from the float vectors."""
        graph = index.vec_index(0)
        candidates = min(k * self.rerank_factor, index.total_docs)
        unit = unit_rows(queries)
        codes, tables = codes_and_tables(graph.pq_codec, unit)
        with graph_lock(graph):
            graph._index.set_ef(max(graph.ef_search, candidates))
            offsets, _ = graph._index.knn_query(codes, k=candidates, num_threads=1, dtables=tables)
        offsets = offsets.astype(np.int64)
        exact = np.empty(offsets.shape, dtype=np.float32)
        for row, query in enumerate(unit):  # one query's candidates at a time: bounded memory
            exact[row] = 1.0 - self.vectors.read(offsets[row]) @ query
        order = np.argsort(exact, axis=1, kind='stable')[:, :k]
        return np.take_along_axis(offsets, order, axis=1), np.take_along_axis(exact, order, axis=1)

    def candidates(self, limit: int) -> int:
        return limit * self.rerank_factor

    @staticmethod
    def rerank_matches(docs, limit: int) -> None:
        """Exact cosine distances for matches that carry their stored embeddings; keep the best ``limit``."""
        for doc in docs:
            if not len(doc.matches):
                continue
            query = unit_rows(doc.embedding)
            exact = 1.0 - unit_rows(doc.matches.embeddings) @ query
            order = np.argsort(exact, kind='stable')[:limit]
            matches = doc.matches[order.tolist()]
            for match, distance in zip(matches, exact[order]):
                match.scores['cosine'].value = float(distance)
            doc.matches = matches

    def add_codes(self, graph, unit: np.ndarray, offsets: np.ndarray) -> None:
        """Insert unit vectors into a graph over PQ codes, at ``offsets``."""
        shard_store.make_room(graph, offsets)
        for start in range(0, len(offsets), INSERT_CHUNK):
            codes, tables = codes_and_tables(graph.pq_codec, unit[start : start + INSERT_CHUNK])
            with graph_lock(graph):
                graph._index.add_items(codes, ids=offsets[start : start + INSERT_CHUNK], dtables=tables)

    def close(self) -> None:
        self.vectors.close()


def graph_lock(graph) -> threading.Lock:
    """The lock of one graph over PQ codes: annlite attaches one call's distance tables to its space,
    so one call at a time (a graph being built beside it by a compaction has its own)."""
    return graph.__dict__.setdefault('_clip_search_lock', threading.Lock())


def load_graph(graph, graph_file, codec_file) -> None:
    """Load a graph over PQ codes: the codec's space first, then the graph (see the module's note)."""
    from annlite.core.codec.pq import PQCodec

    codec = PQCodec.load(codec_file)
    graph.pq_codec = codec
    graph._index.loadPQ(codec)
    graph._index.load_index(str(graph_file))
    graph._set_backend_pq = True

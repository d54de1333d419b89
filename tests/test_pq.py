"""Product quantization (``--pq N``): a shard indexes its first ``pq_train_size`` documents as floats,
then trains the codec and compresses its graph; every distance a client sees is still the exact cosine
distance, re-scored from the float vectors on disk. Bad settings are refused by name, a damaged codec
is rebuilt from the documents."""

from __future__ import annotations

import re

import numpy as np
import pytest
from docarray import Document, DocumentArray

from clip_search import RequestError
from clip_search.flowconfig import FlowConfigError, find_executor, load_flow_config, set_index_dimension
from helpers.service import FLOW_FILE, flow_compressed, start_service

DIM, PQ, TRAIN = 64, 16, 256  # the tiny model's 64-d embeddings in 16 sub-vectors of 4


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors around 20 centres, as embeddings of a real collection cluster."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(20, dim))
    vectors = centres[rng.integers(0, 20, n)] + 0.35 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


CORPUS = clustered(1200, seed=1)
IDS = [f'c{i}' for i in range(len(CORPUS))]
COLORS = ['red' if i % 2 else 'blue' for i in range(len(CORPUS))]


def brute_force(query: np.ndarray, rows: list[int], k: int) -> list[tuple[str, float]]:
    distances = 1.0 - CORPUS[rows] @ (query / np.linalg.norm(query))
    order = np.argsort(distances, kind='stable')[:k]
    return [(IDS[rows[i]], float(distances[i])) for i in order]


def answers(client, queries: np.ndarray, **parameters) -> list[list[tuple[str, float]]]:
    results = client.search([Document(embedding=q) for q in queries], **parameters)
    return [[(m.id, m.scores['cosine'].value) for m in r.matches] for r in results]


def recall(found: list[list[tuple[str, float]]], truth: list[list[tuple[str, float]]]) -> float:
    return float(np.mean([len({i for i, _ in f} & {i for i, _ in t}) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope='module')
def service(tmp_path_factory, tiny_model):
    """Two shards with ``--pq 16`` and ``pq_train_size: 256``, holding 1200 clustered documents (compressed)."""
    directory = tmp_path_factory.mktemp('pq')
    flow = flow_compressed(directory, pq_train_size=TRAIN)
    service = start_service(tiny_model, directory / 'workspace', shards=2, flow_file=flow, extra_args=('--pq', str(PQ)))
    docs = [Document(id=i, embedding=v, tags={'color': c}) for i, v, c in zip(IDS, CORPUS, COLORS)]
    service.client().index(docs, batch_size=200)
    yield service
    service.stop()


def test_each_shard_trains_its_codec_once_it_holds_pq_train_size_documents(service):
    log = ' '.join(re.sub(r'\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\]', '', service.log()).split())  # without the time column
    for shard in (0, 1):
        assert re.search(rf'shard {shard}/2: trained the PQ codec \(16 sub-vectors\) on 256 documents and moved \d+ into the PQ graph', log)
    status = service.client().status()
    assert status['documents'] == 1200 and status['index']['n_subvectors'] == 16


def test_compressed_search_answers_exact_distances_and_finds_the_brute_force_neighbours(service):
    queries = clustered(40, seed=2)
    found = answers(service.client(), queries, limit=10)
    truth = [brute_force(q, list(range(len(CORPUS))), 10) for q in queries]
    for query, matches in zip(queries, found):
        assert len(matches) == 10 and [d for _, d in matches] == sorted(d for _, d in matches)
        exact = [float(1.0 - CORPUS[IDS.index(doc_id)] @ query) for doc_id, _ in matches]  # not the PQ estimate
        assert [d for _, d in matches] == pytest.approx(exact, abs=1e-5)
    assert recall(found, truth) >= 0.95
    own = answers(service.client(), CORPUS[:50], limit=1)
    assert [(m[0][0], round(m[0][1], 6)) for m in own] == [(IDS[i], 0.0) for i in range(50)]  # itself, at distance 0


def test_filters_and_max_distance_apply_to_exact_distances(service):
    client = service.client()
    query = clustered(1, seed=3)[0]
    red = answers(client, query[None], limit=20, filter={'color': {'$eq': 'red'}})[0]
    red_rows = [i for i, c in enumerate(COLORS) if c == 'red']
    truth = brute_force(query, red_rows, 20)
    assert [doc_id for doc_id, _ in red] == [doc_id for doc_id, _ in truth]
    assert [d for _, d in red] == pytest.approx([d for _, d in truth], abs=1e-5)

    unlimited = answers(client, query[None], limit=10)[0]
    cut = unlimited[4][1]
    assert answers(client, query[None], limit=10, max_distance=cut)[0] == unlimited[:5]


def test_update_and_delete_reach_the_compressed_graph_and_the_vector_file(service):
    client = service.client()
    moved = clustered(1, seed=4)[0]
    client.update([Document(id='c7', embedding=moved, tags={'color': 'green'})])
    match = client.search([Document(embedding=moved)], limit=1)[0].matches[0]
    assert (match.id, round(match.scores['cosine'].value, 6), match.tags['color']) == ('c7', 0.0, 'green')
    assert 'c7' not in [doc_id for doc_id, _ in answers(client, CORPUS[7][None], limit=10)[0]]

    assert client.delete(['c8']) == ['c8']
    assert 'c8' not in [doc_id for doc_id, _ in answers(client, CORPUS[8][None], limit=10)[0]]
    assert client.status()['documents'] == 1199


def test_a_limit_whose_candidates_exceed_the_cap_is_refused_by_name(service):
    message = (
        'parameter limit=1001 asks the compressed index for 1001 x rerank_factor 10 = 10010 candidates, '
        'above max_candidates=10000: ask for at most 1000 matches'
    )
    with pytest.raises(RequestError, match=re.escape(message)):
        service.client().search([Document(embedding=CORPUS[0])], limit=1001)
    assert answers(service.client(), CORPUS[:1], limit=1000)[0][0][0] == 'c0'  # and it still answers


def open_shard(workspace, **settings):
    from clip_search.executors.annlite_indexer import AnnLiteIndexer

    return AnnLiteIndexer(n_dim=DIM, workspace=str(workspace), runtime_args={'shard_id': 0, 'shards': 1}, **settings)


def shard_answers(shard, queries: np.ndarray, limit: int = 5) -> list[list[tuple[str, float]]]:
    docs = DocumentArray([Document(embedding=q) for q in queries])
    shard.search(docs, parameters={'limit': limit})
    return [[(m.id, round(m.scores['cosine'].value, 6)) for m in d.matches] for d in docs]


def test_a_restart_loads_the_codec_and_a_damaged_codec_is_rebuilt_from_the_documents(tmp_path):
    shard = open_shard(tmp_path, n_subvectors=PQ, pq_train_size=TRAIN)
    shard.index(DocumentArray(Document(id=i, embedding=v) for i, v in zip(IDS[:600], CORPUS[:600])))
    queries = clustered(10, seed=5)
    before = shard_answers(shard, queries)
    shard.close()

    shard = open_shard(tmp_path, n_subvectors=PQ, pq_train_size=TRAIN)
    assert shard.wait_loaded(120)
    assert re.match(r'loaded snapshot-\d+ \(600 documents\) and replayed 0 changed ids', shard.loaded_how)
    assert shard_answers(shard, queries) == before
    shard.close()

    codec = max(tmp_path.rglob('snapshot-*/pq_codec.params'), key=lambda p: int(p.parent.name.split('-')[1]))
    damaged = bytearray(codec.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    codec.write_bytes(bytes(damaged))
    shard = open_shard(tmp_path, n_subvectors=PQ, pq_train_size=TRAIN)
    assert shard.wait_loaded(120)
    assert re.match(r'rebuilt 600 documents from the document store \(snapshot-\d+/pq_codec.params \(the PQ codec\) is damaged: CRC-32 mismatch\)', shard.loaded_how)
    assert shard_answers(shard, CORPUS[:20], limit=1) == [[(IDS[i], 0.0)] for i in range(20)]
    assert shard_answers(shard, queries) == before  # same exact distances (the graph may differ, the top 5 do not)
    shard.close()


def test_settings_that_product_quantization_cannot_use_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=re.escape('n_subvectors=12 must divide n_dim=64 (product quantization cuts each vector into equal sub-vectors)')):
        open_shard(tmp_path / 'twelve', n_subvectors=12)
    with pytest.raises(FlowConfigError, match=re.escape("the indexer's n_subvectors=12 (--pq) must divide the 64-d embeddings of model 'tiny'")):
        set_index_dimension({'executors': [{'uses': 'CLIPEncoder'}, {'uses': 'AnnLiteIndexer', 'uses_with': {'n_subvectors': 12}}]}, 64, 'tiny')

    config = load_flow_config(FLOW_FILE, pq=16)  # --pq 16
    assert find_executor(config, 'AnnLiteIndexer')['uses_with']['n_subvectors'] == 16
    with pytest.raises(FlowConfigError, match=re.escape('--pq must be at least 1 (bytes a document), not 0')):
        load_flow_config(FLOW_FILE, pq=0)

    float_shard = open_shard(tmp_path / 'float')
    float_shard.index(DocumentArray([Document(id='f', embedding=CORPUS[0])]))
    float_shard.close()
    with pytest.raises(ValueError, match=re.escape('was built with n_subvectors=None, not 16: start with the same setting or a new workspace')):
        open_shard(tmp_path / 'float', n_subvectors=PQ)
    float_shard = open_shard(tmp_path / 'float')
    assert float_shard.wait_loaded(60) and float_shard.status()[0].tags['documents'] == 1  # nothing lost
    float_shard.close()


def test_the_codec_is_annlites_and_its_codes_and_tables_match_annlites_own(tmp_path):
    from annlite.core.codec.pq import PQCodec

    from clip_search.pq import codes_and_tables, train_codec

    codec = train_codec(CORPUS[:TRAIN], PQ)
    codec.dump(tmp_path / 'pq_codec.params')
    loaded = PQCodec.load(tmp_path / 'pq_codec.params')  # annlite loads what the shard snapshots
    codes, tables = codes_and_tables(loaded, CORPUS[:100])
    assert np.array_equal(codes, loaded.encode(CORPUS[:100]))
    assert np.allclose(tables, loaded.get_dist_mat(CORPUS[:100]), atol=1e-5)


def test_annlites_own_load_of_a_pq_graph_empties_it_so_the_shard_loads_the_codec_first(tmp_path):
    """When this fails, annlite's ``HnswIndex.load`` keeps the graph: ``clip_search.pq.load_graph`` may go."""
    from annlite.core.index.hnsw import HnswIndex

    from clip_search.pq import load_graph, train_codec

    codec = train_codec(CORPUS[:TRAIN], PQ)
    built = HnswIndex(DIM, pq_codec=codec)
    built.add_with_ids(CORPUS[:300], list(range(300)))
    built.dump(tmp_path / 'hnsw.bin')
    annlites = HnswIndex(DIM, pq_codec=codec)
    annlites.load(tmp_path / 'hnsw.bin')
    assert annlites.size == 0
    ours = HnswIndex(DIM)
    load_graph(ours, tmp_path / 'hnsw.bin', _dumped(codec, tmp_path))
    assert ours.size == 300
    assert ours.search(CORPUS[5], limit=1)[1][0] == 5


def _dumped(codec, folder):
    codec.dump(folder / 'pq_codec.params')
    return folder / 'pq_codec.params'

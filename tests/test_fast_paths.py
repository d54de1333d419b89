"""The speed-ups found by bench/run.py give exactly the answers of the library code they bypass."""

import numpy as np
import torch
from docarray import Document, DocumentArray

from clip_search.executors.annlite_indexer import AnnLiteIndexer
from clip_search.executors.clip_encoder import CLIPEncoder


def test_text_embeddings_equal_open_clips_encode_text_for_any_mix_of_lengths(tiny_model):
    encoder = CLIPEncoder(name=str(tiny_model), minibatch_size=2)  # batches mix lengths and get reordered
    texts = ['a red circle!', 'hi', 'a very long text ' * 30, '!!! ! !', 'a blue square on a dark background', 'x']
    docs = DocumentArray(Document(text=t) for t in texts)
    model = encoder._clip.model
    library_encode_text = model.encode_text

    def refuse(*args, **kwargs):
        raise AssertionError('the library path ran: the fast text path was not taken')

    model.encode_text = refuse  # the fast path never calls it
    try:
        encoder.embed(docs)
    finally:
        model.encode_text = library_encode_text
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(library_encode_text(encoder._clip.tokenizer(texts)), dim=-1)
    np.testing.assert_allclose(docs.embeddings, expected.numpy(), atol=1e-5)
    encoder.close()


def test_unfiltered_search_answers_as_annlites_own_search(tmp_path):
    rng = np.random.default_rng(0)
    indexer = AnnLiteIndexer(n_dim=16, workspace=str(tmp_path), columns=[['color', 'str']])
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    indexer.index(DocumentArray(Document(id=f'd{i}', embedding=v, tags={'color': 'red'}) for i, v in enumerate(vectors)))
    indexer.delete(DocumentArray(Document(id=f'd{i}') for i in range(0, 300, 3)))  # deleted ids must never come back
    for limit in (5, 250):  # 250 > the 200 left: every document, in order
        queries = DocumentArray(Document(embedding=v) for v in rng.normal(size=(4, 16)).astype(np.float32))
        indexer.search(queries, parameters={'limit': limit})
        for query in queries:
            reference = DocumentArray([Document(embedding=query.embedding)])
            indexer._index.search(reference, limit=limit)  # annlite's own path
            assert query.matches[:, 'id'] == reference[0].matches[:, 'id']
            assert len(query.matches) == min(limit, 200)
            got = [m.scores['cosine'].value for m in query.matches]
            np.testing.assert_allclose(got, [max(m.scores['cosine'].value, 0) for m in reference[0].matches], atol=1e-6)
            assert query.matches[0].tags['color'] == 'red' and query.matches[0].embedding is None
    indexer.close()

"""CLIPEncoder: texts and images in, L2-normalised float32 CLIP embeddings out."""

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np
import open_clip
import torch
from docarray import DocumentArray
from docarray.score import NamedScore
from jina import Executor, requests
from open_clip.transformer import text_global_pool

from clip_search.media import DEFAULT_URI_TIMEOUT, BadDocumentError, MediaPolicy, content_kind, jpeg_thumbnail, load_image
from clip_search.models import DEFAULT_MODEL, load_model, resolve_model


class CLIPEncoder(Executor):
    """Encode ``text``, ``uri`` (path, http(s), data URI), ``blob`` and ``tensor`` documents.

    ``/encode`` returns the embeddings; ``/index``, ``/update`` and ``/search`` encode on the way
    to the indexer so a client never calls ``/encode`` first. A document that already carries an
    embedding and no content is passed through as it is. One bad document fails the whole
    request (nothing of it reaches the index) with an error naming it.

    The handlers are coroutines that run the work in threads: Jina runs a synchronous handler
    under one lock per executor, so a single slow image URL would hold every other request.
    ``/status`` and ``/delete`` have no handler here: they pass the encoder untouched, running nothing.
    """

    def __init__(
        self,
        name: str = DEFAULT_MODEL,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        minibatch_size: int = 32,
        num_workers: Optional[int] = None,
        uri_timeout: float = DEFAULT_URI_TIMEOUT,
        max_request_docs: int = 2048,
        allow_paths: Sequence[str] = (),
        allow_hosts: Sequence[str] = (),
        max_concurrent_requests: int = 8,
        thumbnail_size: int = 128,
        *args,
        **kwargs,
    ):
        """:param name: model name (``ViT-B-32::openai``, ``hf-hub:...``, a directory, ``mini::shapes``)
        :param device: ``cpu`` or ``cuda``; default: cuda when available
        :param dtype: ``fp32``, ``int8`` (CPU: linear layers quantized, ~1.5x faster) or ``fp16`` (CUDA);
            default: fp16 on CUDA, else fp32 (as clip_server)
        :param minibatch_size: inputs per forward pass
        :param num_workers: threads that load and preprocess images while the model runs; default: one per core
        :param uri_timeout: seconds one http(s) image may take in total (DNS, connect, body) before it is refused
        :param max_request_docs: refuse requests with more documents (one client cannot exhaust memory)
        :param allow_paths: directories whose files a document's uri may name (by default no path is opened)
        :param allow_hosts: host names, addresses or networks that may be fetched although they are
            loopback, private, link-local or unspecified (by default only public addresses are)
        :param max_concurrent_requests: requests encoded at once (the others wait their turn)
        :param thumbnail_size: on /index and /update, an image document's bytes become a JPEG of at most
            this many pixels a side, which the index stores and searches return (the web page shows it);
            0 stores the bytes as sent
        """
        super().__init__(*args, **kwargs)
        self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.minibatch_size = minibatch_size
        self.max_request_docs = max_request_docs
        self.thumbnail_size = thumbnail_size
        self.media = MediaPolicy.create(allow_paths, allow_hosts, uri_timeout)
        self._clip = load_model(resolve_model(name), self.device, dtype)  # refuses a dtype the device cannot run
        self._pool = ThreadPoolExecutor(max_workers=num_workers or os.cpu_count(), thread_name_prefix='preprocess')
        # images read from a uri wait on the network (up to uri_timeout): they get threads of their own,
        # enough for every concurrent request's minibatch, so that slow hosts never hold the decoding
        # of another request's images (4 dripping urls held a 2-core pool, and image searches, for 10 s)
        self._fetch_pool = ThreadPoolExecutor(max_workers=max_concurrent_requests * minibatch_size, thread_name_prefix='fetch')
        self._request_threads = ThreadPoolExecutor(max_workers=max_concurrent_requests, thread_name_prefix='request')
        # one forward pass at a time: torch already spreads one over every core, and concurrent
        # requests' passes side by side oversubscribe them (bench/dtype.py, fp32: 5.5 images/s, 9 in turn)
        self._model_lock = threading.Lock()
        self.logger.info(f'dtype {self._clip.dtype} on {self.device}: loaded {name} ({self._clip.spec.embed_dim}-d)')

    @requests(on=['/encode', '/search'])
    async def encode(self, docs: DocumentArray, parameters: Optional[dict] = None, **kwargs) -> DocumentArray:
        """Attach an embedding to every document (on /search before the indexer sees them).

        ``parameters['drop_image_content']`` (clip_server's, which clip_client sets) answers without
        the images' ``blob`` and ``tensor``: the client has them, and sending them back doubles the traffic.
        """
        await self._in_thread(self.embed, docs)
        if (parameters or {}).get('drop_image_content', False):
            for doc in docs:
                doc.pop('blob', 'tensor')
        return docs

    @requests(on=['/index', '/update'])
    async def encode_for_index(self, docs: DocumentArray, **kwargs) -> DocumentArray:
        """Embed, and replace each image's bytes by a small JPEG thumbnail (``thumbnail_size``) for the index."""
        await self._in_thread(self.embed, docs, 0, False, self.thumbnail_size)
        return docs

    @requests(on='/')
    async def encode_for_profile(self, docs: DocumentArray, **kwargs) -> DocumentArray:
        """``/`` (clip_client's ``profile()`` posts there): encode, an empty document as the empty text."""
        await self._in_thread(self.embed, docs, 0, True)
        return docs

    @requests(on='/rank')
    async def rank(self, docs: DocumentArray, parameters: Optional[dict] = None, **kwargs) -> DocumentArray:
        """clip-as-service's ranker: score each document's ``.matches`` by CLIP and sort them, best first."""
        return await self._in_thread(self.rank_docs, docs, parameters)

    async def _in_thread(self, function: Callable, *args):
        """Run blocking work (fetching, decoding, the model) off the event loop, so requests overlap."""
        return await asyncio.get_running_loop().run_in_executor(self._request_threads, function, *args)

    def rank_docs(self, docs: DocumentArray, parameters: Optional[dict] = None) -> DocumentArray:
        """Score each document's ``.matches`` by CLIP, best first (the body of ``/rank``)."""
        for doc in docs:
            if not doc.matches:
                raise BadDocumentError(doc.id, 'it has no candidates to rank: put them in .matches')
        candidates = docs['@m']
        self.embed(docs, extra=len(candidates))
        self.embed(candidates, extra=len(docs))
        set_clip_scores(docs, self.logit_scale)
        if (parameters or {}).get('drop_image_content', True):
            for doc in (*docs, *candidates):
                doc.pop('blob', 'tensor')
        return docs

    @property
    def logit_scale(self) -> float:
        """The temperature the model was trained with: CLIP's softmax over candidates uses it."""
        return float(self._clip.model.logit_scale.detach().exp())

    def embed(self, docs: DocumentArray, extra: int = 0, empty_as_text: bool = False, thumbnail_size: int = 0) -> None:
        """Encode every document with content, in minibatches, writing ``doc.embedding`` (and a thumbnail)."""
        if len(docs) + extra > self.max_request_docs:
            raise ValueError(
                f'the request has {len(docs) + extra} documents, more than max_request_docs={self.max_request_docs}: '
                f'send smaller batches (batch_size)'
            )
        kinds = [content_kind(doc, empty_as_text) for doc in docs]  # raises on the first empty document
        texts = [doc for doc, kind in zip(docs, kinds) if kind == 'text']
        images = [doc for doc, kind in zip(docs, kinds) if kind == 'image']
        if texts:
            tokens = self._clip.tokenizer([doc.text or '' for doc in texts])  # truncates long texts
            order = torch.argsort(_token_counts(tokens), descending=True).tolist()  # similar lengths share a batch
            for positions in _minibatches(order, self.minibatch_size):
                batch_tokens = tokens[positions]
                self._store([texts[i] for i in positions], self._forward(self._encode_text, batch_tokens))
        self._embed_images(images, thumbnail_size)

    def _embed_images(self, images: list, thumbnail_size: int = 0) -> None:
        """Encode images in minibatches; the pool decodes and resizes the next minibatch while the model runs."""
        batches = list(_minibatches(images, self.minibatch_size))
        upcoming = self._submit(batches[0], thumbnail_size) if batches else []
        for i, batch in enumerate(batches):
            pixels = [future.result() for future in upcoming]  # raises the first bad document's error
            upcoming = self._submit(batches[i + 1], thumbnail_size) if i + 1 < len(batches) else []
            pixels = torch.stack(pixels).to(self._clip.input_dtype)
            self._store(batch, self._forward(self._clip.model.encode_image, pixels))

    def _submit(self, batch: list, thumbnail_size: int) -> list[Future]:
        return [self._pool_for(doc).submit(self._preprocess, doc, thumbnail_size) for doc in batch]

    def _pool_for(self, doc) -> ThreadPoolExecutor:
        """The fetch pool for an image read from its uri, the core-sized pool for bytes already here."""
        return self._fetch_pool if doc.tensor is None and not doc.blob and doc.uri else self._pool

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's ``encode_text``, on the batch's tokens only rather than the whole padded context.

        CLIP pads every text to its context (77 tokens) but reads the embedding at the end-of-text
        token, and its text transformer is causal: no position sees the padding after it. Cutting the
        padding beyond the batch's longest text therefore changes no output, and a caption of 12
        tokens costs a sixth of the compute. Models without that shape (other pooling, no causal
        mask, a Hugging Face text tower) use their own ``encode_text``.
        """
        model = self._clip.model
        if not _causal_argmax_text_tower(model):
            return model.encode_text(tokens)
        length = int(_token_counts(tokens).max())
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, 'argmax')
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection

    def _preprocess(self, doc, thumbnail_size: int = 0) -> torch.Tensor:
        image = load_image(doc, self.media)
        if thumbnail_size:
            doc.blob, doc.tensor = jpeg_thumbnail(image, thumbnail_size), None
        return self._clip.preprocess(image)

    def _forward(self, encode, inputs: torch.Tensor) -> np.ndarray:
        with self._model_lock, torch.inference_mode():
            features = encode(inputs.to(self.device))
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)

    @staticmethod
    def _store(batch: list, embeddings: np.ndarray) -> None:
        for doc, embedding in zip(batch, embeddings):
            doc.embedding = embedding

    def close(self) -> None:
        self._request_threads.shutdown(wait=False)
        self._pool.shutdown(wait=False)
        self._fetch_pool.shutdown(wait=False)
        super().close()


def set_clip_scores(queries: DocumentArray, logit_scale: float) -> None:
    """Score and sort each query's embedded candidates as clip_server's ranker does.

    ``clip_score`` is the softmax of ``logit_scale * cosine`` over that query's candidates (they sum
    to 1), ``clip_score_cosine`` the cosine similarity; candidates lose their embeddings (bandwidth).
    """
    for query in queries:
        candidates = query.matches
        cosines = candidates.embeddings @ query.embedding  # both L2-normalised
        logits = logit_scale * cosines
        softmax = np.exp(logits - logits.max())
        softmax /= softmax.sum()
        for candidate, cosine, probability in zip(candidates, cosines, softmax):
            candidate.scores['clip_score'] = NamedScore(value=float(probability), op_name='softmax')
            candidate.scores['clip_score_cosine'] = NamedScore(value=float(cosine), op_name='cosine')
        candidates.embeddings = None
        query.matches = sorted(candidates, key=lambda c: c.scores['clip_score'].value, reverse=True)


def _token_counts(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens per text up to its end-of-text token, the highest id (where CLIP's argmax pooling reads)."""
    return tokens.argmax(dim=1) + 1


def _causal_argmax_text_tower(model) -> bool:
    """Whether the model is open_clip's CLIP with a causal text transformer pooled at end-of-text."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, 'text_pool_type', None) == 'argmax'
        and getattr(model, 'attn_mask', None) is not None
        and getattr(model.transformer, 'batch_first', False)
    )


def _minibatches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]

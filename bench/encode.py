"""Encoder worker: one CLIPEncoder (ours or clip_server's) in this process, driven over stdin.

    python bench/encode.py '{"impl": "ours"|"clip_server", "model_dir": DIR, "minibatch": 32, "threads": 2,
                             "dtype": "fp32"|"int8" (ours only)}'

It loads the encoder, prints ``ready``, then answers each stdin line ``text N``, ``image N``,
``split N`` or ``embed PATH`` with one JSON line: the seconds to encode the first N texts or images
of a fixed set (the same in every worker), the seconds of each stage of the image path run one
after the other (ours only), or where it saved the embeddings of a few inputs. Workers are driven
turn by turn, so all see the same machine load on a shared host.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT  # noqa: F401  (puts the project on sys.path)

ARCH = 'ViT-B-32'
CLIP_SERVER_NAME = 'ViT-B-32::laion2b-s34b-b79k'  # a clip_server name that builds open_clip's ViT-B-32 (GELU)
WEIGHTS = 'open_clip_pytorch_model.bin'  # a plain state dict: open_clip's hub layout and clip_server both read it
WORDS = (
    'a photo of the red blue green yellow dog cat house car tree bird on in with under next to small big '
    'bright dark old new two three people walking along street beach mountain river sunset at night'
).split()


def write_random_vit_b_32(directory: Path, seed: int = 0) -> Path:
    """Random-initialised open_clip ViT-B-32 in the hub layout (no pretrained weights can be fetched here)."""
    import open_clip
    import torch

    if (directory / WEIGHTS).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = open_clip.get_model_config(ARCH)
    model = open_clip.CLIP(**cfg)
    partial = directory / (WEIGHTS + '.part')
    torch.save(model.state_dict(), partial)
    preprocess = {'mean': list(open_clip.OPENAI_DATASET_MEAN), 'std': list(open_clip.OPENAI_DATASET_STD)}
    (directory / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg, 'preprocess_cfg': preprocess}))
    partial.rename(directory / WEIGHTS)
    return directory


def sample_texts(n: int) -> list[str]:
    """Captions of 4 to 20 words, like a search collection's texts."""
    rng = np.random.default_rng(0)
    return [' '.join(rng.choice(WORDS, size=int(rng.integers(4, 21)))) for _ in range(n)]


def sample_images(n: int) -> list[bytes]:
    """640x480 JPEG photos-to-be: smooth random colour fields, each different."""
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((640, 480), Image.BICUBIC).save(buffer, format='JPEG', quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def load_ours(model_dir: Path, minibatch: int, dtype: str = 'fp32'):
    from clip_search.executors.clip_encoder import CLIPEncoder

    return CLIPEncoder(name=str(model_dir), minibatch_size=minibatch, dtype=dtype)


def time_split(encoder, blobs: list[bytes], minibatch: int) -> dict:
    """Seconds spent decoding, preprocessing (resize, crop, normalise) and in the model, one stage
    after the other on one thread each (the encoder overlaps the first two with the third)."""
    import torch
    from docarray import Document

    from clip_search.media import load_image

    started = time.perf_counter()
    images = [load_image(Document(blob=blob)) for blob in blobs]
    decoded = time.perf_counter()
    pixels = [encoder._clip.preprocess(image) for image in images]
    preprocessed = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels), minibatch):
            encoder._clip.model.encode_image(torch.stack(pixels[start : start + minibatch]))
    return {'docs': len(blobs), 'decode_s': decoded - started, 'preprocess_s': preprocessed - decoded,
            'model_s': time.perf_counter() - preprocessed}  # fmt: skip


def load_clip_server(model_dir: Path, minibatch: int):
    from unittest import mock

    import clip_server.model.openclip_model as openclip_model
    from clip_server.executors.clip_torch import CLIPEncoder

    # clip_server fetches weights by name from its bucket; hand it our file instead: the one change
    with mock.patch.object(openclip_model, 'download_model', return_value=str(model_dir / WEIGHTS)):
        encoder = CLIPEncoder(name=CLIP_SERVER_NAME, minibatch_size=minibatch)
    return lambda docs: asyncio.run(encoder.encode(docs))


def main() -> None:
    task = json.loads(sys.argv[1])
    import torch
    from docarray import Document, DocumentArray

    model_dir = Path(task['model_dir'])
    if task['impl'] == 'ours':
        write_random_vit_b_32(model_dir)
        encoder = load_ours(model_dir, task['minibatch'], task.get('dtype', 'fp32'))
        encode = lambda docs: asyncio.run(encoder.encode(docs))  # noqa: E731 - its handlers are coroutines, as clip_server's
    else:
        encode = load_clip_server(model_dir, task['minibatch'])
    torch.set_num_threads(task['threads'])
    texts, images = sample_texts(task['n_texts']), sample_images(task['n_images'])
    make = {
        'text': lambda n: DocumentArray(Document(text=t) for t in texts[:n]),
        'image': lambda n: DocumentArray(Document(blob=b, mime_type='image/jpeg') for b in images[:n]),
    }
    encode(make['text'](4))  # warm up: first calls allocate
    encode(make['image'](2))
    print('ready', flush=True)
    for line in sys.stdin:
        command, arg = line.split()
        if command == 'embed':
            docs = make['text'](8) + make['image'](4)
            encode(docs)
            np.save(arg, np.asarray(docs.embeddings, dtype=np.float32))
            print(json.dumps({'saved': arg}), flush=True)
            continue
        if command == 'split':
            print(json.dumps(time_split(encoder, images[: int(arg)], task['minibatch'])), flush=True)
            continue
        docs = make[command](int(arg))
        started = time.perf_counter()
        encode(docs)
        print(json.dumps({'seconds': time.perf_counter() - started, 'docs': len(docs)}), flush=True)


if __name__ == '__main__':
    os.environ.setdefault('JINA_HIDE_SURVEY', '1')
    main()

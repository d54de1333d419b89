"""The `--dtype int8` check: two services on one random ViT-B-32, fp32 and int8, through clip_client.

    python bench/dtype.py                 # 64 JPEGs (640x480), 5 rounds
    python bench/dtype.py --rounds 5 --images 128

Starts ``python -m clip_search`` twice on the same random-initialised ViT-B-32 (open_clip's
config, hub layout, ``tests/helpers/service.py``'s ``write_tiny_model``), once as is (fp32) and
once with ``--dtype int8``, and encodes the same JPEGs through the unmodified clip_client
(gRPC, its default batch size) turn by turn: each round times both services, their order
alternating, so both see the same load on a shared machine. Reports images/s, the int8/fp32 ratio
of each round (the verdict is their median) and the lowest cosine between an int8 embedding and its
fp32 twin. Last line: ``int8_vs_fp32=X min_cosine=Y``; results.json goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import median  # also puts the project and the test kit on sys.path
from encode import sample_images

BENCH = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def random_vit_b_32(cache: Path) -> Path:
    """open_clip's ViT-B-32, random weights, hub layout (safetensors), written once into the cache."""
    import open_clip

    from helpers.service import write_tiny_model

    directory = cache / 'vit-b-32-random-hub'
    if not (directory / 'open_clip_config.json').is_file():
        write_tiny_model(directory, seed=0, model_cfg=open_clip.get_model_config('ViT-B-32'))
    return directory


def encode(address: str, blobs: list[bytes], batch_size: int | None) -> tuple[float, np.ndarray]:
    """Seconds to encode the JPEGs through clip_client, and the embeddings it got back."""
    from clip_client import Client
    from docarray import Document, DocumentArray

    docs = DocumentArray(Document(blob=blob, mime_type='image/jpeg') for blob in blobs)
    client = Client(address)
    started = time.perf_counter()
    result = client.encode(docs, **({'batch_size': batch_size} if batch_size else {}))
    seconds = time.perf_counter() - started
    return seconds, np.asarray(result.embeddings, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=64, help='640x480 JPEGs per round (default 64)')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds, each service once per round')
    parser.add_argument('--batch-size', type=int, help="clip_client's batch_size (default: its own, 8)")
    parser.add_argument('--cache', type=Path, default=BENCH / '.cache', help='where the random ViT-B-32 is written')
    parser.add_argument('--out', type=Path, default=BENCH / 'results' / 'dtype', help='where results.json goes')
    args = parser.parse_args()
    os.environ.setdefault('JINA_HIDE_SURVEY', '1')
    from helpers.service import start_service

    model_dir = random_vit_b_32(args.cache)
    blobs = sample_images(args.images)
    services = {}
    with tempfile.TemporaryDirectory(prefix='bench-dtype-') as tmp:
        try:
            for dtype, extra in (('fp32', ()), ('int8', ('--dtype', 'int8'))):
                log(f'starting the {dtype} service')
                services[dtype] = start_service(model_dir, Path(tmp) / dtype, shards=1, extra_args=extra, ready_timeout=600)
            for service in services.values():
                encode(service.address, blobs[:8], args.batch_size)  # warm up: first calls allocate
            rates: dict[str, list[float]] = {'fp32': [], 'int8': []}
            embeddings = {}
            for round_ in range(args.rounds):
                order = ['fp32', 'int8'] if round_ % 2 == 0 else ['int8', 'fp32']
                for dtype in order:
                    seconds, embeddings[dtype] = encode(services[dtype].address, blobs, args.batch_size)
                    rates[dtype].append(len(blobs) / seconds)
                log(f'round {round_ + 1}: fp32 {rates["fp32"][-1]:.1f} images/s, int8 {rates["int8"][-1]:.1f} images/s')
            logs = {dtype: service.log() for dtype, service in services.items()}
        finally:
            for service in services.values():
                service.stop()
    ratios = [b / a for a, b in zip(rates['fp32'], rates['int8'])]
    cosines = np.sum(embeddings['fp32'] * embeddings['int8'], axis=1)  # both L2-normalised by the encoder
    results = {
        'model': 'ViT-B-32 (open_clip config, random weights, hub layout)',
        'images': args.images,
        'image_size': '640x480 JPEG',
        'client': f'clip_client {_version("clip-client")}, batch_size {args.batch_size or "default (8)"}',
        'cores': os.cpu_count(),
        'load_average_end': os.getloadavg(),
        'fp32_images_per_s': rates['fp32'],
        'int8_images_per_s': rates['int8'],
        'ratios': ratios,
        'int8_vs_fp32': median(ratios),
        'min_cosine': float(cosines.min()),
        'dtype_logged': {d: f'dtype {d} on cpu' in text for d, text in logs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'results.json').write_text(json.dumps(results, indent=2))
    log(f'ratios per round: {", ".join(f"{r:.2f}" for r in ratios)}; wrote {args.out / "results.json"}')
    print(f'int8_vs_fp32={results["int8_vs_fp32"]:.2f} min_cosine={results["min_cosine"]:.4f}')


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


if __name__ == '__main__':
    main()

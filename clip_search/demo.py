"""``python -m clip_search.demo``: index a small shapes collection and print searches, chapter style.

Meant for a service started with ``--model mini::shapes`` (the bundled demo model), which knows
colours and shapes and nothing else.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path
from typing import Optional, Sequence

from docarray import Document, DocumentArray

from clip_search.client import Client
from clip_search.demo_model.shapes import draw_shape_image, write_demo_collection

DEMO_TEXTS = [
    'a red circle',
    'a green square',
    'a blue triangle',
    'a yellow star',
    'an orange circle',
    'a purple square',
    'a blue square',
    'she smiled, with pain',
]
DEMO_QUERIES = ['a red circle', 'a purple star', 'a small green triangle on a dark background']


def print_matches(query: str, result: Document, shown: int = 3) -> None:
    """Query, then its best matches with their cosine distances (ascending)."""
    print(f'{query if query.startswith("<") else repr(query)}:')
    for match in result.matches[:shown]:
        content = match.text or Path(match.uri).name
        print(f'    {match.scores["cosine"].value + 0.0:.3f}  {content}')  # + 0.0: an exact match's -0.0 prints as 0.000


def run_demo(server: str, image_dir: Path, limit: int = 3) -> DocumentArray:
    """Index the demo images and texts, then search by text and by image; return the results."""
    client = Client(server)
    images = write_demo_collection(image_dir, n_per_class=1, seed=0)
    # the bytes travel with the path: the server opens no path a request names (unless --allow-path)
    client.index([Document(id=f'image:{p.name}', uri=str(p.resolve()), blob=p.read_bytes()) for p in images])
    client.index([Document(id=f'text:{t}', text=t) for t in DEMO_TEXTS])
    print(f'indexed {len(images)} images from {image_dir} and {len(DEMO_TEXTS)} texts\n')
    results = client.search(DEMO_QUERIES, limit=limit)
    for query, result in zip(DEMO_QUERIES, results):
        print_matches(query, result, limit)
    drawing = draw_shape_image('blue', 'square', random.Random(2024))  # not in the index
    buffer = io.BytesIO()
    drawing.save(buffer, format='PNG')
    by_image = client.search([Document(blob=buffer.getvalue())], limit=limit)
    print_matches('<a new drawing of a blue square>', by_image[0], limit)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m clip_search.demo', description=__doc__.splitlines()[0])
    parser.add_argument('--server', default='grpc://localhost:61000', help='the running service')
    parser.add_argument('--images', default='demo_images', help='where to write the demo images')
    args = parser.parse_args(argv)
    run_demo(args.server, Path(args.images))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

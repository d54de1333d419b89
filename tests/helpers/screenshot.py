"""``python -m tests.helpers.screenshot``: the README's picture of the search page, taken for real.

Starts the service with ``mini::shapes`` and ``--web-port`` in a temporary directory, indexes the
demo shapes and texts, types the query into the page in headless Chromium and saves a PNG.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .service import free_port, start_service
from .browser import headless_chromium, index_demo_shapes, search_on_page

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / 'docs' / 'web-search.png'


def take_screenshot(output: Path, query: str = 'a red circle', width: int = 1280, height: int = 830) -> list[str]:
    """Serve the demo collection, search ``query`` on the page, save the window as ``output``; return the card ids."""
    with tempfile.TemporaryDirectory(prefix='clip-search-screenshot-') as tmp:
        web_port = free_port()
        service = start_service(
            'mini::shapes', Path(tmp) / 'workspace', shards=2,
            extra_args=('--host', '127.0.0.1', '--web-port', str(web_port)),
        )  # fmt: skip
        try:
            index_demo_shapes(service.client(), Path(tmp) / 'images')
            with headless_chromium(width, height) as driver:
                cards = search_on_page(driver, f'http://127.0.0.1:{web_port}/', query)
                output.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(output))
                _optimize_png(output)
                return [card.get_attribute('data-id') for card in cards]
        finally:
            service.stop()


def _optimize_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
    image.save(path, optimize=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m tests.helpers.screenshot', description=__doc__.splitlines()[0])
    parser.add_argument('--output', type=Path, default=DEFAULT_OUTPUT, help='where to save the PNG (docs/web-search.png)')
    parser.add_argument('--query', default='a red circle', help='what to type into the page')
    args = parser.parse_args(argv)
    ids = take_screenshot(args.output, args.query)
    print(f'saved {args.output}: {len(ids)} results for {args.query!r}, first {ids[:3]}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

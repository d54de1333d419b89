"""Drive the search page in a real headless Chromium (Debian's ``chromium`` + ``chromedriver``).

Shared by the browser test and the screenshot script. Needs ``selenium`` (the ``test`` extra).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from docarray import Document

from clip_search.demo import DEMO_TEXTS
from clip_search.demo_model.shapes import write_demo_collection

CHROMIUM_FLAGS = (
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-dev-shm-usage', '--hide-scrollbars',
)  # fmt: skip


class BrowserMissing(RuntimeError):
    """Chromium or chromedriver is not installed; the message says how to install them."""


def find_chromium() -> tuple[str, str]:
    """Paths of the chromium binary and its chromedriver, or raise saying how to install them."""
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not (chromium and driver):
        raise BrowserMissing('chromium and chromedriver are needed: apt-get install -y chromium chromium-driver')
    return chromium, driver


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator:
    """A selenium WebDriver on a fresh headless Chromium profile, its viewport ``width`` x ``height``; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = find_chromium()
    with tempfile.TemporaryDirectory(prefix='clip-search-chromium-') as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f'--user-data-dir={profile}', f'--window-size={width},{height}'):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            _set_viewport(driver, width, height)
            yield driver
        finally:
            driver.quit()


def _set_viewport(driver, width: int, height: int) -> None:
    """--window-size counts the browser's frame too: grow the window until the page itself has this size."""
    inner_width, inner_height = driver.execute_script('return [window.innerWidth, window.innerHeight]')
    window = driver.get_window_size()
    driver.set_window_size(window['width'] + width - inner_width, window['height'] + height - inner_height)


def search_on_page(driver, url: str, query: str, timeout: float = 30) -> list:
    """Open the page, type ``query`` in the query box, press Enter; return the result cards once shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    box = driver.find_element(By.ID, 'query')
    box.clear()
    return after_search(driver, lambda: box.send_keys(query, Keys.ENTER), timeout)


def after_search(driver, action: Callable[[], object], timeout: float = 30) -> list:
    """Do ``action`` (which starts a search), wait until its answer is shown, its thumbnails loaded; return the cards."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    count = "return Number(document.body.dataset.searches || 0)"
    before = driver.execute_script(count)
    action()

    def answered(d) -> bool:
        images_loaded = "return [...document.querySelectorAll('#results img')].every(i => i.complete)"
        return d.execute_script(count) > before and d.execute_script(images_loaded)

    WebDriverWait(driver, timeout).until(answered)
    return driver.find_elements(By.CSS_SELECTOR, '#results .result')


def index_demo_shapes(client, image_dir: str | Path, texts: Optional[list[str]] = None) -> int:
    """Index the 24 demo shape images and some texts, tagged with colour and shape; return how many."""
    images = write_demo_collection(image_dir, n_per_class=1, seed=0)
    docs = [
        Document(id=f'image:{path.name}', uri=str(path.resolve()), blob=path.read_bytes(), tags=_shape_tags(path.stem.split('_')))
        for path in images
    ]
    for text in DEMO_TEXTS if texts is None else texts:
        docs.append(Document(id=f'text:{text}', text=text, tags=_shape_tags(text.split())))
    client.index(docs)
    return len(docs)


def _shape_tags(words: list[str]) -> dict:
    from clip_search.demo_model.shapes import COLORS, SHAPES

    tags = {}
    for word in words:
        if word in COLORS:
            tags['color'] = word
        elif word in SHAPES:
            tags['shape'] = word
    return tags

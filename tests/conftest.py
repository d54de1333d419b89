"""Shared fixtures: a tiny random CLIP checkpoint and running services on free ports."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.service import start_service, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
FLOW_FILE = ROOT / 'flows' / 'search_flow.yml'


@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory) -> Path:
    """A random-initialised open_clip model in the hub layout (64-d embeddings)."""
    return write_tiny_model(tmp_path_factory.mktemp('tiny_model'))


@pytest.fixture
def service_factory(tmp_path, tiny_model):
    """Start services with the real CLI; every one still running is stopped at the end."""
    started = []

    def start(shards: int = 3, workspace: Path | None = None, flow_file: Path = FLOW_FILE, **kwargs):
        service = start_service(tiny_model, workspace or tmp_path / 'workspace', shards=shards, flow_file=flow_file, **kwargs)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def png_bytes(seed: int, size: int = 40) -> bytes:
    """A random but reproducible small PNG image."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='PNG')
    return buffer.getvalue()

"""mini::shapes through a running 2-shard Flow: text finds images and images find text."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from docarray import Document
from PIL import Image

from clip_search.models import resolve_model
from clip_search.demo_model.shapes import CLASSES, class_caption, make_samples
from helpers.service import start_service
from conftest import FLOW_FILE

PER_CLASS = 5


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def matplotlib_shape(color: str, shape: str, rng: random.Random) -> Image.Image:
    """A shape drawn by matplotlib, not by our generator: another renderer, sizes and backgrounds."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib import patches

    shades = {'red': '#d9262b', 'green': '#2ca02c', 'blue': '#1f3fd4', 'yellow': '#f2d516',
              'orange': '#ff8c1a', 'purple': '#8a2be2'}  # fmt: skip
    backgrounds = ['white', '#202020', '#8c8c8c', '#f5f0dc', '#c8dcf0']
    pixels = rng.choice([64, 96, 160])
    fig = plt.figure(figsize=(1, 1), dpi=pixels)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.axis('off')
    fig.patch.set_facecolor(rng.choice(backgrounds))
    radius = rng.uniform(0.2, 0.38)
    x, y = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
    angle = rng.uniform(0, 2 * math.pi)
    fill = shades[color]
    if shape == 'circle':
        patch = patches.Circle((x, y), radius, color=fill)
    elif shape == 'square':
        patch = patches.RegularPolygon((x, y), 4, radius=radius * 1.2, orientation=angle, color=fill)
    elif shape == 'triangle':
        patch = patches.RegularPolygon((x, y), 3, radius=radius * 1.2, orientation=angle, color=fill)
    else:
        points = [(x + (radius if i % 2 == 0 else radius * 0.45) * math.cos(angle + i * math.pi / 5),
                   y + (radius if i % 2 == 0 else radius * 0.45) * math.sin(angle + i * math.pi / 5))
                  for i in range(10)]  # fmt: skip
        patch = patches.Polygon(points, closed=True, color=fill)
    ax.add_patch(patch)
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', facecolor=fig.get_facecolor())
    plt.close(fig)
    return Image.open(io.BytesIO(buffer.getvalue())).convert('RGB')


def held_out_images() -> list[tuple[Image.Image, tuple[str, str]]]:
    per_class: dict = {c: [] for c in CLASSES}
    for image, _, label in make_samples(2000, split='test', seed=1):
        if label is not None and len(per_class[label]) < PER_CLASS:
            per_class[label].append(image)
        if all(len(v) == PER_CLASS for v in per_class.values()):
            break
    return [(image, label) for label, images in per_class.items() for image in images]


def other_renderer_images() -> list[tuple[Image.Image, tuple[str, str]]]:
    rng = random.Random(2024)
    return [(matplotlib_shape(c, s, rng), (c, s)) for c, s in CLASSES for _ in range(PER_CLASS)]


def cross_modal_top1(client, images) -> tuple[float, float]:
    """(text->image, image->text) top-1 over the 24 colour-shape classes, both through the Flow."""
    label_of = {}
    docs = []
    for i, (image, label) in enumerate(images):
        doc_id = f'img-{i}'
        label_of[doc_id] = label
        docs.append(Document(id=doc_id, blob=png(image), tags={'color': label[0], 'shape': label[1]}))
    client.index(docs)
    captions = [class_caption(c, s) for c, s in CLASSES]
    text_to_image = client.search(captions, limit=1)
    t2i = np.mean([label_of[r.matches[0].id] == cls for r, cls in zip(text_to_image, CLASSES)])

    client.index([Document(id=f'cap-{c}-{s}', text=class_caption(c, s)) for c, s in CLASSES])
    image_queries = [Document(blob=d.blob) for d in docs]
    results = client.search(image_queries, limit=len(docs) + 1)
    correct = 0
    for doc, result in zip(docs, results):
        first_text = next(m for m in result.matches if m.text)  # images match themselves first
        correct += first_text.id == f'cap-{label_of[doc.id][0]}-{label_of[doc.id][1]}'
    client.delete([d.id for d in docs] + [f'cap-{c}-{s}' for c, s in CLASSES])
    return float(t2i), correct / len(docs)


@pytest.fixture(scope='module')
def shapes_service(tmp_path_factory):
    service = start_service('mini::shapes', tmp_path_factory.mktemp('shapes') / 'workspace', shards=2, flow_file=FLOW_FILE)
    yield service
    service.stop()


@pytest.fixture
def fp32_and_int8_services(tmp_path):
    """mini::shapes served twice, as is and with ``--dtype int8``, each on an empty index."""
    services = []
    for dtype in ('fp32', 'int8'):
        services.append(start_service('mini::shapes', tmp_path / dtype, shards=2, flow_file=FLOW_FILE, extra_args=('--dtype', dtype)))
    yield services
    for service in services:
        service.stop()


def test_the_bundled_model_loads_by_name_without_download():
    spec = resolve_model('mini::shapes')
    assert spec.open_clip_name.startswith('local-dir:') and spec.embed_dim > 0


@pytest.mark.slow
def test_held_out_images_and_captions_find_each_other(shapes_service):
    text_to_image, image_to_text = cross_modal_top1(shapes_service.client(), held_out_images())
    assert text_to_image >= 0.9 and image_to_text >= 0.9, (text_to_image, image_to_text)


@pytest.mark.slow
def test_shapes_drawn_by_another_renderer_are_still_recognised(shapes_service):
    text_to_image, image_to_text = cross_modal_top1(shapes_service.client(), other_renderer_images())
    assert text_to_image >= 0.9 and image_to_text >= 0.9, (text_to_image, image_to_text)


@pytest.mark.slow
@pytest.mark.parametrize('test_set', [held_out_images, other_renderer_images], ids=['held_out', 'other_renderer'])
def test_int8_finds_what_fp32_finds(fp32_and_int8_services, test_set):
    fp32_service, int8_service = fp32_and_int8_services
    images = test_set()
    fp32 = cross_modal_top1(fp32_service.client(), images)
    int8 = cross_modal_top1(int8_service.client(), images)
    # int8 scales activations per minibatch, so an image whose two best captions are within ~0.005 can flip
    assert int8[0] == fp32[0] and abs(int8[1] - fp32[1]) <= 1 / len(images) and min(int8) >= 0.9, (int8, fp32)
    assert 'dtype int8 on cpu' in int8_service.log() and 'dtype fp32 on cpu' in fp32_service.log()


@pytest.mark.slow
def test_the_chapter_example_ranks_text_before_an_unrelated_image(shapes_service):
    from clip_client import Client

    client = Client(shapes_service.address)
    apple = Document(id='red-circle-photo', blob=png(matplotlib_shape('red', 'circle', random.Random(1))))
    client.index([Document(id='caption', text='a purple star on a dark background'), apple])
    matches = client.search(['a purple star'], limit=2)[0].matches
    assert matches[0].id == 'caption'
    assert matches[0].scores['cosine'].value < matches[1].scores['cosine'].value
    assert client.search(['a red circle'], limit=1)[0].matches[0].id == 'red-circle-photo'
    shapes_service.client().delete(['caption', 'red-circle-photo'])


@pytest.mark.slow
def test_the_readme_demo_prints_ranked_results(shapes_service, tmp_path, capsys):
    from clip_search.demo import DEMO_QUERIES, run_demo

    results = run_demo(shapes_service.address, tmp_path / 'demo_images')
    printed = capsys.readouterr().out
    assert "'a red circle':" in printed and '<a new drawing of a blue square>:' in printed
    best = {query: result.matches[:2] for query, result in zip(DEMO_QUERIES, results)}
    assert {m.text or m.uri.rsplit('/', 1)[-1] for m in best['a red circle']} == {'a red circle', 'red_circle_0.png'}
    assert best['a purple star'][0].uri.endswith('purple_star_0.png')
    for result in results:
        distances = [m.scores['cosine'].value for m in result.matches]
        assert distances == sorted(distances)

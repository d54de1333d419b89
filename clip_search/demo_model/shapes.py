"""Synthetic captioned colour-shape images.

Used to train and evaluate the tiny from-scratch CLIP model shipped in
``clip_search/demo_model`` (no pretrained weights can be downloaded
here), and to write a small demo image collection for the search service.

Everything is deterministic given a seed and nothing runs at import time.
"""
from __future__ import annotations

import colorsys
import math
import random
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS", "SHAPES", "CLASSES", "draw_shape_image", "draw_two_shapes_image",
    "random_caption", "class_caption", "two_object_caption", "make_samples",
    "write_demo_collection",
]

Rng = Union[random.Random, np.random.Generator]
RGB = tuple[int, int, int]

#: Canonical object colours (name -> RGB). Drawing jitters these a little.
COLORS: dict[str, RGB] = {
    "red": (225, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 20),
    "purple": (140, 50, 190),
}
#: Shape names, in label order.
SHAPES: list[str] = ["circle", "square", "triangle", "star"]
#: The 24 (colour, shape) classes, in label order.
CLASSES: list[tuple[str, str]] = [(c, s) for c in COLORS for s in SHAPES]

_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}

# --------------------------------------------------------------------------- rng helpers


def _as_random(rng: Rng) -> random.Random:
    """Return a ``random.Random``; a numpy Generator seeds a fresh one (deterministically)."""
    if isinstance(rng, random.Random):
        return rng
    return random.Random(int(rng.integers(0, 2**63 - 1)))


# --------------------------------------------------------------------------- colours


def _jitter_color(rgb: RGB, r: random.Random) -> RGB:
    """Slightly vary a colour's saturation/brightness and hue, so one colour name covers a range of shades."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + r.uniform(-0.018, 0.018)) % 1.0
    s = min(1.0, max(0.45, s * r.uniform(0.82, 1.08)))
    v = min(1.0, max(0.45, v * r.uniform(0.86, 1.06)))
    out = colorsys.hsv_to_rgb(h, s, v)
    return tuple(int(round(c * 255)) for c in out)  # type: ignore[return-value]


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


_NAMED_BGS: list[RGB] = [(255, 255, 255), (0, 0, 0), (128, 128, 128), (245, 245, 220),
                         (235, 235, 235), (30, 30, 30), (200, 200, 200), (70, 70, 70)]


def _random_background(obj: RGB, r: random.Random, tone: Optional[str] = None) -> tuple[RGB, str]:
    """Pick a light or dark background colour that is never too close to the object colour.

    Returns (rgb, "light"|"dark"). Backgrounds are mostly low-saturation (white, greys,
    beige, black, navy, ...) so the colour word always names the object.
    """
    for _ in range(100):
        t = tone or r.choice(["light", "dark"])
        if r.random() < 0.25:
            cand = r.choice(_NAMED_BGS)
            lum = 0.299 * cand[0] + 0.587 * cand[1] + 0.114 * cand[2]
            if (lum >= 100) != (t == "light"):
                continue
        else:
            h = r.random()
            s = r.choice([0.0, r.uniform(0.0, 0.15), r.uniform(0.0, 0.35)])
            v = r.uniform(0.72, 1.0) if t == "light" else r.uniform(0.0, 0.38)
            cand = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
        if _dist(cand, obj) > 130:
            return cand, t  # type: ignore[return-value]
    return ((255, 255, 255), "light") if sum(obj) < 380 else ((0, 0, 0), "dark")


def _background(size: int, bg: RGB, r: random.Random) -> np.ndarray:
    """Background canvas (H, W, 3) float: plain, noise, stripes or gradient around ``bg``."""
    base = np.ones((size, size, 3), np.float32) * np.asarray(bg, np.float32)
    kind = r.choice(["plain", "plain", "noise", "stripes", "gradient"])
    sign = -1.0 if sum(bg) > 380 else 1.0  # move texture away from the extremes
    if kind == "noise":
        nr = np.random.default_rng(r.getrandbits(32))
        sigma = r.uniform(4, 18)
        if r.random() < 0.5:
            base += nr.normal(0, sigma, (size, size, 1))
        else:
            base += nr.normal(0, sigma, (size, size, 3))
    elif kind == "stripes":
        ang = r.uniform(0, math.pi)
        period = r.uniform(4, 14) * size / 48
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = (xx * math.cos(ang) + yy * math.sin(ang)) / period
        mask = (np.floor(phase) % 2)[..., None]
        base += sign * r.uniform(12, 35) * mask
    elif kind == "gradient":
        ang = r.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = (xx * math.cos(ang) + yy * math.sin(ang))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        base += sign * r.uniform(20, 55) * t[..., None]
    return base


# --------------------------------------------------------------------------- geometry


def _shape_polygon(shape: str, cx: float, cy: float, rad: float, rot: float,
                   r: random.Random) -> list[tuple[float, float]]:
    """Vertices of square / triangle / star of circumradius ``rad`` rotated by ``rot`` radians."""
    if shape == "square":
        n, radii = 4, [rad]
    elif shape == "triangle":
        n, radii = 3, [rad]
    elif shape == "star":
        n, radii = 5, [rad, rad * r.uniform(0.36, 0.5)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    pts = []
    k = len(radii)
    for i in range(n * k):
        a = rot + 2 * math.pi * i / (n * k) - math.pi / 2
        rr = radii[i % k]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_object(layer: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, rad: float,
                 color: RGB, r: random.Random, outline: bool, scale: float) -> None:
    """Draw one shape onto an RGBA draw context (coordinates already scaled)."""
    fill = color + (255,)
    width = max(1, int(round(rad * r.uniform(0.18, 0.3))))
    if shape == "circle":
        box = [cx - rad, cy - rad, cx + rad, cy + rad]
        if outline:
            layer.ellipse(box, outline=fill, width=width)
        else:
            layer.ellipse(box, fill=fill)
        return
    # squares look similar in size to circles if their circumradius is a bit larger
    rr = rad * (1.25 if shape == "square" else 1.15 if shape == "triangle" else 1.12)
    rot = r.uniform(0, 2 * math.pi) if r.random() < 0.6 else r.choice([0.0, 0.0, r.uniform(-0.25, 0.25)])
    if shape == "square" and rot == 0.0:
        rot = math.pi / 4  # axis-aligned square (polygon starts at the top vertex)
    pts = _shape_polygon(shape, cx, cy, rr, rot, r)
    if outline:
        layer.polygon(pts, outline=fill, width=width)
    else:
        layer.polygon(pts, fill=fill)


def _render(objects: list[tuple[str, str, float, float, float]], size: int, r: random.Random,
            tone: Optional[str] = None) -> tuple[Image.Image, str]:
    """Render objects ``(color, shape, cx, cy, radius)`` (unit coords) on a textured background."""
    rgbs = [_jitter_color(COLORS[c], r) for c, *_ in objects]
    # background must be far from every object colour
    for _ in range(20):
        bg, t = _random_background(rgbs[0], r, tone)
        if all(_dist(bg, c) > 130 for c in rgbs):
            break
    canvas = _background(size, bg, r)
    aa = r.random() < 0.7
    ss = 4 if aa else 1
    layer = Image.new("RGBA", (size * ss, size * ss), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    outline = r.random() < 0.1
    for (c, s, cx, cy, rad), rgb in zip(objects, rgbs):
        _draw_object(d, s, cx * size * ss, cy * size * ss, rad * size * ss, rgb, r, outline, ss)
    if ss > 1:
        layer = layer.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(layer).astype(np.float32)
    alpha = arr[..., 3:4] / 255.0
    out = canvas * (1 - alpha) + arr[..., :3] * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB"), t


# --------------------------------------------------------------------------- public drawing API


def _draw_with_meta(color: str, shape: str, rng: Rng, size: int = 96) -> tuple[Image.Image, str, str]:
    """Like :func:`draw_shape_image` but also returns the background tone and a size word."""
    r = _as_random(rng)
    rad = r.uniform(0.12, 0.42)
    margin = rad * 1.15 + 0.02
    cx = r.uniform(margin, 1 - margin) if margin < 0.5 else 0.5
    cy = r.uniform(margin, 1 - margin) if margin < 0.5 else 0.5
    img, tone = _render([(color, shape, cx, cy, rad)], size, r)
    size_word = "small" if rad < 0.22 else "large" if rad > 0.33 else ""
    return img, tone, size_word


def draw_shape_image(color: str, shape: str, rng: Rng, size: int = 96) -> Image.Image:
    """Draw one ``color`` ``shape`` (varied size, position, rotation, fill/outline, anti-aliasing)
    on a light or dark background (plain, noise, stripes or gradient) far from the object colour."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown class {color!r} {shape!r}")
    return _draw_with_meta(color, shape, rng, size)[0]


def draw_two_shapes_image(a: tuple[str, str], b: tuple[str, str], rng: Rng,
                          size: int = 96) -> Image.Image:
    """Draw two objects side by side (left ``a``, right ``b``, or top/bottom)."""
    r = _as_random(rng)
    rad_a, rad_b = r.uniform(0.12, 0.2), r.uniform(0.12, 0.2)
    if r.random() < 0.5:  # left / right
        pa = (r.uniform(0.24, 0.3), r.uniform(0.3, 0.7))
        pb = (r.uniform(0.7, 0.76), r.uniform(0.3, 0.7))
    else:  # top / bottom
        pa = (r.uniform(0.3, 0.7), r.uniform(0.24, 0.3))
        pb = (r.uniform(0.3, 0.7), r.uniform(0.7, 0.76))
    img, _ = _render([(a[0], a[1], pa[0], pa[1], rad_a), (b[0], b[1], pb[0], pb[1], rad_b)], size, r)
    return img


# --------------------------------------------------------------------------- captions

_TEMPLATES = [
    "a {c} {s}",
    "a {c} {s}",
    "a {z}{c} {s}",
    "a photo of a {z}{c} {s}",
    "an image of a {z}{c} {s}",
    "a picture of a {z}{c} {s}",
    "a drawing of a {z}{c} {s}",
    "a {z}{c} {s} on a {b} background",
    "a {c} {s} on a {b} background",
    "the {c} {s}",
    "{c} {s}",
    "a {c} colored {s}",
    "a {s} that is {c}",
    "one {z}{c} {s}",
    "a simple {c} {s} shape",
]


def class_caption(color: str, shape: str) -> str:
    """The canonical query for a class, e.g. ``"a red circle"`` (used for evaluation and search)."""
    return f"a {color} {shape}"


def _fix_article(text: str) -> str:
    """Use "an" before vowels ("an orange star")."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


def random_caption(color: str, shape: str, rng: Rng, background: Optional[str] = None,
                   size_word: Optional[str] = None) -> str:
    """A caption from varied templates ("a photo of a small blue square", "a green triangle on a
    dark background", ...). ``background`` ("light"/"dark") and ``size_word`` are used if given."""
    r = _as_random(rng)
    templates = [t for t in _TEMPLATES if background or "{b}" not in t]
    t = r.choice(templates)
    z = f"{size_word} " if size_word else ""
    return _fix_article(t.format(c=color, s=shape, z=z, b=background or ""))


def two_object_caption(a: tuple[str, str], b: tuple[str, str], rng: Optional[Rng] = None) -> str:
    """Caption for a two-object image, e.g. ``"a red circle and a blue square"``."""
    base = f"a {a[0]} {a[1]} and a {b[0]} {b[1]}"
    if rng is not None and _as_random(rng).random() < 0.3:
        base = "a photo of " + base
    return _fix_article(base)


# --------------------------------------------------------------------------- datasets


def make_samples(n: int, split: str = "train", seed: int = 0, size: int = 96,
                 two_object_frac: float = 0.1
                 ) -> Iterator[tuple[Image.Image, str, Optional[tuple[str, str]]]]:
    """Yield ``n`` deterministic (image, caption, label) samples; label is ``(color, shape)``,
    or ``None`` for two-object images. Train and test use different seed streams, so the test
    split is disjoint from train for the same ``seed``."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    r = random.Random(seed * 7_919 + _SPLIT_OFFSET[split])
    for i in range(n):
        if r.random() < two_object_frac:
            a = r.choice(CLASSES)
            b = r.choice([c for c in CLASSES if c != a])
            img = draw_two_shapes_image(a, b, r, size)
            yield img, two_object_caption(a, b, r), None
        else:
            color, shape = CLASSES[i % len(CLASSES)] if split == "test" else r.choice(CLASSES)
            img, tone, size_word = _draw_with_meta(color, shape, r, size)
            bg = tone if r.random() < 0.5 else None
            sz = size_word if (size_word and r.random() < 0.6) else None
            yield img, random_caption(color, shape, r, bg, sz), (color, shape)


def write_demo_collection(out_dir: Union[str, Path], n_per_class: int = 1, seed: int = 0,
                          size: int = 96) -> list[Path]:
    """Write ``{color}_{shape}_{i}.png`` for every class into ``out_dir`` (a demo search folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed * 7_919 + 2_000_017)
    paths = []
    for color, shape in CLASSES:
        for i in range(n_per_class):
            p = out / f"{color}_{shape}_{i}.png"
            draw_shape_image(color, shape, r, size).save(p)
            paths.append(p)
    return paths

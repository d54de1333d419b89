"""The model card's evaluation of the shipped mini::shapes, run in each dtype clip-search can serve on a CPU.

    python -m clip_search.demo_model.evaluate            # fp32 and int8, the card's two test sets

The model is loaded as the encoder loads it (``clip_search.models.load_model``: int8 is its linear
layers quantized at load), and scored with the trainer's ``evaluate`` on the same images as the card.
"""

from __future__ import annotations

import argparse
import json

import torch

from clip_search.demo_model import shapes
from clip_search.demo_model.train import evaluate, second_renderer_set
from clip_search.models import load_model, resolve_model


def test_sets(seed: int = 0) -> dict[str, list]:
    """The card's held-out split and second-renderer set, as train.py builds them after training."""
    held_out = [(im, label) for im, _, label in shapes.make_samples(480 + 60, 'test', seed=seed, size=96) if label is not None]
    return {'held_out': held_out, 'second_renderer': second_renderer_set(per_class=20, seed=seed + 4242)}


def evaluate_dtype(dtype: str, sets: dict[str, list]) -> dict[str, dict]:
    """The card's figures for mini::shapes loaded in ``dtype`` on the CPU."""
    clip = load_model(resolve_model('mini::shapes'), 'cpu', dtype)
    with torch.inference_mode():
        return {name: evaluate(clip.model, clip.preprocess, clip.tokenizer, labelled) for name, labelled in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dtype', nargs='+', default=['fp32', 'int8'], choices=['fp32', 'int8'])
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = test_sets()
    results = {dtype: evaluate_dtype(dtype, sets) for dtype in args.dtype}
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()

"""Helpers for tests and benchmarks: a tiny random CLIP checkpoint and free ports."""

from __future__ import annotations

import json
import socket
from pathlib import Path

TINY_MODEL_CFG = {
    'embed_dim': 64,
    'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'patch_size': 8, 'head_width': 32},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 2},
}


def write_tiny_model(directory: str | Path, seed: int = 0, model_cfg: dict | None = None) -> Path:
    """Write a random-initialised open_clip model in the hub layout; takes about a second.

    Its embeddings are meaningless but deterministic and distinct per input, which is all a
    test of the plumbing (encode, shard, merge, persist) needs.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model_cfg or TINY_MODEL_CFG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / 'open_clip_model.safetensors'))
    config = {
        'model_cfg': cfg,
        'preprocess_cfg': {
            'mean': [0.48145466, 0.4578275, 0.40821073],
            'std': [0.26862954, 0.26130258, 0.27577711],
            'interpolation': 'bicubic',
            'resize_mode': 'shortest',
        },
    }
    (directory / 'open_clip_config.json').write_text(json.dumps(config, indent=2))
    return directory


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]

"""From a model name to a loaded CLIP model: one path, like open_clip's ``factory.py``.

Accepted names (``--model``):

* a clip-server name ``ARCH::TAG`` such as ``ViT-B-32::openai`` or ``ViT-L-14::laion2b-s32b-b82k``,
  and any other open_clip pretrained tag written the same way (``open_clip.list_pretrained()``);
* ``hf-hub:ORG/REPO``, an open_clip checkpoint on the Hugging Face hub;
* a local directory in open_clip's hub layout (``open_clip_config.json`` beside
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``);
* ``mini::shapes``, the small demo model bundled with this package (works offline).

Weights are fetched once into :func:`cache_dir` and reused; when they cannot be had, a
:class:`ModelUnavailableError` says in one sentence what to do.

``dtype`` (clip_server's name) says how the model runs: ``fp32`` (the CPU default), ``fp16`` (the
CUDA default) or ``int8`` (CPU: the linear layers quantized once at load, see :mod:`clip_search.quantize`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

BUNDLED_MODELS: dict[str, Path] = {
    'mini::shapes': Path(__file__).parent / 'demo_model',
}
HUB_CONFIG = 'open_clip_config.json'
HUB_WEIGHTS = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')
DEFAULT_MODEL = 'ViT-B-32::openai'
DTYPES = ('fp32', 'fp16', 'int8')  # clip_server's names
DTYPE_DEVICES = {'fp32': ('cpu', 'cuda'), 'fp16': ('cuda',), 'int8': ('cpu',)}  # where each one runs


class ModelUnavailableError(RuntimeError):
    """The model name is unknown or its weights cannot be loaded; the message says what to do."""


class DtypeError(ValueError):
    """A dtype that is unknown or that the device cannot run; the message says what to use."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: what open_clip is asked for, and the embedding size it gives."""

    name: str  # as the user wrote it
    open_clip_name: str  # 'ViT-B-32', 'local-dir:/path' or 'hf-hub:org/repo'
    pretrained: str | None  # open_clip pretrained tag, for ARCH::TAG names
    embed_dim: int


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with its image preprocessing and tokenizer."""

    spec: ModelSpec
    model: Any  # open_clip.CLIP
    preprocess: Callable  # PIL.Image -> torch.Tensor [3, H, W]
    tokenizer: Callable  # list[str] -> torch.LongTensor [N, context_length]
    dtype: str = 'fp32'  # how it runs: one of DTYPES
    input_dtype: Any = None  # torch dtype the image tower takes (float16 for fp16, else float32)


def cache_dir() -> Path:
    """Where downloaded weights live: ``$CLIP_SEARCH_CACHE`` or ``~/.cache/clip_search``."""
    return Path(os.environ.get('CLIP_SEARCH_CACHE', Path.home() / '.cache' / 'clip_search'))


def resolve_model(name: str) -> ModelSpec:
    """Turn a user's model name into a :class:`ModelSpec` without loading any weights."""
    name = name.strip()
    if name in BUNDLED_MODELS:
        return _local_dir_spec(name, BUNDLED_MODELS[name])
    if name.startswith('hf-hub:'):
        return _hf_hub_spec(name)
    path = Path(name).expanduser()
    if path.is_dir() or name.startswith(('.', '/', '~')):
        return _local_dir_spec(name, path)
    if '::' in name:
        return _pretrained_spec(name)
    raise ModelUnavailableError(
        f'Unknown model {name!r}: use a name like ViT-B-32::openai, hf-hub:ORG/REPO, '
        f'a local checkpoint directory, or mini::shapes.'
    )


def ensure_weights(spec: ModelSpec) -> None:
    """Make sure the weights are on disk (downloading into the cache if needed), or fail clearly.

    Called once at start-up so that a missing checkpoint is reported before the service runs.
    """
    if spec.open_clip_name.startswith('local-dir:'):
        return  # checked by resolve_model
    import open_clip

    try:
        with _hub_access():
            if spec.pretrained is not None:
                cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained)
                found = open_clip.download_pretrained(cfg, cache_dir=str(cache_dir()))
            else:
                found = _hf_download_any(spec.open_clip_name[len('hf-hub:'):], HUB_WEIGHTS)
        if not found:
            raise FileNotFoundError('no weights file was downloaded')
    except Exception as exc:  # the hub raises many kinds; all mean "not here"
        raise _offline_error(spec.name, exc) from exc


def check_dtype(dtype: str | None, device: str) -> str:
    """The dtype to run on ``device``: ``dtype``, or clip_server's default (fp16 on CUDA, else fp32).

    Raises :class:`DtypeError` in one sentence for a dtype the device cannot run.
    """
    kind = str(device).split(':')[0]
    if dtype is None:
        return 'fp16' if kind == 'cuda' else 'fp32'
    if dtype not in DTYPES:
        raise DtypeError(f'dtype {dtype!r} is unknown: use one of {", ".join(DTYPES)}.')
    if kind not in DTYPE_DEVICES[dtype]:
        runs_here = [d for d in DTYPES if kind in DTYPE_DEVICES[d]]
        raise DtypeError(
            f'dtype {dtype} cannot run on {device} (it needs {" or ".join(DTYPE_DEVICES[dtype])}): '
            f'use {" or ".join(runs_here)} there.'
        )
    return dtype


def load_model(spec: ModelSpec, device: str = 'cpu', dtype: str | None = None) -> LoadedModel:
    """Load the model, its preprocessing and tokenizer for inference on ``device`` in ``dtype``."""
    import open_clip
    import torch

    dtype = check_dtype(dtype, device)
    ensure_weights(spec)
    try:
        with _hub_access():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.open_clip_name,
                pretrained=spec.pretrained,
                precision='fp16' if dtype == 'fp16' else 'fp32',
                device=device,
                cache_dir=str(cache_dir()),
            )
            tokenizer = open_clip.get_tokenizer(spec.open_clip_name, cache_dir=str(cache_dir()))
    except Exception as exc:
        raise ModelUnavailableError(f'Could not load model {spec.name!r}: {exc}') from exc
    model.eval()
    if dtype == 'int8':
        from clip_search.quantize import quantize_int8

        model = quantize_int8(model)
    preprocess = normalise_in_numpy(preprocess)
    input_dtype = torch.float16 if dtype == 'fp16' else torch.float32
    return LoadedModel(spec, model, preprocess, tokenizer, dtype=dtype, input_dtype=input_dtype)


class NumpyToNormalisedTensor:
    """torchvision's ``ToTensor`` then ``Normalize(mean, std)``, the same float32 arithmetic in numpy.

    In torch each of these element-wise ops on one small image opens a parallel region over torch's
    threads, which the model's forward pass holds: on a busy 2-core machine the pair cost ~125 ms per
    image (measured), numpy ~2 ms.
    """

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    def __call__(self, image):
        import torch

        pixels = np.asarray(image, dtype=np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        chw = pixels.transpose(2, 0, 1).astype(np.float32, order='C') / np.float32(255)
        return torch.from_numpy((chw - self.mean) / self.std)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()})'


def normalise_in_numpy(preprocess):
    """open_clip's preprocessing with its ``ToTensor, Normalize`` tail done by :class:`NumpyToNormalisedTensor`;
    any other pipeline is returned as it is."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(preprocess, 'transforms', []))
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return preprocess
    return Compose([*steps[:-2], NumpyToNormalisedTensor(steps[-1].mean, steps[-1].std)])


def _local_dir_spec(name: str, path: Path) -> ModelSpec:
    path = path.expanduser().resolve()
    config_file = path / HUB_CONFIG
    if not config_file.is_file():
        raise ModelUnavailableError(
            f'Model directory {str(path)!r} has no {HUB_CONFIG}: a local checkpoint needs '
            f"open_clip's hub layout ({HUB_CONFIG} beside {HUB_WEIGHTS[0]} or {HUB_WEIGHTS[1]})."
        )
    if not any((path / w).is_file() for w in HUB_WEIGHTS):
        raise ModelUnavailableError(
            f'Model directory {str(path)!r} has no weights: put {HUB_WEIGHTS[0]} or '
            f'{HUB_WEIGHTS[1]} beside {HUB_CONFIG}.'
        )
    config = json.loads(config_file.read_text())
    return ModelSpec(name, f'local-dir:{path}', None, _embed_dim(config, name))


def _hf_hub_spec(name: str) -> ModelSpec:
    try:
        with _hub_access():
            config_file = _hf_download_any(name[len('hf-hub:'):], (HUB_CONFIG,))
    except Exception as exc:
        raise _offline_error(name, exc) from exc
    config = json.loads(Path(config_file).read_text())
    return ModelSpec(name, name, None, _embed_dim(config, name))


def _pretrained_spec(name: str) -> ModelSpec:
    import open_clip

    arch, _, tag = name.partition('::')
    known = {(a, t) for a, t in open_clip.list_pretrained()}
    # clip-server writes tags with dashes (laion2b-s34b-b79k), open_clip with underscores
    for candidate in (tag, tag.replace('-', '_')):
        if (arch, candidate) in known:
            config = open_clip.get_model_config(arch)
            return ModelSpec(name, arch, candidate, int(config['embed_dim']))
    raise ModelUnavailableError(
        f'Unknown model {name!r}: open_clip has no pretrained weights by that name '
        f'(see open_clip.list_pretrained() for the {len(known)} known ARCH::TAG pairs).'
    )


def _embed_dim(config: dict, name: str) -> int:
    try:
        return int(config['model_cfg']['embed_dim'])
    except (KeyError, TypeError, ValueError):
        raise ModelUnavailableError(
            f'Model {name!r}: {HUB_CONFIG} has no model_cfg.embed_dim.'
        ) from None


def _hf_download_any(repo: str, filenames: tuple[str, ...]) -> str:
    """Download (or find in the cache) the first of ``filenames`` that the hub repo has."""
    from huggingface_hub import hf_hub_download

    last_error: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, cache_dir=str(cache_dir()))
        except Exception as exc:
            last_error = exc
    raise last_error or FileNotFoundError(repo)


@contextlib.contextmanager
def _hub_access(timeout: float = 5.0) -> Iterator[None]:
    """Use the hub if it answers, else only the local cache.

    huggingface_hub retries for ~45 s on a machine without network before falling back to
    its cache; a plain TCP connect tells the same in seconds, and offline mode then makes
    the hub library read the cache at once.
    """
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == 'https' else 80)
    reachable = True
    if not constants.HF_HUB_OFFLINE:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
        except OSError:
            reachable = False
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not reachable
    try:
        yield
    except Exception as exc:
        if not reachable:
            raise ModelUnavailableError(f'{url.hostname} is unreachable and the cache has no copy') from exc
        raise
    finally:
        constants.HF_HUB_OFFLINE = saved


def _offline_error(name: str, exc: Exception) -> ModelUnavailableError:
    if isinstance(exc, ModelUnavailableError):
        reason = str(exc).rstrip('; ')
    else:
        reason = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'.rstrip(': ')
    return ModelUnavailableError(
        f'The weights of {name!r} cannot be downloaded here ({reason}); '
        f'copy a checkpoint in open_clip hub layout to this machine and pass '
        f'--model /path/to/dir, or run offline with --model mini::shapes.'
    )

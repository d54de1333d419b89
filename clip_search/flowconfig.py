"""A Flow YAML as clip-search serves and exports it: find it, read it, apply the overrides.

``cli.py`` (serve) and ``deploy.py`` (export) both start here, so a Flow is exported exactly as it
would be served.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from clip_search.models import DTYPES, DtypeError, check_dtype, ensure_weights, resolve_model

DEFAULT_FLOW = 'search_flow.yml'
ENCODER_CLASS = 'CLIPEncoder'
INDEXER_CLASS = 'AnnLiteIndexer'


class FlowConfigError(ValueError):
    """The Flow YAML and the command line disagree or miss something; the message says what."""


def shipped_flows_dir() -> Path:
    """The flows shipped with clip-search: inside the installed package, or ``flows/`` of a source checkout.

    One copy: the wheel maps the repository's ``flows/`` to ``clip_search/flows`` (pyproject's package-dir).
    """
    package = Path(__file__).resolve().parent
    installed = package / 'flows'
    return installed if installed.is_dir() else package.parent / 'flows'


def resolve_flow_file(name: str | Path) -> Path:
    """A Flow YAML by path, or by the bare name of a shipped flow (``search_flow.yml``) from any directory."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_flows_dir()
    if path.name == str(name):
        for candidate in (shipped / path.name, shipped / f'{path.name}.yml'):
            if candidate.is_file():
                return candidate
    names = ', '.join(sorted(p.name for p in shipped.glob('*.yml'))) or 'none found'
    raise FlowConfigError(f'no Flow YAML {str(name)!r} in {Path.cwd()} nor among the shipped flows ({names})')


def load_flow_config(
    flow_file: str | Path,
    port: Optional[int] = None,
    host: Optional[str] = None,
    model: Optional[str] = None,
    shards: Optional[int] = None,
    workspace: Optional[str] = None,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    protocol: Optional[str] = None,
    dtype: Optional[str] = None,
) -> dict:
    """Read the Flow YAML and apply the command-line overrides."""
    flow_file = resolve_flow_file(flow_file)
    config = yaml.safe_load(flow_file.read_text())
    if not isinstance(config, dict) or not isinstance(config.get('executors'), list):
        raise FlowConfigError(f'{flow_file} is not a Flow YAML with a list of executors')
    encoder = find_executor(config, ENCODER_CLASS, flow_file)
    indexer = find_executor(config, INDEXER_CLASS, flow_file)
    if port is not None:
        _section(config, 'with')['port'] = port
    if protocol is not None:
        _section(config, 'with')['protocol'] = protocol
    gateway = _section(config, 'gateway')  # the gateway's alone: 'with' reaches every executor
    if host is not None:
        gateway['host'] = host
    if tls_cert or tls_key:
        gateway.update(_tls_settings(tls_cert, tls_key))
    _keep_executors_on_loopback(config)
    if model is not None:
        _section(encoder, 'uses_with')['name'] = model
    if dtype is not None:
        _section(encoder, 'uses_with')['dtype'] = dtype
    declared_dtype = (encoder.get('uses_with') or {}).get('dtype')
    if declared_dtype is not None and declared_dtype not in DTYPES:  # the device check is the encoder's, at its start
        raise FlowConfigError(f'the encoder\'s dtype {declared_dtype!r} is unknown: use one of {", ".join(DTYPES)}')
    if shards is not None:
        if shards < 1:
            raise FlowConfigError(f'--shards must be at least 1, not {shards}')
        indexer['shards'] = shards
    if workspace is not None:
        indexer['workspace'] = workspace
    return config


def set_index_dimension(config: dict, embed_dim: int, model_name: str) -> None:
    """Give the indexer the model's embedding size; a hand-set n_dim must agree with it."""
    indexer = find_executor(config, INDEXER_CLASS)
    indexer_with = _section(indexer, 'uses_with')
    declared = indexer_with.get('n_dim')
    if declared is not None and int(declared) != embed_dim:
        raise FlowConfigError(
            f'the Flow sets the indexer n_dim={declared}, but model {model_name!r} makes '
            f'{embed_dim}-d embeddings: remove n_dim from the YAML (it follows the model)'
        )
    indexer_with['n_dim'] = embed_dim


def model_name_of(config: dict) -> str:
    """The model the encoder will load."""
    from clip_search.models import DEFAULT_MODEL

    encoder = find_executor(config, ENCODER_CLASS)
    return str((encoder.get('uses_with') or {}).get('name', DEFAULT_MODEL))


def prepare_flow_config(flow_file: str | Path, fetch_weights: bool = True, **overrides) -> dict:
    """Everything ``main`` does before starting: YAML, overrides, model check, index dimension.

    ``fetch_weights=False`` (for ``export``) skips fetching the weights: a container fetches them.
    """
    config = load_flow_config(flow_file, **overrides)
    model_name = model_name_of(config)
    spec = resolve_model(model_name)
    if fetch_weights:
        ensure_weights(spec)
    set_index_dimension(config, spec.embed_dim, model_name)
    return config


def check_encoder_dtype(config: dict) -> None:
    """Refuse, before anything starts, a dtype the encoder's device cannot run (fp16 on a CPU, int8 on CUDA)."""
    encoder_with = find_executor(config, ENCODER_CLASS).get('uses_with') or {}
    dtype = encoder_with.get('dtype')
    if dtype in (None, 'fp32'):  # runs anywhere
        return
    try:
        check_dtype(dtype, encoder_with.get('device') or _default_device())
    except DtypeError as exc:
        raise FlowConfigError(str(exc)) from None


def _default_device() -> str:
    """The encoder's default device: cuda when torch sees one (asked in a child: the CLI does not load torch)."""
    probe = 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")'
    result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=120)
    return result.stdout.strip() or 'cpu'


def _section(mapping: dict, key: str) -> dict:
    """``mapping[key]`` as a dict, created when missing or empty (YAML gives None for ``key:``)."""
    if not mapping.get(key):
        mapping[key] = {}
    return mapping[key]


def _keep_executors_on_loopback(config: dict) -> None:
    """Executors listen on random unauthenticated ports: bind them to 127.0.0.1 unless the YAML says."""
    for executor in config['executors']:
        executor.setdefault('host', '127.0.0.1')


def _tls_settings(cert: Optional[str], key: Optional[str]) -> dict:
    if not (cert and key):
        raise FlowConfigError('TLS needs both --tls-cert and --tls-key')
    for option, path in (('--tls-cert', cert), ('--tls-key', key)):
        if not Path(path).is_file():
            raise FlowConfigError(f'{option} {path}: no such file')
    return {'ssl_certfile': str(Path(cert).resolve()), 'ssl_keyfile': str(Path(key).resolve())}


def find_executor(config: dict, wanted: str, flow_file='the Flow') -> dict:
    """The executor entry whose ``uses`` names the class ``wanted``."""
    for executor in config.get('executors') or []:
        if class_name(executor.get('uses', '')) == wanted:
            return executor
    raise FlowConfigError(f'{flow_file} has no executor that uses {wanted}')


def class_name(uses) -> str:
    """The executor class a ``uses`` names (``CLIPEncoder``, ``clip_search.executors.x.CLIPEncoder``)."""
    return str(uses).split('.')[-1]


def build_flow(config: dict):
    """The jina Flow of a config dict."""
    from jina import Flow

    # Jina's loader reads `jtype` only as the first key; a YAML written with sorted keys has it later
    return Flow.load_config({'jtype': config.get('jtype', 'Flow'), **config})

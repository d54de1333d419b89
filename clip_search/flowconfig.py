"""A Flow YAML as clip-search serves and exports it: find it, read it, apply the overrides.

``cli.py`` (serve) and ``deploy.py`` (export) both start here, so a Flow is exported exactly as it
would be served.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from clip_search.models import DTYPES, DtypeError, check_dtype, ensure_weights, resolve_model

DEFAULT_FLOW = 'search_flow.yml'
ENCODER_CLASS = 'CLIPEncoder'
INDEXER_CLASS = 'AnnLiteIndexer'
GATEWAY_MODULE = 'clip_search.gateway'  # Jina's gateway with an all-or-nothing /update, one class per protocol
GATEWAY_CLASSES = {'grpc': 'CheckedGRPCGateway', 'http': 'CheckedHTTPGateway', 'websocket': 'CheckedWebSocketGateway'}
COMPOSITE_GATEWAY_CLASS = 'CheckedCompositeGateway'  # several protocols at once
SHARDED_ENDPOINTS = ('/search', '/update', '/delete', '/status')  # must reach every shard
MERGER_CLASS = 'ShardMerger'
# the modules of our executors, by class (the merger runs in the indexer's deployment)
OWN_MODULES = {
    ENCODER_CLASS: ['clip_search.executors.clip_encoder'],
    INDEXER_CLASS: ['clip_search.executors.annlite_indexer', 'clip_search.executors.shard_merger'],
}
# clip-as-service's executors, which its docs' Flows name: ours serve them (clip-server cannot be
# installed beside open_clip 3, and annlite's executor buffers /index in a thread)
UPSTREAM_MODULES = {
    'clip_server.executors.clip_torch': ENCODER_CLASS,
    'annlite.executor': INDEXER_CLASS,
}
# the design card's polling, for an indexer whose YAML gives none (Jina's default, ANY everywhere,
# would send each search to one shard)
CARD_POLLING = {'/index': 'ANY', '/search': 'ALL', '/update': 'ALL', '/delete': 'ALL', '/status': 'ALL'}


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
    allow_paths: Sequence[str] = (),
    allow_hosts: Sequence[str] = (),
    dtype: Optional[str] = None,
    pq: Optional[int] = None,
) -> dict:
    """Read the Flow YAML and apply the command-line overrides (``allow_*`` add to the YAML's lists)."""
    flow_file = resolve_flow_file(flow_file)
    config = yaml.safe_load(flow_file.read_text())
    if not isinstance(config, dict) or not isinstance(config.get('executors'), list):
        raise FlowConfigError(f'{flow_file} is not a Flow YAML with a list of executors')
    served = [served for executor in config['executors'] for served in normalise_executor(executor)]
    if served:
        named = ' and '.join(f'{module}.{UPSTREAM_MODULES[module]}' for module in dict.fromkeys(served))
        print(f'clip-search: {flow_file.name} names clip-as-service\'s {named}: clip-search\'s own serve them', file=sys.stderr)
    encoder = find_executor(config, ENCODER_CLASS, flow_file)
    indexer = find_executor(config, INDEXER_CLASS, flow_file)
    complete_indexer(indexer)
    if port is not None:
        _section(config, 'with')['port'] = port
    if protocol is not None:
        _section(config, 'with')['protocol'] = protocols_of(protocol)
    _port_per_protocol(config)
    gateway = _section(config, 'gateway')  # the gateway's alone: 'with' reaches every executor
    if host is not None:
        gateway['host'] = host
    if tls_cert or tls_key:
        gateway.update(_tls_settings(tls_cert, tls_key))
    _keep_executors_on_loopback(config)
    _tolerate_jinas_keepalive_pings(config)
    if model is not None:
        _section(encoder, 'uses_with')['name'] = model
    _allow(_section(encoder, 'uses_with'), allow_paths, allow_hosts)
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
    if pq is not None:
        if pq < 1:
            raise FlowConfigError(f'--pq must be at least 1 (bytes a document), not {pq}')
        _section(indexer, 'uses_with')['n_subvectors'] = pq
    set_placement(indexer, flow_file)
    use_checked_gateway(config)
    return config


def set_placement(indexer: dict, flow_file='the Flow') -> None:
    """Tell the indexer (and so its merger) how /index is polled: that decides placement.

    The other endpoints must reach every shard, or a search would see one shard's documents.
    """
    polling = indexer_polling(indexer)
    if int(indexer.get('shards') or 1) > 1:
        for endpoint in SHARDED_ENDPOINTS:
            if polling(endpoint) != 'ALL':
                raise FlowConfigError(
                    f'{flow_file}: the indexer polls {endpoint} {polling(endpoint)}: it must be ALL, '
                    f'so that every shard answers (only /index may be ANY)'
                )
    index_polling = polling('/index')
    if index_polling not in ('ANY', 'ALL'):
        raise FlowConfigError(f'{flow_file}: the indexer polls /index {index_polling}: expected ANY or ALL')
    indexer_with = _section(indexer, 'uses_with')
    declared = indexer_with.get('index_polling')
    if declared is not None and str(declared).upper() != index_polling:
        raise FlowConfigError(
            f'{flow_file}: the indexer sets index_polling={declared}, but polls /index {index_polling}: '
            f'remove index_polling from uses_with (it follows the polling)'
        )
    indexer_with['index_polling'] = index_polling


def indexer_polling(indexer: dict) -> Callable[[str], str]:
    """The indexer's polling per endpoint, read as Jina reads ``polling`` (a word or a map; ANY by default)."""
    polling = indexer.get('polling') or 'ANY'
    if isinstance(polling, dict):
        by_endpoint = {str(endpoint): str(mode).upper() for endpoint, mode in polling.items()}
        default = by_endpoint.get('*', 'ANY')
        return lambda endpoint: by_endpoint.get(endpoint, default)
    return lambda endpoint: str(polling).upper()


def protocols_of(protocol) -> str | list[str]:
    """``grpc`` or ``grpc,http,websocket`` (a list: one gateway serves them all, each on its own port)."""
    names = [name.strip().lower() for name in (protocol.split(',') if isinstance(protocol, str) else protocol)]
    for name in names:
        if name not in GATEWAY_CLASSES:
            raise FlowConfigError(f'protocol {name!r} is unknown: use {", ".join(GATEWAY_CLASSES)} (or several, comma-separated)')
    return names[0] if len(names) == 1 else names


def _port_per_protocol(config: dict) -> None:
    """Several protocols and one port: the first protocol on it, each next one on the next port."""
    settings = config.get('with') or {}
    protocol, port = settings.get('protocol'), settings.get('port')
    if isinstance(protocol, list) and isinstance(port, int):
        settings['port'] = [port + offset for offset in range(len(protocol))]


def gateway_addresses(config: dict, host: str, ports) -> list[str]:
    """``scheme://host:port`` of each protocol the gateway serves (``ports``: the Flow's, one or a list)."""
    protocols = (config.get('with') or {}).get('protocol', 'grpc')
    protocols = protocols if isinstance(protocols, list) else [protocols]
    ports = ports if isinstance(ports, list) else [ports]
    tls = 's' if (config.get('gateway') or {}).get('ssl_certfile') else ''
    schemes = [{'websocket': 'ws'}.get(str(p).lower(), str(p).lower()) + tls for p in protocols]
    return [f'{scheme}://{host}:{port}' for scheme, port in zip(schemes, ports)]


def use_checked_gateway(config: dict) -> None:
    """Serve through clip-search's gateway (clip_search/gateway.py) unless the YAML names a gateway of its own."""
    gateway = _section(config, 'gateway')
    protocol = (config.get('with') or {}).get('protocol', 'grpc')
    protocols = [str(p).lower() for p in protocol] if isinstance(protocol, list) else [str(protocol).lower()]
    if gateway.get('uses') or not all(p in GATEWAY_CLASSES for p in protocols):
        return
    indexer, encoder = find_executor(config, INDEXER_CLASS), find_executor(config, ENCODER_CLASS)
    gateway['uses'] = GATEWAY_CLASSES[protocols[0]] if len(protocols) == 1 else COMPOSITE_GATEWAY_CLASS
    gateway['py_modules'] = [*(gateway.get('py_modules') or []), GATEWAY_MODULE]
    gateway_with = _section(gateway, 'uses_with')
    gateway_with['indexer'] = indexer.setdefault('name', 'indexer')
    gateway_with['encoder'] = encoder.setdefault('name', 'encoder')


def normalise_executor(executor: dict) -> list[str]:
    """Bring an executor entry to one syntax, ``uses: CLASS`` + ``uses_with`` + ``py_modules``; return
    the clip-as-service modules it named (now served by ours).

    Jina also takes ``uses: {jtype: CLASS, with: {...}, metas: {py_modules: [...]}, workspace: ...}``,
    the syntax of clip-as-service's docs. Its settings are kept: ``with`` joins ``uses_with`` (which
    wins, as in Jina), ``metas`` join ``uses_metas``, ``workspace`` moves beside ``uses`` unless one
    is there already.
    """
    uses = executor.get('uses')
    if isinstance(uses, dict):
        executor['uses'] = str(uses.get('jtype') or '')
        executor['uses_with'] = {**(uses.get('with') or {}), **(executor.get('uses_with') or {})}
        executor['uses_metas'] = {**(uses.get('metas') or {}), **(executor.get('uses_metas') or {})}
        if uses.get('workspace') is not None:
            executor.setdefault('workspace', uses['workspace'])
    metas = executor.get('uses_metas') or {}
    modules = _as_list(executor.get('py_modules')) + _as_list(metas.pop('py_modules', None))
    served = [module for module in modules if module in UPSTREAM_MODULES]
    own = OWN_MODULES.get(class_name(executor.get('uses', '')))
    if own is not None:  # ours, whatever module the YAML names for it
        modules = own + [m for m in modules if m not in own and m not in UPSTREAM_MODULES]
    if modules:
        executor['py_modules'] = modules
    for key in ('uses_with', 'uses_metas'):
        if key in executor and not executor[key]:
            del executor[key]
    return served


def complete_indexer(indexer: dict) -> None:
    """What a sharded indexer needs and a YAML written for clip-as-service leaves out: the merger
    after the shards (Jina's reduce only concatenates their matches) and the card's polling."""
    if not indexer.get('uses_after'):
        indexer['uses_after'] = MERGER_CLASS
    polling = indexer.get('polling')
    if polling is None:
        indexer['polling'] = dict(CARD_POLLING)
    elif isinstance(polling, dict) and '*' not in polling:  # endpoints it does not name: the card's, not Jina's ANY
        indexer['polling'] = {**CARD_POLLING, **polling}


def _allow(encoder_with: dict, paths: Sequence[str], hosts: Sequence[str]) -> None:
    """Add ``--allow-path`` directories (absolute, as the encoder process sees them) and ``--allow-host`` names."""
    for path in paths:
        if not Path(path).expanduser().is_dir():
            raise FlowConfigError(f'--allow-path {path}: no such directory')
    if paths:
        encoder_with['allow_paths'] = [*(encoder_with.get('allow_paths') or []), *(str(Path(p).expanduser().resolve()) for p in paths)]
    if hosts:
        encoder_with['allow_hosts'] = [*(encoder_with.get('allow_hosts') or []), *hosts]


def media_policy_of(config: dict):
    """What the encoder may read and fetch (its ``allow_paths``, ``allow_hosts``, ``uri_timeout``): the web page reads no more."""
    from clip_search.media import MediaPolicy

    settings = find_executor(config, ENCODER_CLASS).get('uses_with') or {}
    keys = ('allow_paths', 'allow_hosts', 'uri_timeout')
    return MediaPolicy.create(**{key: settings[key] for key in keys if settings.get(key) is not None})


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
    n_subvectors = indexer_with.get('n_subvectors')
    if n_subvectors is not None and (not isinstance(n_subvectors, int) or n_subvectors < 1 or embed_dim % n_subvectors):
        raise FlowConfigError(
            f'the indexer\'s n_subvectors={n_subvectors!r} (--pq) must divide the {embed_dim}-d embeddings '
            f'of model {model_name!r} (product quantization cuts each vector into equal sub-vectors)'
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


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _keep_executors_on_loopback(config: dict) -> None:
    """Executors listen on random unauthenticated ports: bind them to 127.0.0.1 unless the YAML says."""
    for executor in config['executors']:
        executor.setdefault('host', '127.0.0.1')


# Jina's channels ping every 10 s even when idle ('grpc.keepalive_time_ms': 9999, permit_without_calls)
# and it means its servers to allow that, but it names their settings 'grpc.http1.*', which gRPC does
# not know: every server keeps gRPC's 5 minutes between pings without data, answers the third early
# ping with GOAWAY 'too_many_pings', and the request on that connection fails. A search after an idle
# minute then failed one time in three ('shards [1] of 2 did not answer'). Here are Jina's intended
# settings under gRPC's names, for the gateway and every executor (their heads and mergers inherit them).
PING_TOLERANT_SERVER = {
    'grpc.http2.min_recv_ping_interval_without_data_ms': 5000,
    'grpc.http2.max_ping_strikes': 0,  # 0: no limit
}


def _tolerate_jinas_keepalive_pings(config: dict) -> None:
    """Let every server of the Flow take Jina's keepalive pings (a YAML's own values win)."""
    for section in (_section(config, 'gateway'), *config['executors']):
        options = section.get('grpc_server_options') or {}
        section['grpc_server_options'] = {**PING_TOLERANT_SERVER, **options}


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

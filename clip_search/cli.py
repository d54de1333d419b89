"""``python -m clip_search FLOW.yml``: load a Flow YAML, apply the overrides, serve until stopped.

``python -m clip_search export docker-compose|kubernetes FLOW.yml`` writes it as containers (deploy.py);
``python -m clip_search index|search|status|delete ...`` are client commands (commands.py).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, NoReturn, Optional, Sequence

import yaml

from clip_search.auth import (
    API_KEYS_ENV,
    FILE_SUFFIX,
    READ_ONLY_KEYS_ENV,
    KeyRing,
    KeySettingError,
    check_keys,
    keys_from_environment,
    read_key_file,
)
from clip_search.flowconfig import (
    DEFAULT_FLOW,
    FlowConfigError,
    build_flow,
    check_encoder_dtype,
    gateway_addresses,
    media_policy_of,
    model_name_of,
    prepare_flow_config,
)
from clip_search.models import DTYPES, ModelUnavailableError
from clip_search.web.server import WebServerError, bind_web_socket


CLIENT_COMMANDS = ('index', 'search', 'status', 'delete')  # clip_search/commands.py, imported when used


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m clip_search',
        description='Serve CLIP text & image search: a Jina Flow of CLIPEncoder -> sharded AnnLiteIndexer, over gRPC.',
    )
    parser.add_argument(
        'flow',
        nargs='?',
        default=DEFAULT_FLOW,
        help=f'the Flow YAML: a path, or the name of a flow shipped with clip-search (default: {DEFAULT_FLOW})',
    )
    parser.add_argument('--port', type=int, help='port of the gateway (the YAML says 61000)')
    parser.add_argument(
        '--protocol',
        help='protocol of the gateway: grpc (the YAML\'s), http (JSON on POST /post, as curl sends it) or websocket; '
        'several, comma-separated (grpc,http), are served on --port and the ports after it',
    )
    parser.add_argument(
        '--host',
        help='address the gateway binds to (default: every interface, 0.0.0.0; use 127.0.0.1 for this machine only)',
    )
    parser.add_argument(
        '--model',
        help='CLIP model: a clip-server name (ViT-B-32::openai), any open_clip ARCH::TAG, hf-hub:ORG/REPO, '
        'a local checkpoint directory in open_clip hub layout, or mini::shapes (bundled, offline)',
    )
    parser.add_argument(
        '--dtype',
        choices=DTYPES,
        help='how the encoder runs the model (clip_server\'s dtype): fp32 (the CPU default), int8 (CPU only: '
        'linear layers quantized at load, about 1.5x faster, embeddings within 0.99 cosine of fp32) or fp16 '
        '(CUDA only, the CUDA default)',
    )
    parser.add_argument('--tls-cert', help='PEM certificate: serve gRPC over TLS (clients use grpcs://); needs --tls-key')
    parser.add_argument('--tls-key', help='PEM private key of --tls-cert')
    parser.add_argument('--shards', type=int, help='number of indexer shards (a workspace keeps the count it was built with)')
    parser.add_argument('--workspace', help='directory where the index is stored (the YAML says ./workspace)')
    parser.add_argument(
        '--pq', type=int, metavar='N',
        help='compress the index with product quantization, N bytes a document (N must divide the embedding size, '
        'e.g. 64 for 512-d): about 4x less memory, exact distances from float vectors kept on disk; '
        'a workspace keeps the setting it was built with',
    )  # fmt: skip
    parser.add_argument(
        '--web-port', type=int, help='also serve a search page and a JSON API (/api/search) over HTTP on this port'
    )
    parser.add_argument('--web-host', help='address the web page binds to (default: the same as --host)')
    parser.add_argument(
        '--allow-path', action='append', default=[], metavar='DIR',
        help='let a document\'s uri name files under DIR on the server (repeatable; by default the server opens no path a request names)',
    )  # fmt: skip
    parser.add_argument(
        '--allow-host', action='append', default=[], metavar='HOST',
        help='let the server fetch image URLs of HOST (a name, an address or a network) although it is loopback, '
        'private or link-local (repeatable; by default only public addresses are fetched)',
    )
    parser.add_argument(
        '--api-key', action='append', default=[], metavar='KEY',
        help='require this key on every request (Authorization: KEY, or Bearer KEY) to the gateway and the web '
        'page\'s API (repeatable; --api-key-file or CLIP_SEARCH_API_KEYS keep keys off the process list)',
    )  # fmt: skip
    parser.add_argument('--api-key-file', action='append', default=[], metavar='FILE', help='read-write keys, one a line')
    parser.add_argument(
        '--read-only-key', action='append', default=[], metavar='KEY',
        help='a key that may call /search, /encode, /rank, /status and / only (repeatable; also --read-only-key-file '
        'FILE and CLIP_SEARCH_READ_ONLY_KEYS)',
    )  # fmt: skip
    parser.add_argument('--read-only-key-file', action='append', default=[], metavar='FILE', help='read-only keys, one a line')
    parser.add_argument(
        '--web-allowed-host', action='append', default=[], metavar='HOST',
        help='a Host name the web page answers besides localhost and its bound address (repeatable), e.g. the '
        'name a proxy serves it under; other Host headers get 400 (DNS rebinding)',
    )  # fmt: skip
    parser.add_argument(
        '--exit-on-failure',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='when an executor process (e.g. a shard) dies, stop the service with exit code 1 so that a service '
        'manager restarts it (default); with --no-exit-on-failure it keeps serving and requests that need '
        'the dead shard fail with an error naming it',
    )
    return parser


def serve(
    config: dict,
    stop_event: Optional[threading.Event] = None,
    exit_on_failure: bool = True,
    web_socket: Optional[socket.socket] = None,
    keys: Optional[KeyRing] = None,
    web_allowed_hosts: Sequence[str] = (),
) -> int:
    """Start the Flow and serve until ``stop_event``, Ctrl-C or SIGTERM; then close it cleanly.

    With ``exit_on_failure``, the death of any executor process (a shard, the encoder, ...) stops
    the whole service with exit code 1: a service manager or Docker's restart policy then brings
    it back, every shard with its data. Without it, the service keeps running and requests that
    need the dead shard fail with an error naming it. With ``web_socket`` (see ``open_web_port``),
    the search page is served on it while the Flow runs. Returns the exit code.
    """
    stop_event = stop_event or threading.Event()
    use_uvloop_in_every_process()
    flow = build_flow(config)
    exit_code = 0
    with _stop_signals(stop_event) as starting:
        flow.start()
        starting.clear()
        keys = keys or KeyRing.from_environment()
        addresses = gateway_addresses(config, flow.host, flow.port)
        with contextlib.closing(flow), _web_page(web_socket, config, addresses, keys, web_allowed_hosts):
            # Jina starts every executor as a multiprocessing child of this process, named after it
            executors = {child.pid: child.name for child in multiprocessing.active_children()}
            print(f'clip-search is serving on {", ".join(addresses)} (Ctrl-C to stop)', flush=True)
            if not keys.enabled:
                print(
                    f'clip-search: no API key is set: anyone who can reach {", ".join(addresses)} can search, index and '
                    f'delete; start with --api-key KEY (or CLIP_SEARCH_API_KEYS) to require one',
                    flush=True,
                )  # fmt: skip
            while not stop_event.wait(1.0):
                dead = _dead_executors(executors) if exit_on_failure else []
                if dead:
                    print(
                        f'clip-search: {", ".join(dead)} exited unexpectedly; stopping the service so that '
                        f'a restart brings every shard back with its data',
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
                    exit_code = 1
                    break
    print('clip-search stopped; the index is saved in its workspace', flush=True)
    return exit_code


def use_uvloop_in_every_process() -> None:
    """Run the event loops of the gateway and every executor on uvloop rather than asyncio's own.

    Jina means to (``jina.helper._update_policy``), but sets the policy only where it asks for a
    loop itself, never in the runtimes it forks from this process, which make theirs with
    ``asyncio.new_event_loop()``: every process of the Flow ran asyncio's pure-Python loop, and its
    selector and callbacks were a large share of the CPU a search costs (bench/throughput.py).
    Set here, before the Flow forks them, the policy reaches all of them.
    """
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@contextlib.contextmanager
def _stop_signals(stop_event: threading.Event) -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM stop the service in order: the gateway first, then the executors.

    Ctrl-C in a terminal signals every process of the group at once. Left alone, each executor
    stops itself (a traceback from the ones still starting, "Communication error" lines from the
    gateway when a shard goes first). Here only this process acts: while the Flow starts (the
    yielded event is set until ``clear()``), Ctrl-C stops the executors started so far and exits;
    once it serves, both signals set ``stop_event`` and the Flow closes its executors one by one,
    each on a SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        yield threading.Event()
        return
    import jina.serve.runtimes.asyncio as jina_runtime

    starting = threading.Event()
    starting.set()
    parent = os.getpid()

    def on_signal(signum: int, frame) -> None:
        if os.getpid() != parent:  # an executor, forked before Jina installs its own handlers
            if signum == signal.SIGTERM:  # the Flow stops it: die as an executor without this handler would
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGINT and starting.is_set():
            starting.clear()  # a second Ctrl-C meanwhile changes nothing
            _abandon_start()
        stop_event.set()

    # executors inherit these handlers (Jina forks them) and, once running, handle SIGTERM alone
    handled, jina_runtime.HANDLED_SIGNALS = jina_runtime.HANDLED_SIGNALS, (signal.SIGTERM, signal.SIGSEGV)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield starting
    finally:
        jina_runtime.HANDLED_SIGNALS = handled
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _abandon_start() -> NoReturn:
    """Ctrl-C while the Flow starts: stop the executors started so far and exit at once.

    Not by raising KeyboardInterrupt: it would land anywhere in Jina's start (a lock's release, a
    fork hook) and leave executors behind; and nothing needs saving before the Flow serves. Jina's
    other threads may still fork a process (the gateway) after the first sweep, and it would have
    missed this Ctrl-C: sweep until no new one appears for a second.
    """
    _stop_executors()
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        time.sleep(0.1)
        if multiprocessing.active_children():
            _stop_executors()
            quiet_since = time.monotonic()
    if os.getpgrp() == os.getpid():  # our own process group (a terminal job, a service): one forked late goes too
        os.killpg(os.getpgrp(), signal.SIGTERM)  # this process ignores it here (on_signal)
    print('clip-search stopped before it was ready', flush=True)
    sys.stderr.flush()
    os._exit(130)


def _stop_executors(grace: float = 3.0) -> None:
    """SIGTERM every executor process started so far; SIGKILL what is left after ``grace`` seconds.

    A shard loses nothing either way (its writes are synced); a start is only reading.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


def open_web_port(config: dict, port: Optional[int], host: Optional[str]) -> Optional[socket.socket]:
    """Listen on the ``--web-port`` before the Flow starts (a taken port fails fast); None without one."""
    if port is None:
        return None
    gateway = config.get('gateway') or {}
    if gateway.get('ssl_certfile'):
        raise FlowConfigError('--web-port cannot be combined with --tls-cert yet: serve the page through a TLS proxy')
    gateway_ports = (config.get('with') or {}).get('port')
    if port in (gateway_ports if isinstance(gateway_ports, list) else [gateway_ports]):
        raise FlowConfigError(f'--web-port {port} is the gateway\'s gRPC port: pick another one')
    return bind_web_socket(host or gateway.get('host') or '0.0.0.0', port)


def _web_page(
    web_socket: Optional[socket.socket], config: dict, addresses: list[str], keys: KeyRing, allowed_hosts: Sequence[str]
):
    """The search page beside the Flow, a client of its gateway (over gRPC if it serves it); nothing without a socket."""
    if web_socket is None:
        return contextlib.nullcontext()
    from clip_search.web.server import serve_web_page

    host = (config.get('gateway') or {}).get('host')
    gateway_host = '127.0.0.1' if host in (None, '', '0.0.0.0', '::') else host
    address = next((a for a in addresses if a.startswith('grpc')), addresses[0])
    scheme, _, rest = address.partition('://')
    url = f'{scheme}://{gateway_host}:{rest.rsplit(":", 1)[1]}'
    # the page calls the Flow with the least key it has: it only reads
    gateway_key = next(iter(keys_from_environment(READ_ONLY_KEYS_ENV) or keys_from_environment(API_KEYS_ENV)), None)
    return serve_web_page(
        web_socket, url, model=model_name_of(config), media=media_policy_of(config),
        keys=keys, gateway_key=gateway_key, allowed_hosts=allowed_hosts,
    )  # fmt: skip


def settle_api_keys(args: argparse.Namespace) -> KeyRing:
    """The keys of the command line, its files and the environment, put in the environment for the gateway.

    The gateway process reads its keys from the environment only (clip_search/auth.py), so that no key
    is written in the Flow's YAML or on an executor's command line.
    """
    full = check_keys(
        [*args.api_key, *(k for f in args.api_key_file for k in read_key_file(f, '--api-key-file')), *keys_from_environment(API_KEYS_ENV)],
        '--api-key',
    )
    read_only = check_keys(
        [
            *args.read_only_key,
            *(k for f in args.read_only_key_file for k in read_key_file(f, '--read-only-key-file')),
            *keys_from_environment(READ_ONLY_KEYS_ENV),
        ],
        '--read-only-key',
    )
    for name, keys in ((API_KEYS_ENV, full), (READ_ONLY_KEYS_ENV, read_only)):
        os.environ.pop(name + FILE_SUFFIX, None)
        if keys:
            os.environ[name] = ','.join(dict.fromkeys(keys))
        else:
            os.environ.pop(name, None)
    return KeyRing.create(full, read_only)


def _dead_executors(executors: dict[int, str]) -> list[str]:
    alive = {child.pid for child in multiprocessing.active_children()}
    return sorted(name for pid, name in executors.items() if pid not in alive)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the Flow starts (loading libraries, fetching weights)
        print('clip-search stopped before it was ready', flush=True)
        return 130


def _main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault('JINA_HIDE_SURVEY', '1')
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['export']:  # `python -m clip_search export ...`: a parser of its own, see deploy.py
        from clip_search.deploy import export_main

        return export_main(argv[1:])
    if argv[:1] and argv[0] in CLIENT_COMMANDS:  # `python -m clip_search index ...`: commands.py
        from clip_search.commands import command_main

        return command_main(argv)
    _internal_ports_outside_ephemeral_range()
    args = build_parser().parse_args(argv)
    try:
        config = prepare_flow_config(
            args.flow,
            port=args.port,
            host=args.host,
            model=args.model,
            dtype=args.dtype,
            shards=args.shards,
            workspace=args.workspace,
            pq=args.pq,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            protocol=args.protocol,
            allow_paths=args.allow_path,
            allow_hosts=args.allow_host,
        )
        check_encoder_dtype(config)  # serve only: an exported container may have another device
        keys = settle_api_keys(args)
        web_socket = open_web_port(config, args.web_port, args.web_host)
    except (ModelUnavailableError, FlowConfigError, WebServerError, KeySettingError, OSError, yaml.YAMLError) as exc:
        print(f'clip-search: {exc}', file=sys.stderr)
        return 2
    try:
        return serve(
            config, exit_on_failure=args.exit_on_failure, web_socket=web_socket, keys=keys,
            web_allowed_hosts=args.web_allowed_host,
        )  # fmt: skip
    except Exception as exc:  # jina has logged the details; say it in one line too
        print(f'clip-search: the Flow failed: {exc}', file=sys.stderr)
        return 1


def _internal_ports_outside_ephemeral_range() -> None:
    """Pick Jina's internal ports below the kernel's ephemeral range.

    Jina draws executor ports at random from 49153-65535, which overlaps the range the kernel hands
    to outgoing connections (32768-60999 on Linux): a client's connection could take a port between
    Jina checking it and the executor binding it, and the start failed with PortAlreadyUsed.
    """
    try:
        low = int(Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if low > 12000:
        os.environ.setdefault('JINA_RANDOM_PORT_MIN', str(max(1024, low - 12000)))
        os.environ.setdefault('JINA_RANDOM_PORT_MAX', str(low - 1))



"""Run the web app beside the Flow: uvicorn in a thread of the CLI process, started and stopped with it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator, Optional, Sequence

MAX_CONCURRENT_REQUESTS = 64  # connections and requests the page serves at once


class WebServerError(RuntimeError):
    """The web page could not be served; the message says why (e.g. the port is taken)."""


def bind_web_socket(host: str, port: int) -> socket.socket:
    """Listen on ``host:port`` now, so a taken port is reported before the Flow starts loading models."""
    if not 0 < port < 65536:
        raise WebServerError(f'--web-port {port} must be from 1 to 65535')
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WebServerError(f'--web-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})') from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


@contextlib.contextmanager
def serve_web_page(
    sock: socket.socket,
    grpc_server: str,
    model: Optional[str] = None,
    ready_timeout: float = 30,
    allowed_hosts: Sequence[str] = (),
    **app_options,
) -> Iterator[str]:
    """Serve the search page on ``sock`` for the Flow at ``grpc_server`` until the block ends; yield its URL.

    It answers requests whose Host is localhost, the bound address or one of ``allowed_hosts``.
    ``app_options`` go to ``create_app`` (``media``: what thumbnails may read, ``timeout``: per call to the
    Flow, ``keys`` and ``gateway_key``).
    """
    import uvicorn

    from clip_search.web.app import LOCAL_HOSTS, create_app

    bound = sock.getsockname()[0]
    hosts = [*LOCAL_HOSTS, *([bound] if bound not in ('0.0.0.0', '::') else []), *allowed_hosts]
    config = uvicorn.Config(
        create_app(grpc_server, model=model, allowed_hosts=hosts, **app_options),
        loop='asyncio', log_level='warning', access_log=False, lifespan='on',
        limit_concurrency=MAX_CONCURRENT_REQUESTS,  # past it, uvicorn answers 503 at once instead of queueing
    )  # fmt: skip
    server = uvicorn.Server(config)  # not in the main thread: uvicorn leaves the signals to the CLI
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, name='clip-search-web', daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise WebServerError('the web page did not start (see the log above)')
        time.sleep(0.05)
    host, port = sock.getsockname()[:2]
    url = f'http://{_display_host(host)}:{port}'
    print(f'clip-search web page on {url}', flush=True)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _display_host(host: str) -> str:
    if host in ('0.0.0.0', '::'):
        return 'localhost'  # every interface, this machine's included
    return f'[{host}]' if ':' in host else host

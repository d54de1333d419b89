"""Helpers for tests and benchmarks: a tiny random CLIP checkpoint, free ports, a running service."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
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


FLOW_FILE = Path(__file__).resolve().parents[2] / 'flows' / 'search_flow.yml'  # the repository's copy


def flow_polling_index(directory: str | Path, polling: str) -> Path:
    """The shipped Flow with ``/index`` polled ``polling`` (``ALL``: placement by id hash), as a user would edit it."""
    import yaml

    text = FLOW_FILE.read_text()
    assert '      /index: ANY' in text  # the one line a user changes
    path = Path(directory) / f'search_flow_index_{polling.lower()}.yml'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace('      /index: ANY', f'      /index: {polling}'))
    assert yaml.safe_load(path.read_text())['executors'][1]['polling']['/index'] == polling
    return path


def flow_compressed(directory: str | Path, pq_train_size: int, polling: str = 'ANY', **uses_with) -> Path:
    """The shipped Flow with the indexer's ``pq_train_size`` (and any other ``uses_with``) set, as a user
    would edit it (``--pq`` turns PQ on)."""
    import yaml

    source = flow_polling_index(directory, polling) if polling != 'ANY' else FLOW_FILE
    config = yaml.safe_load(Path(source).read_text())
    indexer = next(executor for executor in config['executors'] if executor['uses'] == 'AnnLiteIndexer')
    indexer['uses_with'].update(pq_train_size=pq_train_size, **uses_with)
    path = Path(directory) / f'search_flow_pq_{polling.lower()}.yml'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Service:
    """A clip-search server started with ``python -m clip_search`` in a subprocess."""

    def __init__(self, process, port: int, log_path: Path, scheme: str = 'grpc'):
        self.process = process
        self.port = port
        self.log_path = log_path
        self.address = f'{scheme}://127.0.0.1:{port}'

    def client(self):
        from clip_search.client import Client

        return Client(self.address)

    def log(self) -> str:
        return self.log_path.read_text(errors='replace') if self.log_path.exists() else ''

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a service manager would send, then wait for a clean exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _kill_group(self.process.pid, signal.SIGKILL)  # leave no executor behind
        return self.process.returncode

    def kill(self) -> None:
        """``kill -9`` every process of the service: the gateway, the executors, the CLI."""
        _kill_group(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def processes(self) -> list[int]:
        """Pids of every process of the service (the CLI and the executors it started)."""
        out = subprocess.run(['pgrep', '-g', str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]


def wait_searchable_until(service: Service, deadline: float) -> None:
    """Ask /status until no shard answers that it is loading (other answers are the caller's to judge)."""
    while True:
        try:
            service.client().status()
            return
        except Exception as exc:  # noqa: BLE001 - only "is loading" means wait
            if 'is loading' not in str(exc):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f'shards still loading at the deadline: {exc}\n{service.log()[-3000:]}') from exc
        time.sleep(0.2)


def _accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=2).close()
        return True
    except OSError:
        return False


def _kill_group(pgid: int, sig) -> None:

    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start_service(
    model_dir: str | Path,
    workspace: str | Path,
    shards: int = 3,
    flow_file: str | Path = FLOW_FILE,
    extra_args: tuple[str, ...] = (),
    log_path: str | Path | None = None,
    ready_timeout: float = 180,
    protocol: str = 'grpc',
    cwd: str | Path | None = None,
    wait_searchable: bool = True,
    python: str = sys.executable,
) -> Service:
    """Start the service on a free port and wait until the Flow answers; raise with its log if not.

    ``wait_searchable`` also waits until no shard says it is loading its index.

    ``flow_file=None`` leaves the flow argument out (the CLI then serves its default flow).
    ``python`` (with ``cwd``) runs another checkout's service, e.g. a baseline in a benchmark.
    """
    port = free_port()
    log_path = Path(log_path or Path(workspace).with_name(Path(workspace).name + f'-{port}.log'))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        python, '-m', 'clip_search', *([str(flow_file)] if flow_file is not None else []),
        '--port', str(port), '--model', str(model_dir), '--protocol', protocol,
        '--shards', str(shards), '--workspace', str(workspace), *extra_args,
    ]  # fmt: skip
    env = dict(os.environ, JINA_HIDE_SURVEY='1')
    with open(log_path, 'wb') as log:
        # a session of its own: kill() can then reach every process of the service at once
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd
        )
    service = Service(process, port, log_path, scheme={'websocket': 'ws'}.get(protocol, protocol))
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f'service exited with {process.returncode}:\n{service.log()[-3000:]}')
        # printed once Jina reports every executor ready (works for TLS too, unlike a plaintext probe)
        if 'clip-search is serving' in service.log() and _accepts_connections(port):
            if wait_searchable:
                wait_searchable_until(service, deadline)
            return service
        time.sleep(0.5)
    service.stop()
    raise TimeoutError(f'service not ready after {ready_timeout}s:\n{service.log()[-3000:]}')


class ComposeProcesses:
    """The services of a docker-compose file, each run as a local process (no Docker engine needed).

    Each service runs its own ``entrypoint`` + ``command`` with the changes a container network
    would make unnecessary: service hostnames become 127.0.0.1, every service gets a free loopback
    port instead of its container port, and each named volume is a folder under ``root``.
    """

    def __init__(self, compose_file: str | Path, root: str | Path):
        import yaml

        self.compose = yaml.safe_load(Path(compose_file).read_text())
        self.root = Path(root)
        self.services: dict = self.compose['services']
        self.ports = {name: free_port() for name in self.services}
        self.processes: dict[str, subprocess.Popen] = {}

    def volume(self, name: str) -> Path:
        """The folder that stands for a named volume."""
        return self.root / 'volumes' / name

    @property
    def gateway_port(self) -> int:
        return self.ports['gateway']

    def command(self, name: str) -> list[str]:
        """The service's entrypoint and command, on loopback with local ports and folders."""
        service = self.services[name]
        args = [*service.get('entrypoint', []), *service.get('command', [])]
        if '--workspace' in args:
            args[args.index('--workspace') + 1] = self._path(name, args[args.index('--workspace') + 1])
        args = [self._localise(name, arg) for arg in args]
        if '--port' in args:
            args[args.index('--port') + 1] = str(self.ports[name])
        if args[0] == 'jina':  # the image's console script; here the same, run by this interpreter
            args = [sys.executable, '-m', 'jina', *args[1:]]
        if '--host' not in args:  # the gateway binds every interface of its container: here loopback only
            args += ['--host', '127.0.0.1']
        return args

    def healthcheck(self, name: str) -> list[str]:
        """The service's healthcheck command, localised like its command."""
        test = self.services[name]['healthcheck']['test']
        args = [self._localise(name, arg) for arg in (test.split() if isinstance(test, str) else test)]
        return [sys.executable, '-m', 'jina', *args[1:]] if args[0] == 'jina' else args

    def up(self, timeout: float = 240) -> None:
        """Start the services as ``docker compose up`` does: a service that ``depends_on`` others
        starts once their healthchecks pass; returns when every healthcheck passes."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.services)
        while waiting:
            ready = [name for name, s in waiting.items() if set(s.get('depends_on') or {}) <= set(self.processes)]
            if not ready:
                raise ValueError(f'services {sorted(waiting)} depend on services that do not exist or on each other')
            for name in ready:
                self._start(name)
                del waiting[name]
            for name in ready:
                self._wait_healthy(name, deadline)

    def _start(self, name: str) -> None:
        """Start one service as a process in a session of its own, its log in ``root/NAME.log``."""
        service = self.services[name]
        env = dict(os.environ, JINA_HIDE_SURVEY='1', **dict(item.split('=', 1) for item in service.get('environment', [])))
        env['CLIP_SEARCH_CACHE'] = self._path(name, '/models')  # as the Dockerfile sets it
        cwd = self.root / 'containers' / name
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.root / f'{name}.log', 'wb') as log:
            self.processes[name] = subprocess.Popen(
                self.command(name), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_healthy(self, name: str, deadline: float) -> None:
        """Run the service's healthcheck until it passes; raise with its output and the logs at ``deadline``."""
        while True:
            dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f'services exited: {dead}\n{self.logs()}')
            check = subprocess.run(self.healthcheck(name), capture_output=True, text=True, timeout=60)
            if check.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f'{name} is not healthy: {check.stdout[-500:]}\n{self.logs()}')
            time.sleep(1)

    def logs(self, tail: int = 1500) -> str:
        """The end of every started service's log."""
        return '\n'.join(
            f'--- {name}:\n' + (self.root / f'{name}.log').read_text(errors='replace')[-tail:] for name in self.processes
        )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every service, as ``docker compose down`` does, then SIGKILL what is left."""
        for process in self.processes.values():
            _kill_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(process.pid, signal.SIGKILL)
            process.wait()

    def _localise(self, name: str, arg: str) -> str:
        """One argument as it must be outside a container network."""
        arg = str(arg)
        for other, service in self.services.items():
            for port in _service_ports(service):
                # `indexer-0:8081` in a connection list, `127.0.0.1:8081` in the service's own healthcheck
                host = r'127\.0\.0\.1' if other == name else re.escape(other)
                arg = re.sub(rf'(?<![\w.-]){host}:{port}\b', f'127.0.0.1:{self.ports[other]}', arg)
        return '127.0.0.1' if arg == '0.0.0.0' else arg

    def _path(self, name: str, path: str) -> str:
        """A path in the service's container: in one of its volumes, or else in its own file system."""
        for volume in self.services[name].get('volumes', []):
            source, target = volume.split(':')[:2]
            if path == target or path.startswith(target + '/'):
                return str(self.volume(source)) + path[len(target) :]
        return str(self.root / 'containers' / name) + path


def _service_ports(service: dict) -> list[int]:
    """The ports a compose service listens on: what its command gives after ``--port``."""
    command = [str(arg) for arg in service.get('command', [])]
    return [int(command[command.index('--port') + 1])] if '--port' in command else []

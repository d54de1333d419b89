"""Helpers for tests and benchmarks: a tiny random CLIP checkpoint, free ports, a running service."""

from __future__ import annotations

import json
import os
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


FLOW_FILE = Path(__file__).resolve().parent.parent / 'flows' / 'search_flow.yml'


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
) -> Service:
    """Start the service on a free port and wait until the Flow answers; raise with its log if not.

    ``flow_file=None`` leaves the flow argument out (the CLI then serves its default flow).
    """
    port = free_port()
    log_path = Path(log_path or Path(workspace).with_name(Path(workspace).name + f'-{port}.log'))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, '-m', 'clip_search', *([str(flow_file)] if flow_file is not None else []),
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
            return service
        time.sleep(0.5)
    service.stop()
    raise TimeoutError(f'service not ready after {ready_timeout}s:\n{service.log()[-3000:]}')

"""A quiet start and stop, as a newcomer sees it in a terminal: no warnings to puzzle over, and
Ctrl-C (SIGINT to every process of the group at once) stops the service in seconds, without tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FLOW_FILE
from helpers.service import start_service

NOISE = ('pkg_resources is deprecated', 'are not defined in', 'Traceback', 'Communication error', 'may be down')


def ctrl_c(service, timeout: float = 10) -> float:
    """What Ctrl-C in a terminal does: SIGINT to every process of the group at once; seconds until all exited."""
    started = time.monotonic()
    os.killpg(service.process.pid, signal.SIGINT)
    service.process.wait(timeout)
    while service.processes() and time.monotonic() - started < timeout:  # the executors, too
        time.sleep(0.1)
    assert service.processes() == [], 'executor processes outlived the CLI'
    return time.monotonic() - started


def assert_quiet(log: str) -> None:
    for noise in NOISE:
        assert noise not in log, f'{noise!r} in the log:\n{log[-3000:]}'


@pytest.mark.slow
def test_a_start_and_ctrl_c_are_quiet(tmp_path, tiny_model):
    service = start_service(tiny_model, tmp_path / 'workspace', shards=3, flow_file=FLOW_FILE)
    try:
        client = service.client()
        client.index([f'quiet sentence {i}' for i in range(20)])
        assert len(client.search(['quiet sentence 3'], limit=5)[0].matches) == 5
        assert ctrl_c(service) < 8
        assert service.process.returncode == 0
    finally:
        service.kill()
    log = service.log()
    assert_quiet(log)
    assert log.rstrip().endswith('clip-search stopped; the index is saved in its workspace')
    service = start_service(tiny_model, tmp_path / 'workspace', shards=3, flow_file=FLOW_FILE)
    try:  # nothing was lost
        assert service.client().status()['documents'] == 20
    finally:
        service.stop()


@pytest.mark.slow
def test_ctrl_c_while_the_executors_start_is_quiet(tmp_path, tiny_model):
    """Ctrl-C before the Flow is ready: the executors started so far stop too, and no traceback."""
    log_path = tmp_path / 'start.log'
    command = [
        sys.executable, '-m', 'clip_search', str(FLOW_FILE), '--model', str(tiny_model), '--shards', '3',
        '--workspace', str(tmp_path / 'workspace'), '--port', '0',
    ]  # fmt: skip
    from helpers.service import Service, free_port

    command[command.index('--port') + 1] = str(free_port())
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(process, 0, log_path)
    try:
        deadline = time.monotonic() + 120
        while 'start server bound' not in service.log():  # some executors run, the Flow is not ready yet
            assert time.monotonic() < deadline and process.poll() is None, service.log()[-3000:]
            time.sleep(0.05)
        assert 'clip-search is serving' not in service.log()
        assert ctrl_c(service) < 8
        assert process.returncode == 130
    finally:
        service.kill()
    assert_quiet(service.log())
    assert service.log().rstrip().endswith('clip-search stopped before it was ready')

"""Notice a dead executor process at once and let the Flow close without waiting for it.

Jina closes each pod by SIGTERM and then waits up to ``timeout_ctrl`` (15 s in the shipped YAML)
for the pod's process to report its shutdown; a process killed by ``kill -9`` never reports, so a
service whose shard died took 16 s to exit and a supervisor 16 s more to bring it back. Jina has no
hook for it: here the pods whose process is gone are marked as shut down before the Flow closes,
so it waits only for the live ones (tests/test_reliability.py measures the exit: it fails when
Jina's pods change shape).
"""

from __future__ import annotations

import multiprocessing
from typing import Iterator

POLL_SECONDS = 0.2  # how often the CLI looks for a dead executor process


def pods(flow) -> Iterator:
    """Every pod of a started Flow: heads, shards' replicas, uses_before/after, the gateway."""
    for deployment in getattr(flow, '_deployment_nodes', {}).values():
        for name in ('head_pod', 'uses_before_pod', 'uses_after_pod'):
            pod = getattr(deployment, name, None)
            if pod is not None:
                yield pod
        for replica_set in getattr(deployment, 'shards', {}).values():
            yield from getattr(replica_set, '_pods', [])


def dead_executors(executors: dict[int, str]) -> list[str]:
    """The names of the processes of ``executors`` (pid -> name) that are no longer running."""
    alive = {child.pid for child in multiprocessing.active_children()}
    return sorted(name for pid, name in executors.items() if pid not in alive)


def release_dead_pods(flow) -> list[str]:
    """Mark the pods whose process is gone as shut down, so that closing the Flow does not wait for them."""
    released = []
    for pod in pods(flow):
        worker = getattr(pod, 'worker', None)
        if worker is not None and worker.pid is not None and not worker.is_alive():
            pod.is_shutdown.set()
            released.append(pod.name)
    return released

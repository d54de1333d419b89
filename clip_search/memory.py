"""Give the heap memory a request freed back to the operating system.

A shard's write or an encoder's request allocates and frees megabytes of short-lived buffers
(protobuf messages, pickled documents) from several threads. glibc keeps what was freed inside its
arenas, between chunks still in use, so a process's resident memory stays at its high-water mark:
measured in-process, 100k documents held 2.87 KiB each in a shard, 2.55 after ``malloc_trim(0)``
(bench/scale.py shows the same in the encoder, which keeps no documents at all). Neither Python nor
Jina offers this, hence the call by hand; on a C library without ``malloc_trim`` it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Callable, Optional


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to release this way
        return None


class FreedMemoryRelease:
    """Call to return freed heap pages to the system, at most once every ``min_interval`` seconds.

    Trimming walks every arena (a few milliseconds), so a stream of small requests pays it once a
    second, not once a request.
    """

    def __init__(self, min_interval: float = 1.0):
        self.min_interval = min_interval
        self._trim = _find_malloc_trim()
        self._last = float('-inf')
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._trim is not None

    def __call__(self) -> bool:
        """Trim now unless the last trim was too recent; whether it trimmed."""
        if self._trim is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.min_interval:
                return False
            self._last = now
        self._trim(0)
        return True

"""A shard's heap kept close to what its index holds: large blocks go back to the OS when freed.

glibc serves a block of ``M_MMAP_THRESHOLD`` bytes or more from a mapping of its own, returned to the
OS by ``free``; but by default the threshold rises to the largest such block freed so far (up to
32 MiB). A shard frees multi-megabyte request buffers (1,000 embeddings, their protobuf, annlite's
batches) from its first ``/index`` on, so from then on they are carved from the heap, where what is
freed stays resident between the graph's allocations. Setting the threshold once fixes it
(``mallopt`` turns the adjustment off): 50k documents indexed in one process took +131 MiB instead
of +167 (the graph itself is 104), and through the 2-shard Flow each shard of 50k held 17-22 MiB
less (bench/scale.py measures the service). No Python library exposes ``mallopt``, hence ctypes.

Only the shards call it: the encoder's torch allocates and frees activation tensors of this size at
every batch, which a fixed threshold would turn into a map and unmap each time.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE_BLOCK_BYTES = 128 << 10  # glibc's own starting threshold, kept instead of raised


def return_large_blocks_to_os(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix this process's mmap threshold at ``threshold`` bytes; False where the C library is not glibc."""
    libc = ctypes.CDLL(None)  # the C library this process already runs on, no search for it
    if not hasattr(libc, 'gnu_get_libc_version'):
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1

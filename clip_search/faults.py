"""Fault injection for the crash tests: ``CLIP_SEARCH_FAULT=<step>`` makes a shard's process exit
at once (``os._exit``, as ``kill -9`` would leave it) when it reaches that step of a write or a
snapshot. Unset, each step costs one dictionary lookup.

Steps, in the order a write reaches them: ``after-journal`` (the ids journalled and fsynced),
``after-graph`` (annlite's graph and tables changed, its document store not yet), ``after-store``
(the store written, the request not yet answered); ``mid-snapshot`` (the graph dumped, the
tables and the manifest not yet); and ``mid-compaction`` (a compacted graph swapped in, its
snapshot not yet taken).
"""

from __future__ import annotations

import os

STEPS = ('after-journal', 'after-graph', 'after-store', 'mid-snapshot', 'mid-compaction')
ENVIRONMENT = 'CLIP_SEARCH_FAULT'
EXIT_CODE = 70


def reach(step: str) -> None:
    """Exit the process here if ``CLIP_SEARCH_FAULT`` names ``step``."""
    if os.environ.get(ENVIRONMENT) == step:
        os._exit(EXIT_CODE)

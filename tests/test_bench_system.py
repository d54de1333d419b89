"""Smoke test of bench/system.py: both systems run end to end at a tiny size and the report says what it promises.

Not a timed test (the numbers on a shared machine are whatever they are). It starts four Flows with
a ViT-B-32 each (both systems, then each again after ``kill -9``): 64 s on this 2-core machine at
load average 4, 6.5 minutes at load 15-24, so it is marked slow. clip_server is pip-installed into
bench/.cache on first use (about 15 s): without it there and without the registry, it is skipped.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIP_SERVER_INSTALLED = (ROOT / 'bench' / '.cache' / 'clip_server_site' / 'clip_server').is_dir()


def registry_reachable() -> bool:
    try:
        socket.create_connection(('pypi.org', 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not CLIP_SERVER_INSTALLED and not registry_reachable(),
    reason='clip_server is not in bench/.cache and pypi.org cannot be reached to install it there',
)
def test_the_chapters_system_and_ours_side_by_side_at_tiny_size(tmp_path):
    temp = tmp_path / 'temp'
    temp.mkdir()
    run = subprocess.run(
        [sys.executable, 'bench/system.py', '--tiny', '--out', str(tmp_path / 'out')],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ, TMPDIR=str(temp)),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(path.name for path in temp.glob('bench-*')) == []  # the Flows' workspaces are removed
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    theirs, ours = results['clip-as-service'], results['clip-search']
    assert results['min_cosine_between_the_systems_embeddings'] > 0.999  # both encoders ran the same weights
    for system in (theirs, ours):
        assert system['index_texts_docs_per_s'] > 0 and system['index_images_docs_per_s'] > 0
        assert system['search']['8_clients']['searches'] == 8 * results['size']['per_client_8']
        assert system['memory']['pss_mib'] > 0 and system['kill9']['restart_s'] > 0
    # ours: exact at this size, one sorted list of `limit`, mutations and every acknowledged document kept
    assert ours['agreement'] == {'queries': 8, 'top10_overlap': 1.0, 'top10_same_order': 1.0, 'answers_sorted': 1.0,
                                 'matches_returned_for_limit_10': 10.0}  # fmt: skip
    assert (ours['update']['outcome'], ours['update']['new_text_finds_id_first'], ours['update']['old_text_still_finds_exact_copy']) == ('ok', 2, 0)
    assert (ours['delete']['outcome'], ours['delete']['still_found']) == ('ok', 0)
    assert ours['delete']['stored_after'] == ours['delete']['stored_before'] - 2
    assert (ours['kill9']['kept'], ours['kill9']['found_by_search']) == (8, 8)
    # theirs ran as the chapter's YAML says: the indexer in 2 shards, its workspace where Jina 3.27 puts it
    assert results['chapter_shards_stored_in'] == ['home/.cache/jina/AnnLiteIndexer/0', 'home/.cache/jina/AnnLiteIndexer/1']
    flow = (tmp_path / 'out' / 'chapter_flow.yml').read_text()
    assert 'annlite.executor' in flow and 'clip_server.executors.clip_torch' in flow and 'uses_after' not in flow
    table = (tmp_path / 'out' / 'table.md').read_text()
    assert table.startswith('| | clip-as-service (chapter Flow) | clip-search |\n|---|---|---|\n')
    assert '| kept after `kill -9` right after `index()` returned | ' in table

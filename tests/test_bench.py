"""Smoke test of the benchmark script: it runs end to end at a tiny size and reports what it promises.

Not a timed test: the numbers on a shared machine are whatever they are; this only keeps
bench/run.py from rotting (every section runs, the files appear, the last line has its format).
It runs offline: clip_server (pip-installed by the benchmark on first use) is left out with
``--no-clip-server`` unless a run of the benchmark has already installed it in ``bench/.cache``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(r'^encode_vs_clip_server=(\d+\.\d+|n/a) search_qps_vs_hnswlib=(\d+\.\d+) recall@10=(\d\.\d+)$')
CLIP_SERVER_INSTALLED = (ROOT / 'bench' / '.cache' / 'clip_server_site' / 'clip_server').is_dir()


def own_temp_dir(tmp_path: Path) -> dict:
    """An environment whose temporary folder is the test's, to see what the benchmark leaves behind."""
    temp = tmp_path / 'temp'
    temp.mkdir()
    return dict(os.environ, TMPDIR=str(temp))


def left_behind(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in (tmp_path / 'temp').glob('bench-*'))


@pytest.mark.slow
def test_quick_benchmark_at_tiny_size_writes_its_report(tmp_path):
    offline = [] if CLIP_SERVER_INSTALLED else ['--no-clip-server']
    run = subprocess.run(
        [sys.executable, 'bench/run.py', '--quick', '--tiny', '--out', str(tmp_path), *offline],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=own_temp_dir(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert left_behind(tmp_path) == []  # the workers' workspaces are removed
    last = run.stdout.strip().splitlines()[-1]
    assert LAST_LINE.match(last), last
    for name in ('results.md', 'results.json', 'overview.png', 'scaling.png', 'profile_search.txt'):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['encode']['text']['ours_docs_per_s'] > 0 and results['encode']['image']['ours_docs_per_s'] > 0
    for kind in ('text', 'image'):  # int8 runs in the same section, turn by turn with fp32
        assert results['encode'][kind]['ours_int8_docs_per_s'] > 0 and results['encode'][kind]['int8_vs_fp32'] > 0
    assert results['encode']['min_cosine_int8_vs_fp32'] >= 0.99
    assert set(results['encode']['image_time_split']) == {'ours', 'ours_int8'}
    assert '| ours fp32 docs/s | ours int8 docs/s |' in (tmp_path / 'results.md').read_text()
    if CLIP_SERVER_INSTALLED:
        assert results['encode']['min_cosine_ours_vs_clip_server'] > 0.999  # both encoders ran the same weights
    else:
        assert last.startswith('encode_vs_clip_server=n/a ') and results['encode']['ratio'] is None
    ours = next(row for row in results['search'] if row['name'].startswith('ours'))
    assert ours['recall_at_10'] >= 0.9
    hnsw_call = next(row for row in results['search'] if row['name'] == 'annlite HNSW call (offsets only)')
    assert hnsw_call['recall_at_10'] == ours['recall_at_10']  # the same graph: offsets are the documents' rows
    assert '| annlite HNSW call (offsets only) |' in (tmp_path / 'results.md').read_text()
    assert [row['shards'] for row in results['flow']] == [1, 2]
    assert all(row['recall_at_10'] >= 0.9 for row in results['flow'])
    assert '| ours: AnnLiteIndexer.search |' in (tmp_path / 'results.md').read_text()
    throughput = results['throughput']  # CPU per search by process, and searches/s under concurrent clients
    pods = {'gateway/rep-0', 'encoder/rep-0', 'indexer/head', 'indexer/shard-0/rep-0', 'indexer/shard-1/rep-0', 'indexer/uses_after-0'}
    assert pods <= set(throughput['embedding']['by_process_ms'])  # every process of the Flow named (py-spy)
    assert throughput['embedding']['by_process_ms']['encoder/rep-0'] < throughput['text']['by_process_ms']['encoder/rep-0']
    assert throughput['embedding']['wrong'] == 0 and throughput['concurrent']['wrong'] == 0
    assert throughput['concurrent']['searches'] > 0 and throughput['concurrent']['error_count'] == 0
    assert '| service | clients | searches/s |' in (tmp_path / 'results.md').read_text()


@pytest.mark.slow
def test_scale_benchmark_at_tiny_size_restarts_and_keeps_the_acknowledged_state(tmp_path):
    run = subprocess.run(
        [sys.executable, 'bench/scale.py', '--docs', '3000', '--queries', '50', '--out', str(tmp_path), '--no-hnswlib'],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=own_temp_dir(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert left_behind(tmp_path) == []  # its data, workspace and worker results are removed
    summary = json.loads((tmp_path / 'scale-3000.json').read_text())['summary']
    assert summary['recall_at_10'] >= 0.9
    assert summary['same_answers_after_graceful_restart'] is True
    assert summary['after_kill9'] == {'new_found_first': True, 'updated_found_first': True, 'deleted_gone': True}
    assert summary['rss_full_mib'] > summary['rss_empty_mib'] > 0
    assert summary['shard_hnsw_call_qps'] > summary['shard_single_query_qps'] > 0  # the search is the call and more
    assert 'index_vs_hnswlib_bound' not in summary  # --no-hnswlib: no ratio to a side that did not run

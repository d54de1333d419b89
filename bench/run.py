"""clip-search side by side with what users would pick instead, measured in one run on one machine.

    python bench/run.py            # full: 100k vectors, scaling to 1M (long)
    python bench/run.py --quick    # 20k vectors, scaling to 50k: under 10 minutes on 2 cores
    python bench/run.py --quick --tiny  # seconds per section: the smoke test's size

Sections, each in processes of its own (annlite and hnswlib cannot share one):

* encode: our CLIPEncoder in fp32 and in int8 (``dtype``) vs clip_server's
  (clip_server.executors.clip_torch) on the same random ViT-B-32 weights, batch size and torch
  threads, driven turn by turn; texts and images, docs/s, and the image path's time split;
* search: clustered 512-d vectors, our AnnLiteIndexer (and the bare annlite under it) vs hnswlib
  (same M, ef_construction, ef_search) and faiss flat (exact, the ground truth): build time, QPS
  (one query per call, one thread), recall@10, memory;
* flow: the real service over gRPC with 1, 2 and 5 shards: index throughput, search p50/p99, and
  the Flow's overhead over a direct call of the indexer;
* scaling: our indexer's search latency, recall and memory as the collection grows;
* throughput: the service's CPU per search, by process, and searches/s with 8 concurrent clients
  (bench/throughput.py: 2 shards, 64-d documents, the unmodified jina.Client).

Writes ``results.md``, ``results.json`` and PNG plots to ``--out``; the last line printed is
``encode_vs_clip_server=X search_qps_vs_hnswlib=Y recall@10=Z`` (ours over theirs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import HNSW, clustered_vectors, median  # noqa: E402

# clip_server 0.8.3 builds its torch models from open_clip<2.9 internals (open_clip 3.x's
# VisionTransformer has no `global_average_pool`), so it runs with its own pins, installed beside
# (not into) our environment, as a clip_server user's environment would have them.
CLIP_SERVER_PACKAGES = ['clip-server==0.8.3', 'open_clip_torch==2.8.2', 'pillow-avif-plugin==1.6.0']

SIZES = {
    'full': {'vectors': 100_000, 'queries': 1000, 'search_rounds': 5, 'texts': 512, 'images': 128, 'rounds': 3,
             'shards': [1, 2, 5], 'flow_queries': 500, 'scaling': [10_000, 30_000, 100_000, 300_000, 1_000_000],
             'scaling_queries': 300, 'scaling_budget_s': 3 * 3600,
             'throughput': {'docs': 20_000, 'searches': 300, 'clients': 8, 'seconds': 60}},
    'quick': {'vectors': 20_000, 'queries': 500, 'search_rounds': 5, 'texts': 256, 'images': 48, 'rounds': 3,
              'shards': [1, 2, 5], 'flow_queries': 200, 'scaling': [10_000, 20_000, 50_000],
              'scaling_queries': 200, 'scaling_budget_s': 90,
              'throughput': {'docs': 20_000, 'searches': 200, 'clients': 8, 'seconds': 20}},
    'tiny': {'vectors': 2_000, 'queries': 100, 'search_rounds': 2, 'texts': 16, 'images': 4, 'rounds': 1,
             'shards': [1, 2], 'flow_queries': 30, 'scaling': [1_000, 2_000],
             'scaling_queries': 30, 'scaling_budget_s': 30,
             'throughput': {'docs': 2_000, 'searches': 20, 'clients': 2, 'seconds': 3}},
}  # fmt: skip


def log(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def run_worker(script: str, task: dict, env: dict | None = None) -> object:
    """Run ``bench/<script>`` on a task in a fresh process and return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as out:
        out_path = Path(out.name)
    subprocess.run([sys.executable, str(BENCH / script), json.dumps(task), str(out_path)], check=True, env=env)
    result = json.loads(out_path.read_text())
    out_path.unlink()
    return result


def worker_env(extra_path: Path | None = None) -> dict:
    env = dict(os.environ, JINA_HIDE_SURVEY='1', PYTHONWARNINGS='ignore')
    if extra_path:
        env['PYTHONPATH'] = os.pathsep.join(p for p in (str(extra_path), env.get('PYTHONPATH', '')) if p)
    return env


def ensure_clip_server(cache: Path) -> Path:
    """clip_server and its own open_clip, pip-installed (no deps) into a directory beside our environment."""
    site = cache / 'clip_server_site'
    if not (site / 'clip_server').is_dir():
        log(f'installing {" ".join(CLIP_SERVER_PACKAGES)} into {site}')
        subprocess.run(
            [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target', str(site), *CLIP_SERVER_PACKAGES],
            check=True,
        )
    return site


class Worker:
    """A long-lived worker process (bench/encode.py, bench/ann.py serve), asked one measurement at a time."""

    def __init__(self, script: str, task: dict, env: dict):
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / script), json.dumps(task)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        for line in self.process.stdout:
            if line.startswith('ready'):
                self.ready = json.loads(line[len('ready'):].strip() or '{}')
                return
        raise RuntimeError(f'{script} {task} exited with {self.process.wait()} before it was ready')

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + '\n')
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith('{'):
                return json.loads(line)
        raise RuntimeError(f'worker exited with {self.process.wait()} on {command!r}')

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def bench_encode(size: dict, cache: Path, threads: int, with_clip_server: bool = True) -> dict:
    """Ours in fp32 and in int8 vs clip_server's CLIPEncoder, turn by turn on the same inputs; docs/s,
    paired ratios, and where an image's time goes (decode, preprocess, model) in each of ours.

    Without clip_server (``--no-clip-server``: it is pip-installed on first use) only ours are measured.
    """
    task = {'model_dir': str(cache / 'vit-b-32-random'), 'minibatch': 32, 'threads': threads,
            'n_texts': size['texts'], 'n_images': size['images']}  # fmt: skip
    workers = {'ours': Worker('encode.py', dict(task, impl='ours'), worker_env())}  # writes the weights on first use
    workers['ours_int8'] = Worker('encode.py', dict(task, impl='ours', dtype='int8'), worker_env())
    if with_clip_server:
        workers['clip_server'] = Worker('encode.py', dict(task, impl='clip_server'), worker_env(ensure_clip_server(cache)))
    try:
        agreement = embedding_agreement(workers['ours'], workers['clip_server']) if with_clip_server else None
        result = {'model': 'ViT-B-32 (open_clip config, random weights)', 'minibatch_size': 32, 'torch_threads': threads,
                  'min_cosine_ours_vs_clip_server': agreement,
                  'min_cosine_int8_vs_fp32': embedding_agreement(workers['ours'], workers['ours_int8'])}  # fmt: skip
        for kind, n in (('text', size['texts']), ('image', size['images'])):
            rates: dict[str, list[float]] = {name: [] for name in workers}
            for _ in range(size['rounds']):
                for name, worker in workers.items():
                    answer = worker.ask(f'{kind} {n}')
                    rates[name].append(answer['docs'] / answer['seconds'])
            theirs = rates.get('clip_server')
            result[kind] = {'docs': n, 'rounds': size['rounds'], 'clip_server_docs_per_s': None,
                            'ratio': _paired(rates['ours'], theirs) if theirs else None,
                            'int8_ratio': _paired(rates['ours_int8'], theirs) if theirs else None,
                            'int8_vs_fp32': _paired(rates['ours_int8'], rates['ours']), 'rates': rates,
                            **{f'{name}_docs_per_s': median(r) for name, r in rates.items()}}  # fmt: skip
            log(f'encode {kind}: ' + ', '.join(f'{name} {median(r):.1f}/s' for name, r in rates.items()))
        result['image_time_split'] = {name: workers[name].ask(f'split {size["images"]}') for name in ('ours', 'ours_int8')}
        result['ratio'] = math.sqrt(result['text']['ratio'] * result['image']['ratio']) if with_clip_server else None
        return result
    finally:
        for worker in workers.values():
            worker.close()


def _paired(ours: list[float], theirs: list[float]) -> float:
    """Median of the per-round ratios (each round measured both under the same load)."""
    return median([a / b for a, b in zip(ours, theirs)])


def embedding_agreement(ours: Worker, theirs: Worker) -> float:
    """Lowest cosine between the two encoders' embeddings of the same inputs: ~1.0 proves one model."""
    with tempfile.TemporaryDirectory() as tmp:
        a = np.load(ours.ask(f'embed {tmp}/ours.npy')['saved'])
        b = np.load(theirs.ask(f'embed {tmp}/theirs.npy')['saved'])
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return float(np.min(np.sum(a * b, axis=1)))


def bench_search(size: dict, data: Path, out: Path) -> list[dict]:
    """faiss flat first (it writes the ground truth); then hnswlib and annlite, built in processes of
    their own and searched turn by turn, round after round, so both see the same machine load."""
    rows = run_worker('ann.py', {'lib': 'faiss', 'data': str(data)}, worker_env())
    workers = [Worker('ann.py', {'lib': lib, 'data': str(data), 'serve': True}, worker_env()) for lib in ('hnswlib', 'annlite')]
    try:
        rounds: dict[str, list[dict]] = {}
        for _ in range(size['search_rounds']):
            for worker in workers:
                for name in worker.ready['searches']:
                    rounds.setdefault(name, []).append(worker.ask(f'search {name}'))
        workers[1].ask(f'profile {out / "profile_search.txt"}')
    finally:
        for worker in workers:
            worker.close()
    builds = {name: worker.ready['build'] for worker in workers for name in worker.ready['searches']}
    for name, stats in rounds.items():
        rows.append({
            'name': name,
            'qps': median([s['qps'] for s in stats]),
            'p50_ms': median([s['p50_ms'] for s in stats]),
            'p99_ms': median([s['p99_ms'] for s in stats]),
            'recall_at_10': stats[0]['recall_at_10'],
            'qps_rounds': [s['qps'] for s in stats],
            **builds[name],
        })
        log(f'search {name}: {rows[-1]["qps"]:.0f} qps, recall@10 {rows[-1]["recall_at_10"]:.3f}')
    return rows


def bench_flow(size: dict, data: Path) -> list[dict]:
    rows = []
    for shards in size['shards']:
        rows.append(run_worker('flow.py', {'data': str(data), 'shards': shards, 'n_queries': size['flow_queries']}, worker_env()))
        log(f'flow {shards} shards: {rows[-1]["index_docs_per_s"]:.0f} docs/s, p50 {rows[-1]["p50_ms"]:.1f} ms')
    return rows


def bench_throughput(size: dict) -> dict:
    """bench/throughput.py at this size: CPU per search by process, and searches/s under concurrent clients."""
    settings = size['throughput']
    with tempfile.TemporaryDirectory(prefix='bench-throughput-') as tmp:
        options = [f'--{key}={value}' for key, value in settings.items()]
        subprocess.run([sys.executable, str(BENCH / 'throughput.py'), *options, '--out', tmp], check=True, env=worker_env())
        run = json.loads((Path(tmp) / 'results.json').read_text())['runs'][0]
    c = run['concurrent']
    log(f'throughput: {run["embedding"]["server_cpu_ms_per_search"]:.1f} ms CPU per search, '
        f'{c["clients"]} clients {c["searches_per_s"]:.0f} searches/s')  # fmt: skip
    return run


def bench_scaling(size: dict) -> list[dict]:
    task = {'lib': 'scaling', 'sizes': size['scaling'], 'n_queries': size['scaling_queries'],
            'clusters': 100, 'deadline': time.monotonic() + size['scaling_budget_s']}  # fmt: skip
    return run_worker('ann.py', task, worker_env())


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')), '?')
    mem_kib = next(int(line.split()[1]) for line in open('/proc/meminfo') if line.startswith('MemTotal'))
    versions = {name: _version(name) for name in ('torch', 'open_clip_torch', 'annlite', 'hnswlib', 'faiss-cpu', 'jina', 'numpy')}
    return {
        'cpu': cpu,
        'cores': os.cpu_count(),
        'memory_gib': round(mem_kib / 2**20, 1),
        'platform': platform.platform(),
        'python': platform.python_version(),
        'versions': versions,
        'clip_server': ', '.join(CLIP_SERVER_PACKAGES) + ' (no deps, beside our environment)',
        'load_average_start': os.getloadavg(),
        'started': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return 'not installed'


def summary(results: dict) -> dict:
    """The ratios of ours to theirs that the last line reports (search: median of paired rounds)."""
    by_name = {row['name']: row for row in results['search']}
    ours, hnswlib = by_name['ours: AnnLiteIndexer.search'], by_name['hnswlib']
    flow_one = next(row for row in results['flow'] if row['shards'] == 1)
    return {
        'encode_vs_clip_server': results['encode']['ratio'],
        'search_qps_vs_hnswlib': median([a / b for a, b in zip(ours['qps_rounds'], hnswlib['qps_rounds'])]),
        'recall@10': ours['recall_at_10'],
        'flow_overhead_p50_ms': flow_one['p50_ms'] - ours['p50_ms'],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='20k vectors, scaling to 50k: under 10 minutes')
    parser.add_argument('--tiny', action='store_true', help='--quick at a tiny size, seconds per section (the smoke test)')
    parser.add_argument('--out', type=Path, help='where results go (default bench/results/<full|quick|tiny>)')
    parser.add_argument('--cache', type=Path, default=BENCH / '.cache', help='random ViT-B-32 weights, clip_server install')
    parser.add_argument(
        '--no-clip-server', action='store_true',
        help='measure our encoder alone (clip_server is pip-installed on first use: this runs offline)',
    )  # fmt: skip
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads of each encoder')
    args = parser.parse_args()
    mode_name = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
    size = SIZES[mode_name]
    out = args.out or BENCH / 'results' / mode_name
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {'mode': mode_name, 'machine': machine(), 'hnsw': HNSW, 'size': size}
    with tempfile.TemporaryDirectory(prefix='bench-data-') as tmp:
        data = Path(tmp)
        clusters = max(10, size['vectors'] // 100)
        np.save(data / 'corpus.npy', clustered_vectors(size['vectors'], clusters, seed=1))
        np.save(data / 'queries.npy', clustered_vectors(size['queries'], clusters, seed=2))
        log(f'{mode_name}: {size["vectors"]} clustered 512-d vectors ({clusters} clusters), {size["queries"]} queries')
        results['encode'] = bench_encode(size, args.cache, args.threads, with_clip_server=not args.no_clip_server)
        results['search'] = bench_search(size, data, out)
        results['flow'] = bench_flow(size, data)
    results['scaling'] = bench_scaling(size)
    results['throughput'] = bench_throughput(size)
    results['machine']['load_average_end'] = os.getloadavg()
    results['machine']['seconds'] = round(time.monotonic() - started)
    results['summary'] = summary(results)
    from report import write_report

    write_report(results, out)
    log(f'wrote {out}/results.md, results.json and plots in {results["machine"]["seconds"]} s')
    s = results['summary']
    encode = 'n/a' if s['encode_vs_clip_server'] is None else f'{s["encode_vs_clip_server"]:.2f}'
    print(f'encode_vs_clip_server={encode} '
          f'search_qps_vs_hnswlib={s["search_qps_vs_hnswlib"]:.2f} recall@10={s["recall@10"]:.3f}')  # fmt: skip


if __name__ == '__main__':
    main()

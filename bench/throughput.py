"""Search throughput and the server's CPU per search, by process, as an outside user sees them.

    python bench/throughput.py                      # 2 shards, 20k 64-d documents, 300 searches, 8 clients x 60 s
    python bench/throughput.py --seconds 20 --out bench/results/throughput
    python bench/throughput.py --python ../base/.venv/bin/python --cwd ../base   # another checkout, same run

The setup of issue 24: a service of 2 shards (``python -m clip_search``, the shipped Flow) holds
20k random 64-d documents given as embeddings; the unmodified ``jina.Client`` sends one query per
request over gRPC. Reported:

* server CPU per search (user + system time of every process of the service, read from ``/proc``
  before and after N sequential searches), by process, for an embedding query and for a text query;
* searches/s, p50 and p99 with ``--clients`` concurrent clients (separate processes, each with its
  own channel) for ``--seconds``, and the server CPU per search under that load;
* whether every answer was right: each client checks its matches against an exact search.

``--floor`` measures the same topology (gateway, encoder, head, shards, merger) with executors that
do nothing (bench/noop_executors.py): the CPU a search costs in Jina before any work is done.

``--python`` and ``--cwd`` run the service of another checkout (its own venv), so that a change and
its baseline are measured side by side in one run (``--baseline`` does both in turn, interleaved).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ROOT, median, percentile, scratch_dir  # noqa: E402

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')
DIM = 64  # the tiny model's embedding size: the index walk is cheap, the per-request path is what is measured


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_roles(pids: list[int]) -> dict[int, str]:
    """Name each process of the service by the Jina pod it runs (``indexer/shard-0/rep-0``), read with py-spy.

    Every process of the service has the CLI's command line (Jina forks them), so the pod's name is
    read from the ``name`` argument of Jina's ``run`` frame; the process without one is the CLI.
    """
    roles = {}
    for pid in pids:
        dump = subprocess.run(['py-spy', 'dump', '--locals', '--pid', str(pid)], capture_output=True, text=True).stdout
        frame = dump.find('run (jina/serve/executors/run.py')
        name = re.search(r'name: "([^"]+)"', dump[frame:]) if frame >= 0 else None
        roles[pid] = name.group(1) if name else 'cli'
    return roles


def profile_processes(roles: dict[int, str], seconds: float, out: Path) -> list[subprocess.Popen]:
    """py-spy record of every process for ``seconds``, as collapsed stacks (``out/<pod>.txt``)."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            ['py-spy', 'record', '--pid', str(pid), '--duration', str(int(seconds)), '--rate', '250',
             '--format', 'raw', '--nonblocking', '-o', str(out / f'{role.replace("/", "_")}.txt')],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for pid, role in roles.items()
    ]


STEPS = ('gRPC and protobuf', 'docarray conversion', 'Jina routing and bookkeeping', 'our handler', 'event loop')
# 'event loop': samples in the loop itself; under uvloop that includes gRPC's callbacks, which are native code too
OURS = ('(executors/', '(clip_search/sharding.py', '(clip_search/params.py', '(clip_search/media.py')
ENTRY_FUNCTIONS = {'_run', '_run_once', 'run', 'run_until_complete', 'run_forever'}  # an event loop's or a thread's


def step_of(frames: list[str]) -> str:
    """Which step of a request a sampled stack is in (frames root first, as py-spy writes them)."""
    entry = ''
    for i in range(len(frames) - 1, -1, -1):  # what runs under the event loop (or the thread) closest to the leaf
        if frames[i].split(' (')[0].split('.')[-1] in ENTRY_FUNCTIONS:
            entry, frames = frames[i], frames[i + 1 :]
            break
    if not frames:  # a thread in native code only is gRPC's completion-queue poller; else the loop itself
        return 'gRPC and protobuf' if entry.startswith('Thread.run') else 'event loop'
    text = ';'.join(frames)
    if any(mark in text for mark in OURS):
        return 'our handler'
    if 'docarray/' in text or 'jina/types/request' in text:
        return 'docarray conversion'
    if 'grpc/' in text or 'protobuf/' in text or 'jina/proto/' in text:
        return 'gRPC and protobuf'
    if 'jina/' in text or 'clip_search/gateway.py' in text:
        return 'Jina routing and bookkeeping'
    return 'event loop'


def summarise_profile(path: Path) -> dict[str, float]:
    """Each step's share of a py-spy raw profile's samples."""
    counts = dict.fromkeys(STEPS, 0)
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(' ')
        counts[step_of(stack.split(';'))] += int(n)
    total = sum(counts.values()) or 1
    return {step: n / total for step, n in counts.items()}


def snapshot_cpu(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {pid: after.get(pid, 0.0) - before[pid] for pid in before}


def make_corpus(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def index_corpus(address: str, corpus: np.ndarray) -> None:
    from docarray import Document, DocumentArray
    from jina import Client

    client = Client(host=address)
    docs = DocumentArray(Document(id=f'd{i}', embedding=v) for i, v in enumerate(corpus))
    client.post('/index', inputs=docs, request_size=1000)


def sequential_searches(address: str, queries: list, limit: int) -> list[list[str]]:
    """One query per request, one after the other, with the unmodified jina.Client; the ids found."""
    from docarray import Document, DocumentArray
    from jina import Client

    client = Client(host=address)
    found = []
    for query in queries:
        doc = Document(text=query) if isinstance(query, str) else Document(embedding=query)
        answer = client.post('/search', inputs=DocumentArray([doc]), parameters={'limit': limit})
        found.append(answer[0].matches[:, 'id'])
    return found


def cpu_per_search(address: str, queries: list, roles: dict[int, str], limit: int) -> tuple[dict, list[list[str]]]:
    """Sequential searches, and the service's CPU per search in total and by process; also the ids found."""
    before = snapshot_cpu(list(roles))
    started = time.perf_counter()
    found = sequential_searches(address, queries, limit)
    seconds = time.perf_counter() - started
    delta = cpu_delta(before, snapshot_cpu(list(roles)))
    row = {
        'searches': len(queries),
        'searches_per_s': len(queries) / seconds,
        'server_cpu_ms_per_search': 1000 * sum(delta.values()) / len(queries),
        'by_process_ms': {roles[pid]: 1000 * d / len(queries) for pid, d in delta.items()},
    }
    return row, found


def run_clients(address: str, n_clients: int, seconds: float, corpus_file: Path, limit: int, out: Path) -> list[dict]:
    """``n_clients`` client processes searching for ``seconds``; each writes its latencies and wrong answers."""
    procs = []
    for k in range(n_clients):
        task = {'address': address, 'seconds': seconds, 'corpus': str(corpus_file), 'limit': limit, 'seed': 1000 + k}
        procs.append(subprocess.Popen([sys.executable, __file__, '--client', json.dumps(task), str(out / f'client-{k}.json')]))
    for proc in procs:
        proc.wait()
    return [json.loads((out / f'client-{k}.json').read_text()) for k in range(n_clients)]


def results_of(clients: list[dict]) -> list[float]:
    return [x for c in clients for x in c['latencies']]


def client_main(task: dict, out: Path) -> None:
    """One outside client: searches until the time is up, checks every answer against exact search."""
    from docarray import Document, DocumentArray
    from jina import Client

    corpus = np.load(task['corpus'])
    rng = np.random.default_rng(task['seed'])
    client = Client(host=task['address'])
    client.post('/status', inputs=DocumentArray([Document()]))  # connect before the clock starts
    latencies, wrong, errors = [], 0, []
    cpu_started = time.process_time()  # the client's own CPU: on one machine it shares the cores with the service
    deadline = time.monotonic() + task['seconds']
    while time.monotonic() < deadline:
        row = int(rng.integers(len(corpus)))
        started = time.perf_counter()
        try:
            answer = client.post('/search', inputs=DocumentArray([Document(embedding=corpus[row])]), parameters={'limit': task['limit']})
        except Exception as exc:  # noqa: BLE001 - counted and reported by kind
            errors.append(type(exc).__name__)
            continue
        latencies.append(time.perf_counter() - started)
        wrong += answer[0].matches[0].id != f'd{row}'  # the document itself is the nearest (distance 0)
    cpu = time.process_time() - cpu_started
    out.write_text(json.dumps({'latencies': latencies, 'wrong': wrong, 'errors': errors, 'cpu_s': cpu}))


def measure(python: str, cwd: Path, args: argparse.Namespace, work: Path, label: str) -> dict:
    from helpers.service import start_service, write_tiny_model

    model_dir = write_tiny_model(work / 'model')
    corpus = make_corpus(args.docs)
    corpus_file = work / 'corpus.npy'
    np.save(corpus_file, corpus)
    service = start_service(model_dir, work / f'workspace-{label}', shards=args.shards, cwd=cwd, python=python)
    try:
        index_corpus(service.address, corpus)
        pids = service.processes()
        roles = process_roles(pids)
        rng = np.random.default_rng(7)
        rows = rng.integers(len(corpus), size=args.searches)
        sequential_searches(service.address, [corpus[r] for r in rows[:20]], args.limit)  # warm up
        result: dict = {'label': label, 'python': python, 'cwd': str(cwd), 'docs': args.docs, 'shards': args.shards}
        for kind, queries in (
            ('embedding', [corpus[r] for r in rows]),
            ('text', [f'a query about thing {r}' for r in rows]),
        ):
            result[kind], found = cpu_per_search(service.address, queries, roles, args.limit)
            if kind == 'embedding':
                result[kind]['wrong'] = sum(ids[0] != f'd{r}' for ids, r in zip(found, rows))
        profilers = profile_processes(roles, args.seconds - 5, args.profile / label) if args.profile else []
        before = snapshot_cpu(pids)
        clients = run_clients(service.address, args.clients, args.seconds, corpus_file, args.limit, work)
        delta = cpu_delta(before, snapshot_cpu(pids))
        for profiler in profilers:
            profiler.wait()
        if args.profile:
            per_search = {roles[pid]: 1000 * d / max(len(results_of(clients)), 1) for pid, d in delta.items()}
            result['steps_ms'] = {
                role: {step: share * per_search[role] for step, share in summarise_profile(args.profile / label / f'{role.replace("/", "_")}.txt').items()}
                for role in per_search if role != 'cli' and (args.profile / label / f'{role.replace("/", "_")}.txt').exists()
            }
        latencies = [x for c in clients for x in c['latencies']]
        result['concurrent'] = {
            'clients': args.clients,
            'seconds': args.seconds,
            'searches': len(latencies),
            'searches_per_s': len(latencies) / args.seconds,
            'p50_ms': 1000 * median(latencies),
            'p99_ms': 1000 * percentile(latencies, 99),
            'server_cpu_ms_per_search': 1000 * sum(delta.values()) / max(len(latencies), 1),
            'client_cpu_ms_per_search': 1000 * sum(c['cpu_s'] for c in clients) / max(len(latencies), 1),
            'by_process_ms': {roles.get(pid, str(pid)): 1000 * d / max(len(latencies), 1) for pid, d in delta.items()},
            'wrong': sum(c['wrong'] for c in clients),
            'errors': sorted({e for c in clients for e in c['errors']}),
            'error_count': sum(len(c['errors']) for c in clients),
        }
        return result
    finally:
        service.stop()


def measure_floor(args: argparse.Namespace, with_encoder: bool = True) -> dict:
    """CPU per search of the card's topology with no-op executors, on uvloop like the service.

    Without the encoder it is the path a query carrying its embedding takes through our gateway.
    """
    from jina import Flow

    from clip_search.cli import use_uvloop_in_every_process
    from helpers.service import free_port

    use_uvloop_in_every_process()
    modules = [str(BENCH / 'noop_executors.py')]
    flow = Flow(port=free_port())
    if with_encoder:
        flow = flow.add(name='encoder', uses='NoopEncoder', py_modules=modules)
    flow = (
        flow.add(name='indexer', uses='NoopShard', py_modules=modules, shards=args.shards, polling='ALL', uses_after='NoopMerger')
    )
    with flow:
        pids = [child.pid for child in multiprocessing.active_children()]
        roles = process_roles(pids)
        address = f'grpc://127.0.0.1:{flow.port}'
        result: dict = {'label': 'floor' if with_encoder else 'floor without the encoder', 'shards': args.shards}
        for kind, query in (('embedding', make_corpus(1)[0]), ('text', 'a query'))[: 2 if with_encoder else 1]:
            sequential_searches(address, [query] * 20, args.limit)  # warm up
            result[kind], _found = cpu_per_search(address, [query] * args.searches, roles, args.limit)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--docs', type=int, default=20_000)
    parser.add_argument('--shards', type=int, default=2)
    parser.add_argument('--searches', type=int, default=300, help='sequential searches per query kind')
    parser.add_argument('--clients', type=int, default=8)
    parser.add_argument('--seconds', type=float, default=60)
    parser.add_argument('--limit', type=int, default=10)
    parser.add_argument('--python', default=sys.executable, help='the interpreter that runs the service')
    parser.add_argument('--cwd', type=Path, default=ROOT, help='the checkout the service runs from')
    parser.add_argument('--baseline', nargs=2, metavar=('PYTHON', 'CWD'), help='also measure this checkout, in the same run')
    parser.add_argument('--out', type=Path, help='write results.json here')
    parser.add_argument('--profile', type=Path, help='py-spy every process during the concurrent phase, into this folder')
    parser.add_argument('--floor', action='store_true', help='also measure the topology with no-op executors')
    parser.add_argument('--client', help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.client:
        return client_main(json.loads(args.client), Path(rest[0]))
    work = scratch_dir('bench-throughput-')
    runs = [('this', args.python, args.cwd)]
    if args.baseline:
        runs.insert(0, ('baseline', args.baseline[0], Path(args.baseline[1])))
    results = [measure(python, Path(cwd), args, work, label) for label, python, cwd in runs]
    for r in results:
        print(summary_line(r))
    floor = [measure_floor(args), measure_floor(args, with_encoder=False)] if args.floor else None
    if floor:
        print(f'floor (no-op executors): cpu/search {floor[0]["embedding"]["server_cpu_ms_per_search"]:.1f} ms, '
              f'without the encoder {floor[1]["embedding"]["server_cpu_ms_per_search"]:.1f} ms')  # fmt: skip
    if len(results) == 2:
        base, this = results
        print(
            f'ratios this/baseline: cpu/search embedding {this["embedding"]["server_cpu_ms_per_search"] / base["embedding"]["server_cpu_ms_per_search"]:.2f}, '
            f'text {this["text"]["server_cpu_ms_per_search"] / base["text"]["server_cpu_ms_per_search"]:.2f}, '
            f'{args.clients}-client searches/s {this["concurrent"]["searches_per_s"] / base["concurrent"]["searches_per_s"]:.2f}'
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {'machine_load': os.getloadavg(), 'runs': results, 'floor': floor}
        (args.out / 'results.json').write_text(json.dumps(summary, indent=2))
        (args.out / 'results.md').write_text(markdown(results, floor))


PROCESSES = ('gateway/rep-0', 'encoder/rep-0', 'indexer/head', 'indexer/shard-0/rep-0', 'indexer/shard-1/rep-0', 'indexer/uses_after-0')


def markdown(results: list[dict], floor: list[dict] | None) -> str:
    """The tables of docs/design.md and the README: CPU per search by process (and by step), throughput."""
    rows = [(r['label'], kind, r[kind]) for r in results for kind in ('embedding', 'text')]
    rows += [(f['label'], kind, f[kind]) for f in floor or [] for kind in ('embedding', 'text') if kind in f]
    names = [name.replace('/rep-0', '').replace('indexer/uses_after-0', 'merger') for name in PROCESSES]
    lines = [
        '| service | query | server CPU ms per search | ' + ' | '.join(names) + ' |',
        '|---|---|---:|' + '---:|' * len(PROCESSES),
    ]
    for label, kind, row in rows:
        per = ' | '.join(f'{row["by_process_ms"].get(name, 0.0):.1f}' for name in PROCESSES)
        lines.append(f'| {label} | {kind} | {row["server_cpu_ms_per_search"]:.1f} | {per} |')
    lines += [
        '',
        '| service | clients | searches/s | p50 ms | p99 ms | server CPU ms per search | clients\' CPU ms per search | wrong | errors |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in results:
        c = r['concurrent']
        lines.append(
            f'| {r["label"]} | {c["clients"]} | {c["searches_per_s"]:.1f} | {c["p50_ms"]:.0f} | {c["p99_ms"]:.0f} | '
            f'{c["server_cpu_ms_per_search"]:.1f} | {c["client_cpu_ms_per_search"]:.1f} | {c["wrong"] + r["embedding"]["wrong"]} | {c["error_count"]} |'
        )
    for r in results:
        if 'steps_ms' not in r:
            continue
        lines += ['', f'{r["label"]}: CPU ms per search by step, under {r["concurrent"]["clients"]} clients (py-spy samples x process CPU)', '']
        lines += ['| process | ' + ' | '.join(STEPS) + ' |', '|---|' + '---:|' * len(STEPS)]
        for name in PROCESSES:
            if name in r['steps_ms']:
                steps = r['steps_ms'][name]
                lines.append(f'| {name} | ' + ' | '.join(f'{steps[step]:.2f}' for step in STEPS) + ' |')
    return '\n'.join(lines) + '\n'


def summary_line(r: dict) -> str:
    c = r['concurrent']
    return (
        f'{r["label"]}: cpu/search embedding {r["embedding"]["server_cpu_ms_per_search"]:.1f} ms '
        f'({r["embedding"]["searches_per_s"]:.0f}/s one client), text {r["text"]["server_cpu_ms_per_search"]:.1f} ms; '
        f'{c["clients"]} clients: {c["searches_per_s"]:.0f} searches/s, p50 {c["p50_ms"]:.0f} ms, p99 {c["p99_ms"]:.0f} ms, '
        f'cpu/search {c["server_cpu_ms_per_search"]:.1f} ms, wrong {c["wrong"] + r["embedding"]["wrong"]}, errors {c["error_count"]}'
    )


if __name__ == '__main__':
    main()

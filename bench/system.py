"""clip-as-service's own search system beside ours, from one run: the comparison a clip-as-service user reads first.

    python bench/system.py            # 2,000 texts + 200 images, 2 shards each: about 15 minutes on 2 cores
    python bench/system.py --tiny     # a few documents: the smoke test's size

* theirs: the "Text & Image Search" chapter's sharded Flow YAML (tests/fixtures/chapter/, polling
  included, no merger) with clip_server 0.8.3's CLIPEncoder (torch) and annlite's own
  ``annlite.executor.AnnLiteIndexer``, served by ``jina flow`` in clip_server's environment (the
  bench/.cache install of bench/run.py, put in front of ours with PYTHONPATH);
* ours: ``python -m clip_search`` with the shipped Flow.

Both run the same random ViT-B-32 weights, 2 shards, the same documents and queries, and are
driven by the unmodified clip_client; one system runs at a time, theirs first. Per system: indexing
docs/s (texts, images) and the CPU time of all its processes per document, how long until indexed
documents are searchable, search p50/p99 and CPU time per search with 1 and
8 concurrent clients, the top-10's agreement with exact search over the stored embeddings,
``/update`` and ``/delete`` across shards, documents kept after ``kill -9`` of every process right
after ``index()`` returned, restart time and the memory of all processes.

Writes ``results.json``, ``table.md`` and the Flow YAML it ran as theirs to ``--out``
(default bench/results/system).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ROOT, median, percentile, scratch_dir  # noqa: E402
from encode import CLIP_SERVER_NAME, WEIGHTS, sample_texts, write_random_vit_b_32  # noqa: E402
from run import CLIP_SERVER_PACKAGES, ensure_clip_server, log, worker_env  # noqa: E402

CHAPTER_YAML = ROOT / 'tests' / 'fixtures' / 'chapter' / 'text_image_search_sharded.yml'
SHARDS = 2
LIMIT = 10
SIZES = {
    'full': {'texts': 2000, 'images': 200, 'queries': 100, 'per_client_8': 25, 'probes': 5, 'mutations': 10, 'kill_batch': 100},
    'tiny': {'texts': 24, 'images': 4, 'queries': 8, 'per_client_8': 2, 'probes': 2, 'mutations': 2, 'kill_batch': 8},
}  # fmt: skip
READY_TIMEOUT = 300


# -- the data ---------------------------------------------------------------------------------------


def sample_shape_images(n: int) -> list[bytes]:
    """JPEGs of mini::shapes' renderer: one or two coloured shapes on varied backgrounds, 224 px."""
    from clip_search.demo_model.shapes import make_samples

    blobs = []
    for image, _caption, _label in make_samples(n, seed=24, size=224):
        buffer = io.BytesIO()
        image.convert('RGB').save(buffer, format='JPEG', quality=90)
        blobs.append(buffer.getvalue())
    return blobs


class Data:
    """The texts, images and queries every system gets, made once, deterministically."""

    def __init__(self, size: dict):
        n = size['texts'] + size['queries'] + size['probes'] + 2 * size['mutations'] + size['kill_batch']
        texts = iter(sample_texts(n))
        self.texts = [next(texts) for _ in range(size['texts'])]
        self.queries = [next(texts) for _ in range(size['queries'])]
        self.probes = [f'probe {i} {next(texts)}' for i in range(size['probes'])]
        self.updated = [f'updated {i} {next(texts)}' for i in range(size['mutations'])]
        self.spare = [next(texts) for _ in range(size['mutations'])]
        self.kill_batch = [f'acknowledged {i} {next(texts)}' for i in range(size['kill_batch'])]
        self.images = sample_shape_images(size['images'])

    def text_docs(self):
        from docarray import DocumentArray, Document

        return DocumentArray(Document(id=f't{i}', text=t) for i, t in enumerate(self.texts))

    def image_docs(self):
        from docarray import DocumentArray, Document

        return DocumentArray(Document(id=f'i{i}', blob=b, mime_type='image/jpeg') for i, b in enumerate(self.images))


# -- the two systems --------------------------------------------------------------------------------


class System:
    """A search service started as a process group of its own, so ``kill -9`` reaches every process."""

    name = ''
    ready_line = ''  # printed once every executor is ready

    def __init__(self, workdir: Path, weights_dir: Path):
        self.workdir = workdir
        self.weights_dir = weights_dir
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f'grpc://127.0.0.1:{self.port}'

    def start(self) -> float:
        """Start (retrying once: Flows started at once on this host can draw the same internal port); seconds to ready."""
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                self._launch()
                self._wait_ready(started + READY_TIMEOUT)
                return time.perf_counter() - started
            except (RuntimeError, TimeoutError) as exc:
                self.kill()
                if attempt == 2:
                    raise
                log(f'{self.name}: start failed ({str(exc).splitlines()[-1][:200]}), retrying once')
        raise AssertionError('unreachable')

    def _wait_ready(self, deadline: float) -> None:
        """Until the log says the Flow is ready, then until /status answers (our shards answer 'is loading' first)."""
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'{self.name} exited with {self.process.returncode}: {self.log_tail()}')
            if self.ready_line not in self.log_tail(10**6):
                time.sleep(0.2)
                continue
            try:
                self.documents()
                return
            except Exception:  # noqa: BLE001 - not answering yet (the gateway or a shard is still starting)
                time.sleep(0.5)
        raise TimeoutError(f'{self.name} not ready after {READY_TIMEOUT} s: {self.log_tail()}')

    def log_tail(self, chars: int = 2000) -> str:
        """The end of this start's log."""
        path = self.workdir / f'{self.name}.log'
        return path.read_text(errors='replace')[-chars:] if path.exists() else ''

    def pids(self) -> list[int]:
        out = subprocess.run(['pgrep', '-g', str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill(self) -> None:
        """``kill -9`` every process of the service at once."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM as a service manager would, then SIGKILL what is left."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def _popen(self, command: list[str], env: dict, before=None) -> None:
        from helpers.service import free_port

        self.port = free_port()
        if before:
            before(self.port)
        command = [arg.replace('{port}', str(self.port)) for arg in command]
        with open(self.workdir / f'{self.name}.log', 'wb') as out:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _launch(self) -> None:
        raise NotImplementedError

    def documents(self) -> dict:
        """Documents stored (searchable) and still waiting in a buffer, summed over the shards."""
        raise NotImplementedError

    def update(self, docs) -> str:
        raise NotImplementedError

    def delete(self, ids: list[str]) -> str:
        raise NotImplementedError


def _jina_post(address: str, endpoint: str, **kwargs):
    from jina import Client

    return Client(host=address).post(endpoint, **kwargs)


class Theirs(System):
    """The chapter's sharded Flow, as printed, with what a run here must set: the port, 2 shards, a
    ViT-B-32 that open_clip builds (name), and the module that hands clip_server our weights."""

    name = 'clip-as-service'
    ready_line = 'Flow is ready to serve'

    def __init__(self, workdir: Path, weights_dir: Path, clip_server_site: Path):
        super().__init__(workdir, weights_dir)
        self.site = clip_server_site
        self.flow_yaml = workdir / 'chapter_flow.yml'

    def _launch(self) -> None:
        # HOME: Jina 3.27 ignores the chapter's `workspace` inside `uses`, so annlite.executor stores in
        # ~/.cache/jina/AnnLiteIndexer/<shard>; a home of its own keeps that in the scratch folder
        home = self.workdir / 'home'
        env = dict(worker_env(self.site), CHAPTER_CLIP_WEIGHTS=str(self.weights_dir / WEIGHTS), HOME=str(home))
        self._popen([sys.executable, '-m', 'jina', 'flow', '--uses', str(self.flow_yaml)], env, self._write_flow_yaml)

    def _write_flow_yaml(self, port: int) -> None:
        self.flow_yaml.write_text(chapter_flow_yaml(port))

    def documents(self) -> dict:
        from docarray import Document

        answers = _jina_post(self.address, '/status', inputs=[Document()])
        shards = [d.tags for d in answers if 'total_docs' in d.tags]
        if len(shards) != SHARDS:
            raise RuntimeError(f'{len(shards)} of {SHARDS} shards answered /status')
        return {'stored': int(sum(s['total_docs'] for s in shards)), 'buffered': int(sum(s['appending_size'] for s in shards))}

    def update(self, docs) -> str:
        _jina_post(self.address, '/update', inputs=docs)
        return 'ok'

    def delete(self, ids: list[str]) -> str:
        _jina_post(self.address, '/delete', parameters={'ids': ids})  # annlite.executor's way: ids as a parameter
        return 'ok'


class Ours(System):
    name = 'clip-search'
    ready_line = 'clip-search is serving'

    def _launch(self) -> None:
        command = [sys.executable, '-m', 'clip_search', '--port', '{port}', '--model', str(self.weights_dir),
                   '--shards', str(SHARDS), '--workspace', str(self.workdir / 'workspace')]  # fmt: skip
        self._popen(command, worker_env())

    def documents(self) -> dict:
        from clip_search.client import Client

        return {'stored': Client(self.address).status()['documents'], 'buffered': 0}

    def update(self, docs) -> str:
        from clip_search.client import Client

        Client(self.address).update(docs)
        return 'ok'

    def delete(self, ids: list[str]) -> str:
        from clip_search.client import Client

        gone = Client(self.address).delete(ids)
        return 'ok' if sorted(gone) == sorted(ids) else f'deleted {len(gone)} of {len(ids)}'


def chapter_flow_yaml(port: int) -> str:
    import yaml

    flow = yaml.safe_load(CHAPTER_YAML.read_text())
    flow['with']['port'] = port
    encoder, indexer = flow['executors']
    encoder['uses']['with'] = {'name': CLIP_SERVER_NAME}
    encoder['uses']['metas']['py_modules'].insert(0, str(BENCH / 'chapter_weights.py'))
    indexer['shards'] = SHARDS
    assert 'uses_after' not in indexer and indexer['polling']['/search'] == 'ALL'  # the chapter's: no merger
    return yaml.safe_dump(flow, sort_keys=False)


# -- the measurements -------------------------------------------------------------------------------


def clip_client(address: str):
    from clip_client import Client

    return Client(address)


def index_rate(system: System, docs) -> tuple[float, object]:
    """docs/s of clip_client's ``index()`` (its default batch size), until it returned; and its answer."""
    started = time.perf_counter()
    answer = clip_client(system.address).index(docs)
    return len(docs) / (time.perf_counter() - started), answer


def wait_stored(system: System, expected: int, timeout: float = 300) -> float:
    """Seconds until /status counts ``expected`` stored documents (annlite.executor stores in a background thread)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if system.documents()['stored'] >= expected:
            return time.perf_counter() - started
        time.sleep(0.05)
    raise TimeoutError(f'{system.name}: {system.documents()} stored, {expected} expected after {timeout} s')


def found_ids(answer) -> list[str]:
    return list(answer.matches[:, 'id']) if len(answer.matches) else []


def seconds_until_searchable(system: System, doc_id: str, text: str, timeout: float = 60) -> float:
    """Index one document, then search its text until it is among the matches: seconds from ``index()`` returning."""
    from docarray import Document

    client = clip_client(system.address)
    client.index([Document(id=doc_id, text=text)])
    returned = time.perf_counter()
    while time.perf_counter() - returned < timeout:
        if doc_id in found_ids(client.search([text], limit=LIMIT)[0]):
            return time.perf_counter() - returned
        time.sleep(0.01)
    raise TimeoutError(f'{system.name}: {doc_id} not searchable {timeout} s after index() returned')


async def search_load(system: System, queries: list[str], clients: int, per_client: int) -> dict:
    """``clients`` clip_clients on one event loop, each sending its queries one per request, back to back;
    latencies, throughput and the service's CPU time per search."""
    address = system.address

    async def one_client(k: int) -> list[tuple[float, int, list]]:
        client = clip_client(address)
        out = []
        for i in range(per_client):
            query = queries[(k * per_client + i) % len(queries)]
            started = time.perf_counter()
            answer = (await client.asearch([query], limit=LIMIT))[0]
            out.append((time.perf_counter() - started, (k * per_client + i) % len(queries), answer))
        return out

    await asyncio.gather(*(one_client(k) for k in range(min(2, clients))))  # warm up the channels, not counted
    cpu, started = server_cpu_s(system), time.perf_counter()
    rows = [row for rows in await asyncio.gather(*(one_client(k) for k in range(clients))) for row in rows]
    wall, cpu = time.perf_counter() - started, server_cpu_s(system) - cpu
    latencies = [row[0] for row in rows]
    return {'clients': clients, 'searches': len(rows), 'searches_per_s': len(rows) / wall,
            'server_cpu_ms_per_search': 1000 * cpu / len(rows),
            'p50_ms': 1000 * median(latencies), 'p99_ms': 1000 * percentile(latencies, 99),
            'answers': {row[1]: row[2] for row in rows}}  # fmt: skip


def agreement_with_exact(answers: dict, query_embeddings: np.ndarray, corpus_ids: list[str], corpus: np.ndarray) -> dict:
    """The first 10 matches a user gets vs the exact top 10 by cosine over the stored embeddings."""
    q = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    exact = np.argsort(-(q @ c.T), axis=1)[:, :LIMIT]
    overlap, same_order, ascending, returned = [], [], [], []
    for i, answer in answers.items():
        ids = found_ids(answer)
        truth = [corpus_ids[j] for j in exact[i]]
        overlap.append(len(set(ids[:LIMIT]) & set(truth)) / LIMIT)
        same_order.append(ids[:LIMIT] == truth)
        distances = [m.scores['cosine'].value for m in answer.matches]
        ascending.append(distances == sorted(distances))
        returned.append(len(ids))
    return {'queries': len(answers), 'top10_overlap': float(np.mean(overlap)), 'top10_same_order': float(np.mean(same_order)),
            'answers_sorted': float(np.mean(ascending)), 'matches_returned_for_limit_10': float(np.mean(returned))}  # fmt: skip


def stored_embeddings(system: System, docs, index_answer) -> np.ndarray:
    """The embeddings the encoder handed the indexer: in index()'s answer (theirs), or the encoder's again (ours answers ids)."""
    if index_answer is not None and index_answer.embeddings is not None:
        return np.asarray(index_answer.embeddings, dtype=np.float32)
    return np.asarray(clip_client(system.address).encode(docs).embeddings, dtype=np.float32)


def search_texts(system: System, texts: list[str]):
    return clip_client(system.address).search(texts, limit=LIMIT)


def check_update(system: System, data: Data) -> dict:
    """Replace the first texts by new ones; then the new text must find the id once, and the old text no copy of it."""
    from docarray import Document, DocumentArray

    ids = [f't{i}' for i in range(len(data.updated))]
    before = system.documents()['stored']
    try:
        outcome = system.update(DocumentArray(Document(id=i, text=t) for i, t in zip(ids, data.updated)))
    except Exception as exc:  # noqa: BLE001 - what the service answers is the measurement
        outcome = f'error: {_one_line(exc)}'
    time.sleep(0.5)
    new = search_texts(system, data.updated)
    old = search_texts(system, data.texts[: len(ids)])
    return {
        'outcome': outcome,
        'stored_before': before,
        'stored_after': system.documents()['stored'],
        'new_text_finds_id_first': sum(found_ids(a)[:1] == [i] for a, i in zip(new, ids)),
        'copies_of_id_in_new_text_answer': [found_ids(a).count(i) for a, i in zip(new, ids)],
        'old_text_still_finds_exact_copy': sum(_exact_copy(a, i) for a, i in zip(old, ids)),
        'of': len(ids),
    }


def check_delete(system: System, data: Data) -> dict:
    """Delete texts that live on different shards; then none may be found."""
    start = len(data.updated)
    ids = [f't{i}' for i in range(start, start + len(data.spare))]
    texts = data.texts[start : start + len(data.spare)]
    before = system.documents()['stored']
    try:
        outcome = system.delete(ids)
    except Exception as exc:  # noqa: BLE001 - what the service answers is the measurement
        outcome = f'error: {_one_line(exc)}'
    time.sleep(0.5)
    answers = search_texts(system, texts)
    return {
        'outcome': outcome,
        'stored_before': before,
        'stored_after': system.documents()['stored'],
        'still_found': sum(i in found_ids(a) for a, i in zip(answers, ids)),
        'of': len(ids),
    }


def _exact_copy(answer, doc_id: str) -> bool:
    return any(m.id == doc_id and m.scores['cosine'].value < 1e-4 for m in answer.matches)


def _one_line(exc: Exception) -> str:
    return ' '.join(str(exc).split())[:300]


def check_kill9(system: System, data: Data) -> dict:
    """index() a batch, ``kill -9`` every process the moment it returns, restart; how many are kept and found."""
    from docarray import Document, DocumentArray

    before = system.documents()['stored']
    ids = [f'k{i}' for i in range(len(data.kill_batch))]
    clip_client(system.address).index(DocumentArray(Document(id=i, text=t) for i, t in zip(ids, data.kill_batch)))
    system.kill()
    restart_s = system.start()
    after = system.documents()
    answers = search_texts(system, data.kill_batch)
    return {
        'acknowledged': len(ids),
        'stored_before': before,
        'stored_after_restart': after['stored'],
        'kept': after['stored'] - before,
        'found_by_search': sum(i in found_ids(a) for a, i in zip(answers, ids)),
        'restart_s': restart_s,
    }


def server_cpu_s(system: System) -> float:
    """CPU seconds (user + system) spent so far by every process of the service."""
    ticks = 0
    for pid in system.pids():
        try:
            fields = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / os.sysconf('SC_CLK_TCK')


def memory_mib(pids: list[int]) -> dict:
    """Sum over the processes of RSS, PSS (shared pages split among their users) and anonymous memory, in MiB."""
    total = {'rss': 0.0, 'pss': 0.0, 'anonymous': 0.0}
    for pid in pids:
        try:
            lines = Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in lines:
            key, _, rest = line.partition(':')
            if key.lower() in total:
                total[key.lower()] += int(rest.split()[0]) / 1024
    return {**{f'{k}_mib': round(v, 1) for k, v in total.items()}, 'processes': len(pids)}


def measure(system: System, data: Data, size: dict) -> tuple[dict, np.ndarray]:
    log(f'{system.name}: starting')
    result = {'load_average_start': os.getloadavg(), 'startup_s': system.start()}
    try:
        texts, images = data.text_docs(), data.image_docs()
        stored = 0
        answers = {}
        for kind, docs in (('texts', texts), ('images', images)):
            cpu = server_cpu_s(system)
            rate, answers[kind] = index_rate(system, docs)
            stored += len(docs)
            result[f'{kind}_stored_after_index_returned_s'] = wait_stored(system, stored)
            result[f'index_{kind}_docs_per_s'] = rate
            result[f'index_{kind}_server_cpu_ms_per_doc'] = 1000 * (server_cpu_s(system) - cpu) / len(docs)
            log(f'{system.name}: indexed {len(docs)} {kind}, {rate:.1f}/s')
        corpus = np.concatenate([stored_embeddings(system, texts, answers['texts']), stored_embeddings(system, images, answers['images'])])
        corpus_ids = [d.id for d in texts] + [d.id for d in images]
        query_embeddings = np.asarray(clip_client(system.address).encode(data.queries), dtype=np.float32)
        one = asyncio.run(search_load(system, data.queries, 1, len(data.queries)))
        result['agreement'] = agreement_with_exact(one.pop('answers'), query_embeddings, corpus_ids, corpus)
        eight = asyncio.run(search_load(system, data.queries, 8, size['per_client_8']))
        eight.pop('answers')
        result['search'] = {'1_client': one, '8_clients': eight}
        log(f'{system.name}: search p50 {one["p50_ms"]:.0f} ms (1 client), {eight["p50_ms"]:.0f} ms (8 clients)')
        result['memory'] = memory_mib(system.pids())
        probes = [seconds_until_searchable(system, f'p{i}', t) for i, t in enumerate(data.probes)]
        result['one_doc_searchable_after_index_returned_s'] = {'median': median(probes), 'max': max(probes), 'probes': probes}
        result['update'] = check_update(system, data)
        result['delete'] = check_delete(system, data)
        log(f'{system.name}: update {result["update"]["outcome"]}, delete {result["delete"]["outcome"]}')
        result['kill9'] = check_kill9(system, data)
        log(f'{system.name}: kill -9 kept {result["kill9"]["kept"]} of {result["kill9"]["acknowledged"]}')
        result['load_average_end'] = os.getloadavg()
        return result, corpus
    finally:
        system.stop()


# -- the report -------------------------------------------------------------------------------------


def table(results: dict) -> str:
    theirs, ours = results['clip-as-service'], results['clip-search']
    n_docs = results['size']['texts'] + results['size']['images']

    def both(fn) -> str:
        return f'| {fn(theirs)} | {fn(ours)} |'

    def latency(r, k):
        s = r['search'][k]
        return f'{s["p50_ms"]:.0f} / {s["p99_ms"]:.0f} ms ({s["searches_per_s"]:.1f}/s)'

    def update(r):
        u = r['update']
        copies = max(u['copies_of_id_in_new_text_answer'] or [0])
        return (f'{u["outcome"]}; new text finds it first {u["new_text_finds_id_first"]}/{u["of"]}, up to {copies} '
                f'cop{"y" if copies == 1 else "ies"}; old text finds a stale copy {u["old_text_still_finds_exact_copy"]}/{u["of"]}; '
                f'stored {u["stored_before"]} -> {u["stored_after"]}')  # fmt: skip

    def delete(r):
        d = r['delete']
        return f'{d["outcome"]}; still found {d["still_found"]}/{d["of"]}; stored {d["stored_before"]} -> {d["stored_after"]}'

    def memory(r):
        m = r['memory']
        return f'{m["rss_mib"]:.0f} / {m["pss_mib"]:.0f} / {m["anonymous_mib"]:.0f} MiB ({m["processes"]} processes)'

    rows = [
        ('indexing texts, docs/s (clip_client `index()` until it returns)', both(lambda r: f'{r["index_texts_docs_per_s"]:.1f}')),
        ('indexing images, docs/s', both(lambda r: f'{r["index_images_docs_per_s"]:.1f}')),
        ('service CPU per indexed text / image, ms', both(lambda r: f'{r["index_texts_server_cpu_ms_per_doc"]:.0f} / {r["index_images_server_cpu_ms_per_doc"]:.0f}')),
        (f'all {results["size"]["texts"]} texts stored, after `index()` returned', both(lambda r: f'{r["texts_stored_after_index_returned_s"]:.2f} s')),
        ('one new document searchable, after `index()` returned (median, max)',
         both(lambda r: '{median:.2f} s, {max:.2f} s'.format(**r['one_doc_searchable_after_index_returned_s']))),
        ('search p50 / p99, 1 client (searches/s)', both(lambda r: latency(r, '1_client'))),
        ('search p50 / p99, 8 concurrent clients (searches/s)', both(lambda r: latency(r, '8_clients'))),
        ('service CPU per search, 1 / 8 clients, ms',
         both(lambda r: '{:.0f} / {:.0f}'.format(*(r['search'][k]['server_cpu_ms_per_search'] for k in ('1_client', '8_clients'))))),
        ('top-10 overlap with exact search (same order)',
         both(lambda r: f'{r["agreement"]["top10_overlap"]:.3f} ({r["agreement"]["top10_same_order"]:.2f})')),
        ('matches returned for `limit=10`; answers sorted by distance',
         both(lambda r: f'{r["agreement"]["matches_returned_for_limit_10"]:.0f}; {100 * r["agreement"]["answers_sorted"]:.0f}%')),
        ('`/update` of documents on either shard', both(update)),
        ('`/delete` of documents on either shard', both(delete)),
        ('kept after `kill -9` right after `index()` returned',
         both(lambda r: f'{r["kill9"]["kept"]} of {r["kill9"]["acknowledged"]} (found by search: {r["kill9"]["found_by_search"]})')),
        (f'restart to answering, {n_docs}+ documents', both(lambda r: f'{r["kill9"]["restart_s"]:.1f} s')),
        ('memory of all processes, RSS / PSS / anonymous', both(memory)),
        ('load average (1 min) at start / end', both(lambda r: f'{r["load_average_start"][0]:.1f} / {r["load_average_end"][0]:.1f}')),
    ]  # fmt: skip
    header = '| | clip-as-service (chapter Flow) | clip-search |\n|---|---|---|\n'
    return header + '\n'.join(f'| {name} {cells}' for name, cells in rows) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tiny', action='store_true', help='a few documents: the smoke test')
    parser.add_argument('--out', type=Path, help='where results go (default bench/results/system, or a temporary folder with --tiny)')
    parser.add_argument('--cache', type=Path, default=BENCH / '.cache', help='random ViT-B-32 weights, clip_server install')
    parser.add_argument('--texts', type=int, help='override the number of texts')
    parser.add_argument('--images', type=int, help='override the number of images')
    args = parser.parse_args()
    size = dict(SIZES['tiny' if args.tiny else 'full'])
    size.update({k: getattr(args, k) for k in ('texts', 'images') if getattr(args, k)})
    out = args.out or (scratch_dir('bench-system-out-') if args.tiny else BENCH / 'results' / 'system')
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    site = ensure_clip_server(args.cache)
    weights = write_random_vit_b_32(args.cache / 'vit-b-32-random')
    data = Data(size)
    log(f'{size["texts"]} texts, {size["images"]} images, {size["queries"]} queries; {SHARDS} shards each')
    results = {'size': size, 'shards': SHARDS, 'model': 'ViT-B-32 (open_clip config, random weights)',
               'clip_server': ', '.join(CLIP_SERVER_PACKAGES) + ' (no deps, in front of our environment)',
               'client': 'clip_client 0.8.3, default batch size, one query per search request',
               'load_average_start': os.getloadavg()}  # fmt: skip
    workdir = scratch_dir('bench-system-')
    corpora = {}
    for system in (Theirs(_mkdir(workdir / 'theirs'), weights, site), Ours(_mkdir(workdir / 'ours'), weights)):
        results[system.name], corpora[system.name] = measure(system, data, size)
        if isinstance(system, Theirs):
            (out / 'chapter_flow.yml').write_text(system.flow_yaml.read_text().replace(f'{ROOT}/', ''))
            results['chapter_shards_stored_in'] = shard_folders(system.workdir)
    a, b = (c / np.linalg.norm(c, axis=1, keepdims=True) for c in corpora.values())
    results['min_cosine_between_the_systems_embeddings'] = float(np.min(np.sum(a * b, axis=1)))  # ~1.0: one model
    results['load_average_end'] = os.getloadavg()
    results['seconds'] = round(time.monotonic() - started)
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    (out / 'table.md').write_text(table(results))
    log(f'wrote {out}/results.json and table.md in {results["seconds"]} s')
    print(table(results))


def shard_folders(workdir: Path) -> list[str]:
    """Where annlite.executor's shards put their data, relative to the folder the Flow ran in (HOME is workdir/home)."""
    return sorted(str(path.relative_to(workdir)) for path in workdir.rglob('AnnLiteIndexer/*') if path.is_dir())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == '__main__':
    os.environ.setdefault('JINA_HIDE_SURVEY', '1')
    main()

"""``python -m clip_search index`` against the encoder alone, and the command's memory on big collections.

    python bench/ingest.py [--images 2000] [--rounds 2] [--memory-images 20000] [--memory-texts 200000]

1. Rate: the same JPEGs (drawn by the demo model's generator) indexed by the command into a
   2-shard Flow serving ``mini::shapes``, and embedded in this process by a ``CLIPEncoder`` alone
   (what /index asks of it: embeddings and thumbnails), turn by turn, ``--rounds`` times each, so
   both see the same machine load. The ratio is command / encoder; the target is >= 0.9.
2. Memory: the command's peak resident memory (the kernel's VmHWM) indexing ``--memory-images``
   small images from a folder and ``--memory-texts`` lines from stdin; the target is < 300 MB.

Rates are per second of wall time and per second of CPU time (the command's plus the Flow's
processes', against this process's for the encoder alone), since the machine may be shared.

Results go to bench/results/ingest/results.json (and are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, median, scratch_dir

RESULTS = ROOT / 'bench' / 'results' / 'ingest'


def write_jpegs(folder: Path, count: int, size: int = 96) -> Path:
    from clip_search.demo_model.shapes import CLASSES, draw_shape_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    for i in range(count):
        color, shape = CLASSES[i % len(CLASSES)]
        draw_shape_image(color, shape, rng, size).save(folder / f'{i:06d}.jpg', quality=90)
    return folder


def encoder_rate(folder: Path, threads: int, batch_size: int = 64) -> dict:
    """A CLIPEncoder in this process: read the files, embed, thumbnail (what /index asks of it).

    Images per second of wall time and of this process's CPU time, after one warm-up batch, with
    ``threads`` torch threads (on a busy 2-core machine 1 thread was 7x faster than 2).
    """
    import torch
    from docarray import Document, DocumentArray

    encoder = _encoder()
    torch.set_num_threads(threads)
    paths = sorted(folder.iterdir())

    def embed(chunk: list[Path]) -> None:
        docs = DocumentArray(Document(id=p.name, blob=p.read_bytes(), uri=str(p)) for p in chunk)
        encoder.embed(docs, 0, False, encoder.thumbnail_size)

    embed(paths[:batch_size])
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(paths), batch_size):
        embed(paths[start : start + batch_size])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {'threads': threads, 'docs_per_s': round(len(paths) / wall, 1), 'docs_per_cpu_s': round(len(paths) / cpu, 1)}


_ENCODER = None


def _encoder():
    global _ENCODER
    if _ENCODER is None:
        from clip_search.executors.clip_encoder import CLIPEncoder

        _ENCODER = CLIPEncoder(name='mini::shapes')
    return _ENCODER


def run_command(args: list[str], stdin_path: Path | None = None, server_pids: list[int] = ()) -> dict:
    """Run ``python -m clip_search index ...``: wall time, CPU time (the command's and the Flow's), peak RSS.

    The peak is the kernel's high-water mark (VmHWM) of the command's own process, read until it
    exits (not wait4's ru_maxrss: that counts the pages of this process the child shares until exec).
    """
    server_cpu = _cpu_seconds(server_pids)
    started = time.perf_counter()
    with open(stdin_path or os.devnull, 'rb') as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, '-m', 'clip_search', 'index', *args], stdin=stdin, stdout=out, stderr=err, cwd=scratch_dir('ingest-run-')
        )  # fmt: skip
        peak, cpu = 0.0, 0.0
        while process.poll() is None:
            peak = max(peak, _status_mib(process.pid, 'VmHWM'))
            cpu = max(cpu, _cpu_seconds([process.pid]))
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        output, errors = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise RuntimeError(f'index exited with {process.returncode}: {output}{errors[-2000:]}')
    return {
        'seconds': round(seconds, 2),
        'client_cpu_seconds': round(cpu, 2),
        'server_cpu_seconds': round(_cpu_seconds(server_pids) - server_cpu, 2),
        'peak_rss_mib': round(peak, 1),
        'summary': output.strip(),
    }


def _status_mib(pid: int, field: str) -> float:
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def _cpu_seconds(pids) -> float:
    """utime + stime of the processes, in seconds (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=2000)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--memory-images', type=int, default=20_000)
    parser.add_argument('--memory-texts', type=int, default=200_000)
    args = parser.parse_args()

    from helpers.service import start_service

    work = scratch_dir('bench-ingest-')
    folder = write_jpegs(work / 'jpegs', args.images)
    service = start_service('mini::shapes', work / 'workspace', shards=2, ready_timeout=600)
    results: dict = {'images': args.images, 'model': 'mini::shapes', 'shards': 2, 'cpus': os.cpu_count(), 'rounds': []}
    try:
        pids = service.processes()
        for round_number in range(args.rounds):  # turn by turn: both see the same load
            encoder = max((encoder_rate(folder, threads) for threads in (1, os.cpu_count())), key=lambda r: r['docs_per_s'])
            command = run_command([str(folder), '--server', service.address, '--failures', str(work / f'f{round_number}.jsonl')], server_pids=pids)
            command['docs_per_s'] = round(args.images / command['seconds'], 1)
            command['docs_per_cpu_s'] = round(args.images / (command['client_cpu_seconds'] + command['server_cpu_seconds']), 1)
            results['rounds'].append({'encoder': encoder, 'command': command})
            print(json.dumps(results['rounds'][-1]), flush=True)
        if results['rounds']:  # each round's ratio, then their median
            for unit in ('docs_per_s', 'docs_per_cpu_s'):
                ratios = [r['command'][unit] / r['encoder'][unit] for r in results['rounds']]
                results[f'ratio_{unit}'] = {'median': round(median(ratios), 3), 'rounds': [round(x, 3) for x in ratios]}

        if args.memory_images:
            many = write_jpegs(work / 'many', args.memory_images, size=32)
            results['memory_images'] = run_command([str(many), '--server', service.address, '--failures', str(work / 'm.jsonl')], server_pids=pids)
            results['memory_images']['documents'] = args.memory_images
            print(json.dumps(results['memory_images']), flush=True)
        if args.memory_texts:
            lines = work / 'texts.txt'
            lines.write_text(''.join(f'text number {i}: a {["red", "blue"][i % 2]} circle\n' for i in range(args.memory_texts)))
            results['memory_texts'] = run_command(['-', '--server', service.address, '--failures', str(work / 't.jsonl')], lines, pids)
            results['memory_texts']['documents'] = args.memory_texts
            print(json.dumps(results['memory_texts']), flush=True)
    finally:
        service.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / 'results.json'  # a run of one part (--rounds 0, --memory-* 0) keeps the others' results
    kept = json.loads(path.read_text()) if path.exists() else {}
    if not args.rounds:
        results = {**kept, **{k: v for k, v in results.items() if k.startswith('memory')}}
    elif not (args.memory_images or args.memory_texts):
        results = {**{k: v for k, v in kept.items() if k.startswith('memory')}, **results}
    path.write_text(json.dumps(results, indent=2) + '\n')
    print(json.dumps({k: v for k, v in results.items() if k != 'rounds'}, indent=2))


if __name__ == '__main__':
    main()

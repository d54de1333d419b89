"""Turn bench/run.py's results into results.json, a markdown report and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def write_report(results: dict, out: Path) -> None:
    """Write results.json, results.md, overview.png and scaling.png into ``out``."""
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    plot_overview(results, out / 'overview.png')
    plot_scaling(results['scaling'], out / 'scaling.png')
    (out / 'results.md').write_text(markdown(results))


def markdown(results: dict) -> str:
    m, e, s = results['machine'], results['encode'], results['summary']
    lines = [
        f'# clip-search benchmark ({results["mode"]})',
        '',
        f'{m["started"]}, {m["seconds"]} s. Machine: {m["cpu"]}, {m["cores"]} cores, {m["memory_gib"]} GiB, '
        f'{m["platform"]}, Python {m["python"]}; load average {_load(m["load_average_start"])} at the start, '
        f'{_load(m["load_average_end"])} at the end (a shared machine: compare ratios within one run).',
        '',
        'Versions: ' + ', '.join(f'{k} {v}' for k, v in m['versions'].items()) + f'; clip_server: {m["clip_server"]}.',
        '',
        f'**Summary**: encode {_num(s["encode_vs_clip_server"])}x clip_server (geometric mean of text and image), '
        f'search {s["search_qps_vs_hnswlib"]:.2f}x hnswlib QPS at recall@10 {s["recall@10"]:.3f}, '
        f'Flow overhead {s["flow_overhead_p50_ms"]:.1f} ms p50 per search (1 shard, gRPC, over a direct indexer call).',
        '',
        f'## Encode: our CLIPEncoder (fp32 and int8) vs clip_server\'s, {e["model"]}',
        '',
        f'Same weights (lowest cosine between their embeddings of the same inputs: {_num(e["min_cosine_ours_vs_clip_server"], ".6f")}; '
        f'int8 against our fp32: {e["min_cosine_int8_vs_fp32"]:.4f}), '
        f'minibatch {e["minibatch_size"]}, {e["torch_threads"]} torch threads, each in its own process, measured turn by turn '
        f'({e["text"]["rounds"]} rounds; a ratio is the median of the paired rounds). int8 is `dtype: int8`: the '
        'linear layers quantized to int8 at load (torch dynamic quantization).',
        '',
        '| input | docs per round | ours fp32 docs/s | ours int8 docs/s | clip_server docs/s | fp32 / clip_server | int8 / clip_server | int8 / fp32 |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for kind, label in (('text', 'texts (4-20 words)'), ('image', 'images (640x480 JPEG)')):
        row = e[kind]
        lines.append(
            f'| {label} | {row["docs"]} | {row["ours_docs_per_s"]:.1f} | {row["ours_int8_docs_per_s"]:.1f} | '
            f'{_num(row["clip_server_docs_per_s"], ".1f")} | {_num(row["ratio"])} | {_num(row["int8_ratio"])} | {row["int8_vs_fp32"]:.2f} |'
        )
    lines += [
        '',
        'Where an image\'s time goes: each stage timed alone, one after the other (decode and preprocess on one '
        'thread); in the encoder a thread pool sized to the cores decodes and preprocesses the next minibatch '
        'while the model runs the current one. End to end is the encoder\'s own rate from the table above.',
        '',
        '| dtype | decode ms/image | preprocess ms/image | model ms/image | stages summed ms/image | end to end ms/image |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for name, label in (('ours', 'fp32'), ('ours_int8', 'int8')):
        split = e['image_time_split'][name]
        per = {stage: 1000 * split[f'{stage}_s'] / split['docs'] for stage in ('decode', 'preprocess', 'model')}
        lines.append(
            f'| {label} | {per["decode"]:.1f} | {per["preprocess"]:.1f} | {per["model"]:.1f} | {sum(per.values()):.1f} | '
            f'{1000 / e["image"][f"{name}_docs_per_s"]:.1f} |'
        )
    size, hnsw = results['size'], results['hnsw']
    lines += [
        '',
        f'## Search: {size["vectors"]:,} clustered 512-d vectors, {size["queries"]} queries',
        '',
        f'HNSW everywhere with M={hnsw["M"]}, ef_construction={hnsw["ef_construction"]}, ef_search={hnsw["ef_search"]}; '
        'one query per call from one thread (as a shard serves a request); recall@10 against faiss flat. '
        'The annlite rows are the same index as ours, called below our executor. hnswlib and annlite run in '
        f'processes of their own, searched turn by turn ({size["search_rounds"]} rounds, medians shown; the '
        'summary ratio is the median of the paired rounds).',
        '',
        '| index | build s | QPS | p50 ms | p99 ms | recall@10 | memory MiB |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in results['search']:
        lines.append(
            f'| {row["name"]} | {row["build_s"]:.1f} | {row["qps"]:.0f} | {row["p50_ms"]:.2f} | {row["p99_ms"]:.2f} | '
            f'{row["recall_at_10"]:.3f} | {row["memory_mib"]:.0f} |'
        )
    lines += [
        '',
        '[profile of our search path](profile_search.txt) (pyinstrument, 300 queries).',
    ]
    lines += [
        '',
        f'## End to end: the service over gRPC, {size["vectors"]:,} documents with embeddings',
        '',
        'One query per request; memory is the resident set of all the service\'s processes.',
        '',
        '| shards | start s | index docs/s | search p50 ms | search p99 ms | recall@10 | memory MiB |',
        '|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in results['flow']:
        lines.append(
            f'| {row["shards"]} | {row["startup_s"]:.0f} | {row["index_docs_per_s"]:.0f} | {row["p50_ms"]:.1f} | '
            f'{row["p99_ms"]:.1f} | {row["recall_at_10"]:.3f} | {row["rss_mib"]:.0f} |'
        )
    lines += throughput_section(results['throughput'])
    lines += [
        '',
        '## Scaling: our indexer (one shard, in-process) as the collection grows',
        '',
        '| vectors | search p50 ms | search p99 ms | recall@10 | index docs/s | memory MiB | disk MiB |',
        '|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in results['scaling']:
        lines.append(
            f'| {row["vectors"]:,} | {row["p50_ms"]:.2f} | {row["p99_ms"]:.2f} | {row["recall_at_10"]:.3f} | '
            f'{row["index_docs_per_s"]:.0f} | {row["rss_mib"]:.0f} | {row["disk_mib"]:.0f} |'
        )
    planned, reached = size['scaling'][-1], results['scaling'][-1]['vectors']
    if reached < planned:
        lines += ['', f'Stopped at {reached:,} of {planned:,} vectors: the time budget ({size["scaling_budget_s"]} s) ran out.']
    lines += ['', '![overview](overview.png)', '', '![scaling](scaling.png)', '']
    return '\n'.join(lines)


def throughput_section(run: dict) -> list[str]:
    """CPU per search by process, and searches/s under concurrent clients (bench/throughput.py's own tables)."""
    from throughput import markdown

    c = run['concurrent']
    return [
        '',
        f'## Throughput: {run["shards"]} shards, {run["docs"]:,} 64-d documents, the unmodified jina.Client',
        '',
        'Server CPU per search is the user + system time of every process of the service over '
        f'{run["embedding"]["searches"]} sequential one-query searches; then {c["clients"]} client processes search '
        f'at once for {c["seconds"]:.0f} s (bench/throughput.py).',
        '',
        *markdown([run], None).splitlines(),
    ]


def _num(value, spec: str = '.2f') -> str:
    """A figure, or n/a when it was not measured (clip_server left out with --no-clip-server)."""
    return 'n/a' if value is None else format(value, spec)


def _load(load: list) -> str:
    return '/'.join(f'{x:.1f}' for x in load)


def plot_overview(results: dict, path: Path) -> None:
    """Three panels: encode docs/s, search QPS, Flow latency per shard count."""
    fig, (enc, ann, flow) = plt.subplots(1, 3, figsize=(15, 4.5))
    e = results['encode']
    kinds = ['text', 'image']
    width = 0.27
    series = (('ours fp32', 'ours_docs_per_s'), ('ours int8', 'ours_int8_docs_per_s'), ('clip_server', 'clip_server_docs_per_s'))
    for offset, (name, key) in zip((-width, 0, width), series):
        enc.bar([i + offset for i in range(2)], [e[k][key] or 0 for k in kinds], width, label=name)  # 0: not measured
    enc.set_xticks(range(2), [f'{k}\n(fp32 {_num(e[k]["ratio"])}x, int8 {_num(e[k]["int8_ratio"])}x)' for k in kinds])
    enc.set_ylabel('docs/s')
    enc.set_title('Encode, ViT-B-32 (CPU)')
    enc.legend()
    rows = results['search']
    names = [r['name'].replace(' (', '\n(').replace(': ', ':\n') for r in rows]
    bars = ann.barh(range(len(rows)), [r['qps'] for r in rows], color=['tab:gray', 'tab:orange', 'tab:blue', 'tab:blue', 'tab:blue', 'tab:green'][: len(rows)])
    for bar, row in zip(bars, rows):
        ann.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f' r@10 {row["recall_at_10"]:.3f}', va='center', fontsize=8)
    ann.set_yticks(range(len(rows)), names, fontsize=8)
    ann.set_xlabel('queries/s (one thread, one query per call)')
    ann.set_title(f'Search, {results["size"]["vectors"]:,} x 512-d')
    ann.margins(x=0.3)
    shards = [r['shards'] for r in results['flow']]
    flow.plot(shards, [r['p50_ms'] for r in results['flow']], 'o-', label='p50')
    flow.plot(shards, [r['p99_ms'] for r in results['flow']], 's--', label='p99')
    ours = next(r for r in rows if r['name'].startswith('ours'))
    flow.axhline(ours['p50_ms'], color='gray', linestyle=':', label='indexer called directly, p50')
    flow.set_xticks(shards)
    flow.set_xlabel('shards')
    flow.set_ylabel('search latency over gRPC, ms')
    flow.set_title('End to end through the Flow')
    flow.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _two_series_over_size(axis, n: list, rows: list[dict], first: tuple, second: tuple, ylabel: str) -> None:
    """Two measures of ``rows`` (key, label) against the collection size, on a log x axis."""
    for (key, label), style in ((first, 'o-'), (second, 's--')):
        axis.plot(n, [r[key] for r in rows], style, label=label)
    axis.set_xscale('log')
    axis.set_xlabel('vectors')
    axis.set_ylabel(ylabel)
    axis.legend()


def plot_scaling(rows: list[dict], path: Path) -> None:
    """Search latency and memory of our indexer against the number of vectors (log scale)."""
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r['vectors'] for r in rows]
    _two_series_over_size(latency, n, rows, ('p50_ms', 'p50'), ('p99_ms', 'p99'), 'search latency, ms')
    _two_series_over_size(memory, n, rows, ('rss_mib', 'resident memory'), ('disk_mib', 'on disk'), 'MiB')
    fig.suptitle('Our indexer (one shard) as the collection grows')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

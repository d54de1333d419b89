"""The client commands beside the server: ``python -m clip_search index|search|status|delete ...``.

Each prints one line and exits 2 when it cannot run (bad arguments, a missing source, the server
unreachable); ``index`` exits 1 when some documents were refused (see ``index_run.py``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from clip_search.client import DEFAULT_BATCH_SIZE, Client, RequestError
from clip_search.index_run import EXIT_CANNOT_RUN, IndexRun, Settings
from clip_search.ingest import Columns, SourceError, check_sources

DEFAULT_SERVER = inspect.signature(Client).parameters['server'].default
AUTH_TOKEN_ENV = 'CLIP_AUTH_TOKEN'  # clip_client's variable for the same key
IN_FLIGHT = inspect.signature(Client).parameters['in_flight'].default


def command_main(argv: Sequence[str]) -> int:
    """``argv[0]`` is one of ``COMMANDS``; returns the exit code."""
    name, rest = argv[0], list(argv[1:])
    args = _parsers()[name]().parse_args(rest)  # argparse exits 2 on bad arguments, in one line
    run: Callable[[argparse.Namespace], int] = {'index': run_index, 'search': run_search, 'status': run_status, 'delete': run_delete}[name]
    logging.disable(logging.CRITICAL)  # Jina's client logs each failure in many lines: a command says it in one
    try:
        return run(args)
    except CommandError as exc:
        print(f'clip-search {name}: {exc}', file=sys.stderr)
        return EXIT_CANNOT_RUN
    finally:
        logging.disable(logging.NOTSET)


class CommandError(RuntimeError):
    """The command cannot run; the message says why in one line."""


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    return {'index': index_parser, 'search': search_parser, 'status': status_parser, 'delete': delete_parser}


def _connection_options(parser: argparse.ArgumentParser, timeout: float = 60.0) -> argparse.ArgumentParser:
    parser.add_argument('--server', default=DEFAULT_SERVER, help=f'the running service (default: {DEFAULT_SERVER})')
    parser.add_argument('--timeout', type=float, default=timeout, help=f'seconds one request may take (default: {timeout:g})')
    parser.add_argument(
        '--api-key', default=os.environ.get(AUTH_TOKEN_ENV),
        help=f'the service\'s API key, if it requires one (default: ${AUTH_TOKEN_ENV}, as clip_client reads it; '
        'the variable keeps the key off the process list)',
    )  # fmt: skip
    return parser


def index_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m clip_search index',
        description='Index folders, files, globs, tables (CSV, TSV, JSONL, Parquet) or stdin lines (-), streamed and resumable.',
    )
    parser.add_argument('sources', nargs='+', metavar='SOURCE', help='a folder (recursive), a file, a glob, a table, or - for stdin')
    parser.add_argument('--texts', action='store_true', help='.txt files become text documents (else they are skipped)')
    parser.add_argument('--uri-column', help='table column with an image path or URL')
    parser.add_argument('--text-column', help='table column with a text')
    parser.add_argument('--tag-columns', default='', help='table columns stored as tags, comma-separated (e.g. color,shape)')
    parser.add_argument('--id-column', help='table column with the document id (default: the uri, else FILE:ROW)')
    parser.add_argument('--failures', default='failures.jsonl', help='refused documents, as JSON lines (default: failures.jsonl); the checkpoint is written beside it')
    parser.add_argument('--resume', action='store_true', help='skip what the checkpoint (and the server) says is indexed')
    parser.add_argument('--batch-size', type=int, default=DEFAULT_BATCH_SIZE, help=f'documents per request (default: {DEFAULT_BATCH_SIZE})')
    parser.add_argument('--in-flight', type=int, default=IN_FLIGHT, help=f'requests awaiting an answer at once (default: {IN_FLIGHT})')
    parser.add_argument('--threads', type=int, default=4, help='threads reading local files (default: 4)')
    return _connection_options(parser, timeout=600.0)  # a batch of images waits behind the batches in flight


def run_index(args: argparse.Namespace, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    columns = Columns(
        uri=args.uri_column,
        text=args.text_column,
        tags=tuple(c.strip() for c in args.tag_columns.split(',') if c.strip()),
        id=args.id_column,
    )
    if args.batch_size < 1 or args.in_flight < 1 or args.threads < 1:
        raise CommandError('--batch-size, --in-flight and --threads must be at least 1')
    try:
        check_sources(args.sources, columns)
    except SourceError as exc:
        raise CommandError(str(exc)) from None
    client = _reachable_client(args, in_flight=args.in_flight)
    settings = Settings(
        sources=args.sources,
        columns=columns,
        texts=args.texts,
        failures=Path(args.failures),
        resume=args.resume,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    return IndexRun(client, settings, out, err, bar=err.isatty()).run()


def search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m clip_search search', description='Search by text or by image.')
    parser.add_argument('query', nargs='?', help='the text to search for')
    parser.add_argument('--image', help='search by this image file instead')
    parser.add_argument('--limit', type=int, default=5, help='matches to show (default: 5)')
    parser.add_argument('--filter', help='a filter on tag columns, as JSON: \'{"color": {"$eq": "red"}}\'')
    parser.add_argument('--json', action='store_true', help='print the matches as JSON')
    return _connection_options(parser)


def run_search(args: argparse.Namespace) -> int:
    from docarray import Document

    from clip_search.demo import print_matches

    if (args.query is None) == (args.image is None):
        raise CommandError('give a text to search for, or --image PATH (one of them)')
    try:
        search_filter = json.loads(args.filter) if args.filter else None
    except json.JSONDecodeError as exc:
        raise CommandError(f'--filter is not JSON ({exc})') from None
    if args.image is not None:
        try:
            query, label = Document(blob=Path(args.image).read_bytes()), f'<{args.image}>'
        except OSError as exc:
            raise CommandError(f'--image {args.image}: {exc.strerror or exc}') from None
    else:
        query, label = Document(text=args.query), args.query
    client = _reachable_client(args)
    result = _request(lambda: client.search([query], limit=args.limit, filter=search_filter))[0]
    if args.json:
        matches = [{'id': m.id, 'distance': m.scores['cosine'].value + 0.0, 'text': m.text or None, 'uri': m.uri or None, 'tags': dict(m.tags)} for m in result.matches]
        print(json.dumps(matches))
    else:
        print_matches(label, result, shown=args.limit)
    return 0


def status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m clip_search status', description='Documents in total and per shard.')
    parser.add_argument('--json', action='store_true', help='print the status as JSON')
    return _connection_options(parser)


def run_status(args: argparse.Namespace) -> int:
    status = _reachable_client(args, status=True)
    if args.json:
        print(json.dumps(status))
    else:
        shards = ', '.join(f'shard {s["shard"]}: {s["documents"]:,}' for s in status['shards'])
        print(f'{status["documents"]:,} documents ({shards})')
    return 0


def delete_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m clip_search delete', description='Delete documents by id.')
    parser.add_argument('ids', nargs='*', metavar='ID', help='ids to delete')
    parser.add_argument('--from', dest='from_file', help='a file of ids, one per line (- for stdin)')
    return _connection_options(parser)


def run_delete(args: argparse.Namespace) -> int:
    ids = list(args.ids)
    if args.from_file:
        try:
            lines = sys.stdin.read() if args.from_file == '-' else Path(args.from_file).read_text(encoding='utf-8')
        except OSError as exc:
            raise CommandError(f'--from {args.from_file}: {exc.strerror or exc}') from None
        ids += [line.strip() for line in lines.splitlines() if line.strip()]
    if not ids:
        raise CommandError('give the ids to delete, or --from FILE')
    client = _reachable_client(args)
    deleted = _request(lambda: client.delete(ids))
    print(f'deleted {len(deleted):,} of {len(ids):,} ids ({len(ids) - len(deleted):,} were not indexed)')
    return 0


def _reachable_client(args: argparse.Namespace, in_flight: int = IN_FLIGHT, status: bool = False):
    """A client of ``--server`` that answered a status request (or that status, with ``status``)."""
    try:
        client = Client(args.server, timeout=args.timeout, in_flight=in_flight, api_key=args.api_key)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    answer = _request(client.status, what=f'cannot reach the server at {args.server}')
    return answer if status else client


def _request(call: Callable, what: Optional[str] = None):
    """``call()``; a refusal or a connection failure becomes one line."""
    try:
        return call()
    except RequestError as exc:
        raise CommandError(exc.reason) from None
    except Exception as exc:  # ConnectionError, a timeout, jina's own errors: one line, not a traceback
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CommandError(f'{what}: {reason}' if what else reason) from None

"""One run of ``python -m clip_search index``: stream entries to /index, survive refusals, checkpoint, resume.

- A batch the server refuses naming one of its documents is sent again without it; the document
  goes to the failures file (JSONL: source, id, reason).
- The checkpoint (beside the failures file) gets a ``sent`` line before a batch is sent and an
  ``acked`` line once it is acknowledged. ``--resume`` skips the acknowledged ids, and asks the
  server (``Client.indexed``, a read-only lookup) which of the sent-but-unacknowledged ids it holds,
  so under ``/index: ANY`` no document is stored twice.
- Ctrl-C stops reading; the batches in flight are answered and checkpointed before the run ends.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

from docarray import Document, DocumentArray

from clip_search.client import Client, RequestError, _run, batches, pipeline
from clip_search.ingest import Columns, Entry, Failure, Tally, count_estimate, entries, load_ahead
from clip_search.progress import JobProgress

EXIT_OK, EXIT_REFUSED, EXIT_CANNOT_RUN, EXIT_INTERRUPTED = 0, 1, 2, 130
_NAMED_DOCUMENT = re.compile(r'''document ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")''')
_NOT_THE_DOCUMENTS_FAULT = ('embedding has shape',)  # the server's index and encoder disagree: every document would fail


class RunError(RuntimeError):
    """The run cannot go on (the server is unreachable, refuses without naming a document, ...)."""


@dataclass
class Settings:
    sources: list[str]
    columns: Columns
    texts: bool
    failures: Path
    resume: bool
    batch_size: int
    threads: int


def checkpoint_path(failures: Path) -> Path:
    """The checkpoint lives beside the failures file: ``failures.jsonl`` -> ``failures.checkpoint``."""
    return failures.with_suffix('.checkpoint')


class Checkpoint:
    """Append-only JSON lines: ``{"sent": [ids]}`` before a batch goes out, ``{"acked": [ids]}`` after."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> tuple[set[str], set[str]]:
        """The acknowledged ids, and the ids sent but never acknowledged (a crash may cut the last line)."""
        acked, sent = set(), set()
        if self.path.exists():
            for line in self.path.read_text(encoding='utf-8').splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the client died
                acked.update(record.get('acked', ()))
                sent.update(record.get('sent', ()))
        return acked, sent - acked

    @contextmanager
    def writing(self, acked: Iterable[str] = ()) -> Iterator['Checkpoint']:
        """Start the file anew, with ``acked`` (what a resumed run already knows is stored)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open('w', encoding='utf-8') as self._file:
            self._write({'acked': sorted(acked)})
            yield self

    def sent(self, ids: list[str]) -> None:
        self._write({'sent': ids})

    def acked(self, ids: list[str]) -> None:
        self._write({'acked': ids})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()  # a kill -9 of the client loses nothing flushed


def refused_document(reason: str, ids: Iterable[str]) -> Optional[str]:
    """The id of the document a refusal names, if it is one of ``ids`` (``document 'x': ...``)."""
    found = _NAMED_DOCUMENT.search(reason)
    if not found or any(phrase in reason for phrase in _NOT_THE_DOCUMENTS_FAULT):
        return None
    doc_id = ast.literal_eval(found.group(1))
    return doc_id if doc_id in set(ids) else None


class IndexRun:
    """Index ``settings.sources`` through ``client``; ``run()`` returns the exit code after printing the summary."""

    def __init__(self, client: Client, settings: Settings, out: IO, err: IO, bar: bool):
        self.client = client
        self.settings = settings
        self.out, self.err = out, err
        self.bar = bar
        self.tally = Tally()
        self.indexed = 0  # in this run
        self.before = 0  # acknowledged by an earlier run (--resume)
        self.refused = 0
        self.stop = threading.Event()
        self._sources: dict[str, str] = {}  # id -> source, for the documents in flight
        self._failures: Optional[IO] = None
        self._failing = threading.Lock()  # failures come from the reading thread and the client loop
        self._checkpoint = Checkpoint(checkpoint_path(settings.failures))

    def run(self) -> int:
        try:
            done = self._already_indexed() if self.settings.resume else set()
        except Exception as exc:  # the checkpoint stays as it was: the next --resume asks again
            reason = exc.reason if isinstance(exc, RequestError) else (str(exc).splitlines() or [type(exc).__name__])[0]
            print(f'clip-search index: cannot ask the server what the last run stored: {reason}', file=self.err)
            return EXIT_CANNOT_RUN
        self.before = len(done)
        started = time.monotonic()
        error: Optional[str] = None
        self.settings.failures.parent.mkdir(parents=True, exist_ok=True)
        with self._checkpoint.writing(done), self.settings.failures.open('w', encoding='utf-8') as self._failures:
            total = count_estimate(self.settings.sources)
            total = total - self.before if total is not None and total >= self.before else total
            with JobProgress('indexing', total, bar=self.bar, log_every=None if self.bar else 10.0, log_to=self.err) as progress:
                self._progress = progress
                with _stop_on_ctrl_c(self.stop):
                    try:
                        _run(self._stream(done))
                    except (RunError, RequestError) as exc:
                        error = str(exc)
                    except Exception as exc:  # the server went away, a timeout: one line, and the checkpoint holds
                        error = (str(exc).splitlines() or [type(exc).__name__])[0]
        self._print_summary(time.monotonic() - started)
        if error is not None:
            print(f'clip-search index: stopped: {error}; {self._resume_hint()}', file=self.err)
            return EXIT_CANNOT_RUN
        if self.stop.is_set():
            print(f'clip-search index: stopped by Ctrl-C after the batches in flight were answered; {self._resume_hint()}', file=self.err)
            return EXIT_INTERRUPTED
        return EXIT_REFUSED if self.refused else EXIT_OK

    def _already_indexed(self) -> set[str]:
        """The checkpoint's acknowledged ids, and those of its unacknowledged batches the server holds."""
        acked, unacknowledged = self._checkpoint.read()
        if unacknowledged:
            acked |= set(self.client.indexed(sorted(unacknowledged)))
        return acked

    async def _stream(self, done: set[str]) -> None:
        fresh = (entry for entry in self._entries() if entry.id not in done)
        docs = self._documents(load_ahead(fresh, threads=self.settings.threads))
        await pipeline(batches(docs, self.settings.batch_size), self._send, self._answered, self.client.in_flight)

    def _entries(self) -> Iterator[Entry]:
        for entry in entries(self.settings.sources, self.settings.columns, self.settings.texts, self.tally):
            if self.stop.is_set():
                return
            yield entry

    def _documents(self, loaded: Iterator) -> Iterator[Document]:
        for entry, doc in loaded:
            if self.stop.is_set():  # Ctrl-C: what is read ahead is not sent
                return
            if isinstance(doc, Failure):
                self._fail(doc.source, doc.id, doc.reason)
                continue
            self._sources[doc.id] = entry.source
            yield doc

    async def _send(self, batch: DocumentArray) -> tuple[list[str], list[tuple[str, str]]]:
        """Send until acknowledged, dropping each document the server refuses by name: (acked ids, refusals)."""
        self._checkpoint.sent(batch[:, 'id'])
        refusals: list[tuple[str, str]] = []
        while len(batch):
            try:
                answer = await self.client.send_batch('/index', batch)
            except RequestError as exc:
                doc_id = refused_document(exc.reason, batch[:, 'id'])
                if doc_id is None:
                    raise RunError(f'the server refused a batch: {exc.reason}') from None
                refusals.append((doc_id, exc.reason))
                batch = DocumentArray(doc for doc in batch if doc.id != doc_id)
                continue
            return answer[:, 'id'], refusals
        return [], refusals

    def _answered(self, batch: DocumentArray, answer: tuple[list[str], list[tuple[str, str]]]) -> None:
        acked, refusals = answer
        self._checkpoint.acked(acked)
        for doc_id, reason in refusals:
            self._fail(self._sources.get(doc_id, ''), doc_id, reason)
        for doc_id in batch[:, 'id']:
            self._sources.pop(doc_id, None)
        self.indexed += len(acked)
        self._progress.advance(done=len(acked))

    def _fail(self, source: str, doc_id: str, reason: str) -> None:
        with self._failing:
            self.refused += 1
            self._failures.write(json.dumps({'source': source, 'id': doc_id, 'reason': reason}) + '\n')
            self._failures.flush()
            self._progress.advance(refused=1)

    def _print_summary(self, seconds: float) -> None:
        total = self.before + self.indexed + self.refused
        refused = f' ({self.refused:,} refused: see {self.settings.failures})' if self.refused else ''
        rate = self.indexed / seconds if seconds > 0 else 0.0
        line = f'indexed {self.before + self.indexed:,} of {total:,}{refused} in {_duration(seconds)}, {rate:.0f} docs/s'
        extras = []
        if self.before:
            extras.append(f'{self.before:,} of them before --resume')
        if self.tally.skipped:
            extras.append(f'{self.tally.skipped:,} other file{"s" if self.tally.skipped != 1 else ""} skipped')
        print(line + ''.join(f'; {e}' for e in extras), file=self.out, flush=True)

    def _resume_hint(self) -> str:
        return 'run the same command with --resume to continue where it stopped'


def _duration(seconds: float) -> str:
    """``12 m 31 s`` (``1 h 2 m 3 s`` past an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes} m {secs} s' if hours else f'{minutes} m {secs} s'


@contextmanager
def _stop_on_ctrl_c(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C stops reading (the batches in flight are still answered); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

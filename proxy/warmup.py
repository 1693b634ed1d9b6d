"""``warm_up``: fill the cache from historical chat logs, as the live proxy would have filled it.

    log lines --(reader thread: JSON, local image files; proxy.history)--> logged exchanges
      --(Keyer: namespace, fingerprint, image hashes; URLs fetched under the proxy's limits)-->
      --(already cached, or on its way in this run? a duplicate)--> entries to add
      --(CPU pool: decode + verifier thumbnail)--> --(embed thread: one forward pass a batch)-->
      --(one transaction a batch: CacheStore.import_entries)--> SQL

The stages run side by side: while the embedder works on one batch, the CPU pool decodes the
next and the store commits the previous one. An entry is what the proxy would have stored for
that request and answer (complete 200 answers only; vectors and thumbnails made as the semantic
tier makes them), stamped ``created_at`` just before its batch commits, so a running proxy's
sync, which looks back from its last sync by ``created_at``, indexes it within a sync interval.
The store is opened without an index: a running proxy's index snapshot is never touched.

A batch is one transaction: a run killed at any point leaves whole entries only, and a second run
adds what is missing (what is there counts as duplicates). One bad line never stops the run: it
is skipped and reported with its file and line number. ``--ttl`` counts from when an answer was
given (a recording's ``ts``), so an answer older than it is not brought back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from PIL import Image
from tqdm import tqdm

from embeddings.errors import ImageDecodeError, ModelLoadError
from embeddings.keys import namespace_for
from embeddings.verifier import make_thumbnail
from store.cache import CacheStore
from store.errors import StoreError
from store.records import NewEntry

from .app import open_embedder
from .calls import CachedCall, Keyer
from .errors import Uncacheable
from .failures import FailureLog
from .fetch import ImageFetcher, create_fetch_session
from .history import Location, LoggedExchange, LogLines, Skip, Unreadable, count_lines
from .protocol import AnswerFacts, read_answer
from .semantic import decode_picture
from .settings import Settings
from .tally import Outcome, Tally

if TYPE_CHECKING:
    from embeddings.embedder import Embedder

log = logging.getLogger(__name__)

# Lines read and parsed in the reader thread per hand-off.
_CHUNK_LINES = 64
# Look-ups of the store at once: within its connection pool (SQLite's holds 5), since a
# connection opened beyond the pool is closed after one use (a thread and a file open each).
_LOOKUPS = 4
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def command(args: argparse.Namespace, settings: Settings) -> int:
    """``vlcache warmup FILE...``: check the arguments, run with a progress bar, report.

    Exit code 0 when the run finished (skipped lines included), 1 when lines were lost to errors
    (store or embedder failures: a rerun retries them) or the run could not start, 2 for a usage
    error.
    """
    problem = _usage_problem(args, settings)
    if problem is not None:
        print(f"vlcache warmup: error: {problem}", file=sys.stderr)
        return 2
    files: list[Path] = args.files
    try:
        total = sum(count_lines(path) for path in files)
    except OSError as exc:
        print(f"vlcache warmup: error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    with tqdm(total=total, unit="line", desc="warm-up", smoothing=0.1) as bar:
        try:
            tally = asyncio.run(
                warm_up(
                    settings,
                    files,
                    namespace=_namespace(args, settings),
                    batch=args.batch,
                    progress=bar.update,
                )
            )
        except (ModelLoadError, StoreError) as exc:
            print(f"vlcache warmup: cannot run: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("vlcache warmup: interrupted; run it again to add the rest", file=sys.stderr)
            return 130
    print(tally.text())
    if args.report_json is not None:
        try:
            args.report_json.write_bytes(orjson.dumps(tally.as_json(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            print(f"vlcache warmup: cannot write the report: {exc}", file=sys.stderr)
            return 1
    return 1 if tally.error_count else 0


def _usage_problem(args: argparse.Namespace, settings: Settings) -> str | None:
    for path in args.files:
        if not path.is_file():
            return f"no such file: {path}"
    chosen = [
        flag
        for flag, value in (
            ("--shared-namespace", settings.shared_namespace),
            ("--tenant", args.tenant),
            ("--api-key-env", args.api_key_env),
        )
        if value is not None
    ]
    if len(chosen) > 1:
        return f"{' and '.join(chosen)} name different namespaces: give one"
    if args.tenant == "":
        return "--tenant needs a name"
    if args.api_key_env is not None and not os.environ.get(args.api_key_env):
        return f"environment variable {args.api_key_env} holds no API key"
    if args.batch < 1:
        return "--batch must be at least 1"
    if args.report_json is not None and not args.report_json.parent.is_dir():
        return f"no such directory for --report-json: {args.report_json.parent}"
    return None


def _namespace(args: argparse.Namespace, settings: Settings) -> str | None:
    """The namespace named on the command line, as the proxy computes it; else None."""
    if settings.shared_namespace is not None:
        return namespace_for(None, shared=settings.shared_namespace)
    if args.tenant is not None:
        return namespace_for(None, tenant=args.tenant)
    if args.api_key_env is not None:
        # The proxy hashes the whole Authorization header, as SDKs send it: "Bearer <key>".
        key = os.environ[args.api_key_env]
        return namespace_for(key if key.lower().startswith("bearer ") else f"Bearer {key}")
    return None


async def warm_up(
    settings: Settings,
    files: Sequence[Path],
    *,
    namespace: str | None = None,
    batch: int = 32,
    embedder: Embedder | None = None,
    progress: Callable[[int], object] | None = None,
) -> Tally:
    """Import the exchanges logged in ``files`` into the store of ``settings``; what it did.

    ``namespace`` puts every line there (else a recording line's own namespace is used);
    ``embedder`` replaces loading the configured one (tests, benchmarks); ``batch`` is the most
    images of one forward pass and entries of one transaction; ``progress`` is told of every
    line done.
    """
    started = time.perf_counter()
    tally = Tally([str(f) for f in files])
    if embedder is None:
        embedder = await open_embedder(settings)
    store = await CacheStore.open(settings.database_url, memory_bytes=0, index=None)
    session = create_fetch_session(allow_private=settings.allow_private_image_urls)
    fetcher = ImageFetcher(
        session,
        max_bytes=settings.max_image_bytes,
        timeout=settings.image_fetch_timeout,
        allow_private=settings.allow_private_image_urls,
    )
    importer = _Importer(
        settings,
        store,
        Keyer(settings, fetcher),
        embedder,
        namespace=namespace,
        batch=batch,
        tally=tally,
        progress=progress,
    )
    lines = LogLines(files, max_image_bytes=settings.max_image_bytes)
    try:
        await importer.run(lines)
    finally:
        importer.close()
        await asyncio.to_thread(lines.close)
        await session.close()
        await store.close()
    tally.seconds = time.perf_counter() - started
    return tally


@dataclass(frozen=True, slots=True)
class _Pending:
    """An entry on its way to the store, with its decoded pictures and thumbnails if embedded."""

    location: Location
    entry: NewEntry
    pictures: tuple[Image.Image, ...] = ()
    thumbnails: tuple[bytes, ...] = ()
    no_vectors: tuple[str, str] | None = None  # (reason, detail): an image that did not decode


class _Importer:
    """The stages of one warm-up, wired to one store, keyer and embedder."""

    def __init__(
        self,
        settings: Settings,
        store: CacheStore,
        keyer: Keyer,
        embedder: Embedder | None,
        *,
        namespace: str | None,
        batch: int,
        tally: Tally,
        progress: Callable[[int], object] | None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyer = keyer
        self._embedder = embedder
        self._namespace = namespace
        self._batch = batch
        self._tally = tally
        self._progress = progress
        self._failures = FailureLog(log)
        # Exact keys between keying and their batch's commit: a repeat meanwhile is a duplicate.
        self._in_flight: set[str] = set()
        self._lookups = asyncio.Semaphore(_LOOKUPS)
        self._cpu_pool = ThreadPoolExecutor(
            os.cpu_count() or 2, thread_name_prefix="vlcache-cpu", initializer=_lowest_priority
        )
        self._embed_thread = ThreadPoolExecutor(1, thread_name_prefix="vlcache-embed")

    def close(self) -> None:
        """Release the worker threads (every job was awaited or abandoned by now)."""
        self._cpu_pool.shutdown(wait=False)
        self._embed_thread.shutdown(wait=False)

    async def run(self, lines: LogLines) -> None:
        """Read, key, embed and commit every line of ``lines``."""
        ready: asyncio.Queue[_Pending | None] = asyncio.Queue(self._batch)
        embedded: asyncio.Queue[list[_Pending] | None] = asyncio.Queue(1)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read_all(lines, ready))
            group.create_task(self._embed_all(ready, embedded))
            group.create_task(self._commit_all(embedded))

    def _done(
        self, outcome: Outcome, location: Location, reason: str = "", detail: str = ""
    ) -> None:
        self._tally.count(outcome, location, reason, detail)
        if self._progress is not None:
            self._progress(1)

    async def _read_all(self, lines: LogLines, ready: asyncio.Queue[_Pending | None]) -> None:
        # Lines are keyed and decoded concurrently (image URLs wait on the network, decoding on
        # the CPU pool), as many at a time as two batches.
        slots = asyncio.Semaphore(self._batch * 2)
        running: set[asyncio.Task[None]] = set()
        while chunk := await asyncio.to_thread(lines.take, _CHUNK_LINES):
            for where, item in chunk:
                if item is None:
                    self._done("blank", where)
                elif isinstance(item, Unreadable):
                    self._done("error", where, item.reason, item.detail)
                elif isinstance(item, Skip):
                    self._done("skipped", where, item.reason, item.detail)
                else:
                    await slots.acquire()
                    task = asyncio.create_task(self._prepare(where, item, ready))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(lambda _: slots.release())
        await asyncio.gather(*running)
        await ready.put(None)

    async def _prepare(
        self, where: Location, exchange: LoggedExchange, ready: asyncio.Queue[_Pending | None]
    ) -> None:
        try:
            pending = await self._pending(where, exchange)
        except Skip as skip:
            self._done("skipped", where, skip.reason, skip.detail)
            return
        except StoreError:
            self._failures.report("the store could not be read")
            self._done("error", where, "store unavailable")
            return
        except Exception as exc:  # one line's surprise must not end the run: report it
            self._failures.report("warming up a line failed")
            self._done("error", where, "unexpected failure", f"{type(exc).__name__}: {exc}")
            return
        if pending is None:
            self._done("duplicate", where)
        else:
            await ready.put(pending)

    async def _pending(self, where: Location, exchange: LoggedExchange) -> _Pending | None:
        """The entry ``exchange`` makes, decoded for embedding; None when already cached."""
        if len(exchange.request) > self._settings.max_body_bytes:
            raise Skip("request larger than --max-body-bytes")
        namespace = self._namespace or exchange.namespace
        if namespace is None:
            raise Skip("no namespace (give --shared-namespace, --tenant or --api-key-env)")
        try:
            call = await self._keyer.key(_NO_HEADERS, exchange.request, namespace=namespace)
        except Uncacheable as exc:
            raise Skip("request not cacheable", str(exc)) from None
        if call is None:
            raise Skip("request is not a chat")
        facts = read_answer(call.chat.format, exchange.answer)
        if not facts.complete:
            raise Skip('answer not complete (a finish_reason is not "stop")')
        expires_at = self._expiry(exchange)
        if expires_at is not None and expires_at <= time.time():
            raise Skip("answer older than --ttl")
        if call.exact_key in self._in_flight:
            return None
        self._in_flight.add(call.exact_key)
        try:
            pending = await self._new_entry(where, call, exchange, facts, expires_at)
        except BaseException:
            self._in_flight.discard(call.exact_key)
            raise
        if pending is None:
            self._in_flight.discard(call.exact_key)
        return pending

    def _expiry(self, exchange: LoggedExchange) -> float | None:
        """When the answer stops being servable under ``--ttl``, counted from when it was given."""
        ttl = self._settings.ttl
        if ttl is None:
            return None
        return (exchange.answered_at or time.time()) + ttl

    async def _new_entry(
        self,
        where: Location,
        call: CachedCall,
        exchange: LoggedExchange,
        facts: AnswerFacts,
        expires_at: float | None,
    ) -> _Pending | None:
        async with self._lookups:
            if await self._store.find_exact(call.exact_key) is not None:
                return None
        entry = _entry(call, exchange, facts, expires_at)
        if self._embedder is None or not call.image_data:
            return _Pending(where, entry)
        loop = asyncio.get_running_loop()
        try:
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self._cpu_pool, self._decode, d) for d in call.image_data)
            )
        except ImageDecodeError as exc:
            # As the proxy does: the exact tier still serves it, the semantic tier cannot.
            return _Pending(where, entry, no_vectors=("undecodable image", str(exc)))
        pictures, thumbnails = zip(*decoded, strict=True)
        return _Pending(where, entry, pictures, thumbnails)

    def _decode(self, data: bytes) -> tuple[Image.Image, bytes]:
        """The picture as the semantic tier decodes it, and its verifier thumbnail."""
        picture = decode_picture(data, self._settings.max_image_pixels)
        return picture, make_thumbnail(picture)

    async def _embed_all(
        self, ready: asyncio.Queue[_Pending | None], out: asyncio.Queue[list[_Pending] | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        finished = False
        while not finished:
            batch: list[_Pending] = []
            pictures: list[Image.Image] = []
            while len(pictures) < self._batch and len(batch) < self._batch:
                item = await ready.get()
                if item is None:
                    finished = True
                    break
                batch.append(item)
                pictures.extend(item.pictures)
            if pictures:
                try:
                    vectors = await loop.run_in_executor(self._embed_thread, self._embed, pictures)
                except Exception:  # the embedder failed on this batch: its lines are errors
                    self._failures.report("embedding a batch failed")
                    for item in batch:
                        if item.pictures:
                            self._in_flight.discard(item.entry.exact_key)
                            self._done("error", item.location, "embedder failed")
                    batch = [item for item in batch if not item.pictures]
                else:
                    batch = self._with_vectors(batch, vectors)
            if batch:
                await out.put(batch)
        await out.put(None)

    def _embed(self, pictures: list[Image.Image]) -> np.ndarray:
        embedder = self._embedder
        assert embedder is not None
        step = self._batch
        return np.concatenate(
            [embedder.embed(pictures[i : i + step]) for i in range(0, len(pictures), step)]
        )

    def _with_vectors(self, batch: list[_Pending], vectors: np.ndarray) -> list[_Pending]:
        """``batch`` with its images' vectors and thumbnails (decoded pictures let go)."""
        embedder = self._embedder
        assert embedder is not None
        done = []
        row = 0
        for item in batch:
            entry = item.entry
            if item.pictures:
                rows = vectors[row : row + len(item.pictures)]
                entry = entry.with_vectors(embedder.id, rows, item.thumbnails)
                row += len(item.pictures)
            done.append(_Pending(item.location, entry, no_vectors=item.no_vectors))
        return done

    async def _commit_all(self, batches: asyncio.Queue[list[_Pending] | None]) -> None:
        while (batch := await batches.get()) is not None:
            # Stamped now, not when keyed: a running proxy's sync looks back from its last sync.
            stamped = time.time()
            entries = [dataclasses.replace(item.entry, created_at=stamped) for item in batch]
            try:
                added = await self._store.import_entries(entries)
            except StoreError:
                self._failures.report("a batch could not be committed")
                for item in batch:
                    self._done("error", item.location, "store unavailable")
                continue
            finally:
                for item in batch:
                    self._in_flight.discard(item.entry.exact_key)
            new = {entry.entry_id for entry in added}
            for item in batch:
                if item.entry.entry_id not in new:
                    self._done("duplicate", item.location)
                elif item.no_vectors is not None:
                    self._done("imported", item.location, *item.no_vectors)
                else:
                    self._done("imported", item.location)


def _lowest_priority() -> None:
    """Make this CPU-pool thread yield to the embedder's (Linux nice values are per thread).

    The embedder's OpenMP team waits for its slowest thread: a decode that preempts one of them
    stalls the whole forward pass. At the lowest priority, decoding fills the moments the team
    leaves a core free (its single-threaded preprocessing, its waits) and still runs when the
    embedder waits for it. Measured on 2 cores with EfficientNet-Lite0: warm-up went from ~88%
    to ~96% of the embedder's own throughput. A co-located ``vlcache serve`` is spared too.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _entry(
    call: CachedCall, exchange: LoggedExchange, facts: AnswerFacts, expires_at: float | None
) -> NewEntry:
    """The entry the proxy would have stored for this call and answer (without vectors)."""
    return call.entry(
        status=exchange.status,
        content_type=exchange.content_type,
        body=exchange.answer,
        prompt_tokens=facts.prompt_tokens,
        completion_tokens=facts.completion_tokens,
        upstream_ms=exchange.upstream_ms,
        expires_at=expires_at,
    )

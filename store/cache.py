"""``CacheStore``: the one async facade over the database, a memory tier and one writer.

Reads go to a bounded in-memory map first (recently stored or served answers), then to SQL.
Writes never hold up a response: ``add`` makes the answer visible in memory at once and queues
its rows for a single writer task, which commits them in batches together with the buffered hit
counters and ledger increments (every ``flush_interval`` seconds). SQL stays the source of truth:
a restart loses at most the counters of the last interval, never a committed entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import claims, maintenance, reports
from .database import create_engine, sqlite_path, upgrade_schema
from .errors import MigrationError, StoreUnavailable
from .index import Candidate
from .ledger import Ledger
from .maintenance import MaintenanceReport, Retention
from .memory import MemoryAnswers
from .models import Entry, EntryImage
from .records import NewEntry, StoredAnswer
from .vectors import IndexConfig, VectorKeeper

log = logging.getLogger(__name__)

T = TypeVar("T")

_EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
_RANDOM_BITS = 22
_WRITE_BATCH = 128
_MAX_PENDING_WRITES = 10_000
_WRITE_LINGER = 0.1  # seconds a new entry waits for others to share its commit
_CLAIM_POLL = 0.05  # seconds between a follower's looks for the claimed answer
# How far a sync looks back past the previous one: rows are stamped when answered and committed
# up to a few seconds later (embedding within --embed-timeout, write batching), and the clocks of
# other hosts may differ a little. Most syncs look back SYNC_RECENT; one every SYNC_FULL_EVERY
# seconds looks back SYNC_SLACK, for rows later or more skewed than that. A row written elsewhere
# is read ~(SYNC_RECENT + interval) / interval + SYNC_SLACK / SYNC_FULL_EVERY times, not ~60.
SYNC_SLACK = 30.0
SYNC_RECENT = 5.0
SYNC_FULL_EVERY = 15.0


def new_entry_id() -> int:
    """A positive 63-bit id: milliseconds since 2025 then 22 random bits (time-ordered)."""
    millis = int(time.time() * 1000) - _EPOCH_MS
    return (millis << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)


class Synced(NamedTuple):
    """What one sync found written elsewhere."""

    # Live rows read: other processes' in the look-back (ours too after a write of ours failed).
    created: int
    indexed: int  # of those, entries added to the vector index
    withdrawn: int  # entries deleted elsewhere, dropped from the index and the memory tier


class CacheStore:
    """Async facade over one database: exact lookups, new entries, hit and ledger counters."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        memory_bytes: int,
        flush_interval: float,
        vectors: VectorKeeper | None = None,
        snapshot_interval: float = 300.0,
        sync_interval: float = 1.0,
        retention: Retention | None = None,
        url: str | None = None,
    ) -> None:
        self._engine = engine
        self._url = url
        self._sqlite_file = sqlite_path(url) if url is not None else None
        self._sqlite_identity: tuple[int, int] | None = None  # read by ``open``
        self._failing = 0  # store failures in a row (logged once per burst)
        self.on_failure: Callable[[], None] | None = None  # counts a store failure (metrics)
        self._retention = retention or Retention()
        self._last_maintenance = time.monotonic()
        self.maintained = MaintenanceReport()  # totals since start (metrics)
        # Claims on identical misses (cross-process coalescing): who we are, what we hold.
        self.owner = secrets.token_hex(16)
        self._claimed: set[str] = set()
        self._storing_claims: set[str] = set()
        self._claim_lease = 10.0
        self._last_renewal = time.monotonic()
        self._sync_interval = sync_interval
        # The writer wakes at least this often: counters are flushed and the sync runs on time.
        self._tick = min(flush_interval, sync_interval)
        self._last_sync = time.monotonic()
        self._last_full_sync = -SYNC_FULL_EVERY  # the first sync looks back all the way
        self._synced_to = time.time()
        # When a write of ours last failed: its transaction may have committed all the same, so
        # syncs read our own rows too while that moment is inside their look-back.
        self._doubtful_write = 0.0
        self._vectors = vectors
        self._snapshot_interval = snapshot_interval
        self._last_snapshot = time.monotonic()
        self._memory = MemoryAnswers(memory_bytes)
        # Hashes of every exact key SQL may hold an entry under (loaded by ``open``, kept up to
        # date by this process's writes and by the sync): a key not in it is a miss without a
        # query. A hash collision only costs the query; ~70 bytes per entry.
        self._known: set[int] | None = None
        # False from a failed query to the next good one: while the database is unreachable,
        # look-ups query it anyway, so callers learn it is down (and fail open).
        self._reachable = True
        self._ledger = Ledger()
        self._pending: asyncio.Queue[NewEntry] = asyncio.Queue(_MAX_PENDING_WRITES)
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self._closing = False
        self._flushing = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        memory_bytes: int = 64 << 20,
        flush_interval: float = 1.0,
        snapshot_interval: float = 300.0,
        sync_interval: float = 1.0,
        retention: Retention | None = None,
        index: IndexConfig | None = None,
    ) -> CacheStore:
        """Connect to ``url``, migrate the schema, load the vector index, start the writer."""
        await upgrade_schema(url)
        # Building an engine touches the file system (SQLite paths): keep it off the loop.
        engine = await asyncio.to_thread(create_engine, url)
        vectors = None
        if index is not None:
            vectors = VectorKeeper(engine, index)
            try:
                await vectors.open()
            except BaseException:
                await vectors.close()
                await engine.dispose()
                raise
        store = cls(
            engine,
            memory_bytes=memory_bytes,
            flush_interval=flush_interval,
            vectors=vectors,
            snapshot_interval=snapshot_interval,
            sync_interval=sync_interval,
            retention=retention,
            url=url,
        )
        if store._sqlite_file is not None:
            store._sqlite_identity = await asyncio.to_thread(_file_identity, store._sqlite_file)
        store._known = await store._load_known_keys()
        store._writer = asyncio.create_task(store._write_forever(), name="vlcache-store-writer")
        return store

    @property
    def memory_bytes(self) -> int:
        """Bytes of answers held in the memory tier."""
        return self._memory.bytes

    @property
    def vectors(self) -> VectorKeeper | None:
        """The vector index keeper, when a semantic tier is configured."""
        return self._vectors

    async def close(self) -> None:
        """Write everything pending, stop the writer and release connections."""
        # The writer is asked to stop, never cancelled: a write cut off mid-transaction would
        # lose the entries it had taken from the queue.
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        try:
            await self.flush()
            if self._claimed:  # followers elsewhere need not wait for these leases to run out
                held = sorted(self._claimed)
                await self._run(lambda conn: claims.drop(conn, held, self.owner))
        except StoreUnavailable:
            log.exception("pending writes lost at close")
        if self._vectors is not None:
            await self._vectors.close()
        await self._engine.dispose()

    async def find_exact(self, exact_key: str) -> StoredAnswer | None:
        """The newest live answer stored under ``exact_key``, or None."""
        now = time.time()
        answer = self._memory.get(exact_key)
        if answer is not None:
            if answer.expires_at is None or answer.expires_at > now:
                return answer
            self._memory.discard(exact_key)
        if self._reachable and self._known is not None and hash(exact_key) not in self._known:
            return None  # SQL holds no entry under this key: no query for a novel question
        row = await self._run(lambda conn: _first(conn, _BY_EXACT_KEY, {"key": exact_key}))
        if row is None:
            return None
        answer = StoredAnswer(*row)
        self._memory.put(exact_key, answer)
        return answer

    async def answer_by_id(self, entry_id: int) -> StoredAnswer | None:
        """The live answer of entry ``entry_id``, or None (deleted, expired or unknown)."""
        row = await self._run(lambda conn: _first(conn, _BY_ID, {"entry_id": entry_id}))
        return None if row is None else StoredAnswer(*row)

    def has_similar_group(self, namespace: str, fingerprint: str, images: int) -> bool:
        """True when the semantic tier holds entries for this question and image count."""
        return self._vectors is not None and self._vectors.has_group(namespace, fingerprint, images)

    async def find_similar(
        self, namespace: str, fingerprint: str, vectors: np.ndarray, threshold: float
    ) -> list[Candidate]:
        """Entries of this question whose every image reaches ``threshold``, best first."""
        if self._vectors is None:
            return []
        return await self._vectors.search(namespace, fingerprint, vectors, threshold)

    async def thumbnails(self, entry_id: int) -> list[bytes | None]:
        """The verifier thumbnails of an entry's images, by position."""
        query = (
            select(EntryImage.thumbnail)
            .where(EntryImage.entry_id == entry_id)
            .order_by(EntryImage.position)
        )
        rows = await self._run(lambda conn: _all(conn, query))
        return [row.thumbnail for row in rows]

    def hold(self, entry: NewEntry) -> None:
        """Serve ``entry`` from memory (exact tier) before it is added (while it is embedded)."""
        self._memory.put(entry.exact_key, entry.answer())
        self._know(entry.exact_key)

    def add(self, entry: NewEntry) -> StoredAnswer | None:
        """Make ``entry`` servable now and queue its rows; None if the write queue is full."""
        try:
            self._pending.put_nowait(entry)
        except asyncio.QueueFull:
            log.warning("store write queue full (%d): answer not cached", _MAX_PENDING_WRITES)
            # Stop renewing its claim, if any: followers take over when the lease runs out.
            self._storing_claims.discard(entry.exact_key)
            self._claimed.discard(entry.exact_key)
            return None
        answer = entry.answer()
        self._memory.put(entry.exact_key, answer)
        self._know(entry.exact_key)
        # Semantic visibility needs the commit (candidates are read back from SQL): an entry with
        # vectors is written at once. Others linger a moment so a burst of misses costs one
        # commit, not one each (the memory tier serves them meanwhile), yet other processes on
        # the database see them well within a second.
        if any(image.embedding is not None for image in entry.images) or (
            self._pending.qsize() >= _WRITE_BATCH
        ):
            self._wake.set()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(_WRITE_LINGER, self._wake.set)
        return answer

    async def import_entries(self, entries: Sequence[NewEntry]) -> list[NewEntry]:
        """Commit ``entries`` whose exact key holds no live answer yet; returns those added.

        One transaction per call: after a crash either the whole batch is there or none of it,
        and a second run skips what the first committed (warm-up is idempotent and resumable).
        The entries reach this process's index at once and other processes' at their next sync.
        """
        if not entries:
            return []
        keys = list({entry.exact_key for entry in entries})

        async def work(conn: AsyncConnection) -> tuple[list[NewEntry], list[int]]:
            present = await conn.execute(
                select(Entry.exact_key).where(Entry.exact_key.in_(keys), Entry.deleted.is_(False))
            )
            taken = {row.exact_key for row in present}
            fresh: list[NewEntry] = []
            for entry in entries:
                if entry.exact_key not in taken:
                    taken.add(entry.exact_key)
                    fresh.append(entry)
            return fresh, await _insert_entries(conn, fresh, self.owner)

        try:
            added, retired = await self._run(work)
        except StoreUnavailable:
            self._doubtful_write = time.time()
            raise
        for entry in added:
            self._know(entry.exact_key)
        if self._vectors is not None:
            await self._vectors.add(added)
            await self._vectors.remove(retired)
        return added

    async def ping(self) -> None:
        """Reach the database once (``StoreUnavailable`` when it cannot be reached)."""
        await self._run(lambda conn: conn.execute(select(1)))

    async def claim(self, exact_key: str, lease: float) -> bool:
        """Claim an identical miss for this process; False when another holds a live claim.

        The claim is renewed while held and dropped in the transaction that stores the entry.
        """
        self._claim_lease = lease
        now = time.time()
        won = await self._run(lambda conn: claims.take(conn, exact_key, self.owner, now, lease))
        if won:
            self._claimed.add(exact_key)
        return won

    async def release(self, exact_key: str) -> None:
        """Give a claim up without storing anything (error, uncacheable answer, semantic hit)."""
        if exact_key not in self._claimed:
            return
        self._claimed.discard(exact_key)
        await self._run(lambda conn: claims.drop(conn, [exact_key], self.owner))

    def storing_claimed(self, exact_key: str) -> None:
        """The entry of this claim is on its way: its commit will drop the claim."""
        self._storing_claims.add(exact_key)

    async def await_claimed(self, exact_key: str) -> StoredAnswer | None:
        """The answer another process is producing under its claim, or None once the claim is
        gone without one (nothing to store) or its lease ran out (its holder died).

        A live holder renews its lease, so this waits as long as that process's upstream call.
        """
        while True:
            await asyncio.sleep(_CLAIM_POLL)

            async def look(conn: AsyncConnection) -> tuple[float | None, Any]:
                # The claim first: its row goes in the same commit that adds the entry.
                expires = await claims.state(conn, exact_key)
                return expires, await _first(conn, _BY_EXACT_KEY, {"key": exact_key})

            expires, row = await self._run(look)
            if row is not None:
                answer = StoredAnswer(*row)
                self._memory.put(exact_key, answer)
                return answer
            if expires is None or expires < time.time():
                return None

    async def ledger_report(self, since_hour: int) -> reports.LedgerReport:
        """Ledger sums overall, per model and per hour since ``since_hour``."""
        return await self._run(lambda conn: reports.ledger_report(conn, since_hour))

    async def entry_totals(self) -> tuple[int, int]:
        """(live entries, their bytes)."""
        return await self._run(reports.entry_totals)

    async def top_entries(self, limit: int = 10) -> list[reports.EntrySummary]:
        """Live entries with the most hits (counters as of the last flush)."""
        return await self._run(lambda conn: reports.top_entries(conn, limit))

    async def list_entries(
        self, where: reports.EntryFilter, *, limit: int = 50, before_id: int | None = None
    ) -> list[reports.EntrySummary]:
        """Live entries matching ``where``, newest first (``before_id``: the next page)."""
        return await self._run(
            lambda conn: reports.list_entries(conn, where, limit=limit, before_id=before_id)
        )

    async def entry(self, entry_id: int) -> reports.EntryDetail | None:
        """One live entry in full."""
        return await self._run(lambda conn: reports.entry_detail(conn, entry_id))

    async def thumbnail(self, entry_id: int, position: int) -> bytes | None:
        """The verifier thumbnail stored for one image of a live entry."""
        return await self._run(lambda conn: reports.thumbnail(conn, entry_id, position))

    async def delete(self, entry_id: int) -> bool:
        """Delete one entry (tombstone, memory tier, index); False when it was not live."""
        return await self._tombstone([Entry.id == entry_id]) > 0

    async def purge(self, where: reports.EntryFilter) -> int:
        """Delete every live entry ``where`` selects; returns how many."""
        if where.empty:
            raise ValueError("a purge needs at least one condition")
        return await self._tombstone(where.conditions())

    async def _tombstone(self, conditions: list[Any]) -> int:
        # Entries still queued for writing must be in SQL first, or they would outlive the purge.
        await self.flush()
        statement = (
            update(Entry)
            .where(Entry.deleted.is_(False), *conditions)
            .values(deleted=True, deleted_at=time.time())
            .returning(Entry.id, Entry.exact_key)
            .execution_options(synchronize_session=False)
        )
        rows = await self._run(lambda conn: _all(conn, statement))
        for row in rows:
            held = self._memory.get(row.exact_key)
            if held is not None and held.entry_id == row.id:
                self._memory.discard(row.exact_key)
        if self._vectors is not None:
            await self._vectors.remove(row.id for row in rows)
        return len(rows)

    def _know(self, exact_key: str) -> None:
        if self._known is not None:
            self._known.add(hash(exact_key))

    def record(
        self,
        outcome: str,
        namespace: str,
        model: str,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float = 0.0,
        time_ms: float = 0.0,
        entry_id: int | None = None,
    ) -> None:
        """Count one request outcome (and the served entry's hit) for the next flush."""
        self._ledger.add(
            outcome,
            namespace,
            model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            time_ms=time_ms,
            entry_id=entry_id,
        )

    async def flush(self) -> None:
        """Commit queued entries and buffered counters now."""
        # One flush at a time: counters of an entry must never reach SQL before its row.
        async with self._flushing:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        batch: list[NewEntry] = []
        while not self._pending.empty():
            batch.append(self._pending.get_nowait())
        await self._write_entries(batch)
        counters = self._ledger.take()
        if counters.empty:
            return
        try:
            await self._run(counters.write)
        except StoreUnavailable:
            self._ledger.restore(counters)
            raise

    async def _write_forever(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick)
            self._wake.clear()
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            try:
                await self._reopen_if_replaced()
                await self.flush()
                await self._sync_if_due()
                await self._renew_claims_if_due()
                await self._maintain_if_due()
                await self._snapshot_if_due()
            except StoreUnavailable as exc:
                self._failed(f"store write failed, will retry every {self._tick:g} s: {exc}")
            else:
                if self._failing:
                    log.warning("store writes resumed after %d failed attempts", self._failing)
                    self._failing = 0

    def _failed(self, message: str) -> None:
        """Count a failure of the store; log the first of a burst (the rest are counted)."""
        self._failing += 1
        if self.on_failure is not None:
            self.on_failure()
        if self._failing == 1:
            log.error("%s", message)

    async def _reopen_if_replaced(self) -> None:
        """Notice a SQLite file deleted or replaced under the running store, and open the new one.

        Pooled connections would otherwise go on writing to the unlinked file, and everything
        cached from then on would be gone at the next start.
        """
        if self._sqlite_file is None or self._url is None:
            return
        identity = await asyncio.to_thread(_file_identity, self._sqlite_file)
        if identity == self._sqlite_identity:
            return
        self._failed(
            f"the database file {self._sqlite_file} was deleted or replaced: "
            "starting on a fresh one (what it held is gone)"
        )
        await self._engine.dispose()
        try:
            await upgrade_schema(self._url)
        except MigrationError as exc:
            raise StoreUnavailable(f"cannot make a new database file: {exc}") from exc
        self._sqlite_identity = await asyncio.to_thread(_file_identity, self._sqlite_file)
        self._memory.clear()
        self._known = set()
        if self._vectors is not None:
            await self._vectors.rebuild()

    async def _load_known_keys(self) -> set[int]:
        known: set[int] = set()
        try:
            async with self._engine.connect() as conn:
                rows = await conn.stream(_LIVE_KEYS.execution_options(yield_per=10_000))
                async for row in rows:
                    known.add(hash(row.exact_key))
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return known

    async def sync(self) -> Synced:
        """Follow what other processes changed in SQL.

        Entries written elsewhere (warm-up, other replicas) join the index; entries deleted
        elsewhere leave it and the memory tier. Looks back ``SYNC_RECENT`` seconds past the
        previous sync (``SYNC_SLACK`` every ``SYNC_FULL_EVERY`` seconds), for rows committed after
        the moment they were stamped with. Rows this process wrote are skipped (it indexed them
        when it wrote them), unless a write of it failed inside the look-back: that commit may
        have landed all the same.
        """
        started = time.time()
        full = time.monotonic() - self._last_full_sync >= SYNC_FULL_EVERY
        since = self._synced_to - (SYNC_SLACK if full else SYNC_RECENT)
        gone = await self._run(lambda conn: _all(conn, _DELETED_SINCE, {"since": since}))
        for row in gone:
            held = self._memory.get(row.exact_key)
            if held is not None and held.entry_id == row.id:
                self._memory.discard(row.exact_key)
        created = _CREATED_SINCE if self._doubtful_write >= since else _CREATED_ELSEWHERE_SINCE
        params = {"since": since, "me": self.owner}
        fresh = await self._run(lambda conn: _all(conn, created, params))
        if self._known is not None:
            self._known.update(hash(row.exact_key) for row in fresh)
        added = 0
        if self._vectors is not None:
            embedded = (row.id for row in fresh if row.image_count)
            added = await self._vectors.add_from_sql(self._vectors.missing(embedded))
            await self._vectors.remove(row.id for row in gone)
        self._synced_to = started
        if full:
            self._last_full_sync = time.monotonic()
        return Synced(len(fresh), added, len(gone))

    async def _renew_claims_if_due(self) -> None:
        if not self._claimed or time.monotonic() - self._last_renewal < self._claim_lease / 3:
            return
        self._last_renewal = time.monotonic()
        held = sorted(self._claimed)
        until = time.time() + self._claim_lease
        await self._run(lambda conn: claims.renew(conn, held, self.owner, until))

    async def _sync_if_due(self) -> None:
        if time.monotonic() - self._last_sync < self._sync_interval:
            return
        self._last_sync = time.monotonic()
        synced = await self.sync()
        if synced.indexed or synced.withdrawn:
            log.info(
                "sync: %d entries indexed, %d withdrawn (written elsewhere)",
                synced.indexed,
                synced.withdrawn,
            )

    async def maintain(self) -> MaintenanceReport:
        """Expire, evict over the size budget (least recently hit first), vacuum old tombstones.

        Works in chunks of ``maintenance.CHUNK`` rows, each its own short transaction, so
        requests and the writer are never held up for long.
        """
        report = MaintenanceReport()
        now = time.time()
        while expired := await self._run(lambda conn: maintenance.expired_ids(conn, now)):
            report.expired += await self._tombstone([Entry.id.in_(expired)])
        retention = self._retention
        if retention.max_entries is not None or retention.max_bytes is not None:
            while over := await self._run(
                lambda conn: maintenance.over_budget_ids(conn, retention)
            ):
                report.evicted += await self._tombstone([Entry.id.in_(over)])
        while vacuumed := await self._run(
            lambda conn: maintenance.vacuum(conn, now, retention.vacuum_after)
        ):
            report.vacuumed += vacuumed
        return report

    async def _maintain_if_due(self) -> None:
        if time.monotonic() - self._last_maintenance < self._retention.interval:
            return
        self._last_maintenance = time.monotonic()
        report = await self.maintain()
        if not report.empty:
            log.info(
                "maintenance: %d expired, %d evicted over the size budget, %d rows vacuumed",
                report.expired,
                report.evicted,
                report.vacuumed,
            )
        self.maintained.merge(report)

    async def _snapshot_if_due(self) -> None:
        if self._vectors is None:
            return
        if time.monotonic() - self._last_snapshot < self._snapshot_interval:
            return
        self._last_snapshot = time.monotonic()
        await self._vectors.save()

    async def _write_entries(self, batch: list[NewEntry]) -> None:
        for start in range(0, len(batch), _WRITE_BATCH):
            chunk = batch[start : start + _WRITE_BATCH]
            settled = [e.exact_key for e in chunk if e.exact_key in self._storing_claims]

            async def write(
                conn: AsyncConnection, chunk: list[NewEntry] = chunk, settled: list[str] = settled
            ) -> list[int]:
                retired = await _insert_entries(conn, chunk, self.owner)
                if settled:
                    await claims.drop(conn, settled, self.owner)
                return retired

            try:
                retired = await self._run(write)
            except StoreUnavailable:
                # The answers were only ever promised by the memory tier: withdraw them, so
                # nothing is served that SQL does not hold once this process restarts. If the
                # commit landed after all, the sync finds them.
                self._doubtful_write = time.time()
                for entry in chunk:
                    self._memory.discard(entry.exact_key)
                raise
            for key in settled:
                self._storing_claims.discard(key)
                self._claimed.discard(key)
            if self._vectors is not None:
                await self._vectors.add(chunk)
                await self._vectors.remove(retired)

    async def _run(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        try:
            async with self._engine.begin() as conn:
                result = await work(conn)
        except (SQLAlchemyError, OSError) as exc:
            self._reachable = False
            raise StoreUnavailable(str(exc)) from exc
        self._reachable = True
        return result


def _answer_query() -> Any:
    """Live (not deleted, not expired) answers; callers add the key condition."""
    return (
        select(
            Entry.id,
            Entry.status,
            Entry.content_type,
            Entry.body,
            Entry.model,
            Entry.prompt_tokens,
            Entry.completion_tokens,
            Entry.upstream_ms,
            Entry.created_at,
            Entry.expires_at,
        )
        .where(Entry.deleted.is_(False))
        .where(
            Entry.expires_at.is_(None) | (Entry.expires_at > bindparam("now", callable_=time.time))
        )
    )


# Built once: composing a statement per request costs SQLAlchemy a new cache key every time.
_BY_EXACT_KEY = (
    _answer_query()
    .where(Entry.exact_key == bindparam("key"))
    .order_by(Entry.created_at.desc())
    .limit(1)
)
_BY_ID = _answer_query().where(Entry.id == bindparam("entry_id"))
_DELETED_SINCE = select(Entry.id, Entry.exact_key).where(
    Entry.deleted.is_(True), Entry.deleted_at >= bindparam("since")
)
_CREATED_SINCE = select(Entry.id, Entry.exact_key, Entry.image_count).where(
    Entry.created_at >= bindparam("since"), Entry.deleted.is_(False)
)
# The same, less the rows this process wrote (it knows them already).
_CREATED_ELSEWHERE_SINCE = _CREATED_SINCE.where(Entry.origin.is_distinct_from(bindparam("me")))
_LIVE_KEYS = select(Entry.exact_key).where(Entry.deleted.is_(False))


async def _first(conn: AsyncConnection, query: Any, params: dict[str, Any] | None = None) -> Any:
    return (await conn.execute(query, params)).first()


async def _all(
    conn: AsyncConnection, query: Any, params: dict[str, Any] | None = None
) -> list[Any]:
    return list((await conn.execute(query, params)).all())


async def _insert_entries(conn: AsyncConnection, batch: list[NewEntry], origin: str) -> list[int]:
    """Insert ``batch`` as written by ``origin``; returns the ids of older entries it retired."""
    if not batch:
        return []
    await conn.execute(insert(Entry), [e.entry_row(origin) for e in batch])
    images = [row for e in batch for row in e.image_rows()]
    if images:
        await conn.execute(insert(EntryImage), images)
    # A refreshed answer (Cache-Control: no-cache) retires every older one under its exact key:
    # one statement per batch, keeping only the newest entry of each key.
    newest: dict[str, NewEntry] = {}
    for entry in batch:
        if entry.exact_key not in newest or entry.created_at >= newest[entry.exact_key].created_at:
            newest[entry.exact_key] = entry
    result = await conn.execute(
        update(Entry)
        .where(Entry.exact_key.in_(list(newest)), Entry.deleted.is_(False))
        .where(Entry.id.not_in([e.entry_id for e in newest.values()]))
        .where(Entry.created_at <= max(e.created_at for e in newest.values()))
        .values(deleted=True, deleted_at=time.time())
        .returning(Entry.id)
    )
    retired = [row.id for row in result]
    return retired


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it does not exist."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino

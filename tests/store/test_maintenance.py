"""Maintenance against real SQLite and PostgreSQL: expiry, eviction by LRU, vacuum."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from sqlalchemy import func, select

from store.cache import CacheStore
from store.maintenance import Retention
from store.models import Entry, EntryImage
from store.reports import EntryFilter
from tests.store.test_vectors import config, entry


async def count(store: CacheStore, model: type, *where: object) -> int:
    query = select(func.count()).select_from(model).where(*where)
    async with store._engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def live_ids(store: CacheStore) -> set[int]:
    return {row.id for row in await store.list_entries(EntryFilter(), limit=100)}


async def test_expired_entries_are_tombstoned_and_leave_the_index(
    db_url: str, tmp_path: Path
) -> None:
    store = await CacheStore.open(db_url, flush_interval=60, index=config(tmp_path))
    try:
        store.add(entry(1))
        store.add(dataclasses.replace(entry(2), expires_at=time.time() + 0.2))
        await store.flush()
        assert store.vectors is not None and store.vectors.size == 2
        assert (await store.maintain()).expired == 0
        await asyncio.sleep(0.25)
        assert await store.find_exact("exact-2") is None  # never served once expired
        report = await store.maintain()
        assert (report.expired, report.evicted) == (1, 0)
        assert store.vectors.size == 1
        assert await store.find_exact("exact-1") is not None
        assert await count(store, Entry, Entry.deleted.is_(True)) == 1
    finally:
        await store.close()


async def test_eviction_takes_the_least_recently_hit_first(db_url: str, tmp_path: Path) -> None:
    store = await CacheStore.open(
        db_url, flush_interval=60, index=config(tmp_path), retention=Retention(max_entries=3)
    )
    try:
        entries = [entry(seed) for seed in range(10, 15)]  # oldest first
        for e in entries:
            store.add(e)
        await store.flush()
        # The oldest entry was hit just now: it is the most recently used.
        store.record("hit_exact", "key:tenant", "m", entry_id=entries[0].entry_id)
        await store.flush()
        report = await store.maintain()
        # 5 live over a budget of 3: evicted down to 95% of the budget (2), with headroom.
        assert report.evicted == 3
        assert await live_ids(store) == {entries[0].entry_id, entries[4].entry_id}
        assert store.vectors is not None and store.vectors.size == 2
        assert (await store.maintain()).evicted == 0  # under budget now
    finally:
        await store.close()


async def test_byte_budget_then_vacuum_after_the_grace_period(db_url: str, tmp_path: Path) -> None:
    store = await CacheStore.open(
        db_url,
        flush_interval=60,
        index=config(tmp_path),
        retention=Retention(max_bytes=500, vacuum_after=0.1),
    )
    try:
        for seed in range(20, 26):
            store.add(entry(seed))
        await store.flush()
        total, size = await store.entry_totals()
        per_entry = size // total
        report = await store.maintain()
        kept, kept_bytes = await store.entry_totals()
        assert kept_bytes <= 500 * 0.95 < kept_bytes + per_entry  # no more evicted than needed
        assert 0 < kept < total
        assert report.evicted == total - kept
        assert report.vacuumed == 0  # tombstones stay a while, so other replicas see them
        await asyncio.sleep(0.15)
        assert (await store.maintain()).vacuumed == report.evicted
        assert await count(store, Entry, Entry.deleted.is_(True)) == 0
        assert await count(store, EntryImage) == kept
    finally:
        await store.close()

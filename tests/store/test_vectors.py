"""The semantic index kept in step with SQL: live adds, snapshot, catch-up, rebuild."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from store import cache
from store.cache import CacheStore, Synced, new_entry_id
from store.errors import StoreUnavailable
from store.models import Entry, EntryImage
from store.records import NewEntry, NewImage
from store.reports import EntryFilter
from store.vectors import IndexConfig

DIM = 32
EMBEDDER = "test/random-32"


def vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry(
    seed: int, *, fingerprint: str = "q1", key: str | None = None, age: float = 0.0
) -> NewEntry:
    image = NewImage(0, f"{seed:064d}", 100, EMBEDDER, vector(seed).tobytes(), b"thumb%d" % seed)
    return NewEntry(
        entry_id=new_entry_id(),
        namespace="key:tenant",
        fingerprint=fingerprint,
        exact_key=key or f"exact-{seed}",
        model="m",
        request_format="openai",
        question="what is it?",
        images=(image,),
        status=200,
        content_type="application/json",
        body=b'{"seed": %d}' % seed,
        prompt_tokens=10,
        completion_tokens=5,
        upstream_ms=800.0,
        created_at=time.time() - age,
    )


def config(tmp_path: Path) -> IndexConfig:
    return IndexConfig(EMBEDDER, DIM, tmp_path / "snap" / "index.npz", approx_rows=1000)


async def test_committed_entries_become_searchable_with_thumbnails(
    db_url: str, tmp_path: Path
) -> None:
    store = await CacheStore.open(db_url, flush_interval=60, index=config(tmp_path))
    try:
        first = entry(1)
        store.add(first)
        store.add(entry(2))
        await store.flush()
        assert store.has_similar_group("key:tenant", "q1", 1)
        assert not store.has_similar_group("key:tenant", "q1", 2)
        assert not store.has_similar_group("key:other", "q1", 1)
        (hit,) = await store.find_similar("key:tenant", "q1", vector(1)[None, :], 0.99)
        assert hit.entry_id == first.entry_id
        assert await store.thumbnails(first.entry_id) == [b"thumb1"]
        answer = await store.answer_by_id(first.entry_id)
        assert answer is not None and answer.body == b'{"seed": 1}'
    finally:
        await store.close()


async def test_restart_loads_snapshot_and_catches_up_with_other_writers(
    db_url: str, tmp_path: Path
) -> None:
    store = await CacheStore.open(db_url, flush_interval=60, index=config(tmp_path))
    kept = entry(10)
    store.add(kept)
    await store.close()  # writes the snapshot
    assert config(tmp_path).snapshot.exists()

    # Another process (a warm-up, a replica) adds and refreshes entries behind our back.
    other = await CacheStore.open(db_url, flush_interval=60)
    late = entry(11, fingerprint="q2")
    other.add(late)
    refreshed = entry(12, key="exact-10")  # same exact key as `kept`: retires it
    other.add(refreshed)
    await other.close()

    store = await CacheStore.open(db_url, flush_interval=60, index=config(tmp_path))
    try:
        assert (await store.find_similar("key:tenant", "q2", vector(11)[None, :], 0.99))[
            0
        ].entry_id == late.entry_id
        assert await store.find_similar("key:tenant", "q1", vector(10)[None, :], 0.99) == []
        keeper = store.vectors
        assert keeper is not None and keeper.size == 2
        assert await keeper.count_in_sql() == 2
        assert await keeper.rebuild() == 2
        assert keeper.size == 2
    finally:
        await store.close()


async def test_a_running_store_follows_entries_and_deletions_made_elsewhere(
    db_url: str, tmp_path: Path
) -> None:
    running = await CacheStore.open(
        db_url, flush_interval=0.05, sync_interval=0.05, index=config(tmp_path)
    )
    other = await CacheStore.open(db_url, flush_interval=60)  # a warm-up, another replica
    try:
        served = entry(20)
        running.add(served)
        await running.flush()
        assert (await running.find_exact("exact-20")) is not None  # now in its memory tier

        imported = await other.import_entries([entry(21), entry(22, key="exact-20")])
        assert [e.exact_key for e in imported] == ["exact-21"]  # exact-20 already holds one
        assert await other.import_entries([entry(21)]) == []  # idempotent by exact key

        async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
            for _ in range(100):
                if await check():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the running store did not follow")

        async def indexed() -> bool:
            found = await running.find_similar("key:tenant", "q1", vector(21)[None, :], 0.99)
            return [c.entry_id for c in found] == [imported[0].entry_id]

        await eventually(indexed)
        assert await other.delete(served.entry_id)
        assert await other.purge(EntryFilter(question_contains="what is")) == 1

        async def withdrawn() -> bool:
            keeper = running.vectors
            return keeper is not None and keeper.size == 0

        await eventually(withdrawn)
        # Deleted elsewhere: gone from the running store's memory tier too.
        assert await running.find_exact("exact-20") is None
        assert await running.find_exact("exact-21") is None
    finally:
        await other.close()
        await running.close()


async def test_a_store_reads_back_only_rows_it_did_not_write_unless_a_write_failed(
    db_url: str, tmp_path: Path
) -> None:
    mine = await CacheStore.open(
        db_url, flush_interval=60, sync_interval=3600, index=config(tmp_path)
    )
    other = await CacheStore.open(db_url, flush_interval=60)
    try:
        for seed in range(5):
            mine.add(entry(seed))
        await mine.flush()
        await other.import_entries([entry(10)])
        # Its own five rows are not read again (it indexed them as it wrote them).
        assert await mine.sync() == Synced(created=1, indexed=1, withdrawn=0)

        # A row of ours that SQL holds although we never learned it: the commit landed and
        # the connection broke before its answer came back.
        landed = entry(11)
        async with other._engine.begin() as conn:
            await conn.execute(insert(Entry), [landed.entry_row(mine.owner)])
            await conn.execute(insert(EntryImage), landed.image_rows())
        # (The other process's row is still in the look-back: read again, indexed already.)
        assert await mine.sync() == Synced(created=1, indexed=0, withdrawn=0)
        assert await mine.find_similar("key:tenant", "q1", vector(11)[None, :], 0.99) == []

        # Our write of it fails (its id is taken), so the process doubts its own writes and
        # reads its rows of the look-back as well: the landed one joins the index.
        mine.add(landed)
        with pytest.raises(StoreUnavailable):
            await mine.flush()
        assert await mine.sync() == Synced(created=7, indexed=1, withdrawn=0)
        found = await mine.find_similar("key:tenant", "q1", vector(11)[None, :], 0.99)
        assert [c.entry_id for c in found] == [landed.entry_id]
        assert await mine.find_exact(landed.exact_key) is not None
    finally:
        await other.close()
        await mine.close()


async def test_a_row_committed_long_after_its_stamp_is_found_by_the_full_look_back(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = await CacheStore.open(
        db_url, flush_interval=60, sync_interval=3600, index=config(tmp_path)
    )
    other = await CacheStore.open(db_url, flush_interval=60)
    try:
        assert await mine.sync() == Synced(created=0, indexed=0, withdrawn=0)  # a full one
        # Stamped 20 s before its commit (a long embedding, or a clock running behind).
        late = entry(30, age=20.0)
        await other.import_entries([late])
        # Most syncs look back SYNC_RECENT (5 s) past the last one: not that far.
        assert await mine.sync() == Synced(created=0, indexed=0, withdrawn=0)
        # One every SYNC_FULL_EVERY seconds looks back SYNC_SLACK (30 s).
        monkeypatch.setattr(cache, "SYNC_FULL_EVERY", 0.0)
        assert await mine.sync() == Synced(created=1, indexed=1, withdrawn=0)
        found = await mine.find_similar("key:tenant", "q1", vector(30)[None, :], 0.99)
        assert [c.entry_id for c in found] == [late.entry_id]
    finally:
        await other.close()
        await mine.close()

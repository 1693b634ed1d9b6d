"""CacheStore against real SQLite and PostgreSQL: entries, tombstones, counters, restarts."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from store.cache import CacheStore, new_entry_id
from store.memory import MemoryAnswers
from store.models import Entry, EntryImage, LedgerRow
from store.records import NewEntry, NewImage


def _entry(key: str, body: bytes = b'{"answer": 1}', **overrides: object) -> NewEntry:
    fields: dict[str, object] = {
        "entry_id": new_entry_id(),
        "namespace": "key:abc",
        "fingerprint": "f" * 64,
        "exact_key": key,
        "model": "qwen3-vl-8b-instruct",
        "request_format": "openai",
        "question": "what is this?",
        "images": (NewImage(0, "a" * 64, 1234),),
        "status": 200,
        "content_type": "application/json",
        "body": body,
        "prompt_tokens": 1200,
        "completion_tokens": 40,
        "upstream_ms": 900.0,
        "created_at": time.time(),
    }
    fields.update(overrides)
    return NewEntry(**fields)  # type: ignore[arg-type]


async def _rows(store: CacheStore, model: type) -> list:
    async with store._engine.connect() as conn:
        return list((await conn.execute(select(model))).all())


async def test_entries_survive_a_restart_and_newest_wins(db_url: str) -> None:
    store = await CacheStore.open(db_url, flush_interval=60)
    first = _entry("k1", b"old")
    assert store.add(first) is not None
    assert (await store.find_exact("k1")).body == b"old"  # served from memory before any commit
    await store.flush()
    newer = _entry("k1", b"new", created_at=first.created_at + 1)
    store.add(newer)
    await store.close()

    store = await CacheStore.open(db_url, flush_interval=60)
    try:
        answer = await store.find_exact("k1")
        assert answer is not None and answer.body == b"new" and answer.entry_id == newer.entry_id
        assert await store.find_exact("missing") is None
        entries = {row.id: row for row in await _rows(store, Entry)}
        assert entries[first.entry_id].deleted and not entries[newer.entry_id].deleted
        images = await _rows(store, EntryImage)
        assert {(r.entry_id, r.position, r.byte_size) for r in images} == {
            (first.entry_id, 0, 1234),
            (newer.entry_id, 0, 1234),
        }
    finally:
        await store.close()


async def test_expired_entries_are_not_served(db_url: str) -> None:
    store = await CacheStore.open(db_url, flush_interval=60)
    try:
        store.add(_entry("gone", expires_at=time.time() - 1))
        await store.flush()
        assert await store.find_exact("gone") is None
    finally:
        await store.close()


async def test_ledger_and_hit_counts_are_flushed_and_summed(db_url: str) -> None:
    store = await CacheStore.open(db_url, flush_interval=60)
    try:
        entry = _entry("k2")
        store.add(entry)
        store.record("miss", "key:abc", "m", prompt_tokens=1200, completion_tokens=40, time_ms=900)
        for _ in range(3):
            store.record(
                "hit_exact",
                "key:abc",
                "m",
                prompt_tokens=1200,
                completion_tokens=40,
                time_ms=899.0,
                entry_id=entry.entry_id,
            )
        await store.flush()
        store.record(
            "hit_exact",
            "key:abc",
            "m",
            prompt_tokens=1200,
            completion_tokens=40,
            time_ms=899.0,
            entry_id=entry.entry_id,
        )
        await store.flush()
        ledger = {row.outcome: row for row in await _rows(store, LedgerRow)}
        assert ledger["miss"].requests == 1 and ledger["miss"].time_ms == pytest.approx(900)
        hits = ledger["hit_exact"]
        assert (hits.requests, hits.prompt_tokens, hits.completion_tokens) == (4, 4800, 160)
        assert hits.time_ms == pytest.approx(4 * 899.0)
        (row,) = await _rows(store, Entry)
        assert row.hit_count == 4 and row.last_hit_at is not None
    finally:
        await store.close()


def test_memory_answers_evict_least_recently_used_by_bytes() -> None:
    memory = MemoryAnswers(max_bytes=3 * (1000 + 400))
    answers = {k: _entry(k, b"x" * 1000).answer() for k in "abcd"}
    for key in "abc":
        memory.put(key, answers[key])
    assert memory.get("a") is not None  # a is now the most recently used
    memory.put("d", answers["d"])
    assert memory.get("b") is None
    assert [memory.get(k) is not None for k in "acd"] == [True, True, True]
    assert memory.bytes <= 3 * 1400
    memory.put("huge", _entry("huge", b"x" * 10_000).answer())
    assert memory.get("huge") is None and len(memory) == 3


def test_entry_ids_are_positive_63_bit_and_time_ordered() -> None:
    first = new_entry_id()
    time.sleep(0.002)
    second = new_entry_id()
    assert 0 < first < second < 2**63

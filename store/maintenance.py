"""What a maintenance pass removes: expired entries, entries over the size budget, old tombstones.

Entries are never deleted in one step: they are tombstoned first (``deleted``, ``deleted_at``),
so every process following the database (``CacheStore.sync``) withdraws them from its memory
tier and index, and only rows tombstoned longer than ``vacuum_after`` ago are removed. Each
statement touches at most ``CHUNK`` rows, so a large expiry never holds the database (SQLite's
single writer) for long.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import Entry, EntryImage

CHUNK = 1000
# Evict a little below the budget, so one pass is not followed by another at the next entry.
_HEADROOM = 0.95


@dataclass(frozen=True, slots=True)
class Retention:
    """How long entries live and how many the store keeps."""

    max_entries: int | None = None
    max_bytes: int | None = None
    interval: float = 30.0
    vacuum_after: float = 3600.0


@dataclass(slots=True)
class MaintenanceReport:
    """What one pass did."""

    expired: int = 0
    evicted: int = 0
    vacuumed: int = 0

    @property
    def empty(self) -> bool:
        """True when the pass changed nothing."""
        return not (self.expired or self.evicted or self.vacuumed)

    def merge(self, other: MaintenanceReport) -> None:
        """Add ``other``'s counts into this report."""
        self.expired += other.expired
        self.evicted += other.evicted
        self.vacuumed += other.vacuumed


async def expired_ids(conn: AsyncConnection, now: float) -> list[int]:
    """Up to ``CHUNK`` live entries whose time is up."""
    rows = await conn.execute(
        select(Entry.id).where(Entry.deleted.is_(False), Entry.expires_at <= now).limit(CHUNK)
    )
    return [row.id for row in rows]


async def over_budget_ids(conn: AsyncConnection, retention: Retention) -> list[int]:
    """Up to ``CHUNK`` least recently hit live entries that take the store over its budget."""
    count, size = (
        await conn.execute(
            select(func.count(), func.coalesce(func.sum(Entry.size_bytes), 0)).where(
                Entry.deleted.is_(False)
            )
        )
    ).one()
    excess_entries = 0
    if retention.max_entries is not None and count > retention.max_entries:
        excess_entries = count - int(retention.max_entries * _HEADROOM)
    excess_bytes = 0
    if retention.max_bytes is not None and size > retention.max_bytes:
        excess_bytes = int(size) - int(retention.max_bytes * _HEADROOM)
    if not excess_entries and not excess_bytes:
        return []
    rows = await conn.execute(
        select(Entry.id, Entry.size_bytes)
        .where(Entry.deleted.is_(False))
        .order_by(func.coalesce(Entry.last_hit_at, Entry.created_at), Entry.id)
        .limit(CHUNK)
    )
    chosen: list[int] = []
    freed = 0
    for row in rows:
        if len(chosen) >= excess_entries and freed >= excess_bytes:
            break
        chosen.append(row.id)
        freed += row.size_bytes
    return chosen


async def vacuum(conn: AsyncConnection, now: float, vacuum_after: float) -> int:
    """Remove up to ``CHUNK`` rows tombstoned more than ``vacuum_after`` seconds ago."""
    ids = [
        row.id
        for row in await conn.execute(
            select(Entry.id)
            .where(Entry.deleted.is_(True), Entry.deleted_at < now - vacuum_after)
            .limit(CHUNK)
        )
    ]
    if ids:
        await conn.execute(delete(EntryImage).where(EntryImage.entry_id.in_(ids)))
        await conn.execute(delete(Entry).where(Entry.id.in_(ids)))
    return len(ids)

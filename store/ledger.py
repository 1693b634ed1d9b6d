"""Buffered counters: the hourly savings ledger and per-entry hit counts.

Counting happens on every request, so it only touches dicts; ``Counters.write`` turns a batch
into a few upserts (``INSERT ... ON CONFLICT DO UPDATE`` on both SQLite and PostgreSQL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import Entry, LedgerRow

LedgerKey = tuple[int, str, str, str]  # hour, namespace, model, outcome
SUMMED = ("requests", "prompt_tokens", "completion_tokens", "cost", "time_ms")


@dataclass
class Tally:
    """Sums for one ledger row."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    time_ms: float = 0.0

    def merge(self, other: Tally) -> None:
        """Add ``other`` into this tally."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost += other.cost
        self.time_ms += other.time_ms


@dataclass
class Counters:
    """One batch of counts taken from the ledger, ready to be written."""

    rows: dict[LedgerKey, Tally] = field(default_factory=dict)
    hits: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when there is nothing to write."""
        return not self.rows and not self.hits

    async def write(self, conn: AsyncConnection) -> None:
        """Upsert the ledger rows and add the hit counts to their entries."""
        if self.rows:
            dialect = conn.dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            stmt = insert(LedgerRow)
            stmt = stmt.on_conflict_do_update(
                index_elements=["hour", "namespace", "model", "outcome"],
                set_={
                    name: getattr(LedgerRow, name) + getattr(stmt.excluded, name) for name in SUMMED
                },
            )
            await conn.execute(
                stmt,
                [
                    {
                        "hour": hour,
                        "namespace": namespace,
                        "model": model,
                        "outcome": outcome,
                        "requests": t.requests,
                        "prompt_tokens": t.prompt_tokens,
                        "completion_tokens": t.completion_tokens,
                        "cost": t.cost,
                        "time_ms": t.time_ms,
                    }
                    for (hour, namespace, model, outcome), t in self.rows.items()
                ],
            )
        if self.hits:
            await conn.execute(
                update(Entry)
                .where(Entry.id == bindparam("entry_id"))
                .values(
                    hit_count=Entry.hit_count + bindparam("count"),
                    last_hit_at=bindparam("last_hit"),
                )
                .execution_options(synchronize_session=False),
                [
                    {"entry_id": entry_id, "count": count, "last_hit": last}
                    for entry_id, (count, last) in self.hits.items()
                ],
            )


class Ledger:
    """Accumulates counts between flushes."""

    def __init__(self) -> None:
        self._current = Counters()

    def add(
        self,
        outcome: str,
        namespace: str,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cost: float,
        time_ms: float,
        entry_id: int | None,
    ) -> None:
        """Count one request."""
        now = time.time()
        key = (int(now // 3600) * 3600, namespace, model, outcome)
        tally = self._current.rows.get(key)
        if tally is None:
            tally = self._current.rows[key] = Tally()
        tally.merge(Tally(1, prompt_tokens, completion_tokens, cost, time_ms))
        if entry_id is not None:
            count, _ = self._current.hits.get(entry_id, (0, now))
            self._current.hits[entry_id] = (count + 1, now)

    def take(self) -> Counters:
        """Hand over everything counted so far and start afresh."""
        taken, self._current = self._current, Counters()
        return taken

    def restore(self, counters: Counters) -> None:
        """Put back a batch that could not be written, so the next flush retries it."""
        for key, tally in counters.rows.items():
            self._current.rows.setdefault(key, Tally()).merge(tally)
        for entry_id, (count, last) in counters.hits.items():
            mine, my_last = self._current.hits.get(entry_id, (0, last))
            self._current.hits[entry_id] = (mine + count, max(last, my_last))

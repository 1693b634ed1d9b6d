"""Read-side queries for operators: ledger sums, entry listings, one entry in full.

Each function takes an open connection and returns plain records; ``CacheStore`` runs them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import Entry, EntryImage, LedgerRow


@dataclass(slots=True)
class Sums:
    """Summed ledger columns. For hits: what was saved; for misses: what the upstream spent."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    time_ms: float = 0.0

    def add(self, other: Sums) -> None:
        """Add ``other`` into these sums."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost += other.cost
        self.time_ms += other.time_ms


def _by_outcome() -> defaultdict[str, Sums]:
    return defaultdict(Sums)


@dataclass(slots=True)
class LedgerReport:
    """The ledger summed by outcome: overall, per model, and per hour since a given hour."""

    outcomes: defaultdict[str, Sums] = field(default_factory=_by_outcome)
    models: defaultdict[str, defaultdict[str, Sums]] = field(
        default_factory=lambda: defaultdict(_by_outcome)
    )
    hours: defaultdict[int, defaultdict[str, Sums]] = field(
        default_factory=lambda: defaultdict(_by_outcome)
    )


@dataclass(frozen=True, slots=True)
class EntrySummary:
    """One entry as listed."""

    id: int
    namespace: str
    model: str
    question: str
    images: int
    hits: int
    prompt_tokens: int
    completion_tokens: int
    upstream_ms: float
    size_bytes: int
    created_at: float
    last_hit_at: float | None
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class ImageSummary:
    """One image of an entry (its thumbnail is fetched separately)."""

    position: int
    sha256: str
    byte_size: int
    embedder: str | None
    has_thumbnail: bool


@dataclass(frozen=True, slots=True)
class EntryDetail:
    """One entry in full: its summary, its images, the stored answer."""

    summary: EntrySummary
    request_format: str
    fingerprint: str
    status: int
    content_type: str
    body: bytes
    images: tuple[ImageSummary, ...]


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """Which live entries a listing or a purge covers (every given condition must hold)."""

    namespace: str | None = None
    model: str | None = None
    created_before: float | None = None
    created_after: float | None = None
    question_contains: str | None = None

    @property
    def empty(self) -> bool:
        """True when no condition is given (a purge refuses that)."""
        return all(
            value is None
            for value in (
                self.namespace,
                self.model,
                self.created_before,
                self.created_after,
                self.question_contains,
            )
        )

    def conditions(self) -> list[Any]:
        """SQL conditions of this filter (live entries only)."""
        where: list[Any] = [Entry.deleted.is_(False)]
        if self.namespace is not None:
            where.append(Entry.namespace == self.namespace)
        if self.model is not None:
            where.append(Entry.model == self.model)
        if self.created_before is not None:
            where.append(Entry.created_at < self.created_before)
        if self.created_after is not None:
            where.append(Entry.created_at >= self.created_after)
        if self.question_contains:
            # Escaped: % and _ in the user's text mean themselves.
            where.append(Entry.question.contains(self.question_contains, autoescape=True))
        return where


_SUMMARY_COLUMNS = (
    Entry.id,
    Entry.namespace,
    Entry.model,
    Entry.question,
    Entry.image_count,
    Entry.hit_count,
    Entry.prompt_tokens,
    Entry.completion_tokens,
    Entry.upstream_ms,
    Entry.size_bytes,
    Entry.created_at,
    Entry.last_hit_at,
    Entry.expires_at,
)


def _summary(row: Any) -> EntrySummary:
    return EntrySummary(*row[: len(_SUMMARY_COLUMNS)])


async def ledger_report(conn: AsyncConnection, since_hour: int) -> LedgerReport:
    """Ledger sums overall and per model, and per hour from ``since_hour`` on."""
    sums = [func.sum(getattr(LedgerRow, name)) for name in Sums.__slots__]
    report = LedgerReport()
    rows = await conn.execute(
        select(LedgerRow.model, LedgerRow.outcome, *sums).group_by(
            LedgerRow.model, LedgerRow.outcome
        )
    )
    for model, outcome, *values in rows:
        row_sums = _sums(values)
        report.outcomes[outcome].add(row_sums)
        report.models[model][outcome].add(row_sums)
    hourly = await conn.execute(
        select(LedgerRow.hour, LedgerRow.outcome, *sums)
        .where(LedgerRow.hour >= since_hour)
        .group_by(LedgerRow.hour, LedgerRow.outcome)
    )
    for hour, outcome, *values in hourly:
        report.hours[int(hour)][outcome].add(_sums(values))
    return report


def _sums(values: list[Any]) -> Sums:
    requests, prompt, completion, cost, time_ms = values
    return Sums(
        int(requests or 0), int(prompt or 0), int(completion or 0), cost or 0.0, time_ms or 0.0
    )


async def entry_totals(conn: AsyncConnection) -> tuple[int, int]:
    """(live entries, their bytes)."""
    row = (
        await conn.execute(
            select(func.count(), func.coalesce(func.sum(Entry.size_bytes), 0)).where(
                Entry.deleted.is_(False)
            )
        )
    ).one()
    return int(row[0]), int(row[1])


async def top_entries(conn: AsyncConnection, limit: int) -> list[EntrySummary]:
    """Live entries with the most hits."""
    rows = await conn.execute(
        select(*_SUMMARY_COLUMNS)
        .where(Entry.deleted.is_(False), Entry.hit_count > 0)
        .order_by(Entry.hit_count.desc(), Entry.id.desc())
        .limit(limit)
    )
    return [_summary(row) for row in rows]


async def list_entries(
    conn: AsyncConnection, where: EntryFilter, *, limit: int, before_id: int | None
) -> list[EntrySummary]:
    """Live entries matching ``where``, newest first, after the cursor ``before_id``."""
    query = select(*_SUMMARY_COLUMNS).where(*where.conditions())
    if before_id is not None:
        query = query.where(Entry.id < before_id)
    rows = await conn.execute(query.order_by(Entry.id.desc()).limit(limit))
    return [_summary(row) for row in rows]


async def entry_detail(conn: AsyncConnection, entry_id: int) -> EntryDetail | None:
    """One live entry in full, or None."""
    row = (
        await conn.execute(
            select(
                *_SUMMARY_COLUMNS,
                Entry.request_format,
                Entry.fingerprint,
                Entry.status,
                Entry.content_type,
                Entry.body,
            ).where(Entry.id == entry_id, Entry.deleted.is_(False))
        )
    ).first()
    if row is None:
        return None
    images = await conn.execute(
        select(
            EntryImage.position,
            EntryImage.sha256,
            EntryImage.byte_size,
            EntryImage.embedder,
            EntryImage.thumbnail.is_not(None),
        )
        .where(EntryImage.entry_id == entry_id)
        .order_by(EntryImage.position)
    )
    return EntryDetail(
        summary=_summary(row),
        request_format=row.request_format,
        fingerprint=row.fingerprint,
        status=row.status,
        content_type=row.content_type,
        body=row.body,
        images=tuple(ImageSummary(*image) for image in images),
    )


async def thumbnail(conn: AsyncConnection, entry_id: int, position: int) -> bytes | None:
    """The stored verifier thumbnail of one image of a live entry, or None."""
    row = (
        await conn.execute(
            select(EntryImage.thumbnail)
            .join(Entry, Entry.id == EntryImage.entry_id)
            .where(
                EntryImage.entry_id == entry_id,
                EntryImage.position == position,
                Entry.deleted.is_(False),
            )
        )
    ).first()
    return None if row is None else row.thumbnail

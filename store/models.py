"""SQLAlchemy models: the source of truth for every cached answer.

Times are epoch seconds (floats) so SQLite and PostgreSQL agree without timezone handling.
Entry ids are 63-bit integers made by the store (time-ordered, see ``cache.new_entry_id``), so an
answer can be served from memory before its row is committed, and FAISS can use them as vector ids.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations name constraints stably."""

    metadata = MetaData(naming_convention=NAMING)


class Entry(Base):
    """One cached answer to one question in one namespace."""

    __tablename__ = "entries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    namespace: Mapped[str] = mapped_column(String(80))
    fingerprint: Mapped[str] = mapped_column(String(64))
    exact_key: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    request_format: Mapped[str] = mapped_column(String(16))
    question: Mapped[str] = mapped_column(Text)
    image_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(200))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float | None] = mapped_column(Double)
    upstream_ms: Mapped[float] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float | None] = mapped_column(Double)
    hit_count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hit_at: Mapped[float | None] = mapped_column(Double)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[float | None] = mapped_column(Double)
    # The writing process (``CacheStore.owner``): a process's sync skips the rows it wrote.
    origin: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_entries_exact_key", "exact_key"),
        Index("ix_entries_namespace_fingerprint", "namespace", "fingerprint"),
        Index("ix_entries_created_at", "created_at"),
        Index("ix_entries_deleted_at", "deleted_at"),
    )


class EntryImage(Base):
    """One image of an entry: its byte hash and, once embedded, its vector and thumbnail."""

    __tablename__ = "entry_images"

    entry_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("entries.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    embedder: Mapped[str | None] = mapped_column(String(200))
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary)


class LedgerRow(Base):
    """Hourly counters per namespace, model and outcome.

    For hits the token, cost and time columns are what the hit saved; for misses they are what
    the upstream call spent.
    """

    __tablename__ = "savings_ledger"

    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(80), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(32), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost: Mapped[float] = mapped_column(Double, default=0.0)
    time_ms: Mapped[float] = mapped_column(Double, default=0.0)


class Claim(Base):
    """An identical miss being answered by one process; others wait for its entry.

    The row disappears in the transaction that stores the answer (or when the holder gives up),
    and a holder that dies stops renewing ``expires_at``, so its followers take over.
    """

    __tablename__ = "claims"

    exact_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Double)

"""``VectorKeeper``: keeps one embedder's ``VectorIndex`` in step with SQL.

SQL is the truth: every vector lives in its ``entry_images`` row. At start the keeper loads the
snapshot from the data directory, then catches up from SQL: vectors of entries created since the
snapshot's watermark (minus a slack for rows committed late by another writer) are added, entries
tombstoned since then are removed. ``rebuild`` forgets the snapshot and reads everything again.
Every index call runs on one dedicated thread, so FAISS and numpy never block the event loop and
the index never sees two writers (or a reader beside a writer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import StoreUnavailable
from .index import Candidate, VectorIndex
from .models import Entry, EntryImage
from .records import NewEntry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows committed by another writer can carry a created_at a little older than rows this
# process already saw; catch-up looks back this far to pick them up (adds are idempotent).
CATCH_UP_SLACK = 120.0
_STREAM_ROWS = 5000


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Which embedder's vectors to index, and where its snapshot lives."""

    embedder: str
    dim: int
    snapshot: Path
    approx_rows: int = 8192


class VectorKeeper:
    """The index of one embedder, its snapshot and its catch-up from SQL."""

    def __init__(self, engine: AsyncEngine, config: IndexConfig) -> None:
        self._engine = engine
        self._config = config
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix="vlcache-index", initializer=_one_openmp_thread
        )
        self._index = VectorIndex(config.embedder, config.dim, approx_rows=config.approx_rows)
        self._watermark = 0.0
        self._dirty = False

    @property
    def size(self) -> int:
        """Entries indexed."""
        return len(self._index)

    async def open(self) -> None:
        """Load the snapshot, then catch up with SQL."""
        config = self._config
        self._index, self._watermark = await self._call(
            VectorIndex.load,
            config.snapshot,
            config.embedder,
            config.dim,
            approx_rows=config.approx_rows,
        )
        loaded = len(self._index)
        added, removed = await self.catch_up()
        log.info(
            "index %s: %d entries from snapshot, %d added and %d removed from SQL",
            config.embedder,
            loaded,
            added,
            removed,
        )

    async def close(self) -> None:
        """Save the snapshot if anything changed, then stop the index thread."""
        try:
            if self._dirty:
                await self.save()
        finally:
            # Every call was awaited, so the thread is idle: nothing to wait for.
            self._thread.shutdown(wait=False)

    def has_group(self, namespace: str, fingerprint: str, images: int) -> bool:
        """True when a semantic search of this question could find anything."""
        return self._index.has_group((namespace, fingerprint), images)

    async def search(
        self, namespace: str, fingerprint: str, vectors: np.ndarray, threshold: float
    ) -> list[Candidate]:
        """Entries of the question group whose every image reaches ``threshold``, best first."""
        return await self._call(self._index.search, (namespace, fingerprint), vectors, threshold)

    async def add(self, entries: Iterable[NewEntry]) -> None:
        """Index the vectors of freshly committed entries (those made by this embedder)."""
        rows = []
        for entry in entries:
            images = entry.images
            if images and all(i.embedder == self._config.embedder for i in images):
                vectors = np.stack([_vector(i.embedding) for i in images])
                rows.append((entry.entry_id, (entry.namespace, entry.fingerprint), vectors))
                self._watermark = max(self._watermark, entry.created_at)
        if rows:
            await self._call(self._add_rows, rows)

    async def remove(self, entry_ids: Iterable[int]) -> None:
        """Drop tombstoned entries."""
        ids = list(entry_ids)
        if ids:
            await self._call(lambda: [self._index.remove(i) for i in ids])
            self._dirty = True

    async def save(self) -> None:
        """Write the snapshot now."""
        await self._call(self._index.save, self._config.snapshot, self._watermark)
        self._dirty = False

    async def catch_up(self) -> tuple[int, int]:
        """Add what SQL gained and remove what it tombstoned since the watermark."""
        since = max(self._watermark - CATCH_UP_SLACK, 0.0)
        added = await self._load_vectors(since, None)
        removed = await self._tombstoned_since(since)
        await self.remove(removed)
        return added, len(removed)

    async def rebuild(self, progress: Callable[[int], None] | None = None) -> int:
        """Forget the index and read every vector of this embedder from SQL; returns entries."""
        config = self._config
        self._index = VectorIndex(config.embedder, config.dim, approx_rows=config.approx_rows)
        self._watermark = 0.0
        added = await self._load_vectors(0.0, progress)
        await self.save()
        return added

    async def count_in_sql(self) -> int:
        """Live entries in SQL that carry vectors of this embedder."""
        query = (
            select(func.count(func.distinct(EntryImage.entry_id)))
            .join(Entry, Entry.id == EntryImage.entry_id)
            .where(EntryImage.embedder == self._config.embedder, Entry.deleted.is_(False))
        )
        try:
            async with self._engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def missing(self, entry_ids: Iterable[int]) -> list[int]:
        """Those of ``entry_ids`` that are not indexed."""
        return [i for i in entry_ids if i not in self._index]

    async def add_from_sql(self, entry_ids: Sequence[int]) -> int:
        """Index the vectors of these entries as SQL holds them (entries other processes wrote)."""
        added = 0
        for start in range(0, len(entry_ids), _STREAM_ROWS):
            chunk = list(entry_ids[start : start + _STREAM_ROWS])
            added += await self._load_vectors(0.0, None, Entry.id.in_(chunk))
        return added

    async def _load_vectors(
        self, since: float, progress: Callable[[int], None] | None, *where: Any
    ) -> int:
        query = (
            select(
                Entry.id,
                Entry.namespace,
                Entry.fingerprint,
                Entry.created_at,
                EntryImage.position,
                EntryImage.embedding,
            )
            .join(EntryImage, EntryImage.entry_id == Entry.id)
            .where(EntryImage.embedder == self._config.embedder, Entry.deleted.is_(False))
            .where(Entry.created_at >= since, *where)
            .order_by(Entry.id, EntryImage.position)
            .execution_options(yield_per=_STREAM_ROWS)
        )
        added = 0
        pending: list[tuple[int, tuple[str, str], np.ndarray]] = []
        current: list[Any] = []
        try:
            async with self._engine.connect() as conn:
                result = await conn.stream(query)
                async for row in result:
                    if current and current[0].id != row.id:
                        pending.append(_row_entry(current))
                        current = []
                    current.append(row)
                    self._watermark = max(self._watermark, row.created_at)
                    if len(pending) >= _STREAM_ROWS:
                        added += await self._flush(pending, progress)
                        pending = []
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        if current:
            pending.append(_row_entry(current))
        added += await self._flush(pending, progress)
        return added

    async def _flush(
        self,
        rows: list[tuple[int, tuple[str, str], np.ndarray]],
        progress: Callable[[int], None] | None,
    ) -> int:
        if rows:
            await self._call(self._add_rows, rows)
            if progress is not None:
                progress(len(rows))
        return len(rows)

    async def _tombstoned_since(self, since: float) -> list[int]:
        query = select(Entry.id).where(Entry.deleted.is_(True), Entry.deleted_at >= since)
        try:
            async with self._engine.connect() as conn:
                return [row.id for row in await conn.execute(query)]
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _add_rows(self, rows: list[tuple[int, tuple[str, str], np.ndarray]]) -> None:
        for entry_id, group, vectors in rows:
            self._index.add(entry_id, group, vectors)
        self._dirty = True

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: function(*args, **kwargs))


def _one_openmp_thread() -> None:
    # One query at a time gains nothing from OpenMP; its thread start-up and spinning made the
    # restricted search's p99 2.8 ms with 2 threads against 2.1 ms with 1 (bench/index_1m.py).
    faiss.omp_set_num_threads(1)


def _vector(embedding: bytes | None) -> np.ndarray:
    if embedding is None:
        raise ValueError("image has no embedding")
    return np.frombuffer(embedding, dtype=np.float32)


def _row_entry(rows: list[Any]) -> tuple[int, tuple[str, str], np.ndarray]:
    first = rows[0]
    vectors = np.stack([_vector(r.embedding) for r in rows])
    return first.id, (first.namespace, first.fingerprint), vectors

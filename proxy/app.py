"""``create_app``: the proxy's aiohttp application, built from settings.

No module-level app, session, model or store: every resource is made in ``cleanup_ctx`` when the
app starts, reached through typed ``AppKey``s, and released when it stops (in-flight background
writes are drained first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from PIL import Image

from store.cache import CacheStore
from store.maintenance import Retention
from store.vectors import IndexConfig

from .accounting import Accounting
from .batcher import MicroBatcher
from .calls import Keyer
from .fetch import ImageFetcher, create_fetch_session
from .metrics import Metrics
from .pricing import Pricing
from .recorder import Recorder
from .semantic import SemanticTier, embed_batch
from .service import CacheService
from .settings import Settings
from .upstream import Upstream, create_upstream_session

if TYPE_CHECKING:
    # torch is imported only when an embedder is actually loaded (not with --embedder none).
    from embeddings.embedder import Embedder

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", CacheStore)
SERVICE = web.AppKey("service", CacheService)
ACCOUNTING = web.AppKey("accounting", Accounting)
SEMANTIC: web.AppKey[SemanticTier | None] = web.AppKey("semantic")


def create_app(settings: Settings, *, embedder: Embedder | None = None) -> web.Application:
    """The proxy application for ``settings``; ``embedder`` replaces loading one (tests, demo)."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_resources(settings, embedder))
    app.router.add_route("*", "/{tail:.*}", handle_any)
    return app


async def handle_any(request: web.Request) -> web.StreamResponse:
    """Every method on every path: the cache service decides."""
    return await request.app[SERVICE].respond(request)


async def settle(app: web.Application) -> None:
    """Wait until every answer given so far is stored and indexed (demo, tests, benchmarks)."""
    await app[SERVICE].drain()
    await app[STORE].flush()


async def open_embedder(settings: Settings) -> Embedder | None:
    """Load the configured embedder in a worker thread (None when the tier is off)."""
    if settings.embedder == "none":
        return None
    return await asyncio.to_thread(_load_embedder, settings)


def _load_embedder(settings: Settings) -> Embedder:
    # Imported here, in the worker thread: importing torch reads hundreds of files.
    from embeddings.embedder import load_embedder

    return load_embedder(
        settings.embedder,
        clip_model=settings.clip_model,
        clip_pretrained=settings.clip_pretrained,
        threads=settings.embed_threads,
        precision=settings.embed_precision,
        runtime=settings.embed_runtime,
        cache_dir=settings.data_dir / "models",
    )


async def load_pricing(settings: Settings) -> Pricing:
    """The price table of ``--pricing`` (``PricingError`` when unreadable), or none."""
    if settings.pricing is None:
        return Pricing.none()
    return await asyncio.to_thread(Pricing.load, settings.pricing)


_GAUGES = {
    "vlcache_entries": "Live cache entries (as of the last scrape's count).",
    "vlcache_entries_bytes": "Bytes of the live entries' answers, vectors and thumbnails.",
    "vlcache_index_vectors": "Entries in this process's vector index.",
    "vlcache_embed_queue_depth": "Images waiting for the embedder.",
    "vlcache_memory_tier_bytes": "Bytes of answers held in the memory tier.",
}


_MAINTENANCE = {
    "vlcache_expired_entries": "Entries whose TTL ran out (tombstoned by this process).",
    "vlcache_evicted_entries": "Least recently hit entries evicted over --max-entries/--max-bytes.",
    "vlcache_vacuumed_rows": "Tombstoned entries removed from the database.",
}


def _maintenance_counters(store: CacheStore) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        done = store.maintained
        return {
            "vlcache_expired_entries": done.expired,
            "vlcache_evicted_entries": done.evicted,
            "vlcache_vacuumed_rows": done.vacuumed,
        }

    return read


def _gauges(
    accounting: Accounting, store: CacheStore, semantic: SemanticTier | None
) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        entries, entry_bytes = accounting.entries
        return {
            "vlcache_entries": entries,
            "vlcache_entries_bytes": entry_bytes,
            "vlcache_index_vectors": store.vectors.size if store.vectors is not None else 0,
            "vlcache_embed_queue_depth": semantic.queue_depth if semantic is not None else 0,
            "vlcache_memory_tier_bytes": store.memory_bytes,
        }

    return read


def index_config(settings: Settings, embedder: Embedder) -> IndexConfig:
    """Where the index of ``embedder`` keeps its snapshot."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder.id)
    return IndexConfig(
        embedder=embedder.id,
        dim=embedder.dim,
        snapshot=settings.data_dir / "index" / f"{name}.npz",
        approx_rows=settings.index_approx_rows,
    )


def _resources(
    settings: Settings, given: Embedder | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            pricing = await load_pricing(settings)
            embedder = given if given is not None else await open_embedder(settings)
            store = await CacheStore.open(
                settings.database_url,
                memory_bytes=settings.memory_cache_bytes,
                flush_interval=settings.flush_interval,
                snapshot_interval=settings.snapshot_interval,
                sync_interval=settings.sync_interval,
                retention=Retention(
                    max_entries=settings.max_entries,
                    max_bytes=settings.max_bytes,
                    interval=settings.maintenance_interval,
                    vacuum_after=settings.vacuum_after,
                ),
                index=index_config(settings, embedder) if embedder is not None else None,
            )
            stack.push_async_callback(store.close)
            upstream_session = create_upstream_session(
                connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout
            )
            stack.push_async_callback(upstream_session.close)
            fetch_session = create_fetch_session(allow_private=settings.allow_private_image_urls)
            stack.push_async_callback(fetch_session.close)
            fetcher = ImageFetcher(
                fetch_session,
                max_bytes=settings.max_image_bytes,
                timeout=settings.image_fetch_timeout,
                allow_private=settings.allow_private_image_urls,
            )
            semantic = None
            if embedder is not None:
                semantic = await stack.enter_async_context(semantic_tier(settings, embedder))
            recorder = None
            if settings.record is not None:
                recorder = Recorder(
                    settings.record,
                    max_bytes=settings.record_max_bytes,
                    backups=settings.record_backups,
                )
                await recorder.start()
                stack.push_async_callback(recorder.close)
            accounting = Accounting(store, Metrics(pricing.currency), pricing)
            accounting.metrics.add_gauges(_gauges(accounting, store, semantic), _GAUGES)
            accounting.metrics.add_counters(_maintenance_counters(store), _MAINTENANCE)
            store.on_failure = partial(accounting.failure, "store")
            service = CacheService(
                settings,
                store,
                Upstream(upstream_session, settings.upstream),
                Keyer(settings, fetcher),
                accounting,
                semantic,
                recorder,
            )
            # Stopped in reverse: answers still being stored are drained before the recorder
            # and the store close.
            stack.push_async_callback(service.drain)
            app[STORE] = store
            app[SERVICE] = service
            app[ACCOUNTING] = accounting
            app[SEMANTIC] = semantic
            yield

    return resources


@asynccontextmanager
async def semantic_tier(settings: Settings, embedder: Embedder) -> AsyncIterator[SemanticTier]:
    """The embedder's own thread, its micro-batcher and a CPU pool, started and stopped together."""
    embed_thread = ThreadPoolExecutor(1, thread_name_prefix="vlcache-embed")
    cpu_pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="vlcache-cpu")
    batcher: MicroBatcher[Image.Image, np.ndarray] = MicroBatcher(
        partial(embed_batch, embedder),
        embed_thread,
        max_batch=settings.embed_batch,
        max_wait=settings.embed_wait,
        max_queue=settings.embed_queue,
    )
    batcher.start()
    threshold = settings.threshold or embedder.default_threshold
    log.info("semantic tier: %s, threshold %.4f", embedder.id, threshold)
    try:
        yield SemanticTier(
            embedder,
            batcher,
            cpu_pool,
            threshold=threshold,
            max_pixels=settings.max_image_pixels,
            budget=settings.embed_timeout,
        )
    finally:
        await batcher.close()
        # Every job was awaited or abandoned by now: nothing to wait for on the loop.
        embed_thread.shutdown(wait=False)
        cpu_pool.shutdown(wait=False)

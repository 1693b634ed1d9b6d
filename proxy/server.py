"""Running vlcache as a process: ``serve``, ``migrate`` and ``index rebuild``."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web
from tqdm import tqdm

from embeddings.errors import ModelLoadError
from store.cache import CacheStore
from store.database import create_engine, upgrade_schema
from store.errors import StoreError
from store.vectors import VectorKeeper

from .admin import STOPPING, create_admin_app
from .app import create_app, index_config, load_pricing, open_embedder
from .pricing import PricingError
from .settings import Settings
from .stats import TierInfo, format_table, stats_document

log = logging.getLogger(__name__)

# glibc's mallopt parameters: blocks below _MMAP_THRESHOLD come from the heap (reused), and the
# heap's top goes back to the system only once more than _TRIM_THRESHOLD of it is free.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 8 * 2**20
_TRIM_THRESHOLD = 64 * 2**20


def serve(settings: Settings) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    log.info(
        "vlcache listening on http://%s:%d -> %s (db: %s)",
        settings.host,
        settings.port,
        settings.upstream,
        settings.database_url.split("@")[-1],
    )
    _reuse_freed_memory()
    # One INFO line per chat request comes from the cache service; the access log would double it.
    app = create_app(settings)
    app.cleanup_ctx.append(_admin_listener(settings))
    app.on_startup.append(_freeze_heap)
    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            access_log=None,
            print=None,
            shutdown_timeout=30,
        )
    except (ModelLoadError, StoreError, PricingError, OSError) as exc:
        # Start-up failures a person can fix: say what and how, without a traceback.
        raise SystemExit(f"vlcache: cannot start: {exc}") from None


def _admin_listener(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Run the admin listener beside the proxy, on its resources (started after them, stopped
    before them; ``/readyz`` says 503 from the moment the proxy starts shutting down)."""

    async def admin_listener(app: web.Application) -> AsyncIterator[None]:
        admin = create_admin_app(app)
        app.on_shutdown.append(lambda _app: _set(admin[STOPPING]))
        runner = web.AppRunner(admin, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.admin_host, settings.admin_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                f"admin listener on {settings.admin_host}:{settings.admin_port}: {exc.strerror}"
            ) from exc
        log.info(
            "admin listener on http://%s:%d (metrics, stats, dashboard%s)",
            settings.admin_host,
            settings.admin_port,
            ", token required" if settings.admin_token else "",
        )
        yield
        await runner.cleanup()

    return admin_listener


async def _set(event: asyncio.Event) -> None:
    event.set()


async def _freeze_heap(_app: web.Application) -> None:
    """Move start-up objects (modules, models) out of the collector's sight.

    Measured: with torch and faiss loaded, a full collection took ~100 ms, one request in ~5,000
    waited for it; after ``gc.freeze`` none did.
    """
    gc.collect()
    gc.freeze()


def _reuse_freed_memory() -> None:
    """Reuse freed memory for the next request instead of returning it to the system at once.

    glibc maps every block over its mmap threshold (128 KB at first) fresh from the system and
    gives the heap's top back once 128 KB of it is free; either way the next request's body,
    image or JSON string of a few hundred KB is faulted in and zeroed again, page by page.
    Measured: aiohttp's parser took 64 us to receive a 200 KB body, 8 us with these thresholds;
    ``orjson.loads`` of that body is unchanged (it was already reusing its blocks). The cost is
    resident memory: up to 64 MiB of freed heap is kept. Elsewhere than glibc, nothing is tuned.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


async def rebuild_index(settings: Settings) -> int:
    """Rebuild the configured embedder's vector index from SQL, with a progress bar."""
    embedder = await open_embedder(settings)
    if embedder is None:
        raise SystemExit("vlcache: --embedder none has no index to rebuild")
    await upgrade_schema(settings.database_url)
    engine = await asyncio.to_thread(create_engine, settings.database_url)
    keeper = VectorKeeper(engine, index_config(settings, embedder))
    try:
        total = await keeper.count_in_sql()
        with tqdm(total=total, unit="entry", desc=f"index {embedder.id}") as bar:
            added = await keeper.rebuild(progress=bar.update)
    finally:
        await keeper.close()
        await engine.dispose()
    print(f"indexed {added} entries of {embedder.id}; snapshot written")
    return added


async def migrate(settings: Settings) -> None:
    """Bring the configured database to the newest schema revision."""
    await upgrade_schema(settings.database_url)
    print(f"schema is at the newest revision ({settings.database_url.split('@')[-1]})")


async def print_stats(settings: Settings, *, as_json: bool) -> None:
    """Print the ledger's figures from the database (``vlcache stats``)."""
    pricing = await load_pricing(settings)
    store = await CacheStore.open(settings.database_url)
    try:
        document = await stats_document(store, pricing, TierInfo())
    finally:
        await store.close()
    if as_json:
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"vlcache stats ({settings.database_url.split('@')[-1]})")
        print(format_table(document))

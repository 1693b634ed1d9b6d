"""``create_app``: the proxy's aiohttp application, built from settings.

No module-level app, session or store: every resource is made in ``cleanup_ctx`` when the app
starts, reached through typed ``AppKey``s, and released when it stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from store.cache import CacheStore

from .fetch import ImageFetcher, create_fetch_session
from .service import CacheService
from .settings import Settings
from .upstream import Upstream, create_upstream_session

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", CacheStore)
SERVICE = web.AppKey("service", CacheService)


def create_app(settings: Settings) -> web.Application:
    """The proxy application for ``settings`` (resources open when it starts)."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_resources(settings))
    app.router.add_route("*", "/{tail:.*}", handle_any)
    return app


async def handle_any(request: web.Request) -> web.StreamResponse:
    """Every method on every path: the cache service decides."""
    return await request.app[SERVICE].respond(request)


def _resources(
    settings: Settings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = await CacheStore.open(
            settings.database_url,
            memory_bytes=settings.memory_cache_bytes,
            flush_interval=settings.flush_interval,
        )
        upstream_session = create_upstream_session(
            connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout
        )
        fetch_session = create_fetch_session(allow_private=settings.allow_private_image_urls)
        fetcher = ImageFetcher(
            fetch_session,
            max_bytes=settings.max_image_bytes,
            timeout=settings.image_fetch_timeout,
            allow_private=settings.allow_private_image_urls,
        )
        app[STORE] = store
        app[SERVICE] = CacheService(
            settings, store, Upstream(upstream_session, settings.upstream), fetcher
        )
        try:
            yield
        finally:
            await upstream_session.close()
            await fetch_session.close()
            await store.close()

    return resources

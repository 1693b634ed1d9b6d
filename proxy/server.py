"""Running the proxy as a process: ``serve`` and ``migrate``."""

from __future__ import annotations

import logging

from aiohttp import web

from store.database import upgrade_schema

from .app import create_app
from .settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    log.info(
        "vlcache listening on http://%s:%d -> %s (db: %s)",
        settings.host,
        settings.port,
        settings.upstream,
        settings.database_url.split("@")[-1],
    )
    # One INFO line per chat request comes from the cache service; the access log would double it.
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=None,
        shutdown_timeout=30,
    )


async def migrate(settings: Settings) -> None:
    """Bring the configured database to the newest schema revision."""
    await upgrade_schema(settings.database_url)
    print(f"schema is at the newest revision ({settings.database_url.split('@')[-1]})")

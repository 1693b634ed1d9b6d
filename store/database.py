"""Engines and schema: one async engine per store, the schema owned by Alembic.

SQLite (the embedded default) runs in WAL mode with ``synchronous=NORMAL``: readers never wait
for the writer, and a commit costs no fsync (a crash can lose the last moments of writes, never
corrupt the file; the cache can always be refilled). Runtime code never calls ``create_all``:
``upgrade_schema`` runs the Alembic migrations in ``migrations/``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import migrations

from .errors import MigrationError, StoreUnavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).parent


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url`` (SQLite with WAL pragmas, pooled for PostgreSQL)."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "handle_error", _sqlite_file_errors_disconnect)
    return engine


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


def _sqlite_file_errors_disconnect(context: Any) -> None:
    # A connection opened while the file was read-only (or unreadable) stays that way: have the
    # pool drop it like a broken connection, so writes work again once the file is fixed.
    error = context.original_exception
    if isinstance(error, sqlite3.OperationalError) and any(
        sign in str(error) for sign in ("readonly", "disk I/O error", "unable to open")
    ):
        context.is_disconnect = True


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged ``migrations/`` directory."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade_schema(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (idempotent).

    Alembic reads its scripts from disk and drives its own event loop, so it runs in a worker
    thread, never on the caller's loop.
    """
    try:
        await asyncio.to_thread(_upgrade, url, revision)
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot migrate {_safe(url)}: {exc}") from exc
    except Exception as exc:  # Alembic raises plain exceptions (CommandError, KeyError...)
        raise MigrationError(f"migration of {_safe(url)} to {revision} failed: {exc}") from exc
    log.info("schema at %s on %s", revision, _safe(url))


# Alembic keeps the running migration in module globals (``alembic.context``, ``alembic.op``): two
# upgrades in one process at once (a store reopening a replaced file while another migrates)
# would run each other's steps. One at a time.
_MIGRATING = threading.Lock()


def _upgrade(url: str, revision: str) -> None:
    with _MIGRATING:
        _upgrade_now(url, revision)


def _upgrade_now(url: str, revision: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)

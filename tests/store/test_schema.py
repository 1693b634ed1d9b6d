"""Alembic owns the schema: upgrade works on SQLite and PostgreSQL and matches the models."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from store.database import alembic_config, create_engine, upgrade_schema
from store.models import Base


async def test_upgrade_head_matches_models(db_url: str) -> None:
    await upgrade_schema(db_url)
    await upgrade_schema(db_url)  # idempotent
    engine = await asyncio.to_thread(create_engine, db_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            drift = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
            revision = await conn.run_sync(
                lambda c: MigrationContext.configure(c).get_current_revision()
            )
    finally:
        await engine.dispose()
    assert {"entries", "entry_images", "savings_ledger", "alembic_version"} <= tables
    assert drift == []
    assert revision == ScriptDirectory.from_config(alembic_config()).get_current_head()

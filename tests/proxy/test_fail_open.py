"""The cache fails open: with its database gone, requests are still answered by the upstream."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from store.database import upgrade_schema
from tests.conftest import PG_ADMIN_URL, data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream


async def test_postgres_dropped_mid_run_then_back(
    make_proxy, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
    except (OSError, asyncpg.PostgresError):
        pytest.skip(f"no PostgreSQL server reachable at {PG_ADMIN_URL}")
    name = "vlcache_failopen_" + uuid.uuid4().hex[:10]
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    url = f"{base}/{name}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    fake, _ = upstream
    try:
        proxy = await make_proxy(db=url)

        async def ask(question: str) -> tuple[int, str]:
            body = openai_chat(question, data_uri(jpeg_bytes(80)))
            async with client.post(proxy.make_url("/v1/chat/completions"), json=body) as r:
                await r.read()
                return r.status, r.headers["X-Cache"]

        assert await ask("before") == (200, "MISS")
        assert await ask("before") == (200, "HIT")
        await asyncio.sleep(0.3)  # committed (unwritten answers are withdrawn when SQL fails)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        for question in ("during 1", "during 2", "during 1"):
            assert await ask(question) == (200, "BYPASS")
        assert await ask("before") == (200, "HIT")  # still in the memory tier

        await admin.execute(f'CREATE DATABASE "{name}"')
        await upgrade_schema(url)
        outcomes = [await ask("after")]
        await asyncio.sleep(0.3)  # the writer commits the new entry
        outcomes.append(await ask("after"))
        assert outcomes == [(200, "MISS"), (200, "HIT")]
        assert len(fake.chat_calls) == 1 + 3 + 1
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

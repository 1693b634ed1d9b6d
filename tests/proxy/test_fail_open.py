"""The cache fails open: with its database gone, requests are still answered by the upstream."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.test_utils import TestServer

from store.database import upgrade_schema
from tests.conftest import data_uri, jpeg_bytes, openai_chat, pg_database
from tests.fakes import FakeUpstream


async def test_postgres_dropped_mid_run_then_back(
    make_proxy, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    async with pg_database("vlcache_failopen_") as (url, pg):
        proxy = await make_proxy(db=url)

        async def ask(question: str) -> tuple[int, str]:
            body = openai_chat(question, data_uri(jpeg_bytes(80)))
            async with client.post(proxy.make_url("/v1/chat/completions"), json=body) as r:
                await r.read()
                return r.status, r.headers["X-Cache"]

        assert await ask("before") == (200, "MISS")
        assert await ask("before") == (200, "HIT")
        await asyncio.sleep(0.3)  # committed (unwritten answers are withdrawn when SQL fails)
        await pg.drop()
        for question in ("during 1", "during 2", "during 1"):
            assert await ask(question) == (200, "BYPASS")
        assert await ask("before") == (200, "HIT")  # still in the memory tier

        await pg.create()
        await upgrade_schema(url)
        outcomes = [await ask("after")]
        await asyncio.sleep(0.3)  # the writer commits the new entry
        outcomes.append(await ask("after"))
        assert outcomes == [(200, "MISS"), (200, "HIT")]
        assert len(fake.chat_calls) == 1 + 3 + 1

"""TTL end to end: --ttl, shortened by the request (X-Cache-TTL) or the upstream (max-age)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.app import settle
from proxy.freshness import entry_ttl
from tests.conftest import ProxyFactory, data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream, Reply


async def ask(
    client: aiohttp.ClientSession, proxy: TestServer, question: str, **headers: str
) -> str:
    body = openai_chat(question, data_uri(jpeg_bytes(5)))
    async with client.post(
        proxy.make_url("/v1/chat/completions"), json=body, headers=headers
    ) as response:
        await response.read()
        return response.headers["X-Cache"]


def test_limits_only_ever_shorten_the_ttl() -> None:
    assert entry_ttl(None, {}, {}) is None
    assert entry_ttl(60.0, {}, {}) == 60.0
    assert entry_ttl(60.0, {"X-Cache-TTL": "5"}, {}) == 5.0
    assert entry_ttl(60.0, {"X-Cache-TTL": "3600"}, {}) == 60.0  # never longer than --ttl
    assert entry_ttl(None, {"X-Cache-TTL": "30"}, {}) == 30.0
    assert entry_ttl(60.0, {}, {"Cache-Control": "public, max-age=10"}) == 10.0
    assert entry_ttl(60.0, {}, {"Cache-Control": "max-age=10, s-maxage=20"}) == 20.0
    assert entry_ttl(60.0, {"X-Cache-TTL": "-4"}, {}) == 0.0  # do not store
    for junk in ("soon", "nan", "inf", ""):
        assert entry_ttl(60.0, {"X-Cache-TTL": junk}, {}) == 60.0


async def test_entries_expire_after_ttl_and_requests_can_shorten_it(
    make_proxy: ProxyFactory,
    db_url: str,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(db=db_url, ttl=0.6)
    assert await ask(client, proxy, "long") == "MISS"
    assert await ask(client, proxy, "short", **{"X-Cache-TTL": "0.2"}) == "MISS"
    assert await ask(client, proxy, "longer?", **{"X-Cache-TTL": "3600"}) == "MISS"
    await settle(proxy.app)
    assert [await ask(client, proxy, q) for q in ("long", "short", "longer?")] == ["HIT"] * 3
    await asyncio.sleep(0.3)
    assert [await ask(client, proxy, q) for q in ("long", "short")] == ["HIT", "MISS"]
    await asyncio.sleep(0.4)
    assert await ask(client, proxy, "long") == "MISS"
    assert await ask(client, proxy, "longer?") == "MISS"  # the request could not extend --ttl
    assert len(fake.chat_calls) == 6


async def test_the_upstream_can_shorten_or_forbid_storing(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    fake.push(Reply(headers={"Cache-Control": "max-age=0"}))
    assert await ask(client, proxy, "stale at once") == "MISS"
    assert await ask(client, proxy, "stale at once") == "MISS"
    fake.push(Reply(headers={"Cache-Control": "max-age=0.3"}))
    assert await ask(client, proxy, "brief") == "MISS"
    assert await ask(client, proxy, "brief") == "HIT"
    await asyncio.sleep(0.35)
    assert await ask(client, proxy, "brief") == "MISS"

"""Concurrent identical misses share one upstream call; tenants never share anything."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from tests.conftest import data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream, Reply

URL = "/v1/chat/completions"


async def post(
    client: aiohttp.ClientSession, proxy: TestServer, body: dict, key: str = "sk-a"
) -> tuple[int, str, str, bytes]:
    headers = {"Authorization": f"Bearer {key}"}
    async with client.post(proxy.make_url(URL), json=body, headers=headers) as r:
        data = await r.read()
        return r.status, r.headers["X-Cache"], r.headers.get("X-Cache-Match", ""), data


def content(body: bytes) -> str:
    if body.startswith(b"data:"):
        frames = [f[6:] for f in body.split(b"\n\n") if f.startswith(b"data: {")]
        chunks = [orjson.loads(f) for f in frames]
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
    return orjson.loads(body)["choices"][0]["message"]["content"]


async def test_fifty_identical_misses_make_one_upstream_call(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    fake.latency = 0.3
    request = openai_chat("Which model is it?", data_uri(jpeg_bytes(60)))
    streamed = {**request, "stream": True}
    results = await asyncio.gather(
        *(post(client, proxy, streamed if i % 5 == 4 else request) for i in range(50))
    )
    assert len(fake.chat_calls) == 1
    assert all(status == 200 for status, *_ in results)
    outcomes = sorted((cache, match) for _, cache, match, _ in results)
    assert outcomes.count(("MISS", "")) == 1
    assert outcomes.count(("HIT", "coalesced")) == 49
    texts = {content(body) for *_, body in results}
    assert len(texts) == 1 and "stand-in" in texts.pop()


async def test_followers_ask_themselves_when_the_leader_fails(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    fake.push(Reply(status=500, json={"error": {"message": "boom"}}, hang=0.3))
    request = openai_chat("Will the leader fail?", data_uri(jpeg_bytes(61)))
    results = await asyncio.gather(*(post(client, proxy, request) for _ in range(5)))
    statuses = sorted(status for status, *_ in results)
    assert statuses == [200, 200, 200, 200, 500]
    assert 2 <= len(fake.chat_calls) <= 5  # the failed leader, then the followers' own calls


async def test_tenants_never_receive_each_others_answers_even_concurrently(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    fake.latency = 0.2
    fake.sign_answers = True  # the double puts the caller's key into its answer
    request = openai_chat("Same question, same photo", data_uri(jpeg_bytes(62)))
    keys = ["sk-one", "sk-two", "sk-three"] * 4
    results = await asyncio.gather(*(post(client, proxy, request, key) for key in keys))
    assert len(fake.chat_calls) == 3
    for key, (_, _, _, body) in zip(keys, results, strict=True):
        assert content(body).endswith(f"for {key}")
    # and later, from the cache:
    for key in ("sk-one", "sk-two", "sk-three"):
        _, cache, _, body = await post(client, proxy, request, key)
        assert cache == "HIT" and content(body).endswith(f"for {key}")
    _, cache, _, body = await post(client, proxy, request, "sk-four")
    assert cache == "MISS" and content(body).endswith("for sk-four")

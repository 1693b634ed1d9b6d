"""The official openai SDK, sync and async, as the client of the proxy."""

from __future__ import annotations

import asyncio

import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import data_uri, jpeg_bytes
from tests.fakes import FakeUpstream


def _messages(seed: int) -> list[dict[str, object]]:
    return [
        {"role": "system", "content": "You are a shop assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(jpeg_bytes(seed))}},
                {"type": "text", "text": "这是什么手机？能用5G吗？"},
            ],
        },
    ]


async def test_async_sdk_miss_then_hit(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-sdk", max_retries=0
    )
    async with client:
        first = await client.chat.completions.with_raw_response.create(
            model="qwen3-vl-8b-instruct", messages=_messages(30), temperature=0.1
        )
        second = await client.chat.completions.with_raw_response.create(
            model="qwen3-vl-8b-instruct", messages=_messages(30), temperature=0.7
        )
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["x-cache-match"] == "exact"
    one, two = first.parse(), second.parse()
    assert two.choices[0].message.content == one.choices[0].message.content
    assert two.choices[0].finish_reason == "stop"
    assert two.usage is not None and two.usage.prompt_tokens == 1200
    assert len(fake.chat_calls) == 1


async def test_sync_sdk_miss_then_hit(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream

    def ask() -> tuple[str, str]:
        client = openai.OpenAI(
            base_url=str(proxy.make_url("/v1")), api_key="sk-sync", max_retries=0
        )
        with client:
            raw = client.chat.completions.with_raw_response.create(
                model="qwen3-vl-8b-instruct", messages=_messages(31)
            )
        return raw.headers["x-cache"], raw.parse().choices[0].message.content or ""

    # The sync client blocks: it runs in a thread while the proxy serves on this loop.
    first = await asyncio.to_thread(ask)
    second = await asyncio.to_thread(ask)
    assert first[0] == "MISS" and second[0] == "HIT"
    assert first[1] == second[1] and "stand-in" in first[1]
    assert len(fake.chat_calls) == 1


async def test_sdk_sees_proxy_errors_as_api_errors(
    make_proxy, upstream: tuple[FakeUpstream, TestServer], unused_tcp_port: int
) -> None:
    proxy = await make_proxy(upstream=f"http://127.0.0.1:{unused_tcp_port}")
    client = openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="k", max_retries=0)
    async with client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="m", messages=_messages(32))
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"

"""Streaming: misses relayed and assembled, hits replayed as real chunk frames."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
from aiohttp.test_utils import TestServer

from proxy.sse import replay_frames
from proxy.standin import openai_answer
from tests.conftest import data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream, Reply

MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_uri(jpeg_bytes(50))}},
            {"type": "text", "text": "Describe the product in one sentence."},
        ],
    }
]


def sdk(proxy: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="sk-s", max_retries=0)


async def streamed_text(client: openai.AsyncOpenAI, **extra: object) -> tuple[str, str, list]:
    response = await client.chat.completions.with_raw_response.create(
        model="qwen3-vl", messages=MESSAGES, stream=True, **extra
    )
    chunks = [chunk async for chunk in response.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return response.headers["x-cache"], text, chunks


async def test_streamed_miss_is_stored_and_replayed_to_both_kinds_of_request(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    async with sdk(proxy) as client:
        cache, first_text, _ = await streamed_text(client, stream_options={"include_usage": True})
        assert cache == "MISS" and "stand-in" in first_text
        await asyncio.sleep(0.2)  # the entry is written by the store's writer
        plain = await client.chat.completions.with_raw_response.create(
            model="qwen3-vl", messages=MESSAGES
        )
        assert plain.headers["x-cache"] == "HIT"
        assert plain.parse().choices[0].message.content == first_text
        assert plain.parse().usage.completion_tokens == 40
        cache, replayed, chunks = await streamed_text(
            client, stream_options={"include_usage": True}
        )
        assert (cache, replayed) == ("HIT", first_text)
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
        assert chunks[-1].choices == []  # the usage chunk the client asked for
    assert len(fake.chat_calls) == 1


async def test_non_streamed_entry_serves_streamed_requests_with_reasoning_and_tools(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    answer = openai_answer("qwen3-vl", "It is an X5 Pro.")
    answer["choices"][0]["message"]["reasoning_content"] = "The label reads X5 Pro."
    answer["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_9", "type": "function", "function": {"name": "sku", "arguments": '{"a": 1}'}}
    ]
    fake.push(Reply(json=answer))
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="qwen3-vl", messages=MESSAGES)
        cache, text, chunks = await streamed_text(client)
    assert (cache, text) == ("HIT", "It is an X5 Pro.")
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    assert reasoning == "The label reads X5 Pro."
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "sku" and calls[0].function.arguments == '{"a": 1}'
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(fake.chat_calls) == 1


async def test_broken_or_unfinished_streams_are_never_stored(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    good = list(
        replay_frames(openai_answer("qwen3-vl", "one two three four five"), include_usage=False)
    )
    truncated = list(replay_frames(openai_answer("qwen3-vl", "cut", "length"), include_usage=False))
    error = [good[0], b'data: {"error": {"message": "overloaded"}}\n\n', b"data: [DONE]\n\n"]
    fake.push(Reply(stream_frames=good, cut_after_frames=3))
    fake.push(Reply(stream_frames=truncated))
    fake.push(Reply(stream_frames=error))
    fake.push(Reply(stream_frames=good[:-1]))  # no [DONE]
    request = openai_chat("Stream this", data_uri(jpeg_bytes(51)), stream=True)
    for _ in range(4):
        try:
            async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
                assert r.headers["X-Cache"] == "MISS"
                await r.read()
        except aiohttp.ClientPayloadError:
            pass  # the cut-off stream: the proxy cut the client off too
    await asyncio.sleep(0.2)
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
        assert r.headers["X-Cache"] == "MISS"
        body = await r.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert len(fake.chat_calls) == 5


async def test_client_leaving_mid_stream_stores_nothing(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    frames = list(
        replay_frames(openai_answer("qwen3-vl", " ".join(["word"] * 40)), include_usage=False)
    )
    fake.push(Reply(stream_frames=frames, frame_delay=0.02))
    request = openai_chat("Leave early", data_uri(jpeg_bytes(52)), stream=True)
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
        await r.content.readany()
        r.close()  # the client goes away after the first bytes
    await asyncio.sleep(1.2)  # long enough for the upstream to have finished
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
        assert r.headers["X-Cache"] == "MISS"
        frames_seen = (await r.read()).count(b"data: ")
    assert frames_seen > 3
    assert len(fake.chat_calls) == 2
    assert orjson.loads(fake.chat_calls[0].body)["stream"] is True

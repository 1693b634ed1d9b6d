"""Concurrent identical misses share one upstream call; tenants never share anything."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from proxy.sse import replay_frames
from proxy.standin import openai_answer
from tests.conftest import data_uri, jpeg_bytes, openai_chat, sse_text
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
        return sse_text(body)
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


class Streamed:
    """One streamed request through the proxy: its headers, its bytes, when its first chunk and
    its end arrived (seconds after ``t0``), or the error that cut it."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = b""
        self.first = self.end = float("inf")
        self.error: Exception | None = None

    async def run(
        self, client: aiohttp.ClientSession, proxy: TestServer, body: dict, t0: float
    ) -> Streamed:
        headers = {"Authorization": "Bearer sk-a"}
        try:
            async with client.post(proxy.make_url(URL), json=body, headers=headers) as r:
                self.headers = dict(r.headers)
                async for chunk in r.content.iter_any():
                    self.first = min(self.first, time.perf_counter() - t0)
                    self.body += chunk
        except aiohttp.ClientPayloadError as exc:
            self.error = exc
        self.end = time.perf_counter() - t0
        return self


def frames(text: str, count: int) -> list[bytes]:
    words = " ".join([text] * count)
    return list(replay_frames(openai_answer("qwen3-vl", words), include_usage=False))


async def test_streamed_followers_get_the_leaders_frames_as_they_pass(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    sent = frames("live", 40)
    fake.push(Reply(stream_frames=sent, frame_delay=1.0 / len(sent)))  # ~1 s of frames
    request = openai_chat("Who streams first?", data_uri(jpeg_bytes(63)), stream=True)
    t0 = time.perf_counter()
    leader = asyncio.ensure_future(Streamed().run(client, proxy, request, t0))
    early = [asyncio.ensure_future(Streamed().run(client, proxy, request, t0)) for _ in range(3)]
    await asyncio.sleep(0.4)  # mid-stream
    late = await Streamed().run(client, proxy, request, t0)
    first, *others = await asyncio.gather(leader, *early)
    followers = [*others, late]
    assert len(fake.chat_calls) == 1
    assert first.headers["X-Cache"] == "MISS" and first.body == b"".join(sent)
    stream_end = first.end
    for follower in followers:
        assert (follower.headers["X-Cache"], follower.headers["X-Cache-Match"]) == (
            "HIT",
            "coalesced",
        )
        assert "X-Cache-Entry" not in follower.headers  # its entry is not stored yet
        assert follower.body == first.body  # the very bytes the leader got
        # Its first chunk came while the stream was still going, not when it ended.
        assert follower.first < stream_end - 0.4, (follower.first, stream_end)
    assert late.first < 0.6  # what was relayed so far, at once
    # The answer is stored once the stream ended: an exact hit, replayed.
    _, cache, match, body = await post(client, proxy, request)
    assert (cache, match) == ("HIT", "exact") and content(body) == content(first.body)


async def test_a_follower_asking_for_other_frames_waits_for_the_stored_answer(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    sent = frames("usage", 20)
    fake.push(Reply(stream_frames=sent, frame_delay=0.02))
    request = openai_chat("Usage, anyone?", data_uri(jpeg_bytes(64)), stream=True)
    with_usage = {**request, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    leader, other = await asyncio.gather(
        Streamed().run(client, proxy, request, t0), Streamed().run(client, proxy, with_usage, t0)
    )
    assert len(fake.chat_calls) == 1
    assert (other.headers["X-Cache"], other.headers["X-Cache-Match"]) == ("HIT", "coalesced")
    # Not the leader's bytes (a usage chunk was asked for, the leader's stream has none): the
    # stored answer replayed in the frames it asked for, once the leader's stream has ended.
    assert other.first >= leader.end - 0.05
    assert content(other.body) == content(leader.body)


async def test_a_stream_cut_by_the_upstream_cuts_its_followers_and_stores_nothing(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    fake.push(Reply(stream_frames=frames("cut", 30), frame_delay=0.02, cut_after_frames=10))
    request = openai_chat("Will it break?", data_uri(jpeg_bytes(65)), stream=True)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(Streamed().run(client, proxy, request, t0) for _ in range(4)))
    assert len(fake.chat_calls) == 1
    # Every one of them sees the break: none mistakes a truncated stream for a whole one.
    assert all(r.error is not None and b"[DONE]" not in r.body for r in results)
    # Nothing was stored: the next one asks the model (the double's default answer).
    _, cache, _, body = await post(client, proxy, request)
    assert cache == "MISS" and len(fake.chat_calls) == 2 and "stand-in" in content(body)

"""Replicas: several real `vlcache serve` processes on one real PostgreSQL database."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.demo import product_photo, reencoded
from tests.conftest import data_uri, jpeg_bytes, openai_chat, pg_database
from tests.fakes import FakeUpstream, Reply
from tests.proxy.test_cli import start_serve

KEY = {"Authorization": "Bearer sk-replicas"}


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with pg_database("vlcache_replicas_") as (url, _):
        yield url


class Replica:
    """One `vlcache serve` process and its two listeners."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, admin_port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.admin = f"http://127.0.0.1:{admin_port}"

    async def ask(self, client: aiohttp.ClientSession, body: object) -> dict[str, str]:
        async with client.post(self.url, json=body, headers=KEY) as response:
            assert response.status == 200, await response.text()
            await response.read()
            return dict(response.headers)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.communicate(), 30)


ReplicaFactory = Callable[..., "asyncio.Future[Replica]"]


@pytest.fixture
async def replicas(
    upstream: tuple[FakeUpstream, TestServer],
    pg_url: str,
    unused_tcp_port_factory: Callable[[], int],
    tmp_path: Path,
) -> AsyncIterator[Callable[..., object]]:
    started: list[Replica] = []

    async def start(*extra: str) -> Replica:
        port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
        process = await start_serve(
            port,
            str(upstream[1].make_url("/")),
            tmp_path / f"replica-{len(started)}",  # own data dir: own index snapshot
            "--db",
            pg_url,
            "--sync-interval",
            "0.25",
            *extra,
            admin_port=admin_port,
        )
        replica = Replica(process, port, admin_port)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.stop()


async def visible_within(check: Callable[[], object], seconds: float) -> float:
    """Seconds until ``await check()`` is true (fails after ``seconds``)."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if await check():  # type: ignore[misc]
            return time.monotonic() - began
        await asyncio.sleep(0.02)
    raise AssertionError(f"not visible within {seconds} s")


async def test_answers_deletes_and_coalescing_span_replicas(
    replicas: Callable[..., object], upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    a = await replicas()  # type: ignore[misc]
    b = await replicas()  # type: ignore[misc]
    async with aiohttp.ClientSession() as client:
        body = openai_chat("Which phone?", data_uri(jpeg_bytes(60)))
        assert (await a.ask(client, body))["X-Cache"] == "MISS"
        await asyncio.sleep(1.0)  # the visibility bound
        headers = await b.ask(client, body)
        assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "exact")
        assert len(fake.chat_calls) == 1

        # A delete through one replica's admin API withdraws the answer from the other's memory.
        assert (await b.ask(client, body))["X-Cache"] == "HIT"  # now in b's memory tier
        async with client.delete(f"{a.admin}/entries/{headers['X-Cache-Entry']}") as r:
            assert r.status == 200
        await asyncio.sleep(1.0)
        assert (await b.ask(client, body))["X-Cache"] == "MISS"
        assert len(fake.chat_calls) == 2

        # Identical misses spread over both replicas: one upstream call.
        fake.latency = 0.8
        question = openai_chat("Coalesce me", data_uri(jpeg_bytes(61)))
        answers = await asyncio.gather(*(replica.ask(client, question) for replica in (a, b) * 5))
        assert len(fake.chat_calls) == 3
        assert sorted(h["X-Cache"] for h in answers) == ["HIT"] * 9 + ["MISS"]
        assert {h["X-Cache-Entry"] for h in answers} == {answers[0]["X-Cache-Entry"]}


async def test_semantic_hits_span_replicas_within_a_second(
    replicas: Callable[..., object], upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    a = await replicas("--embedder", "efficientnet-lite0")  # type: ignore[misc]
    b = await replicas("--embedder", "efficientnet-lite0")  # type: ignore[misc]
    phone = await asyncio.to_thread(product_photo, "X5 Pro", "2999", 40)
    copy = await asyncio.to_thread(reencoded, phone, quality=60)
    async with aiohttp.ClientSession() as client:
        assert (await a.ask(client, openai_chat("Which phone?", data_uri(phone))))[
            "X-Cache"
        ] == "MISS"
        await asyncio.sleep(1.0)
        headers = await b.ask(client, openai_chat("Which phone?", data_uri(copy)))
        assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "semantic")
        assert len(fake.chat_calls) == 1


async def test_a_replica_killed_mid_call_loses_nothing_and_its_followers_take_over(
    replicas: Callable[..., object], upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    a = await replicas("--claim-lease", "1.5")  # type: ignore[misc]
    b = await replicas("--claim-lease", "1.5")  # type: ignore[misc]
    async with aiohttp.ClientSession() as client:
        kept = openai_chat("Stored before the kill", data_uri(jpeg_bytes(62)))
        await a.ask(client, kept)
        await asyncio.sleep(0.5)  # committed (the writer lingers 0.1 s)

        fake.latency = 3.0
        question = openai_chat("Asked as the leader dies", data_uri(jpeg_bytes(63)))
        on_a = asyncio.ensure_future(a.ask(client, question))
        await asyncio.sleep(0.5)  # a holds the claim and waits for the model
        on_b = asyncio.ensure_future(b.ask(client, question))
        await asyncio.sleep(0.3)  # b follows a's claim
        a.process.send_signal(signal.SIGKILL)
        await a.process.wait()
        with pytest.raises(aiohttp.ClientError):
            await on_a
        fake.latency = 0.0
        began = time.monotonic()
        headers = await on_b  # the lease ran out: b asked the model itself
        assert headers["X-Cache"] == "MISS" and time.monotonic() - began < 5
        assert (await b.ask(client, question))["X-Cache"] == "HIT"
        assert (await b.ask(client, kept))["X-Cache"] == "HIT"  # nothing committed was lost

        c = await replicas()  # type: ignore[misc]  # a restarted replica catches up
        assert (await c.ask(client, question))["X-Cache"] == "HIT"
        async with client.get(f"{b.admin}/entries") as r:
            entries = (await r.json())["entries"]
        assert sorted(e["question"] for e in entries) == [
            "Asked as the leader dies",
            "Stored before the kill",
        ]


async def test_a_leaders_uncacheable_answer_frees_other_replicas_followers_at_once(
    replicas: Callable[..., object], upstream: tuple[FakeUpstream, TestServer]
) -> None:
    fake, _ = upstream
    a = await replicas("--claim-lease", "30")  # type: ignore[misc]
    b = await replicas("--claim-lease", "30")  # type: ignore[misc]
    fake.push(Reply(hang=1.0, finish_reason="length"))  # a's call: cut short, not storable
    async with aiohttp.ClientSession() as client:
        question = openai_chat("Cut short for the leader", data_uri(jpeg_bytes(64)))
        on_a = asyncio.ensure_future(a.ask(client, question))

        async def a_asked_the_model() -> bool:
            return len(fake.chat_calls) == 1

        await visible_within(a_asked_the_model, 5)  # so a holds the claim, for ~1 s more
        began = time.monotonic()
        headers = await b.ask(client, question)
        waited = time.monotonic() - began
        assert (await on_a)["X-Cache"] == "MISS"
        # b followed a's claim until a gave it up with nothing stored, then asked the model
        # itself: at once, not when the 30 s lease ran out.
        assert headers["X-Cache"] == "MISS"
        assert 0.5 < waited < 5
        assert len(fake.chat_calls) == 2
        assert (await b.ask(client, question))["X-Cache"] == "HIT"  # its own answer was stored

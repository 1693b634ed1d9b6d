"""Hostile input over the network, end to end: image URLs that must not be fetched or never
finish, and clients that are slow or leave. The real proxy, the real upstream double, real sockets
on 127.0.0.1; each test checks that the proxy stays up, answers the next normal request (and
caches it), and stores nothing wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.fetch import PublicOnlyResolver, is_public_address
from proxy.settings import Settings
from proxy.sse import replay_frames
from proxy.standin import openai_answer
from tests.conftest import (
    ProxyFactory,
    data_uri,
    jpeg_bytes,
    openai_chat,
    sse_text,
)
from tests.fakes import FakeUpstream, Reply
from tests.proxy.hostile import (
    Pictures,
    Served,
    chat_bytes,
    digest,
    healthy,
    open_raw,
    post,
    stored_questions,
)

# --- image URLs that must not be fetched, or never finish ---------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
        "::127.0.0.1",  # IPv4-compatible (deprecated, still parsed)
        "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix: 169.254.169.254 on a NAT64 network
        "64:ff9b::7f00:1",
        "64:ff9b:1::a9fe:a9fe",  # NAT64 local-use prefix
        "2002:a9fe:a9fe::1",  # 6to4 around 169.254.169.254
        "2002:7f00:1::1",
    ],
)
def test_ipv6_forms_of_private_ipv4_addresses_are_not_public(address: str) -> None:
    assert is_public_address(address) is False


def test_ipv6_forms_of_public_ipv4_addresses_stay_public() -> None:
    for address in ("::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"):
        assert is_public_address(address) is True, address


async def test_private_image_urls_are_never_fetched_whatever_their_spelling(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    pictures: Pictures,
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(allow_private_image_urls=False, image_fetch_timeout=2)
    port = pictures.server.port
    urls = [
        f"http://[::ffff:127.0.0.1]:{port}/a.jpg",
        f"http://[::ffff:7f00:1]:{port}/a.jpg",
        f"http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/a.jpg",
        f"http://[::1]:{port}/a.jpg",
        f"http://127.1:{port}/a.jpg",
        f"http://0x7f000001:{port}/a.jpg",
        f"http://2130706433:{port}/a.jpg",
        f"http://localhost:{port}/a.jpg",
        # Would reach the cloud metadata service; port 9 (discard) in case it ever did.
        "http://[::ffff:169.254.169.254]:9/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]:9/latest/meta-data/",
        # On 127.0.0.1, redirecting to a private address: refused before the first hop.
        f"http://127.0.0.1:{port}/redirect?to=http://10.0.0.1:9/a.jpg",
    ]
    for url in urls:
        body = chat_bytes("Whose picture is this?", url)
        started = time.perf_counter()
        assert (await post(client, proxy, body))[:2] == (200, "BYPASS"), url
        assert time.perf_counter() - started < 1, url  # refused, not timed out
        assert digest(fake.chat_calls[-1].body) == digest(body), url
    assert pictures.hits == []
    await healthy(client, proxy, "private image URLs")
    assert await stored_questions(proxy) == ["healthy after private image URLs?"]


class PretendPublicResolver(AbstractResolver):
    """DNS where ``images.example`` is a public host (it is the loopback picture server); every
    other name is resolved as the proxy does, public addresses only."""

    def __init__(self) -> None:
        self._public_only = PublicOnlyResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host == "images.example":
            loopback = ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0,
                flags=socket.AI_NUMERICHOST,
            )  # fmt: skip
            return [loopback]
        return await self._public_only.resolve(host, port, family)

    async def close(self) -> None:
        await self._public_only.close()


async def test_a_public_image_url_redirecting_to_a_private_address_is_not_followed(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    pictures: Pictures,
    aiohttp_server: Any,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _ = upstream
    secret = Pictures()  # what the redirects aim at: it must never be asked
    secret_server = await aiohttp_server(secret.app())

    def fetch_session(*, allow_private: bool) -> aiohttp.ClientSession:
        assert not allow_private
        connector = aiohttp.TCPConnector(resolver=PretendPublicResolver())
        return aiohttp.ClientSession(connector=connector)

    monkeypatch.setattr("proxy.app.create_fetch_session", fetch_session)
    proxy = await make_proxy(allow_private_image_urls=False)
    base = f"http://images.example:{pictures.server.port}"
    assert (await post(client, proxy, chat_bytes("Public?", f"{base}/a.jpg")))[1] == "MISS"
    port = secret_server.port
    targets = [
        f"http://127.0.0.1:{port}/s.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/s.jpg",
        f"http://localhost:{port}/s.jpg",
        "http://[::ffff:169.254.169.254]:9/latest/meta-data/",
    ]
    for target in targets:
        body = chat_bytes("Where does it lead?", f"{base}/redirect?to={target}")
        assert (await post(client, proxy, body))[:2] == (200, "BYPASS"), target
        assert digest(fake.chat_calls[-1].body) == digest(body), target
    assert pictures.hits == ["a.jpg"] + ["redirect"] * len(targets)
    assert secret.hits == []
    assert await stored_questions(proxy) == ["Public?"]


async def test_image_urls_that_never_finish_are_abandoned_within_the_fetch_timeout(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    pictures: Pictures,
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(image_fetch_timeout=0.5)  # loopback allowed: the server is local
    for name in ("stall.jpg", "trickle.jpg"):
        body = chat_bytes("Is it finished yet?", str(pictures.server.make_url(f"/{name}")))
        started = time.perf_counter()
        stuck = asyncio.ensure_future(post(client, proxy, body))
        # Meanwhile the proxy answers others at once.
        quick = chat_bytes(f"Quick one beside {name}?")
        assert (await post(client, proxy, quick))[:2] == (200, "MISS")
        assert not stuck.done() and time.perf_counter() - started < 0.4
        assert (await stuck)[:2] == (200, "BYPASS")
        assert 0.45 < time.perf_counter() - started < 1.5, name
        assert digest(fake.chat_calls[-1].body) == digest(body)
    assert pictures.hits == ["stall.jpg", "trickle.jpg"]
    await healthy(client, proxy, "URLs that never finish")
    assert await stored_questions(proxy) == [
        "Quick one beside stall.jpg?",
        "Quick one beside trickle.jpg?",
        "healthy after URLs that never finish?",
    ]


# --- slow and vanishing clients -----------------------------------------------------------------


CANCELLING = "test server (handler cancelled)"
SERVE = "vlcache serve (handler not cancelled)"


@pytest.fixture(params=[CANCELLING, SERVE])
async def served(
    request: pytest.FixtureRequest,
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    tmp_path: Any,
) -> AsyncIterator[TestServer | Served]:
    if request.param == CANCELLING:
        yield await make_proxy()
        return
    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "served",
        flush_interval=0.05,
        embedder="none",
    )
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=75.0, handler_cancellation=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Served(app, runner.addresses[0][1])
    await runner.cleanup()


async def test_slow_loris_bodies_do_not_hold_up_other_requests(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    """Twenty clients send a body a byte every 10 ms and never finish; others are served at once.

    What bounds such a client today: nothing in the proxy. aiohttp's keep-alive timeout (75 s
    under ``vlcache serve``) closes a connection whose request *headers* are still incomplete,
    but once they are, the handler waits in ``request.read()`` for as long as bytes keep coming,
    up to ``--max-body-bytes`` of them. The next test pins the missing deadline.
    """
    fake, _ = upstream
    proxy = await make_proxy()
    body = chat_bytes("Slowly, very slowly?", data_uri(jpeg_bytes(4)))
    lorises = [await open_raw(proxy, len(body)) for _ in range(20)]

    async def trickle() -> None:
        for i in range(120):  # never the whole body
            for _, writer in lorises:
                writer.write(body[i : i + 1])
            await asyncio.sleep(0.01)

    trickling = asyncio.ensure_future(trickle())
    worst = 0.0
    for n in range(10):
        started = time.perf_counter()
        status, cache, _ = await post(client, proxy, chat_bytes(f"Served beside lorises {n}?"))
        assert (status, cache) == (200, "MISS")
        worst = max(worst, time.perf_counter() - started)
    assert not trickling.done()  # the lorises were still at it all along
    await trickling
    assert worst < 0.25
    for _, writer in lorises:
        writer.close()
    assert len(fake.chat_calls) == 10  # no partial body reached the model
    assert len(await stored_questions(proxy)) == 10


async def test_a_body_that_takes_too_long_is_cut_off_with_an_openai_shaped_408(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(body_read_timeout=0.5)
    reader, writer = await open_raw(proxy, 1000)

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(60):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)

    trickling = asyncio.ensure_future(trickle())
    started = time.perf_counter()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    finally:
        trickling.cancel()
        writer.close()
    assert time.perf_counter() - started < 1.5
    assert head.startswith(b"HTTP/1.1 408 ")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    error = orjson.loads(await reader.readexactly(length))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fake.chat_calls == []
    await healthy(client, proxy, "a body cut off")


@pytest.mark.parametrize(
    "served",
    [CANCELLING, SERVE],
    indirect=True,
)
async def test_a_client_leaving_mid_body_reaches_no_one_and_is_no_error(
    served: TestServer | Served,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, _ = upstream
    caplog.set_level(logging.WARNING)
    body = chat_bytes("Half a question?", data_uri(jpeg_bytes(5)))
    for _ in range(5):
        _, writer = await open_raw(served, len(body))
        writer.write(body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.1)
    assert fake.chat_calls == []
    await healthy(client, served, "half a body")
    assert await stored_questions(served) == ["healthy after half a body?"]
    assert [r.getMessage() for r in caplog.records] == []  # a client leaving is no error


async def test_a_leader_leaving_while_the_model_answers_does_not_hurt_its_followers(
    served: TestServer | Served,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    fake.latency = 0.3
    body = chat_bytes("Who leaves first?", data_uri(jpeg_bytes(6)))
    _, writer = await open_raw(served, len(body))
    writer.write(body)
    await writer.drain()
    await asyncio.sleep(0.05)  # the leader's request is with the model
    followers = [asyncio.ensure_future(post(client, served, body)) for _ in range(3)]
    await asyncio.sleep(0.05)
    writer.close()  # the leader leaves before the answer
    # A handler that runs on gets the answer and shares it. A cancelled one gives up its call:
    # the first follower to wake asks the model and the others follow it. Either way no
    # follower sees an error.
    caches, calls = (["HIT"] * 3, 1) if isinstance(served, Served) else (["HIT", "HIT", "MISS"], 2)
    outcomes = await asyncio.gather(*followers)
    assert sorted(follower_cache for _, follower_cache, _ in outcomes) == caches
    for status, _, answer in outcomes:
        assert status == 200
        assert "stand-in" in orjson.loads(answer)["choices"][0]["message"]["content"]
    assert len(fake.chat_calls) == calls
    assert (await post(client, served, body))[:2] == (200, "HIT")
    assert await stored_questions(served) == ["Who leaves first?"]


async def test_a_streaming_leader_leaving_mid_stream_leaves_its_followers_the_whole_stream(
    served: TestServer | Served,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, _ = upstream
    caplog.set_level(logging.WARNING)
    words = " ".join(["whole"] * 30)
    frames = list(replay_frames(openai_answer("qwen3-vl", words), include_usage=False))
    fake.push(Reply(stream_frames=frames, frame_delay=0.02))
    body = orjson.dumps(openai_chat("Stream, then leave?", data_uri(jpeg_bytes(8)), stream=True))
    reader, writer = await open_raw(served, len(body))
    writer.write(body)
    await writer.drain()
    await reader.readuntil(b"data: ")  # the stream has begun
    followers = [asyncio.ensure_future(post(client, served, body)) for _ in range(3)]
    await asyncio.sleep(0.05)
    writer.close()  # the leader leaves mid-stream; its followers are reading the same stream
    outcomes = await asyncio.gather(*followers)
    # Whether or not the server cancels the leader's handler, the stream is read to its end
    # for the followers: one upstream call, the whole answer to each, and it is stored.
    assert [(status, cache) for status, cache, _ in outcomes] == [(200, "HIT")] * 3
    for _, _, answer in outcomes:
        assert answer == b"".join(frames)
    assert len(fake.chat_calls) == 1
    status, cache, answer = await post(client, served, body)
    assert (status, cache) == (200, "HIT") and sse_text(answer) == words
    assert await stored_questions(served) == ["Stream, then leave?"]
    # The client left; the upstream did nothing wrong and is not blamed.
    assert [r.getMessage() for r in caplog.records] == []

"""Hostile input end to end: the real proxy, the real upstream double, real sockets on 127.0.0.1.

Each test sends what an attacker or a broken client would, then checks what issue 4 asks: the
proxy stays up and answers the next normal request (and caches it), the hostile request gets an
OpenAI-shaped error or reaches the upstream byte for byte, and nothing wrong is stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import io
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from PIL import Image
from yarl import URL

from embeddings.embedder import Embedder, load_embedder
from embeddings.keys import question_fingerprint
from proxy.app import STORE, create_app, settle
from proxy.demo import product_photo
from proxy.errors import Uncacheable
from proxy.fetch import PublicOnlyResolver, is_public_address
from proxy.protocol import parse_chat
from proxy.recorder import Exchange
from proxy.settings import Settings
from proxy.sse import replay_frames
from proxy.standin import openai_answer
from store.reports import EntryFilter
from tests.conftest import (
    AdminFactory,
    ProxyFactory,
    data_uri,
    jpeg_bytes,
    native_chat,
    openai_chat,
)
from tests.fakes import FakeUpstream, Reply

CHAT_PATH = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer sk-hostile", "Content-Type": "application/json"}
MIB = 1024 * 1024


async def post(
    client: aiohttp.ClientSession, proxy: TestServer | Served, body: bytes
) -> tuple[int, str, bytes]:
    data = io.BytesIO(body) if len(body) > MIB else body  # aiohttp warns about big raw bytes
    async with client.post(proxy.make_url(CHAT_PATH), data=data, headers=AUTH) as r:
        return r.status, r.headers.get("X-Cache", ""), await r.read()


async def healthy(client: aiohttp.ClientSession, proxy: TestServer | Served, tag: str) -> None:
    """A normal request after a hostile one: answered by the upstream, then from the cache."""
    body = orjson.dumps(openai_chat(f"healthy after {tag}?", data_uri(jpeg_bytes(7))))
    assert (await post(client, proxy, body))[:2] == (200, "MISS"), tag
    assert (await post(client, proxy, body))[:2] == (200, "HIT"), tag


async def stored_questions(proxy: TestServer | Served) -> list[str]:
    """The questions of every entry in SQL, once pending writes are committed."""
    await settle(proxy.app)
    entries = await proxy.app[STORE].list_entries(EntryFilter(), limit=1000)
    return sorted(entry.question for entry in entries)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chat_bytes(question: str, *images: str) -> bytes:
    return orjson.dumps(openai_chat(question, *images))


class Pictures:
    """A picture server on 127.0.0.1 that counts its requests: a photo, an SVG, a redirect, and
    photos that never finish (headers, then nothing; or a byte now and then)."""

    server: TestServer

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.release = asyncio.Event()  # ends the handlers that never finish

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits.append(name)
        if name == "drawing.svg":
            return web.Response(body=SVG, content_type="image/svg+xml")
        if name == "redirect":
            raise web.HTTPFound(request.query["to"])
        if name not in ("stall.jpg", "trickle.jpg"):
            return web.Response(body=jpeg_bytes(3), content_type="image/jpeg")
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 1_000_000
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await response.write(b"\xff\xd8")
            while not self.release.is_set():
                if name == "stall.jpg":
                    await self.release.wait()
                else:
                    await asyncio.sleep(0.05)
                    await response.write(b"\0")
        return response


@pytest.fixture
async def pictures(aiohttp_server: Any) -> AsyncIterator[Pictures]:
    pictures = Pictures()
    pictures.server = await aiohttp_server(pictures.app())
    yield pictures
    pictures.release.set()


# --- oversized, long and deep bodies ------------------------------------------------------------


async def test_fifty_megabyte_image_passes_through_untouched_and_a_larger_body_is_413(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()  # --max-body-bytes 64 MiB, --max-image-bytes 20 MiB
    head, tail = chat_bytes("What is in this huge picture?", "@@").split(b"@@")
    # 50 MiB of base64 (37.5 MiB of image bytes): under the body limit, over the image limit.
    body = head + b"data:image/jpeg;base64," + b"A" * (50 * MIB) + tail
    assert len(body) < Settings.model_fields["max_body_bytes"].default
    started = time.perf_counter()
    status, cache, _ = await post(client, proxy, body)
    assert (status, cache) == (200, "BYPASS")
    assert time.perf_counter() - started < 10
    assert digest(fake.chat_calls[-1].body) == digest(body)  # byte for byte
    await healthy(client, proxy, "a 50 MB image")
    assert await stored_questions(proxy) == ["healthy after a 50 MB image?"]

    small = await make_proxy(max_body_bytes=32 * MIB, data_dir=tmp_path / "small")
    calls = len(fake.chat_calls)
    status, cache, answer = await post(client, small, body)
    assert (status, cache) == (413, "BYPASS")
    error = orjson.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert len(fake.chat_calls) == calls
    await healthy(client, small, "a body over the limit")
    assert await stored_questions(small) == ["healthy after a body over the limit?"]


async def test_ten_thousand_messages_are_keyed_and_ten_thousand_images_bypass(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": f"turn {i}"} for i in range(10_000)]
    body = orjson.dumps({"model": "qwen3-vl-8b-instruct", "messages": messages})
    for expected in ("MISS", "HIT"):  # a long conversation is still a conversation
        started = time.perf_counter()
        assert (await post(client, proxy, body))[:2] == (200, expected)
        assert time.perf_counter() - started < 2
    assert [digest(c.body) for c in fake.chat_calls] == [digest(body)]

    tiny = data_uri(jpeg_bytes(1, size=(8, 8)))
    parts = [{"type": "image_url", "image_url": {"url": tiny}}] * 10_000
    many = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]})
    for _ in range(2):
        assert (await post(client, proxy, many))[:2] == (200, "BYPASS")
    assert digest(fake.chat_calls[-1].body) == digest(many)
    await healthy(client, proxy, "10,000 messages")
    assert await stored_questions(proxy) == ["healthy after 10,000 messages?", "turn 9998"]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@dataclass(frozen=True)
class Deep:
    """A deeply nested body, what the upstream double answers it, and whether it is a chat."""

    name: str
    body: bytes
    upstream_status: int = 200
    chat: bool = True  # parsed as a chat the cache refuses to key (counted as a bypass)


DEEP_BODIES = [
    Deep("100,000 open brackets", b"[" * 100_000, 400, chat=False),
    Deep("100,000 levels", nested(100_000), 400, chat=False),
    # JSON parsers stop at ~1,000 levels: not a chat to the proxy, nor to the double.
    Deep(
        "100,000 levels in a chat",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi", "x": '
        + nested(100_000)
        + b"}]}",
        400,
        chat=False,
    ),
    # Parsed, but too deep for the key builder and the recorder, which re-serialise it.
    Deep(
        "300 levels in tools",
        b'{"model": "m", "tools": ' + nested(300) + b', "messages": [{"role": "user", '
        b'"content": "deep tools?"}]}',
    ),
    Deep(
        "300 levels in tool_calls",
        b'{"model": "m", "messages": [{"role": "assistant", "content": null, "tool_calls": '
        + nested(300)
        + b'}, {"role": "user", "content": "deep calls?"}]}',
    ),
    Deep(
        "300 levels in a text part",
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
        b'"text": "deep part?", "junk": ' + nested(300) + b"}]}]}",
    ),
    Deep(
        "300 levels in metadata",
        b'{"model": "m", "metadata": ' + nested(300) + b', "messages": [{"role": "user", '
        b'"content": "deep metadata?"}]}',
    ),
]


async def test_deeply_nested_json_passes_through_as_a_client_matter(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Any,
) -> None:
    fake, _ = upstream
    # --record re-serialises every keyed exchange: it must never meet a body it cannot write.
    proxy = await make_proxy(record=tmp_path / "exchanges.jsonl")
    admin = await make_admin(proxy)
    caplog.set_level(logging.ERROR)
    for deep in DEEP_BODIES:
        for _ in range(2):
            status, cache, _ = await post(client, proxy, deep.body)
            assert (status, cache) == (deep.upstream_status, "BYPASS"), deep.name
            assert digest(fake.chat_calls[-1].body) == digest(deep.body), deep.name
    await healthy(client, proxy, "deep JSON")
    # Input the proxy cannot key is the client's matter: no failure counted, no error logged.
    assert [r.getMessage() for r in caplog.records] == []
    async with client.get(admin.make_url("/metrics")) as response:
        text = await response.text()
    failures = [line for line in text.splitlines() if line.startswith("vlcache_failures_total{")]
    assert failures and all(line.endswith(" 0.0") for line in failures), failures
    refused = 2 * sum(deep.chat for deep in DEEP_BODIES)
    assert f'vlcache_requests_total{{outcome="bypass"}} {refused}.0' in text.splitlines()
    assert await stored_questions(proxy) == ["healthy after deep JSON?"]


def test_the_nesting_limit_leaves_room_for_the_key_builder_and_the_recorder() -> None:
    def body(depth: int) -> bytes:  # ``depth`` levels in all, the request object included
        return (
            b'{"model": "m", "tools": ' + nested(depth - 1) + b', "messages": [{"role": '
            b'"assistant", "tool_calls": ' + nested(depth - 3) + b'}, {"role": "user", '
            b'"content": "hi"}]}'
        )

    chat = parse_chat(body(240), max_images=4, max_image_bytes=MIB)
    assert chat is not None
    assert len(question_fingerprint(chat.format, chat.model, chat.turns, chat.params)) == 64
    exchange = Exchange(
        namespace="anonymous", method="POST", path=CHAT_PATH, request_format="openai", model="m",
        stream=False, cache="MISS", match=None, latency_ms=1.0, request=body(240), status=200,
        content_type="application/json", response=b"{}", at=0.0,
    )  # fmt: skip
    assert orjson.loads(exchange.line())["request"]["model"] == "m"
    with pytest.raises(Uncacheable, match="nested"):
        parse_chat(body(241), max_images=4, max_image_bytes=MIB)


# --- images that are not photos ------------------------------------------------------------------

SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9"/></svg>'
NOT_IMAGES = {
    "svg, base64": "data:image/svg+xml;base64," + base64.b64encode(SVG).decode(),
    "svg, upper case": "data:IMAGE/SVG+XML;base64," + base64.b64encode(SVG).decode(),
    "svg, plain text": "data:image/svg+xml;utf8," + SVG.decode(),
    "pdf": "data:application/pdf;base64,JVBERi0xLjQKJcfsj6IK",
    "html": "data:text/html,<script>alert(1)</script>",
    "octet-stream": "data:application/octet-stream;base64," + base64.b64encode(b"\0" * 64).decode(),
    "no media type": "data:;base64," + base64.b64encode(jpeg_bytes(2)).decode(),
    "jpeg, not base64": "data:image/jpeg,not-base64-at-all",
    "no comma": "data:image/jpeg;base64",
    "javascript URL": "javascript:alert(1)",
}


async def test_svg_and_non_image_data_uris_pass_through_and_are_never_stored(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    pictures: Pictures,
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    uris = {**NOT_IMAGES, "svg served at a URL": str(pictures.server.make_url("/drawing.svg"))}
    for name, uri in uris.items():
        for form in ("openai", "native"):
            body = orjson.dumps(
                openai_chat(f"What is {name}?", uri)
                if form == "openai"
                else native_chat(f"What is {name}?", uri)
            )
            for _ in range(2):
                assert (await post(client, proxy, body))[:2] == (200, "BYPASS"), (name, form)
                assert digest(fake.chat_calls[-1].body) == digest(body), (name, form)
    await healthy(client, proxy, "SVG and non-image data URIs")
    assert await stored_questions(proxy) == ["healthy after SVG and non-image data URIs?"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("efficientnet-lite0", precision="fp32")


def jpeg_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def animations() -> dict[str, bytes]:
    """Animated GIF and WebP of three product shots, and stills of their first and last frames
    as a client would send them (made outside the event loop)."""
    shots = [("X5 Pro", "2999", 40), ("Tab 11", "1899", 150), ("Watch 3", "899", 90)]
    frames = [Image.open(io.BytesIO(product_photo(*shot))).convert("RGB") for shot in shots]
    made = {}
    for kind in ("GIF", "WEBP"):
        out = io.BytesIO()
        frames[0].save(
            out, format=kind, save_all=True, append_images=frames[1:], duration=300, loop=0
        )
        animated = Image.open(io.BytesIO(out.getvalue()))
        assert animated.n_frames == 3
        made[kind] = out.getvalue()
        made[f"{kind} first frame"] = jpeg_of(animated)
        animated.seek(2)
        made[f"{kind} last frame"] = jpeg_of(animated)
    return made


async def test_animated_gif_and_webp_are_seen_by_their_first_frame(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    embedder: Embedder,
    animations: dict[str, bytes],
    client: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    fake, _ = upstream
    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "data",
        embedder="efficientnet-lite0",
        flush_interval=0.05,
    )
    proxy = await aiohttp_server(create_app(settings, embedder=embedder))
    vectors = proxy.app[STORE].vectors
    assert vectors is not None

    async def ask(question: str, image: bytes, media: str) -> tuple[str, str]:
        body = chat_bytes(question, data_uri(image, media))
        async with client.post(proxy.make_url(CHAT_PATH), data=body, headers=AUTH) as r:
            assert r.status == 200
            await r.read()
            return r.headers["X-Cache"], r.headers.get("X-Cache-Match", "")

    for kind, media in (("GIF", "image/gif"), ("WEBP", "image/webp")):
        question = f"What product is in this {kind}?"
        assert await ask(question, animations[kind], media) == ("MISS", "")
        await settle(proxy.app)
        assert await ask(question, animations[kind], media) == ("HIT", "exact")
        first = await ask(question, animations[f"{kind} first frame"], "image/jpeg")
        assert first == ("HIT", "semantic")
        last = await ask(question, animations[f"{kind} last frame"], "image/jpeg")
        assert last == ("MISS", "")
    # SVG markup labelled as a PNG: the exact tier may key its bytes, the index never sees it.
    await ask("What product is in this GIF?", SVG, "image/png")
    await settle(proxy.app)
    assert vectors.size == 4  # two animations and two last frames, nothing else
    assert len(fake.chat_calls) == 5
    await healthy(client, proxy, "animations")


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


@dataclass
class Served:
    """A proxy served as ``vlcache serve`` serves it (``web.run_app``'s defaults): a client that
    leaves does not cancel its handler. aiohttp's test server, behind ``make_proxy``, cancels it."""

    app: web.Application
    port: int

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")


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


async def open_raw(proxy: TestServer | Served, declared: int) -> tuple[asyncio.StreamReader, Any]:
    """A raw connection that has sent a chat request's headers, announcing ``declared`` bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-hostile\r\nContent-Length: {declared}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


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


async def test_a_streaming_leader_leaving_mid_stream_sends_its_followers_upstream(
    served: TestServer | Served,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, _ = upstream
    caplog.set_level(logging.WARNING)
    words = " ".join(["partial"] * 30)
    frames = list(replay_frames(openai_answer("qwen3-vl", words), include_usage=False))
    fake.push(Reply(stream_frames=frames, frame_delay=0.02))
    body = orjson.dumps(openai_chat("Stream, then leave?", data_uri(jpeg_bytes(8)), stream=True))
    reader, writer = await open_raw(served, len(body))
    writer.write(body)
    await writer.drain()
    await reader.readuntil(b"data: ")  # the stream has begun
    followers = [asyncio.ensure_future(post(client, served, body)) for _ in range(3)]
    await asyncio.sleep(0.05)
    writer.close()  # the leader leaves mid-stream: its answer is incomplete, not to be shared
    # The first follower to wake asks the model; the other two follow it.
    outcomes = await asyncio.gather(*followers)
    assert sorted(cache for _, cache, _ in outcomes) == ["HIT", "HIT", "MISS"]
    for status, _, answer in outcomes:
        assert status == 200
        assert answer.endswith(b"data: [DONE]\n\n") and b"partial" not in answer
    assert len(fake.chat_calls) == 2
    status, cache, answer = await post(client, served, body)
    assert (status, cache) == (200, "HIT") and b"partial" not in answer
    assert await stored_questions(served) == ["Stream, then leave?"]
    # The client left; the upstream did nothing wrong and is not blamed.
    assert [r.getMessage() for r in caplog.records] == []


# --- memory ---------------------------------------------------------------------------------------


def hostile_body(n: int) -> bytes | None:
    """The ``n``-th of a cycle of hostile requests, each a little different (None: half a body,
    then the client leaves)."""
    tag = f"#{n}"
    kind = n % 10
    if kind == 0:
        return b'{"model": "m", "messages": [{"role": "user", "content": "' + tag.encode()
    if kind == 1:
        return b"[" * 100_000 + tag.encode()
    if kind == 2:
        return chat_bytes(f"svg {tag}", NOT_IMAGES["svg, base64"])
    if kind == 3:
        return chat_bytes(f"pdf {tag}", NOT_IMAGES["pdf"])
    if kind == 4:
        return chat_bytes(f"five {tag}", *[data_uri(jpeg_bytes(1, size=(8, 8)))] * 5)
    if kind == 5:
        return chat_bytes(f"big {tag}", "data:image/jpeg;base64," + "A" * 100_000)
    if kind == 6:
        return chat_bytes(f"private {tag}", f"http://127.0.0.1:9/{n}.jpg")
    if kind == 7:
        return DEEP_BODIES[3].body.replace(b"deep tools?", tag.encode())
    if kind == 8:
        return orjson.dumps({"model": n, "messages": [{"role": "user", "content": tag}]})
    return None


async def test_memory_stays_bounded_across_hostile_requests(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    """Live Python memory (tracemalloc, after a collection) across 200 hostile requests."""
    fake, _ = upstream
    proxy = await make_proxy(
        max_image_bytes=64 * 1024, max_images=4, allow_private_image_urls=False
    )

    async def send(n: int) -> None:
        body = hostile_body(n)
        if body is not None:
            status, cache, _ = await post(client, proxy, body)
            assert cache == "BYPASS" and status in (200, 400), n
            return
        _, writer = await open_raw(proxy, 10_000)
        writer.write(b'{"model": "m", "messages": [' * 100)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def live_bytes() -> int:
        await settle(proxy.app)
        fake.calls.clear()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    for n in range(50):  # warm up: pools, caches, first-use allocations
        await send(n)
    await proxy.app[STORE].sync()  # the periodic sync's first run sets up SQLAlchemy's mappers
    tracemalloc.start()
    try:
        before = await live_bytes()
        for n in range(50, 250):
            await send(n)
        grown = await live_bytes() - before
    finally:
        tracemalloc.stop()
    # ~4 MB of hostile bytes went through; what stays is bounded library caches (yarl's parsed
    # URLs, orjson's keys: measured ~50 KB, less in each later round), never the bodies.
    assert grown < 128 * 1024, f"{grown} bytes still live after 200 hostile requests"
    await healthy(client, proxy, "200 hostile requests")
    assert await stored_questions(proxy) == ["healthy after 200 hostile requests?"]

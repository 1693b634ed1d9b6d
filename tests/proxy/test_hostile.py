"""Hostile input end to end: the real proxy, the real upstream double, real sockets on 127.0.0.1.

Each test sends what an attacker or a broken client would, then checks what issue 4 asks: the
proxy stays up and answers the next normal request (and caches it), the hostile request gets an
OpenAI-shaped error or reaches the upstream byte for byte, and nothing wrong is stored.
"""

from __future__ import annotations

import base64
import gc
import io
import logging
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from embeddings.embedder import Embedder, load_embedder
from embeddings.keys import question_fingerprint
from proxy.app import STORE, create_app, settle
from proxy.demo import product_photo
from proxy.errors import Uncacheable
from proxy.protocol import parse_chat
from proxy.recorder import Exchange
from proxy.settings import Settings
from tests.conftest import (
    AdminFactory,
    ProxyFactory,
    data_uri,
    jpeg_bytes,
    native_chat,
    openai_chat,
)
from tests.fakes import FakeUpstream
from tests.proxy.hostile import (
    AUTH,
    CHAT_PATH,
    MIB,
    SVG,
    Pictures,
    chat_bytes,
    digest,
    healthy,
    open_raw,
    post,
    stored_questions,
)

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

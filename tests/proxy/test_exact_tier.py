"""The exact tier end to end: real proxy, real upstream double, real databases."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

import proxy.calls as proxy_calls
import proxy.service as proxy_service
from tests.conftest import ProxyFactory, data_uri, jpeg_bytes, native_chat, openai_chat
from tests.fakes import FakeUpstream

KEY_A = {"Authorization": "Bearer sk-tenant-a"}
KEY_B = {"Authorization": "Bearer sk-tenant-b"}


async def post(
    client: aiohttp.ClientSession,
    proxy: TestServer,
    body: object,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, str], bytes]:
    async with client.post(
        proxy.make_url(path), json=body, headers=KEY_A if headers is None else headers
    ) as response:
        return response.status, dict(response.headers), await response.read()


async def test_repeat_is_exact_hit_and_variants_miss(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    photo = data_uri(jpeg_bytes(1))
    request = openai_chat("What phone is this? Does it support 5G?", photo)

    status, headers, first = await post(client, proxy, request)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert len(fake.chat_calls) == 1
    assert fake.chat_calls[0].body == aiohttp.JsonPayload(request)._value  # original bytes went up

    status, headers, again = await post(client, proxy, request)
    assert (status, headers["X-Cache"], headers["X-Cache-Match"]) == (200, "HIT", "exact")
    assert headers["X-Cache-Entry"].isdigit()
    assert headers["Content-Type"].startswith("application/json")
    assert again == first
    assert len(fake.chat_calls) == 1

    # Same question, whitespace and case differ only: same fingerprint.
    status, headers, _ = await post(
        client, proxy, openai_chat("  what PHONE is this?\n Does it support 5G? ", photo)
    )
    assert headers["X-Cache"] == "HIT"

    _, headers, _ = await post(client, proxy, openai_chat("Is it waterproof?", photo))
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await post(
        client,
        proxy,
        openai_chat("What phone is this? Does it support 5G?", data_uri(jpeg_bytes(2))),
    )
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await post(client, proxy, request, KEY_B)
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await post(client, proxy, request, {})
    assert headers["X-Cache"] == "MISS"  # no credential: its own anonymous namespace
    assert len(fake.chat_calls) == 5


async def test_sampling_knobs_share_an_answer_but_shaping_params_do_not(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    photo = data_uri(jpeg_bytes(3))
    await post(client, proxy, openai_chat("Price?", photo, temperature=0.2))
    _, headers, _ = await post(
        client,
        proxy,
        openai_chat("Price?", photo, temperature=0.9, top_p=0.5, max_tokens=99, user="u"),
    )
    assert headers["X-Cache"] == "HIT"
    _, headers, _ = await post(client, proxy, openai_chat("Price?", photo, seed=7))
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await post(client, proxy, openai_chat("Price?", photo, model="qwen3-vl-32b"))
    assert headers["X-Cache"] == "MISS"


async def test_shared_namespace_lets_credentials_share(
    make_proxy,
    db_url: str,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(db=db_url, shared_namespace="shop")
    request = openai_chat("What is this?", data_uri(jpeg_bytes(4)))
    _, headers, _ = await post(client, proxy, request, KEY_A)
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await post(client, proxy, request, KEY_B)
    assert headers["X-Cache"] == "HIT"
    _, headers, _ = await post(client, proxy, request, {"api-key": "azure-style"})
    assert headers["X-Cache"] == "HIT"
    assert len(fake.chat_calls) == 1


async def test_native_format_miss_then_hit(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    request = native_chat("这是什么手机?", data_uri(jpeg_bytes(5)))
    path = "/api/v1/services/aigc/multimodal-generation/generation"
    status, headers, first = await post(client, proxy, request, path=path)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert fake.chat_calls[0].path == path
    status, headers, again = await post(client, proxy, request, path=path)
    assert (status, headers["X-Cache"], headers["X-Cache-Match"]) == (200, "HIT", "exact")
    assert again == first
    assert len(fake.chat_calls) == 1


async def test_cache_control_no_cache_refreshes_and_no_store_keeps_nothing(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    request = openai_chat("Describe it", data_uri(jpeg_bytes(6)))
    await post(client, proxy, request)
    _, headers, _ = await post(client, proxy, request, {**KEY_A, "Cache-Control": "no-cache"})
    assert headers["X-Cache"] == "MISS"
    fresh_entry = headers["X-Cache-Entry"]
    _, headers, _ = await post(client, proxy, request)
    assert (headers["X-Cache"], headers["X-Cache-Entry"]) == ("HIT", fresh_entry)

    other = openai_chat("Describe it briefly", data_uri(jpeg_bytes(6)))
    _, headers, _ = await post(client, proxy, other, {**KEY_A, "Cache-Control": "no-store"})
    assert headers["X-Cache"] == "MISS" and "X-Cache-Entry" not in headers
    _, headers, _ = await post(client, proxy, other)
    assert headers["X-Cache"] == "MISS"
    assert len(fake.chat_calls) == 4


async def test_image_url_is_fetched_and_keyed_by_its_bytes(
    proxy: TestServer,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    aiohttp_server,
) -> None:
    from aiohttp import web

    pictures = {"a": jpeg_bytes(7), "b": jpeg_bytes(7), "c": jpeg_bytes(8)}

    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=pictures[request.match_info["name"]], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}.jpg", picture)
    images = await aiohttp_server(app)
    ask = lambda name: openai_chat("What is it?", str(images.make_url(f"/{name}.jpg")))  # noqa: E731
    _, headers, _ = await post(client, proxy, ask("a"))
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await post(client, proxy, ask("b"))  # another URL, the same bytes
    assert headers["X-Cache"] == "HIT"
    _, headers, _ = await post(client, proxy, ask("c"))
    assert headers["X-Cache"] == "MISS"


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The request bodies the proxy parsed, in order."""
    bodies: list[bytes] = []
    real_parse = proxy_calls.parse_chat

    def counted(body: bytes, **kwargs: Any) -> Any:
        bodies.append(body)
        return real_parse(body, **kwargs)

    monkeypatch.setattr(proxy_calls, "parse_chat", counted)
    return bodies


async def test_a_body_is_kept_from_its_first_exact_hit_on_and_then_skips_the_parse(
    proxy: TestServer,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    parsed: list[bytes],
) -> None:
    fake, _ = upstream
    request = openai_chat("Which charger fits this phone?", data_uri(jpeg_bytes(3)))
    caches = []
    for _ in range(4):
        _, headers, _ = await post(client, proxy, request)
        caches.append(headers["X-Cache"])
    # The miss and the first hit are parsed; the hit keeps the body, so the repeats after it
    # are found by their bytes alone.
    assert caches == ["MISS", "HIT", "HIT", "HIT"]
    assert len(parsed) == 2
    assert len(fake.chat_calls) == 1


async def test_a_run_of_one_off_misses_does_not_push_out_a_body_that_repeats(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    parsed: list[bytes],
) -> None:
    photo = data_uri(jpeg_bytes(4))
    hot = openai_chat("Is this the black model?", photo)
    # Room for about three bodies of this size.
    monkeypatch.setattr(proxy_service, "_KNOWN_BODY_BYTES", 3 * len(orjson.dumps(hot)) + 100)
    proxy = await make_proxy()
    assert [(await post(client, proxy, hot))[1]["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    for n in range(6):
        _, headers, _ = await post(client, proxy, openai_chat(f"One-off question {n}?", photo))
        assert headers["X-Cache"] == "MISS"
    before = len(parsed)
    _, headers, _ = await post(client, proxy, hot)
    assert headers["X-Cache"] == "HIT"
    assert len(parsed) == before  # still known by its bytes

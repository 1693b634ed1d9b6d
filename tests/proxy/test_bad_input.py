"""Bad input never crashes the proxy, never poisons the cache: it passes through or gets a 413."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream

AUTH = {"Authorization": "Bearer sk-bad", "Content-Type": "application/json"}

BAD_BODIES = [
    pytest.param(b'{"model": "m", "messages": [', id="malformed-json"),
    pytest.param(b'[{"role": "user", "content": "hi"}]', id="json-array"),
    pytest.param(b'"just a string"', id="json-string"),
    pytest.param(b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', id="model-int"),
    pytest.param(b'{"model": "m", "messages": "hi"}', id="messages-string"),
    pytest.param(b'{"model": "m", "messages": []}', id="messages-empty"),
    pytest.param(b'{"model": "m", "messages": [42]}', id="message-int"),
    pytest.param(b'{"model": "m", "messages": [{"content": "no role"}]}', id="no-role"),
    pytest.param(b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', id="content-int"),
    pytest.param(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
        id="text-int",
    ),
    pytest.param(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",'
        b' "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}]}]}',
        id="corrupt-base64",
    ),
    pytest.param(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",'
        b' "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}]}]}',
        id="non-image-data-uri",
    ),
    pytest.param(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",'
        b' "image_url": {"url": "file:///etc/passwd"}}]}]}',
        id="file-url",
    ),
    pytest.param(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "video_url",'
        b' "video_url": {"url": "https://example.invalid/v.mp4"}}]}]}',
        id="video-part",
    ),
    pytest.param(b'{"model": "m", "input": {"messages": 3}}', id="native-messages-int"),
    pytest.param(
        b'{"model": "m", "input": {"messages": [{"role": "user", "content": "x"}]},'
        b' "parameters": 1}',
        id="native-parameters-int",
    ),
    pytest.param(b"\xff\xfe not utf-8", id="binary"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_bad_bodies_pass_through_untouched(
    body: bytes,
    make_proxy,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    for _ in range(2):
        async with client.post(
            proxy.make_url("/v1/chat/completions"), data=body, headers=AUTH
        ) as r:
            assert r.headers["X-Cache"] == "BYPASS"
            await r.read()
    assert [c.body for c in fake.chat_calls] == [body, body]  # byte for byte, never cached
    request = openai_chat("still healthy?", data_uri(jpeg_bytes(20)))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "MISS")


async def test_too_many_images_bypass(
    make_proxy, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(max_images=2)
    request = openai_chat("Compare", *(data_uri(jpeg_bytes(i)) for i in range(3)))
    for _ in range(2):
        async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
            assert (r.status, r.headers["X-Cache"]) == (200, "BYPASS")
    assert len(fake.chat_calls) == 2


async def test_body_over_limit_is_413_in_openai_shape(
    make_proxy, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(max_body_bytes=50_000)
    request = openai_chat("Big", data_uri(b"\xff\xd8" + b"\x00" * 60_000))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
        assert r.status == 413
        error = (await r.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}

    async def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(10):
            yield b" " * 10_000

    async with client.post(
        proxy.make_url("/v1/chat/completions"), data=chunks(), headers=AUTH
    ) as r:
        assert r.status == 413
    assert fake.chat_calls == []
    async with client.post(proxy.make_url("/v1/chat/completions"), json=openai_chat("ok")) as r:
        assert r.status == 200

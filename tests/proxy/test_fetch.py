"""Image URLs cannot reach private networks; fetches are bounded in size and time."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import ImageFetchError
from proxy.fetch import ImageFetcher, create_fetch_session, is_public_address
from tests.conftest import jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("224.0.0.1", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_public_address_rule(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.fixture
async def picture_server(aiohttp_server: Any) -> TestServer:
    async def picture(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "redirect":
            raise web.HTTPFound("/a.jpg")
        if name == "big":
            return web.Response(body=b"\xff" * 300_000, content_type="image/jpeg")
        if name == "svg":
            return web.Response(body=b"<svg/>", content_type="image/svg+xml")
        return web.Response(body=jpeg_bytes(1), content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}.jpg", picture)
    return await aiohttp_server(app)


async def test_private_targets_are_refused_by_literal_and_by_name(
    picture_server: TestServer,
) -> None:
    async with create_fetch_session(allow_private=False) as session:
        fetcher = ImageFetcher(session, max_bytes=1 << 20, timeout=2, allow_private=False)
        port = picture_server.port
        for url in (
            f"http://127.0.0.1:{port}/a.jpg",
            f"http://localhost:{port}/a.jpg",
            f"http://[::ffff:127.0.0.1]:{port}/a.jpg",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/a.jpg",
            "ftp://example.org/a.jpg",
        ):
            with pytest.raises(ImageFetchError):
                await fetcher.fetch(url)


async def test_limits_on_size_type_and_redirects(picture_server: TestServer) -> None:
    async with create_fetch_session(allow_private=True) as session:
        fetcher = ImageFetcher(session, max_bytes=100_000, timeout=2, allow_private=True)
        assert await fetcher.fetch(str(picture_server.make_url("/redirect.jpg"))) == jpeg_bytes(1)
        for name in ("big", "svg", "missing/x"):
            with pytest.raises(ImageFetchError):
                await fetcher.fetch(str(picture_server.make_url(f"/{name}.jpg")))


async def test_proxy_passes_a_private_image_url_through_untouched(
    make_proxy,
    upstream: tuple[FakeUpstream, TestServer],
    picture_server: TestServer,
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(allow_private_image_urls=False)
    request = openai_chat("What is it?", str(picture_server.make_url("/a.jpg")))
    for _ in range(2):
        async with client.post(proxy.make_url("/v1/chat/completions"), json=request) as r:
            assert (r.status, r.headers["X-Cache"]) == (200, "BYPASS")
    assert len(fake.chat_calls) == 2

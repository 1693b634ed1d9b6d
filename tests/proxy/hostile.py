"""What the hostile-input tests share: posting, health checks, stored questions, raw sockets,
and a picture server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.app import STORE, settle
from store.reports import EntryFilter
from tests.conftest import (
    data_uri,
    jpeg_bytes,
    openai_chat,
)

CHAT_PATH = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer sk-hostile", "Content-Type": "application/json"}
MIB = 1024 * 1024
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9"/></svg>'


@dataclass
class Served:
    """A proxy served as ``vlcache serve`` serves it (``web.run_app``'s defaults): a client that
    leaves does not cancel its handler. aiohttp's test server, behind ``make_proxy``, cancels it."""

    app: web.Application
    port: int

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")


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


async def open_raw(proxy: TestServer | Served, declared: int) -> tuple[asyncio.StreamReader, Any]:
    """A raw connection that has sent a chat request's headers, announcing ``declared`` bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-hostile\r\nContent-Length: {declared}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


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

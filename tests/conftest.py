"""Shared fixtures: a real upstream double, the proxy on a real socket, real databases."""

from __future__ import annotations

import base64
import io
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestServer
from blockbuster import blockbuster_ctx
from PIL import Image

from proxy.admin import create_admin_app
from proxy.app import create_app
from proxy.settings import Settings
from tests.fakes import FakeUpstream

PG_ADMIN_URL = os.environ.get(
    "VLCACHE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(autouse=True)
def no_blocking_calls(request: pytest.FixtureRequest) -> Any:
    """Fail any async test that blocks the event loop (file or socket I/O, sleeps...)."""
    if request.node.get_closest_marker("allow_blocking"):
        yield
        return
    with blockbuster_ctx(["proxy", "store", "embeddings"]) as bb:
        # Alembic runs in a worker thread with a private event loop of its own (see
        # store.database.upgrade_schema): blocking there holds up no one's requests.
        # asyncpg stats ~/.pgpass and certificate files once per new pooled connection.
        for function in bb.functions.values():
            function.can_block_functions.append(("store/database.py", {"_upgrade"}))
            function.can_block_functions.append(
                ("asyncpg/connect_utils.py", {"_parse_connect_dsn_and_args"})
            )
        yield bb


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[tuple[FakeUpstream, TestServer]]:
    """The fake model endpoint, listening on 127.0.0.1."""
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    yield fake, server


async def _pg_admin() -> asyncpg.Connection | None:
    try:
        return await asyncpg.connect(PG_ADMIN_URL, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'db' / 'vlcache.db'}"
        return
    async with pg_database() as (url, _):
        yield url


@asynccontextmanager
async def pg_database(prefix: str = "vlcache_test_") -> AsyncIterator[tuple[str, PgAdmin]]:
    """A new PostgreSQL database (its SQLAlchemy URL, and an admin connection to drop or re-create
    it), dropped afterwards; the test is skipped when no server is reachable."""
    admin = await _pg_admin()
    if admin is None:
        pytest.skip(f"no PostgreSQL server reachable at {PG_ADMIN_URL} (set VLCACHE_TEST_PG_URL)")
    name = prefix + uuid.uuid4().hex[:12]
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}", PgAdmin(admin, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass(frozen=True)
class PgAdmin:
    """An admin connection to the server holding a test database, to break it on purpose."""

    connection: asyncpg.Connection
    name: str

    async def drop(self) -> None:
        """Drop the database under the running proxy (connections are forced out)."""
        await self.connection.execute(f'DROP DATABASE "{self.name}" WITH (FORCE)')

    async def create(self) -> None:
        """Create it again, empty."""
        await self.connection.execute(f'CREATE DATABASE "{self.name}"')


ProxyFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def make_proxy(
    aiohttp_server: Any, upstream: tuple[FakeUpstream, TestServer], tmp_path: Path
) -> ProxyFactory:
    """Start a proxy in front of the fake upstream; keyword arguments become settings."""

    async def start(**overrides: Any) -> TestServer:
        fields: dict[str, Any] = {
            "upstream": str(upstream[1].make_url("/")),
            "data_dir": tmp_path / "data",
            "allow_private_image_urls": True,
            "flush_interval": 0.05,
            "embedder": "none",
        }
        fields.update(overrides)
        return await aiohttp_server(create_app(Settings(**fields)))

    return start


AdminFactory = Callable[[TestServer], Awaitable[TestServer]]


@pytest.fixture
async def make_admin(aiohttp_server: Any) -> AdminFactory:
    """Start the admin listener of a started proxy (as ``vlcache serve`` does beside it)."""

    async def start(proxy: TestServer) -> TestServer:
        return await aiohttp_server(create_admin_app(proxy.app))

    return start


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, db_url: str) -> TestServer:
    """A proxy on a fresh database (SQLite and PostgreSQL)."""
    return await make_proxy(db=db_url)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client session."""
    async with aiohttp.ClientSession() as session:
        yield session


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), quality: int = 85) -> bytes:
    """A small real JPEG whose pixels depend on ``seed``."""
    image = Image.new("RGB", size, ((seed * 47) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for x in range(0, size[0], 8):
        image.putpixel((x, (x + seed) % size[1]), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def data_uri(data: bytes, media: str = "image/jpeg") -> str:
    """A base64 data URI."""
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def openai_chat(
    question: str, *images: str, model: str = "qwen3-vl-8b-instruct", **extra: Any
) -> dict[str, Any]:
    """An OpenAI chat request body with image parts then the question."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    parts.append({"type": "text", "text": question})
    return {"model": model, "messages": [{"role": "user", "content": parts}], **extra}


def native_chat(question: str, *images: str, model: str = "qwen3-vl-plus") -> dict[str, Any]:
    """A native (DashScope) request body."""
    content: list[dict[str, str]] = [{"image": u} for u in images]
    content.append({"text": question})
    return {
        "model": model,
        "input": {"messages": [{"role": "user", "content": content}]},
        "parameters": {"result_format": "message"},
    }


def sse_text(body: bytes) -> str:
    """The content an OpenAI ``chat.completion.chunk`` stream spells out (it ends in [DONE])."""
    frames = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    choices = [orjson.loads(frame)["choices"] for frame in frames[:-1]]
    return "".join(c[0]["delta"].get("content") or "" for c in choices if c)

"""Fail-open beyond a lost PostgreSQL: a SQLite file made read-only or deleted, an embedder that
raises or hangs, an index that errors. Each time the request is answered by the upstream, the
failure is counted and logged once per burst, and caching resumes without a restart."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import STORE, create_app, settle
from proxy.demo import product_photo, reencoded
from proxy.settings import Settings
from store.database import upgrade_schema
from store.reports import EntryFilter
from tests.conftest import AdminFactory, ProxyFactory, data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream

ASK = "What phone is this?"


class SwitchableEmbedder:
    """Vectors from an 8x8 greyscale thumbnail; told to fail, it raises or hangs instead."""

    id = "test/switchable"
    dim = 64
    default_threshold = 0.9

    def __init__(self) -> None:
        self.mode = "ok"  # "ok" | "raise" | "hang"
        self.release = threading.Event()  # ends a hang

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self.mode == "raise":
            raise RuntimeError("CUDA error: device-side assert triggered")
        if self.mode == "hang":
            self.release.wait(10)
        rows = []
        for image in images:
            pixels = np.asarray(image.convert("L").resize((8, 8)), np.float32).ravel()
            pixels -= pixels.mean()
            rows.append(pixels / (np.linalg.norm(pixels) or 1.0))
        return np.stack(rows)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    phone = product_photo("X5 Pro", "2999", 40)
    return {"phone": phone, "phone again": reencoded(phone, quality=60)}


async def start(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    tmp_path: Path,
    embedder: SwitchableEmbedder,
    **overrides: Any,
) -> TestServer:
    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "data",
        embedder="efficientnet-lite0",  # replaced by ``embedder``: nothing is loaded
        flush_interval=0.05,
        **overrides,
    )
    return await aiohttp_server(create_app(settings, embedder=embedder))


async def ask(
    client: aiohttp.ClientSession, proxy: TestServer, photo: bytes, question: str = ASK
) -> tuple[str, str]:
    body = openai_chat(question, data_uri(photo))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200
        await r.read()
        return r.headers["X-Cache"], r.headers.get("X-Cache-Match", "")


async def failures(client: aiohttp.ClientSession, admin: TestServer) -> dict[str, float]:
    """``vlcache_failures_total`` by component, from the admin listener's /metrics."""
    async with client.get(admin.make_url("/metrics")) as response:
        text = await response.text()
    return {
        sample.labels["component"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vlcache_failures_total"
    }


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def picture(n: int) -> bytes:
    """A new picture for the question each time: it must be embedded to be looked up."""
    return jpeg_bytes(100 + n, size=(200, 150))


# --- the embedder and the index -------------------------------------------------------------------


async def test_an_embedder_that_raises_is_counted_logged_once_and_recovers(
    aiohttp_server: Any,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    embedder = SwitchableEmbedder()
    proxy = await start(aiohttp_server, upstream, tmp_path, embedder)
    admin = await make_admin(proxy)
    assert await ask(client, proxy, photos["phone"]) == ("MISS", "")
    await settle(proxy.app)  # the question has an entry with vectors: new pictures are embedded

    embedder.mode = "raise"
    caplog.set_level(logging.ERROR)
    for n in range(5):
        assert await ask(client, proxy, picture(n)) == ("MISS", "")
    assert (await failures(client, admin))["embedder"] == 5
    assert errors(caplog) == ["embedding failed, answering without the semantic tier"]
    assert len(fake.chat_calls) == 6

    embedder.mode = "ok"
    assert await ask(client, proxy, photos["phone again"]) == ("HIT", "semantic")
    assert await ask(client, proxy, picture(0)) == ("HIT", "exact")  # stored meanwhile
    assert len(fake.chat_calls) == 6


async def test_a_hanging_embedder_is_abandoned_within_the_budget_and_recovers(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    embedder = SwitchableEmbedder()
    proxy = await start(aiohttp_server, upstream, tmp_path, embedder, embed_timeout=0.3)
    assert await ask(client, proxy, photos["phone"]) == ("MISS", "")
    await settle(proxy.app)

    embedder.mode = "hang"
    try:
        for n in range(3):
            started = time.perf_counter()
            assert await ask(client, proxy, picture(n)) == ("MISS", "")
            assert 0.25 < time.perf_counter() - started < 0.8  # the budget, then the upstream
        # The exact tier does not need the embedder.
        started = time.perf_counter()
        assert await ask(client, proxy, picture(0)) == ("HIT", "exact")
        assert time.perf_counter() - started < 0.2
    finally:
        embedder.mode = "ok"
        embedder.release.set()
    assert await ask(client, proxy, photos["phone again"]) == ("HIT", "semantic")
    assert len(fake.chat_calls) == 4


async def test_a_hanging_embedder_is_counted_and_logged_once_per_burst(
    aiohttp_server: Any,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    embedder = SwitchableEmbedder()
    proxy = await start(aiohttp_server, upstream, tmp_path, embedder, embed_timeout=0.2)
    admin = await make_admin(proxy)
    assert await ask(client, proxy, photos["phone"]) == ("MISS", "")
    await settle(proxy.app)
    embedder.mode = "hang"
    caplog.set_level(logging.ERROR)
    try:
        for n in range(3):
            assert await ask(client, proxy, picture(n)) == ("MISS", "")
    finally:
        embedder.release.set()
    assert (await failures(client, admin))["embedder"] == 3
    assert len(errors(caplog)) == 1


async def test_an_index_that_errors_is_counted_logged_once_and_recovers(
    aiohttp_server: Any,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    proxy = await start(aiohttp_server, upstream, tmp_path, SwitchableEmbedder())
    admin = await make_admin(proxy)
    assert await ask(client, proxy, photos["phone"]) == ("MISS", "")
    await settle(proxy.app)
    vectors = proxy.app[STORE].vectors
    assert vectors is not None

    async def broken_search(*args: object) -> list[object]:
        raise RuntimeError("Error in faiss::IndexHNSW::search: index corrupted")

    monkeypatch.setattr(vectors, "search", broken_search)
    caplog.set_level(logging.ERROR)
    for n in range(4):
        assert await ask(client, proxy, picture(n)) == ("MISS", "")
    assert (await failures(client, admin))["index"] == 4
    assert errors(caplog) == ["semantic verification failed, answering from the upstream"]

    monkeypatch.undo()
    await settle(proxy.app)
    assert await ask(client, proxy, photos["phone again"]) == ("HIT", "semantic")
    assert len(fake.chat_calls) == 5


# --- the SQLite file ------------------------------------------------------------------------------


async def chattr(flag: str, *paths: Path) -> bool:
    """Set or clear the immutable attribute (what makes a file read-only even for root)."""
    if shutil.which("chattr") is None:
        return False
    process = await asyncio.create_subprocess_exec(
        "chattr", flag, *map(str, paths), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await process.wait() == 0


class ReadOnlyDatabase:
    """The SQLite file and its write-ahead log made read-only under a running proxy.

    Not the ``-shm`` file: SQLite maps it into memory, and a write to a mapped immutable file
    kills the process with SIGBUS. Permission bits would not do either: descriptors opened before
    a chmod keep writing, and root ignores them.
    """

    def __init__(self, data_dir: Path) -> None:
        database = data_dir / "vlcache.db"
        self._files = (database, database.with_name("vlcache.db-wal"))

    async def __aenter__(self) -> None:
        if not await chattr("+i", *self._files):
            await chattr("-i", *self._files)
            pytest.skip("cannot make a file immutable here (chattr +i needs CAP_LINUX_IMMUTABLE)")

    async def __aexit__(self, *exc: object) -> None:
        await chattr("-i", *self._files)


async def ask_text(client: aiohttp.ClientSession, proxy: TestServer, question: str) -> str:
    body = openai_chat(question, data_uri(jpeg_bytes(80)))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200, question
        await r.read()
        return r.headers["X-Cache"]


async def stored(proxy: TestServer) -> list[str]:
    await settle(proxy.app)
    entries = await proxy.app[STORE].list_entries(EntryFilter(), limit=100)
    return sorted(entry.question for entry in entries)


async def test_a_read_only_sqlite_file_is_answered_around(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    assert [await ask_text(client, proxy, "before") for _ in range(2)] == ["MISS", "HIT"]
    await settle(proxy.app)
    async with ReadOnlyDatabase(tmp_path / "data"):
        assert await ask_text(client, proxy, "during") == "MISS"
        await asyncio.sleep(0.3)  # the writer has tried, failed and withdrawn the answer
        # Nothing is served that SQL does not hold; what SQL holds is still served.
        assert await ask_text(client, proxy, "during") == "MISS"
        assert await ask_text(client, proxy, "before") == "HIT"
    assert await ask_text(client, proxy, "after") == "MISS"
    assert len(fake.chat_calls) == 4


async def test_caching_resumes_once_a_read_only_sqlite_file_is_writable_again(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    assert await ask_text(client, proxy, "before") == "MISS"
    await settle(proxy.app)
    async with ReadOnlyDatabase(tmp_path / "data"):
        # Concurrent requests: the pool opens more connections while the file is read-only.
        questions = [f"during {n}" for n in range(5)]
        outcomes = await asyncio.gather(*(ask_text(client, proxy, q) for q in questions))
        assert outcomes == ["MISS"] * 5
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.0)  # a good many writer ticks with the file writable again
    assert await ask_text(client, proxy, "after") == "MISS"
    assert await stored(proxy) == ["after", "before"]
    assert await ask_text(client, proxy, "after") == "HIT"
    assert len(fake.chat_calls) == 7


async def test_a_read_only_sqlite_file_is_counted_and_logged_once_per_burst(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy()
    admin = await make_admin(proxy)
    assert await ask_text(client, proxy, "before") == "MISS"
    await settle(proxy.app)
    caplog.set_level(logging.ERROR)
    async with ReadOnlyDatabase(tmp_path / "data"):
        for n in range(3):
            assert await ask_text(client, proxy, f"during {n}") == "MISS"
            await asyncio.sleep(0.2)
        assert (await failures(client, admin))["store"] >= 1
    assert len(errors(caplog)) == 1


async def test_a_deleted_sqlite_file_never_fails_a_request(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    assert await ask_text(client, proxy, "before") == "MISS"
    await settle(proxy.app)
    for path in (tmp_path / "data").glob("vlcache.db*"):
        await asyncio.to_thread(path.unlink)
    for question in ("during 1", "during 2", "during 1", "before"):
        assert await ask_text(client, proxy, question) in ("MISS", "HIT")
    assert len(fake.chat_calls) == 3


async def test_a_deleted_sqlite_file_is_noticed_and_a_new_one_is_used(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy()
    admin = await make_admin(proxy)
    assert await ask_text(client, proxy, "before") == "MISS"
    await settle(proxy.app)
    for path in (tmp_path / "data").glob("vlcache.db*"):
        await asyncio.to_thread(path.unlink)
    assert await ask_text(client, proxy, "during") in ("MISS", "BYPASS")
    await upgrade_schema(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'vlcache.db'}")  # migrate
    await asyncio.sleep(1.5)  # a sync interval: time to notice
    assert await ask_text(client, proxy, "after") == "MISS"
    await settle(proxy.app)
    counted = (await failures(client, admin))["store"]
    await proxy.close()
    again = await make_proxy()
    assert await ask_text(client, again, "after") == "HIT"  # it was written to the new file
    assert counted >= 1

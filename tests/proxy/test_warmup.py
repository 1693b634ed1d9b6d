"""``vlcache warmup``: logs in every format become entries a proxy serves, live, exact and semantic.

Real databases (SQLite and PostgreSQL), the real offline embedder, real proxies on sockets, and
real ``vlcache warmup`` processes for the command line and for a run killed with SIGKILL. Log
files and pictures are generated in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import text

from embeddings.embedder import Embedder, load_embedder
from embeddings.errors import EmbeddingError
from embeddings.keys import namespace_for
from proxy.app import STORE, create_app
from proxy.cli import main
from proxy.demo import product_photo, reencoded
from proxy.settings import Settings
from proxy.standin import native_answer, openai_answer
from proxy.warmup import warm_up
from store.cache import CacheStore
from store.database import create_engine
from tests.conftest import ProxyFactory, data_uri, jpeg_bytes, native_chat, openai_chat, sse_text
from tests.fakes import FakeUpstream

VLCACHE = [sys.executable, "-m", "proxy"]
MODEL = "qwen3-vl-8b-instruct"
NATIVE_MODEL = "qwen3-vl-plus"
NATIVE_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
KEY = "sk-warm"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMESPACE = namespace_for(f"Bearer {KEY}")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("efficientnet-lite0", precision="fp32")


def recording(
    request: dict[str, Any],
    answer: Any,
    *,
    namespace: str | None = NAMESPACE,
    cache: str = "MISS",
    match: str | None = None,
    status: Any = 200,
    ts: float | None = None,
) -> dict[str, Any]:
    """One line as ``vlcache serve --record`` writes it."""
    native = "input" in request
    return {
        "v": 1,
        "ts": time.time() if ts is None else ts,
        "namespace": namespace,
        "method": "POST",
        "path": NATIVE_PATH if native else "/v1/chat/completions",
        "format": "native" if native else "openai",
        "model": request.get("model"),
        "stream": bool(request.get("stream")),
        "cache": cache,
        "match": match,
        "latency_ms": 812.5,
        "request": request,
        "response": {"status_code": status, "content_type": "application/json", "body": answer},
    }


def write_log(path: Path, lines: list[Any]) -> Path:
    """Dicts as JSON lines, strings as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for line in lines:
            f.write(
                (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
            )
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def settings_for(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "db": db_url,
        "data_dir": tmp_path / "data",
        "embedder": "none",
        "allow_private_image_urls": True,
    }
    fields.update(overrides)
    return Settings(**fields)


async def entry_counts(db_url: str) -> tuple[int, int]:
    """(live entries, entries whose image rows are not all there with vector and thumbnail)."""
    engine = await asyncio.to_thread(create_engine, db_url)
    try:
        async with engine.connect() as conn:
            entries = (
                await conn.execute(text("SELECT count(*) FROM entries WHERE NOT deleted"))
            ).scalar_one()
            broken = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM entries e WHERE e.image_count != ("
                        "SELECT count(*) FROM entry_images i WHERE i.entry_id = e.id "
                        "AND i.embedding IS NOT NULL AND i.thumbnail IS NOT NULL)"
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    return int(entries), int(broken)


async def post(
    client: aiohttp.ClientSession,
    proxy: TestServer,
    body: dict[str, Any],
    headers: dict[str, str] = AUTH,
    path: str = "/v1/chat/completions",
) -> tuple[dict[str, str], bytes]:
    async with client.post(proxy.make_url(path), json=body, headers=headers) as response:
        assert response.status == 200
        return dict(response.headers), await response.read()


async def test_every_log_format_becomes_an_exact_hit(
    make_proxy: ProxyFactory,
    db_url: str,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    photos = [jpeg_bytes(seed) for seed in range(1, 7)]
    logs = tmp_path / "logs"
    await asyncio.to_thread(write_bytes, logs / "img" / "relative.jpg", photos[3])
    absolute = await asyncio.to_thread(write_bytes, tmp_path / "elsewhere" / "abs.jpg", photos[4])
    spaced = await asyncio.to_thread(write_bytes, logs / "img" / "with space.jpg", photos[5])
    # What each logged request is when a client sends it (files as data URIs), and its answer.
    served: list[tuple[dict[str, Any], Any, str]] = []

    def openai(question: str, image: str | None, answer: str, **extra: Any) -> dict[str, Any]:
        request = openai_chat(question, *([image] if image else []), **extra)
        body = openai_answer(MODEL, answer)
        served.append((request, body, "/v1/chat/completions"))
        return body

    def native(question: str, image: str, answer: str) -> dict[str, Any]:
        body = native_answer(NATIVE_MODEL, answer)
        served.append((native_chat(question, image), body, NATIVE_PATH))
        return body

    recorded = [
        recording(
            openai_chat("What phone?", data_uri(photos[0])),
            openai("What phone?", data_uri(photos[0]), "X5 Pro"),
        ),
        recording(
            native_chat("这是什么手机？", data_uri(photos[1])),
            native("这是什么手机？", data_uri(photos[1]), "X5"),
        ),
        # A streamed request is recorded with the chat.completion its stream spelled out.
        recording(
            openai_chat("Streamed?", data_uri(photos[2]), stream=True),
            openai("Streamed?", data_uri(photos[2]), "streamed answer", stream=True),
        ),
    ]
    other = [
        {
            "custom_id": "r1",
            "body": openai_chat("Relative path?", "img/relative.jpg"),
            "response": {
                "status_code": 200,
                "request_id": "q1",
                "body": openai("Relative path?", data_uri(photos[3]), "relative"),
            },
        },
        {
            "custom_id": "r2",
            "request": {
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": openai_chat("Absolute?", str(absolute)),
            },
            "response": {
                "status_code": 200,
                "body": openai("Absolute?", data_uri(photos[4]), "absolute"),
            },
        },
        {
            "request": openai_chat("File URI?", "file://" + quote(str(spaced))),
            "response": openai("File URI?", data_uri(photos[5]), "file uri"),
        },
        {
            "request": native_chat("Native pair?", "img/relative.jpg"),
            "response": native("Native pair?", data_uri(photos[3]), "native pair"),
        },
        {
            "request": openai_chat("Text only?"),
            "response": {"status_code": 200, "body": openai("Text only?", None, "text only")},
        },
    ]
    recorded_log = await asyncio.to_thread(write_log, logs / "recorded.jsonl", recorded)
    other_log = await asyncio.to_thread(write_log, logs / "batch.jsonl", other)
    settings = settings_for(db_url, tmp_path)
    before = time.time()
    first = await warm_up(settings, [recorded_log])  # each recording's own namespace
    second = await warm_up(settings, [other_log], namespace=NAMESPACE)
    after = time.time()
    assert (first.imported, second.imported) == (3, 5), first.text() + second.text()

    proxy = await make_proxy(db=db_url)
    entries = []
    for request, answer, path in served:
        headers, body = await post(client, proxy, request, path=path)
        assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "exact"), request
        if request.get("stream"):
            assert headers["Content-Type"].startswith("text/event-stream")
            assert sse_text(body) == "streamed answer"
        else:
            assert orjson.loads(body) == answer
        entries.append(int(headers["X-Cache-Entry"]))
    # Streamed and plain requests share entries, as on the live path.
    headers, _ = await post(client, proxy, openai_chat("Streamed?", data_uri(photos[2])))
    assert headers["X-Cache-Entry"] == str(entries[2])
    assert fake.chat_calls == []

    store = await CacheStore.open(db_url, index=None)
    try:
        stored = [await store.answer_by_id(entry) for entry in entries]
    finally:
        await store.close()
    assert all(s is not None and before <= s.created_at <= after for s in stored)
    assert [s.upstream_ms for s in stored if s is not None][2:4] == [812.5, 0.0]
    assert stored[0] is not None and stored[0].prompt_tokens == 1200


async def test_what_serve_records_warms_a_fresh_store(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    record = tmp_path / "record.jsonl"
    photo = data_uri(jpeg_bytes(61))
    asked = [
        (openai_chat("Recorded?", photo), "/v1/chat/completions"),
        (openai_chat("Recorded stream?", photo, stream=True), "/v1/chat/completions"),
        (native_chat("Recorded native?", photo), NATIVE_PATH),
    ]
    first = await make_proxy(record=record)
    for body, path in asked:
        headers, _ = await post(client, first, body, path=path)
        assert headers["X-Cache"] == "MISS"
    await first.close()  # the recorder writes what is queued, then stops
    assert len(fake.chat_calls) == 3

    fresh = f"sqlite+aiosqlite:///{tmp_path / 'fresh' / 'vlcache.db'}"
    tally = await warm_up(settings_for(fresh, tmp_path), [record])
    assert (tally.imported, tally.lines) == (3, 3), tally.text()
    second = await make_proxy(db=fresh)
    for body, path in asked:
        headers, _ = await post(client, second, body, path=path)
        assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "exact"), body
    assert len(fake.chat_calls) == 3


async def test_a_second_run_adds_nothing_and_repeats_are_duplicates(
    db_url: str, tmp_path: Path
) -> None:
    request = openai_chat("Which model?", data_uri(jpeg_bytes(11)))
    lines = [
        recording(request, openai_answer(MODEL, "first")),
        recording(
            openai_chat("Which colour?", data_uri(jpeg_bytes(11))), openai_answer(MODEL, "red")
        ),
        recording(request, openai_answer(MODEL, "first"), cache="HIT", match="exact"),
        recording(
            openai_chat("Which model?", data_uri(jpeg_bytes(12))), openai_answer(MODEL, "other")
        ),
    ]
    log = await asyncio.to_thread(write_log, tmp_path / "log.jsonl", lines)
    settings = settings_for(db_url, tmp_path)
    first = await warm_up(settings, [log])
    assert (first.imported, first.duplicates, first.lines) == (3, 1, 4), first.text()
    again = await warm_up(settings, [log])
    assert (again.imported, again.duplicates) == (0, 4), again.text()
    assert "duplicates          4  (already cached)" in again.text()
    assert await entry_counts(db_url) == (3, 3)  # three entries, none with vectors (no embedder)


async def test_the_report_gives_reasons_and_file_line_numbers(
    tmp_path: Path, embedder: Embedder
) -> None:
    now = time.time()
    photo = data_uri(jpeg_bytes(21))
    lines: list[Any] = [
        recording(openai_chat("Good?", photo), openai_answer(MODEL, "yes")),  # 1
        "{not json",  # 2
        "[1, 2]",  # 3
        {"hello": "world"},  # 4
        recording(openai_chat("Types?", photo), openai_answer(MODEL, "x"), status="200"),  # 5
        recording(openai_chat("Cut?", photo), openai_answer(MODEL, "cut", "length")),  # 6
        recording(openai_chat("Failed?", photo), {"error": {"message": "boom"}}, status=500),  # 7
        recording(
            openai_chat("Similar?", photo), openai_answer(MODEL, "s"), cache="HIT", match="semantic"
        ),  # 8
        {"custom_id": "x", "response": None, "error": {"code": "rate_limited"}},  # 9
        recording(
            openai_chat("Missing file?", "pictures/gone.jpg"), openai_answer(MODEL, "m")
        ),  # 10
        {"request": openai_chat("Whose?", photo), "response": openai_answer(MODEL, "w")},  # 11
        recording({"model": MODEL, "prompt": "a completion"}, openai_answer(MODEL, "c")),  # 12
        recording(
            openai_chat("Corrupt?", "data:image/jpeg;base64,@@@@"), openai_answer(MODEL, "c")
        ),  # 13
        "",  # 14
        recording(
            openai_chat("Undecodable?", data_uri(b"not a picture")), openai_answer(MODEL, "u")
        ),  # 15
        {**recording(openai_chat("Future?", photo), openai_answer(MODEL, "f")), "v": 2},  # 16
        recording(openai_chat("Old?", photo), openai_answer(MODEL, "old"), ts=now - 7200),  # 17
    ]
    log = await asyncio.to_thread(write_log, tmp_path / "logs" / "mixed.jsonl", lines)
    more = await asyncio.to_thread(write_log, tmp_path / "logs" / "more.jsonl", ["oops"])
    settings = settings_for(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path, ttl=3600)
    tally = await warm_up(settings, [log, more], embedder=embedder)

    def where(group: dict[str, Any], reason: str) -> list[str]:
        return [str(location) for location, _ in group[reason].lines]

    at = str(log)
    assert (tally.lines, tally.imported, tally.duplicates, tally.errors) == (18, 2, 0, {}), (
        tally.text()
    )
    assert where(tally.without_vectors, "undecodable image") == [f"{at}:15"]
    expected = {
        "not valid JSON": [f"{at}:2", f"{more}:1"],
        "line is not a JSON object": [f"{at}:3"],
        "not a recording, batch or request/response line": [f"{at}:4"],
        "status_code is not an integer": [f"{at}:5"],
        'answer not complete (a finish_reason is not "stop")': [f"{at}:6"],
        "answer status is not 200": [f"{at}:7"],
        "semantic hit (answered from a similar picture)": [f"{at}:8"],
        "batch line without a response": [f"{at}:9"],
        "image file not found": [f"{at}:10"],
        "no namespace (give --shared-namespace, --tenant or --api-key-env)": [f"{at}:11"],
        "request is not a chat": [f"{at}:12"],
        "request not cacheable": [f"{at}:13"],
        "unsupported recording version": [f"{at}:16"],
        "answer older than --ttl": [f"{at}:17"],
    }
    assert {reason: where(tally.skipped, reason) for reason in tally.skipped} == expected
    assert tally.skipped["answer status is not 200"].lines[0][1] == "500"
    assert "gone.jpg" in tally.skipped["image file not found"].lines[0][1]
    assert tally.skipped["batch line without a response"].lines[0][1] == "rate_limited"
    report = tally.text()
    assert f"{at}:10 (" in report and "imported            2  (1 without vectors" in report
    document = tally.as_json()
    assert document["skipped"]["count"] == 15 and document["imported"] == 2
    assert document["skipped"]["reasons"]["answer status is not 200"]["lines"] == [
        {"file": at, "line": 7, "detail": "500"}
    ]
    engine = await asyncio.to_thread(create_engine, settings.database_url)
    try:
        async with engine.connect() as conn:
            expiries = (await conn.execute(text("SELECT expires_at FROM entries"))).scalars()
            # --ttl counts from when the answer was given (the line's ts), not from the import.
            assert all(abs(expiry - (now + 3600)) < 60 for expiry in expiries)
    finally:
        await engine.dispose()


class FakeBrokenEmbedder:
    """An embedder whose every forward pass fails."""

    id = "broken/1"
    dim = 4
    default_threshold = 0.9

    def embed(self, images: Any) -> Any:
        raise EmbeddingError("the model fell over")


async def test_embedder_failures_are_errors_to_retry_not_entries_without_vectors(
    tmp_path: Path,
) -> None:
    lines = [
        recording(openai_chat("Pictured?", data_uri(jpeg_bytes(51))), openai_answer(MODEL, "p")),
        recording(openai_chat("No picture?"), openai_answer(MODEL, "text")),
    ]
    log = await asyncio.to_thread(write_log, tmp_path / "log.jsonl", lines)
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    tally = await warm_up(settings_for(db_url, tmp_path), [log], embedder=FakeBrokenEmbedder())
    assert tally.imported == 1 and tally.error_count == 1
    assert [str(where) for where, _ in tally.errors["embedder failed"].lines] == [f"{log}:1"]
    assert "errors              1" in tally.text()


async def test_image_urls_are_fetched_as_the_proxy_fetches_them(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    photo = jpeg_bytes(31)
    images = web.Application()

    async def serve(request: web.Request) -> web.Response:
        body = photo if request.match_info["name"] == "photo" else photo * 8
        return web.Response(body=body, content_type="image/jpeg")

    images.router.add_get("/{name:photo|big}.jpg", serve)
    server = await aiohttp_server(images)
    url = str(server.make_url("/photo.jpg"))
    lines = [
        recording(openai_chat("From a URL?", url), openai_answer(MODEL, "fetched")),
        recording(
            openai_chat("Gone?", str(server.make_url("/gone.jpg"))), openai_answer(MODEL, "g")
        ),
        recording(openai_chat("Big?", str(server.make_url("/big.jpg"))), openai_answer(MODEL, "b")),
    ]
    log = await asyncio.to_thread(write_log, tmp_path / "log.jsonl", lines)
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'vlcache.db'}"

    private = await warm_up(settings_for(db_url, tmp_path, allow_private_image_urls=False), [log])
    refused = private.skipped["request not cacheable"]
    assert private.imported == 0 and refused.count == 3
    assert "non-public address" in refused.lines[0][1]

    limits = settings_for(db_url, tmp_path, max_image_bytes=len(photo) * 4)
    tally = await warm_up(limits, [log])
    assert tally.imported == 1, tally.text()
    details = [detail for _, detail in tally.skipped["request not cacheable"].lines]
    assert "answered 404" in details[0] and "larger than the per-image limit" in details[1]

    proxy = await make_proxy(db=db_url)
    headers, body = await post(client, proxy, openai_chat("From a URL?", url))
    assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "exact")
    assert b"fetched" in body and fake.chat_calls == []


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *VLCACHE,
        "warmup",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_command_line_namespaces_report_and_exit_codes(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, server = upstream
    keyed = openai_chat("Keyed?", data_uri(jpeg_bytes(41)))
    tenant = openai_chat("Tenant?", data_uri(jpeg_bytes(42)))
    lines = [
        {
            "custom_id": "a",
            "body": keyed,
            "response": {"status_code": 200, "body": openai_answer(MODEL, "k")},
        },
        "{broken",
        {
            "custom_id": "b",
            "body": tenant,
            "response": {"status_code": 200, "body": openai_answer(MODEL, "t")},
        },
    ]
    log = await asyncio.to_thread(write_log, tmp_path / "log.jsonl", lines)
    data = tmp_path / "data"
    report = tmp_path / "report.json"
    code, out, err = await run_cli(
        str(log), "--data-dir", str(data), "--embedder", "none", "--api-key-env", "WARM_KEY",
        "--report-json", str(report), env={"WARM_KEY": KEY},
    )  # fmt: skip
    assert code == 0, err
    assert "imported            2" in out and f"{log}:2" in out and "warm-up" in err  # the bar
    document = json.loads(await asyncio.to_thread(report.read_text))
    assert (document["imported"], document["skipped"]["count"], document["lines"]) == (2, 1, 3)
    code, out, err = await run_cli(
        str(log), "--data-dir", str(data), "--embedder", "none", "--tenant", "acme"
    )
    assert code == 0, err

    settings = Settings(
        upstream=str(server.make_url("/")), data_dir=data, embedder="none", tenant_header="X-Tenant"
    )
    proxy = await aiohttp_server(create_app(settings))
    headers, _ = await post(client, proxy, keyed)  # the key's namespace: no tenant header
    assert headers["X-Cache"] == "HIT"
    headers, _ = await post(client, proxy, tenant, headers={"X-Tenant": "acme"})
    assert headers["X-Cache"] == "HIT"
    assert fake.chat_calls == []


def test_usage_errors_exit_with_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = write_log(tmp_path / "log.jsonl", [])
    monkeypatch.delenv("WARM_KEY_UNSET", raising=False)

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as exited:
            main(["warmup", *args, "--data-dir", str(tmp_path / "data"), "--embedder", "none"])
        return int(exited.value.code or 0)

    assert run(str(tmp_path / "missing.jsonl")) == 2
    assert run(str(log), "--tenant", "a", "--api-key-env", "HOME") == 2
    assert run(str(log), "--shared-namespace", "s", "--tenant", "a") == 2
    assert run(str(log), "--api-key-env", "WARM_KEY_UNSET") == 2
    assert run(str(log), "--tenant", "") == 2
    assert run(str(log), "--batch", "0") == 2
    assert run(str(log), "--report-json", str(tmp_path / "no" / "dir.json")) == 2
    assert not (tmp_path / "data").exists()  # nothing was opened


async def test_a_running_proxy_serves_warmed_entries_exact_and_semantic(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    embedder: Embedder,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, server = upstream
    phone = await asyncio.to_thread(product_photo, "X5 Pro", "2999", 40)
    resized = await asyncio.to_thread(reencoded, phone, quality=70, scale=0.7)
    data = tmp_path / "data"
    settings = Settings(
        upstream=str(server.make_url("/")),
        data_dir=data,
        embedder="efficientnet-lite0",
        flush_interval=0.05,
        sync_interval=0.2,
    )
    proxy = await aiohttp_server(create_app(settings, embedder=embedder))
    store = proxy.app[STORE]
    assert store.vectors is not None and store.vectors.size == 0
    index_files = await asyncio.to_thread(
        lambda: {p: p.stat().st_mtime_ns for p in data.rglob("*.npz")}
    )
    ask = "What phone is this?"
    log = await asyncio.to_thread(
        write_log,
        tmp_path / "record.jsonl",
        [recording(openai_chat(ask, data_uri(phone)), openai_answer(MODEL, "An X5 Pro."))],
    )
    code, out, err = await run_cli(
        str(log), "--data-dir", str(data), "--embedder", "efficientnet-lite0",
        "--embed-precision", "fp32",
    )  # fmt: skip
    assert code == 0 and "imported            1" in out, err

    headers, body = await post(client, proxy, openai_chat(ask, data_uri(phone)))
    assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "exact")
    for _ in range(200):  # the proxy's next sync indexes what warm-up wrote
        if store.vectors.size > 0:
            break
        await asyncio.sleep(0.05)
    headers, body = await post(client, proxy, openai_chat(ask, data_uri(resized)))
    assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "semantic")
    assert b"An X5 Pro." in body and fake.chat_calls == []
    after = await asyncio.to_thread(lambda: {p: p.stat().st_mtime_ns for p in data.rglob("*.npz")})
    assert after == index_files  # warm-up never touched the proxy's index snapshot


async def test_a_run_killed_with_sigkill_leaves_whole_entries_and_a_rerun_adds_the_rest(
    db_url: str, tmp_path: Path, embedder: Embedder
) -> None:
    total = 160
    lines = [
        recording(
            openai_chat(f"Item {n}?", data_uri(jpeg_bytes(n, size=(96, 72)))),
            openai_answer(MODEL, f"answer {n}"),
        )
        for n in range(total)
    ]
    log = await asyncio.to_thread(write_log, tmp_path / "big.jsonl", lines)
    process = await asyncio.create_subprocess_exec(
        *VLCACHE, "warmup", str(log), "--db", db_url, "--data-dir", str(tmp_path / "data"),
        "--embedder", "efficientnet-lite0", "--embed-precision", "fp32", "--batch", "4",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    if (await entry_counts(db_url))[0] > 0:
                        break
                except Exception:  # the schema may not be there yet
                    pass
                assert process.returncode is None, "the run ended before it could be killed"
                await asyncio.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    committed, broken = await entry_counts(db_url)
    assert 0 < committed < total and broken == 0

    tally = await warm_up(settings_for(db_url, tmp_path), [log], embedder=embedder)
    assert (tally.imported, tally.duplicates) == (total - committed, committed), tally.text()
    assert await entry_counts(db_url) == (total, 0)

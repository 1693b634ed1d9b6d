"""The ``vlcache`` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import data_uri, jpeg_bytes, openai_chat
from tests.fakes import FakeUpstream

VLCACHE = [sys.executable, "-m", "proxy"]


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *VLCACHE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def test_help_lists_commands_and_settings() -> None:
    code, out = await _run("--help")
    assert code == 0
    for command in ("serve", "migrate", "demo"):
        assert command in out
    code, out = await _run("serve", "--help")
    assert code == 0
    assert "--upstream" in out and "VLCACHE_UPSTREAM" in out and "--max-body-bytes" in out


async def test_invalid_setting_is_a_clear_error() -> None:
    code, out = await _run("serve", "--port", "not-a-port")
    assert code != 0
    assert "--port" in out and "Traceback" not in out


async def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    code, out = await _run("migrate", "--data-dir", str(tmp_path / "d"))
    assert code == 0, out
    assert (tmp_path / "d" / "vlcache.db").exists()


async def test_demo_runs_offline_and_every_outcome_is_as_scripted() -> None:
    code, out = await _run("demo", "--latency", "0.05")
    assert code == 0, out
    assert out.count("HIT") >= 4 and "NO (expected" not in out
    assert "model calls" in out
    # It ends with the savings summary from /stats and the dashboard's address.
    assert "hit rate 53.8%" in out and "cost 0.0048 USD" in out
    assert "/dashboard" in out


SERVE_START_TIMEOUT = 60.0


async def start_serve(
    port: int, upstream_url: str, data_dir: Path, *extra: str, admin_port: int = 0
) -> asyncio.subprocess.Process:
    """``vlcache serve`` as a real process, once it answers (admin listener on ``admin_port``)."""
    process = await asyncio.create_subprocess_exec(
        *VLCACHE,
        "serve",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "VLCACHE_UPSTREAM": upstream_url,
            "VLCACHE_DATA_DIR": str(data_dir),
            "VLCACHE_EMBEDDER": "none",
        },
    )
    # A first start with an embedder exports it to ONNX (5-20 s on these 2 cores): wait for it,
    # but not for a process that already gave up.
    deadline = asyncio.get_running_loop().time() + SERVE_START_TIMEOUT
    async with aiohttp.ClientSession() as client:
        while asyncio.get_running_loop().time() < deadline and process.returncode is None:
            try:
                async with client.get(f"http://127.0.0.1:{port}/v1/models") as r:
                    if r.status == 200:
                        return process
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.1)
    if process.returncode is None:
        process.kill()
    assert process.stderr is not None
    errors = (await process.stderr.read()).decode(errors="replace")[-2000:]
    pytest.fail(f"vlcache serve did not start:\n{errors}")


async def test_serve_on_a_fresh_data_dir_caches_with_no_extra_step(
    upstream: tuple[FakeUpstream, TestServer], unused_tcp_port: int, tmp_path: Path
) -> None:
    fake, server = upstream
    process = await start_serve(unused_tcp_port, str(server.make_url("/")), tmp_path / "fresh")
    base = f"http://127.0.0.1:{unused_tcp_port}"
    request = openai_chat("Which model?", data_uri(jpeg_bytes(40)))
    try:
        outcomes = []
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.post(base + "/v1/chat/completions", json=request) as r:
                    outcomes.append(r.headers["X-Cache"])
        assert outcomes == ["MISS", "HIT"]
        assert len(fake.chat_calls) == 1
    finally:
        process.terminate()
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert "cache=hit match=exact" in err.decode()


async def test_sigterm_lets_in_flight_requests_finish_and_keeps_their_answers(
    upstream: tuple[FakeUpstream, TestServer], unused_tcp_port: int, tmp_path: Path
) -> None:
    fake, server = upstream
    fake.latency = 1.0
    process = await start_serve(unused_tcp_port, str(server.make_url("/")), tmp_path / "d")
    url = f"http://127.0.0.1:{unused_tcp_port}/v1/chat/completions"
    request = openai_chat("Slow answer, then shutdown", data_uri(jpeg_bytes(41)))
    async with aiohttp.ClientSession() as client:

        async def ask() -> tuple[int, str]:
            async with client.post(url, json=request) as r:
                await r.read()
                return r.status, r.headers["X-Cache"]

        in_flight = asyncio.ensure_future(ask())
        await asyncio.sleep(0.3)  # the request is with the model now
        process.terminate()
        assert await in_flight == (200, "MISS")
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()

    fake.latency = 0.0
    process = await start_serve(unused_tcp_port, str(server.make_url("/")), tmp_path / "d")
    try:
        async with aiohttp.ClientSession() as client, client.post(url, json=request) as r:
            assert r.headers["X-Cache"] == "HIT"
        assert len(fake.chat_calls) == 1
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), 30)


async def test_serve_without_clip_weights_exits_at_once_naming_the_ways_out(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    code, out = await _run(
        "serve",
        "--port",
        str(unused_tcp_port),
        "--data-dir",
        str(tmp_path / "d"),
        "--clip-pretrained",
        str(tmp_path / "missing.pt"),
    )
    assert code != 0
    assert "--clip-pretrained" in out and "efficientnet-lite0" in out
    assert "Traceback" not in out


async def test_index_rebuild_reads_sql_with_a_progress_bar(
    upstream: tuple[FakeUpstream, TestServer], tmp_path: Path
) -> None:
    from aiohttp.test_utils import TestServer as Server

    from proxy.app import create_app, settle
    from proxy.settings import Settings

    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "data",
        embedder="efficientnet-lite0",
    )
    server = Server(create_app(settings))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as client:
            for seed in (70, 71):
                body = openai_chat("Rebuild me", data_uri(jpeg_bytes(seed, size=(300, 200))))
                async with client.post(server.make_url("/v1/chat/completions"), json=body) as r:
                    assert r.headers["X-Cache"] == "MISS"
        await settle(server.app)
    finally:
        await server.close()
    snapshot = next((tmp_path / "data" / "index").glob("*.npz"))
    snapshot.unlink()
    code, out = await _run(
        "index", "rebuild", "--data-dir", str(tmp_path / "data"), "--embedder", "efficientnet-lite0"
    )
    assert code == 0, out
    assert "indexed 1 entries" in out or "indexed 2 entries" in out
    assert "100%" in out  # tqdm's bar reached the end
    assert snapshot.exists()


async def test_a_public_admin_listener_needs_a_token(tmp_path: Path) -> None:
    code, out = await _run("serve", "--admin-host", "0.0.0.0", "--data-dir", str(tmp_path / "d"))
    assert code != 0
    assert "--admin-token" in out and "Traceback" not in out


async def test_admin_listener_beside_serve_and_stats_from_the_database(
    upstream: tuple[FakeUpstream, TestServer],
    unused_tcp_port_factory: Callable[[], int],
    tmp_path: Path,
) -> None:
    _, server = upstream
    port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'currency = "EUR"\n[models."qwen3-vl-8b-instruct"]\n'
        "input_per_million = 1.0\noutput_per_million = 2.0\n"
    )
    data = tmp_path / "d"
    process = await start_serve(
        port, str(server.make_url("/")), data, "--pricing", str(prices), admin_port=admin_port
    )
    request = openai_chat("Which model?", data_uri(jpeg_bytes(42)))
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=request
                ) as r:
                    await r.read()
            admin = f"http://127.0.0.1:{admin_port}"
            async with client.get(admin + "/metrics") as r:
                assert 'vlcache_requests_total{outcome="hit_exact"} 2.0' in await r.text()
            async with client.get(admin + "/dashboard") as r:
                assert r.status == 200 and r.content_type == "text/html"
            async with client.get(admin + "/readyz") as r:
                assert r.status == 200
    finally:
        process.terminate()
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert f"admin listener on http://127.0.0.1:{admin_port}" in err.decode()

    code, out = await _run("stats", "--data-dir", str(data), "--pricing", str(prices))
    assert code == 0, out
    assert "hit rate 66.7%" in out and "qwen3-vl-8b-instruct" in out and "EUR" in out
    code, out = await _run("stats", "--data-dir", str(data), "--json")
    assert code == 0, out
    document = json.loads(out)
    assert document["outcomes"]["hit_exact"] == 2 and document["outcomes"]["miss"] == 1
    saved = document["saved"]
    assert saved["cost"] == pytest.approx(2 * (1200 * 1.0 + 40 * 2.0) / 1e6)
    assert document["windows"] == "ledger" and document["requests"]["1h"] == 3


async def test_a_bad_price_table_is_a_clear_error(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('currency = "USD"\n[models.m]\ninput_per_million = -1\n')
    code, out = await _run("stats", "--data-dir", str(tmp_path / "d"), "--pricing", str(prices))
    assert code != 0 and "Traceback" not in out
    assert "models.m.input_per_million" in out and "output_per_million" in out

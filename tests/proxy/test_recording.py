"""``--record``: one JSON line per completed chat exchange, without credentials, rotated by size."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from embeddings.keys import namespace_for
from tests.conftest import ProxyFactory, data_uri, jpeg_bytes, native_chat, openai_chat
from tests.fakes import FakeUpstream

SECRET = "Bearer sk-live-do-not-log-me"


async def post(client: aiohttp.ClientSession, proxy: TestServer, body: object) -> str:
    async with client.post(
        proxy.make_url("/v1/chat/completions"), json=body, headers={"Authorization": SECRET}
    ) as response:
        await response.read()
        return response.headers["X-Cache"]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rotated(directory: Path, name: str) -> dict[str, tuple[int, list[dict]]]:
    """Size and lines of the record file and its rotated backups, by file name."""
    return {p.name: (p.stat().st_size, lines(p)) for p in directory.glob(name + "*")}


async def test_exchanges_are_recorded_in_the_warmup_format(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    record = tmp_path / "logs" / "exchanges.jsonl"
    proxy = await make_proxy(record=record)
    photo = data_uri(jpeg_bytes(7))
    question = openai_chat("What phone is this?", photo)
    assert await post(client, proxy, question) == "MISS"
    assert await post(client, proxy, question) == "HIT"
    streamed = openai_chat("Describe it", photo, stream=True)
    assert await post(client, proxy, streamed) == "MISS"
    assert await post(client, proxy, native_chat("这是什么手机?", photo)) == "MISS"
    await proxy.close()  # the recorder writes what is queued before it stops

    text = record.read_text()
    assert "sk-live-do-not-log-me" not in text
    miss, hit, stream, native = lines(record)
    assert miss["namespace"] == hit["namespace"] == namespace_for(SECRET)
    assert (miss["cache"], miss["match"], hit["cache"], hit["match"]) == (
        "MISS",
        None,
        "HIT",
        "exact",
    )
    assert miss["request"] == question and hit["request"] == question
    assert miss["response"]["status_code"] == 200
    assert miss["response"]["body"] == hit["response"]["body"]
    assert miss["response"]["body"]["object"] == "chat.completion"
    assert miss["path"] == "/v1/chat/completions" and miss["method"] == "POST"
    assert miss["latency_ms"] > 0 and miss["ts"] <= hit["ts"]
    # A streamed answer is recorded as the completion it spelled out.
    assert stream["stream"] is True
    assert stream["response"]["body"]["choices"][0]["message"]["content"]
    assert (native["format"], native["model"]) == ("native", "qwen3-vl-plus")
    assert native["request"]["input"]["messages"][0]["content"][1]["text"] == "这是什么手机?"


async def test_the_record_file_rotates_by_size(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    record = tmp_path / "exchanges.jsonl"
    proxy = await make_proxy(record=record, record_max_bytes=3000, record_backups=2)
    for n in range(12):
        await post(client, proxy, openai_chat(f"Question {n}?", data_uri(jpeg_bytes(n))))
    await proxy.close()
    files = rotated(tmp_path, "exchanges.jsonl")
    assert sorted(files) == ["exchanges.jsonl", "exchanges.jsonl.1", "exchanges.jsonl.2"]
    kept = [line for size, records in files.values() for line in records]
    assert 2 <= len(kept) < 12  # older lines were rotated away, every kept line is whole
    for size, _ in files.values():
        assert size <= 3000 + 1500  # a file rotates before the line that would overfill it


async def test_concurrent_exchanges_are_each_recorded_once(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy(record=tmp_path / "exchanges.jsonl")
    bodies = [openai_chat(f"Question {n}?", data_uri(jpeg_bytes(n))) for n in range(20)]
    outcomes = await asyncio.gather(*(post(client, proxy, body) for body in bodies))
    assert outcomes == ["MISS"] * 20
    await proxy.close()
    recorded = lines(tmp_path / "exchanges.jsonl")
    assert sorted(r["request"]["messages"][0]["content"][1]["text"] for r in recorded) == sorted(
        f"Question {n}?" for n in range(20)
    )

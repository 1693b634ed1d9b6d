"""Everything that is not a cacheable chat answer passes through untouched and is not stored."""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from tests.conftest import data_uri, jpeg_bytes, native_chat, openai_chat
from tests.fakes import FakeUpstream, Reply

AUTH = {"Authorization": "Bearer sk-pass"}


async def test_non_chat_routes_pass_through(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    async with client.get(proxy.make_url("/v1/models?limit=5"), headers=AUTH) as response:
        assert response.status == 200
        assert response.headers["X-Cache"] == "BYPASS"
        assert (await response.json())["data"][0]["id"] == "qwen3-vl-8b-instruct"
    assert fake.calls[-1].path == "/v1/models?limit=5"
    assert fake.calls[-1].headers["Authorization"] == "Bearer sk-pass"

    async with client.delete(proxy.make_url("/v1/files/abc"), headers=AUTH) as response:
        assert response.status == 200
        assert await response.json() == {"path": "/v1/files/abc", "method": "DELETE"}

    form = aiohttp.FormData()
    form.add_field("file", b"x" * 100_000, filename="batch.jsonl")
    async with client.post(proxy.make_url("/v1/files"), data=form, headers=AUTH) as response:
        assert response.headers["X-Cache"] == "BYPASS"
    assert fake.calls[-1].path == "/v1/files"
    assert len(fake.calls[-1].body) > 100_000


async def test_upstream_errors_pass_through_and_are_not_cached(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    request = openai_chat("Is it genuine?", data_uri(jpeg_bytes(10)))
    limited = {
        "error": {"message": "slow down", "type": "rate_limit", "param": None, "code": "429"}
    }
    fake.push(Reply(status=429, json=limited, headers={"Retry-After": "3"}))
    fake.push(Reply(status=500, json={"error": {"message": "boom"}}))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert (r.status, r.headers["Retry-After"], r.headers["X-Cache"]) == (429, "3", "MISS")
        assert await r.json() == limited
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert (r.status, r.headers["X-Cache"]) == (500, "MISS")
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "MISS")
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "HIT")
    assert len(fake.chat_calls) == 3


async def test_incomplete_or_no_store_answers_are_not_cached(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    fake.push(Reply(finish_reason="length"))
    fake.push(Reply(finish_reason="content_filter"))
    fake.push(Reply(headers={"Cache-Control": "private, no-store"}))
    request = openai_chat("Read the label", data_uri(jpeg_bytes(11)))
    for _ in range(4):
        async with client.post(
            proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH
        ) as r:
            assert (r.status, r.headers["X-Cache"]) == (200, "MISS")
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert r.headers["X-Cache"] == "HIT"
    assert len(fake.chat_calls) == 4


async def test_streamed_chat_is_relayed_frame_for_frame(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    native = native_chat("Stream it natively", data_uri(jpeg_bytes(12)))
    native["parameters"]["incremental_output"] = True
    path = "/api/v1/services/aigc/multimodal-generation/generation"
    sse = {**AUTH, "X-DashScope-SSE": "enable"}  # how a native request asks for a stream
    async with client.post(proxy.make_url(path), json=native, headers=sse) as r:
        assert r.headers["X-Cache"] == "MISS"  # cached like OpenAI streams
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert (await r.read()).startswith(b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:")
    request = openai_chat("Stream it", data_uri(jpeg_bytes(12)), stream=True)
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert r.headers["X-Cache"] == "MISS"
        assert r.headers["Content-Type"] == "text/event-stream"
        body = await r.read()
    frames = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert frames[-1] == b"[DONE]"
    assert orjson.loads(frames[-2])["choices"][0]["finish_reason"] == "stop"


async def test_upstream_down_is_502_and_slow_upstream_is_504(
    make_proxy,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    unused_tcp_port: int,
    tmp_path,
) -> None:
    request = openai_chat("Anyone there?", data_uri(jpeg_bytes(13)))
    down = await make_proxy(upstream=f"http://127.0.0.1:{unused_tcp_port}")
    async with client.post(down.make_url("/v1/chat/completions"), json=request) as r:
        assert r.status == 502
        error = (await r.json())["error"]
        assert error["code"] == "upstream_unreachable" and set(error) == {
            "message",
            "type",
            "param",
            "code",
        }
    async with client.get(down.make_url("/v1/models")) as r:
        assert r.status == 502

    fake, _ = upstream
    fake.push(Reply(hang=2.0))
    slow = await make_proxy(read_timeout=0.3, data_dir=tmp_path / "slow")
    async with client.post(slow.make_url("/v1/chat/completions"), json=request) as r:
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_upstream_cut_off_mid_body_is_not_cached_and_proxy_survives(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    fake.push(Reply(cut_off=True))
    request = openai_chat("Cut me off", data_uri(jpeg_bytes(14)))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert r.status == 502
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "MISS")
    async with client.post(proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH) as r:
        assert r.headers["X-Cache"] == "HIT"


async def test_hop_by_hop_headers_are_not_forwarded(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    headers = {
        **AUTH,
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "X-Trace": "t1",
    }
    async with client.get(proxy.make_url("/v1/models"), headers=headers) as r:
        assert r.status == 200
    sent = {k.lower() for k in fake.calls[-1].headers}
    assert "x-secret-hop" not in sent and "x-trace" in sent
    assert fake.calls[-1].headers["Host"] == f"127.0.0.1:{upstream[1].port}"


async def test_upstream_cookies_reach_only_the_caller_that_got_them(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    """The proxy's pooled upstream session keeps no cookies: a ``Set-Cookie`` meant for one
    caller is relayed to that caller and never sent upstream on anyone else's request."""
    fake, _ = upstream
    fake.push(Reply(headers={"Set-Cookie": "session=tenant-a-secret; Path=/"}))
    first = openai_chat("Whose cookie is this?", data_uri(jpeg_bytes(80)))
    async with client.post(
        proxy.make_url("/v1/chat/completions"), json=first, headers=AUTH
    ) as response:
        assert response.status == 200
        assert "tenant-a-secret" in response.headers.get("Set-Cookie", "")
    other = openai_chat("Another question", data_uri(jpeg_bytes(81)))
    async with aiohttp.ClientSession() as stranger:
        async with stranger.post(
            proxy.make_url("/v1/chat/completions"),
            json=other,
            headers={"Authorization": "Bearer sk-other"},
        ) as response:
            assert response.status == 200
        async with stranger.get(proxy.make_url("/v1/models"), headers=AUTH) as response:
            assert response.status == 200
    assert len(fake.calls) >= 3
    assert all("Cookie" not in call.headers for call in fake.calls)

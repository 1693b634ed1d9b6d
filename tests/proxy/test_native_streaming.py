"""Native (DashScope) streaming: asked with ``X-DashScope-SSE: enable``, relayed byte for byte,
stored once complete, replayed as ``event:result`` frames of the form the request asked for.

The upstream frames here are written the way DashScope's API reference shows them, not by the
proxy's own replay, and the proxy's frames are read back the way a DashScope client reads them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from embeddings.keys import question_fingerprint
from proxy.native_sse import NativeStreamAssembler
from proxy.protocol import parse_chat
from proxy.standin import native_answer
from tests.conftest import ProxyFactory, data_uri, jpeg_bytes, native_chat
from tests.fakes import FakeUpstream, Reply

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
AUTH = {"Authorization": "Bearer sk-native"}
SSE = {**AUTH, "X-DashScope-SSE": "enable"}
DASHSCOPE_SSE_TYPE = {"Content-Type": "text/event-stream;charset=UTF-8"}
DELTAS = ["这是", " X5 Pro", " 手机，", "支持", " 5G 网络。"]
TEXT = "".join(DELTAS)
USAGE = {"input_tokens": 1200, "output_tokens": len(DELTAS), "total_tokens": 1205}


def frame(number: int, output: dict[str, Any]) -> bytes:
    """One event as the DashScope API reference prints it (no space after the colons)."""
    data = {"output": output, "usage": {**USAGE, "output_tokens": number}, "request_id": "req-7"}
    return (
        f"id:{number}\nevent:result\n:HTTP_STATUS/200\n"
        f"data:{json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
    ).encode()


def error_frame(number: int) -> bytes:
    """A failure mid-stream, as DashScope sends it."""
    data = {"code": "InternalError", "message": "overloaded", "request_id": "req-7"}
    return f"id:{number}\nevent:error\n:HTTP_STATUS/500\ndata:{json.dumps(data)}\n\n".encode()


def dashscope_frames(pieces: list[str], reason: str = "stop") -> list[bytes]:
    """A multimodal answer streamed as ``pieces``; the last frame carries ``reason``."""
    return [
        frame(
            number,
            {
                "choices": [
                    {
                        "message": {"content": [{"text": piece}], "role": "assistant"},
                        "finish_reason": reason if number == len(pieces) else "null",
                    }
                ]
            },
        )
        for number, piece in enumerate(pieces, 1)
    ]


def snapshots(deltas: list[str]) -> list[str]:
    """All the text so far after each delta (``incremental_output: false`` frames)."""
    return ["".join(deltas[: n + 1]) for n in range(len(deltas))]


def read_events(body: bytes) -> list[dict[str, Any]]:
    """The frames of a native stream, checked for DashScope's framing, as a client reads them."""
    assert body.endswith(b"\n\n")
    events = []
    for number, block in enumerate(body.decode().split("\n\n")[:-1], 1):
        head, data = block.rsplit("\n", 1)
        assert head.split("\n") == [f"id:{number}", "event:result", ":HTTP_STATUS/200"]
        assert data.startswith("data:")
        events.append(json.loads(data[5:]))
    return events


def frame_texts(events: list[dict[str, Any]], field: str = "content") -> list[str]:
    messages = [e["output"]["choices"][0]["message"] for e in events]
    if field == "content":
        return ["".join(part["text"] for part in m["content"]) for m in messages]
    return [m.get(field) or "" for m in messages]


def request(question: str, seed: int, model: str = "qwen3-vl-plus", **params: Any) -> dict:
    body = native_chat(question, data_uri(jpeg_bytes(seed)), model=model)
    body["parameters"].update(params)
    return body


async def post(
    client: aiohttp.ClientSession, proxy: TestServer, body: dict, headers: dict[str, str]
) -> tuple[str, str, bytes]:
    async with client.post(proxy.make_url(PATH), json=body, headers=headers) as r:
        assert r.status == 200
        return r.headers["X-Cache"], r.headers["Content-Type"], await r.read()


@pytest.mark.parametrize(
    ("flag", "model", "pieces"),
    [
        (True, "qwen3-vl-plus", DELTAS),
        (False, "qwen3-vl-plus", snapshots(DELTAS)),
        (None, "qwen3-vl-plus", DELTAS),  # the model's default: new text per frame
        (None, "qwen-vl-max", snapshots(DELTAS)),  # the model's default: all text so far
    ],
)
async def test_streamed_miss_is_relayed_byte_for_byte_and_serves_both_forms(
    proxy: TestServer,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    flag: bool | None,
    model: str,
    pieces: list[str],
) -> None:
    fake, _ = upstream
    frames = dashscope_frames(pieces)
    fake.push(Reply(stream_frames=frames, headers=DASHSCOPE_SSE_TYPE))
    params = {} if flag is None else {"incremental_output": flag}
    body = request("Which phone is this?", 60, model, **params)
    cache, content_type, relayed = await post(client, proxy, body, SSE)
    assert (cache, content_type) == ("MISS", DASHSCOPE_SSE_TYPE["Content-Type"])
    assert relayed == b"".join(frames)
    assert fake.chat_calls[0].headers["X-DashScope-SSE"] == "enable"
    await asyncio.sleep(0.2)  # the entry is written by the store's writer

    cache, content_type, plain = await post(client, proxy, body, AUTH)
    assert (cache, content_type) == ("HIT", "application/json")
    answer = orjson.loads(plain)
    choice = answer["output"]["choices"][0]
    assert choice == {
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": [{"text": TEXT}]},
    }
    assert answer["usage"] == USAGE and answer["request_id"] == "req-7"

    cache, content_type, streamed = await post(client, proxy, body, SSE)
    assert (cache, content_type) == ("HIT", "text/event-stream")
    events = read_events(streamed)
    texts = frame_texts(events)
    assert ("".join(texts) if flag is not False else texts[-1]) == TEXT
    assert events[-1]["usage"] == USAGE and events[-1]["request_id"] == "req-7"
    assert len(fake.chat_calls) == 1


async def test_a_non_streamed_entry_is_replayed_in_the_form_each_request_asks(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    text = "It is an X5 Pro with 5G. The box shows the price and a 6.7 inch screen on the front."
    reasoning = "The label reads X5 Pro and the box has a 5G logo next to the price."
    stored = native_answer("qwen3-vl-plus", text)
    stored["output"]["choices"][0]["message"]["reasoning_content"] = reasoning
    fake.push(Reply(json=stored))
    body = request("Describe it.", 61)
    assert (await post(client, proxy, body, AUTH))[0] == "MISS"

    # Frames of new text (each a delta), of all the text so far (each extends the one before),
    # or, when the request leaves it to the model, one frame that reads the same either way.
    for flag in (True, False, None):
        asked = body if flag is None else request("Describe it.", 61, incremental_output=flag)
        cache, content_type, streamed = await post(client, proxy, asked, SSE)
        assert (cache, content_type) == ("HIT", "text/event-stream")
        events = read_events(streamed)
        contents, thoughts = frame_texts(events), frame_texts(events, "reasoning_content")
        if flag:
            assert len([c for c in contents if c]) > 2 and len([t for t in thoughts if t]) > 2
            assert ("".join(contents), "".join(thoughts)) == (text, reasoning)
        elif flag is False:
            assert len(set(contents)) > 2
            assert all(b.startswith(a) for a, b in itertools.pairwise(contents))
            assert (contents[-1], thoughts[-1]) == (text, reasoning)
        else:
            assert len(events) == 1 and (contents[0], thoughts[0]) == (text, reasoning)
        assert [e["output"]["choices"][0]["finish_reason"] for e in events][-2:] in (
            ["null", "stop"],
            ["stop"],
        )
        assert events[-1]["usage"] == stored["usage"]
        assert events[-1]["request_id"] == stored["request_id"]
    assert len(fake.chat_calls) == 1


async def test_unfinished_or_failed_streams_are_never_stored(
    proxy: TestServer, upstream: tuple[FakeUpstream, TestServer], client: aiohttp.ClientSession
) -> None:
    fake, _ = upstream
    good = dashscope_frames(DELTAS)
    error = error_frame(3)
    fake.push(Reply(stream_frames=good, cut_after_frames=3))  # the upstream breaks off
    fake.push(Reply(stream_frames=[*good[:2], error]))  # an error event
    fake.push(Reply(stream_frames=dashscope_frames(DELTAS, reason="length")))  # truncated
    fake.push(Reply(stream_frames=good[:-1]))  # ends without a finish_reason
    body = request("Stream this", 62, incremental_output=True)
    for number in range(4):
        try:
            async with client.post(proxy.make_url(PATH), json=body, headers=SSE) as r:
                assert r.headers["X-Cache"] == "MISS"
                relayed = await r.read()
            if number == 1:
                assert relayed.endswith(error)  # relayed as the upstream sent it
        except aiohttp.ClientPayloadError:
            assert number == 0  # cut off: the proxy cut the client off too
    await asyncio.sleep(0.2)
    assert (await post(client, proxy, body, AUTH))[0] == "MISS"
    assert len(fake.chat_calls) == 5


async def test_a_client_leaving_mid_stream_stores_nothing(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy()
    fake.push(Reply(stream_frames=dashscope_frames(["word "] * 30), frame_delay=0.02))
    body = request("Leave early", 63, incremental_output=True)
    async with client.post(proxy.make_url(PATH), json=body, headers=SSE) as r:
        await r.content.readany()
        r.close()  # the client goes away after the first bytes
    await asyncio.sleep(0.9)  # long enough for the upstream to have finished
    assert (await post(client, proxy, body, AUTH))[0] == "MISS"
    assert len(fake.chat_calls) == 2


async def test_the_stand_in_streams_natively_and_followers_get_frames(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    fake.latency = 0.3
    proxy = await make_proxy()
    body = request("这是什么手机？", 64)
    # A streamed request and a non-streamed one for the same question, at the same time: one
    # model run; whichever waits for the other gets the answer in its own form.
    (streamed, plain) = await asyncio.gather(
        post(client, proxy, body, SSE), post(client, proxy, body, AUTH)
    )
    assert sorted([streamed[0], plain[0]]) == ["HIT", "MISS"]
    assert streamed[1].startswith("text/event-stream") and plain[1] == "application/json"
    text = orjson.loads(plain[2])["output"]["choices"][0]["message"]["content"][0]["text"]
    assert "stand-in" in text
    # The stand-in streams new text per frame unless told otherwise, as Qwen3-VL does.
    assert "".join(frame_texts(read_events(streamed[2]))) == text
    cache, _, cumulative = await post(
        client, proxy, request("这是什么手机？", 64, incremental_output=False), SSE
    )
    assert (cache, frame_texts(read_events(cumulative))[-1]) == ("HIT", text)
    assert len(fake.chat_calls) == 1


async def test_a_streamed_answer_is_recorded_as_the_answer_it_spelled_out(
    make_proxy: ProxyFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    record = tmp_path / "exchanges.jsonl"
    proxy = await make_proxy(record=record)
    fake.push(Reply(stream_frames=dashscope_frames(DELTAS)))
    body = request("Record it", 65, incremental_output=True)
    assert (await post(client, proxy, body, SSE))[0] == "MISS"
    await proxy.close()  # the recorder writes what is queued before it stops
    (line,) = [json.loads(text) for text in record.read_text().splitlines()]
    assert (line["format"], line["stream"], line["cache"]) == ("native", True, "MISS")
    assert line["response"]["content_type"] == "application/json"
    assert line["response"]["body"]["output"]["choices"][0]["message"]["content"] == [
        {"text": TEXT}
    ]
    assert line["response"]["body"]["usage"] == USAGE


def test_only_the_header_asks_for_a_stream_and_the_question_stays_the_same() -> None:
    body = orjson.dumps(request("Same question?", 66, incremental_output=True))
    plain = parse_chat(body, max_images=4, max_image_bytes=1 << 20)
    streamed = parse_chat(body, max_images=4, max_image_bytes=1 << 20, sse_requested=True)
    assert plain is not None and streamed is not None
    assert (plain.stream, streamed.stream) == (False, True)  # incremental_output alone: no stream
    assert question_fingerprint(
        plain.format, plain.model, plain.turns, plain.params
    ) == question_fingerprint(streamed.format, streamed.model, streamed.turns, streamed.params)
    openai = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    chat = parse_chat(openai, max_images=4, max_image_bytes=1, sse_requested=True)
    assert chat is not None and chat.stream is False  # the header means nothing to OpenAI bodies


def assembled(
    frames: list[bytes], *, model: str = "qwen3-vl-plus", incremental: bool | None = None
) -> NativeStreamAssembler:
    assembler = NativeStreamAssembler(model=model, incremental=incremental)
    for byte in b"".join(frames):  # one byte at a time: any split of the stream
        assembler.feed(bytes([byte]))
    return assembler


def test_the_text_result_format_and_reasoning_are_assembled() -> None:
    pieces = ["Fine", " weather", " today."]
    text_form = [
        frame(n, {"text": t, "finish_reason": "stop" if n == 3 else "null"})
        for n, t in enumerate(snapshots(pieces), 1)
    ]
    answer = assembled(text_form, model="qwen-plus").completion()
    assert answer["output"] == {"text": "Fine weather today.", "finish_reason": "stop"}
    thinking = [
        frame(1, {"choices": [{"message": {"content": [], "reasoning_content": "Look"}}]}),
        frame(2, {"choices": [{"message": {"content": [], "reasoning_content": " closer"}}]}),
        *dashscope_frames(DELTAS),
    ]
    message = assembled(thinking).completion()["output"]["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": [{"text": TEXT}],
        "reasoning_content": ("Look closer"),
    }


def test_a_stream_is_complete_only_when_it_finished_without_an_error() -> None:
    good = dashscope_frames(DELTAS)
    assert assembled(good).complete
    assert not assembled(good[:-1]).complete  # cut off before the last frame
    assert not assembled(dashscope_frames(DELTAS, reason="length")).complete
    assert not assembled([*good[:2], error_frame(3), *good[2:]]).complete
    # An error event or status is an error whatever its data looks like.
    assert not assembled([*good[:-1], good[-1].replace(b"event:result", b"event:error")]).complete
    assert not assembled([*good[:-1], good[-1].replace(b"/200", b"/500")]).complete
    assert not assembled([*good[:-1], b"id:9\nevent:result\ndata:{not json\n\n"]).complete
    assert not assembled([*good, b'id:9\nevent:result\ndata:{"code":"Throttling"}\n\n']).complete


def test_frames_that_read_two_ways_or_hold_more_than_text_are_not_complete() -> None:
    digits = dashscope_frames(["1", "1"])  # "11" in new-text frames, "1" in all-text frames
    assert not assembled(digits).complete  # Qwen3-VL streams new text by default: undecidable
    assert assembled(digits, incremental=True).completion()["output"]["choices"][0]["message"][
        "content"
    ] == [{"text": "11"}]
    legacy = assembled(digits, model="qwen-vl-max")  # defaults to all text so far
    assert legacy.complete
    assert legacy.completion()["output"]["choices"][0]["message"]["content"] == [{"text": "1"}]
    assert not assembled(dashscope_frames(DELTAS), incremental=False).complete  # not snapshots
    tool = {"tool_calls": [{"function": {"name": "sku", "arguments": "{"}}]}
    with_tool = frame(1, {"choices": [{"message": tool, "finish_reason": "stop"}]})
    audio = {"content": [{"audio": {"data": "UklGR"}}], "role": "assistant"}
    with_audio = frame(1, {"choices": [{"message": audio, "finish_reason": "stop"}]})
    assert not assembled([with_tool]).complete and not assembled([with_audio]).complete


@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(data: bytes) -> None:
    assembler = NativeStreamAssembler(model="qwen3-vl-plus", incremental=None)
    assembler.feed(data)
    if assembler.complete:
        assembler.completion()

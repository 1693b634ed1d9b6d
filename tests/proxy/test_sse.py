"""Stream assembly and replay round-trip, including reasoning, tool calls and usage."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sse import StreamAssembler, replay_frames

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "qwen3-vl",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "这是 X5 Pro 手机，支持 5G 网络。 It has a 6.7 inch screen.",
                "reasoning_content": "The label says X5 Pro; the box shows a 5G logo.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup_sku", "arguments": '{"sku": "X5-PRO"}'},
                    }
                ],
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240},
}


def assemble(frames: list[bytes], split: int = 0) -> StreamAssembler:
    assembler = StreamAssembler()
    data = b"".join(frames)
    if split:
        for start in range(0, len(data), split):
            assembler.feed(data[start : start + split])
    else:
        assembler.feed(data)
    return assembler


@pytest.mark.parametrize("split", [0, 1, 7, 100])
def test_replay_then_assemble_gives_back_the_completion(split: int) -> None:
    frames = list(replay_frames(COMPLETION, include_usage=True))
    assert frames[-1] == b"data: [DONE]\n\n"
    assert len([f for f in frames if b'"content"' in f]) > 2  # really split into several chunks
    assembled = assemble(frames, split)
    assert assembled.complete
    assert assembled.completion() == COMPLETION


def test_usage_only_when_asked() -> None:
    frames = list(replay_frames(COMPLETION, include_usage=False))
    assert not any(b'"usage"' in f for f in frames)
    assert "usage" not in assemble(frames).completion()


def test_incomplete_streams_are_not_complete() -> None:
    frames = list(replay_frames(COMPLETION, include_usage=True))
    assert not assemble(frames[:-1]).complete  # no [DONE]
    assert not assemble(frames[:3]).complete  # cut off mid-answer
    truncated = dict(COMPLETION, choices=[dict(COMPLETION["choices"][0], finish_reason="length")])
    assert not assemble(list(replay_frames(truncated, include_usage=False))).complete
    error = b'data: {"error": {"message": "overloaded"}}\n\n'
    assert not assemble([*frames[:2], error, frames[-1]]).complete
    assert not assemble([b"data: {not json\n\n", b"data: [DONE]\n\n"]).complete


@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(data: bytes) -> None:
    assembler = StreamAssembler()
    assembler.feed(data)
    assembler.feed(b"\n\ndata: [DONE]\n\n")
    if assembler.complete:
        orjson.dumps(assembler.completion())

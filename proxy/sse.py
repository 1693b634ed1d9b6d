"""Server-sent events of OpenAI chat completions: assemble a stream, replay an answer.

``StreamAssembler`` is fed the upstream's bytes as they pass through to the client and rebuilds
the ``chat.completion`` the stream spelled out (content, ``reasoning_content``, tool calls, usage).
It says the stream is complete only when every choice finished with ``"stop"`` and
``data: [DONE]`` arrived, so a cut-off or failed stream is never stored.

``replay_frames`` turns a stored ``chat.completion`` back into ``chat.completion.chunk`` frames,
the way a model would have streamed it, ending in ``data: [DONE]``.

``EventSplitter`` (bytes to events) and ``text_pieces`` (a text in a few chunks) serve the native
DashScope stream too (``native_sse``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

_DONE = b"[DONE]"
_REPLAY_PIECES = 8
# Bytes of one stream an assembler reads before it gives up on storing the answer.
MAX_ASSEMBLED_BYTES = 8 * 1024 * 1024


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    saw_content: bool = False


class EventSplitter:
    """Cuts a byte stream into server-sent events, whatever the chunks' split; gives up past a
    size cap, so an endless stream never holds memory without bound."""

    def __init__(self, max_bytes: int) -> None:
        self._buffer = b""
        self._seen = 0
        self._max_bytes = max_bytes
        self.overflowed = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by ``chunk`` (lines joined by LF, without the blank line)."""
        self._seen += len(chunk)
        if self._seen > self._max_bytes:
            self.overflowed = True
            self._buffer = b""
        if self.overflowed:
            return []
        self._buffer += chunk.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        return events


class StreamAssembler:
    """Rebuilds a ``chat.completion`` from the SSE bytes of a streamed one."""

    def __init__(self, max_bytes: int = MAX_ASSEMBLED_BYTES) -> None:
        self._events = EventSplitter(max_bytes)
        self._choices: dict[int, _Choice] = {}
        self._meta: dict[str, Any] = {}
        self._usage: Any = None
        self._done = False
        self._broken = False

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream (any split)."""
        if self._broken:
            return
        for event in self._events.feed(chunk):
            self._event(event)
        self._broken = self._broken or self._events.overflowed

    def _event(self, event: bytes) -> None:
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not data:
            return
        if data == _DONE:
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._broken = True
            return
        if not isinstance(chunk, dict) or "error" in chunk:
            self._broken = True
            return
        self._chunk(chunk)

    def _chunk(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self._meta:
                self._meta[key] = chunk[key]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for raw in choices:
            if not isinstance(raw, dict) or not isinstance(raw.get("index", 0), int):
                self._broken = True
                return
            choice = self._choices.setdefault(raw.get("index", 0), _Choice())
            delta = raw.get("delta") or {}
            if not isinstance(delta, dict):
                self._broken = True
                return
            if isinstance(delta.get("role"), str):
                choice.role = delta["role"]
            if isinstance(delta.get("content"), str):
                choice.content.append(delta["content"])
                choice.saw_content = True
            if isinstance(delta.get("reasoning_content"), str):
                choice.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                self._tool_call(choice, call)
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]

    def _tool_call(self, choice: _Choice, call: Any) -> None:
        if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
            self._broken = True
            return
        slot = choice.tool_calls.setdefault(
            call.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": []}
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        if isinstance(function.get("name"), str):
            slot["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            slot["arguments"].append(function["arguments"])

    @property
    def complete(self) -> bool:
        """True when the stream ended with ``[DONE]`` and every choice finished with "stop"."""
        return (
            self._done
            and not self._broken
            and bool(self._choices)
            and all(c.finish_reason == "stop" for c in self._choices.values())
        )

    def completion(self) -> dict[str, Any]:
        """The assembled ``chat.completion`` body."""
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            message: dict[str, Any] = {
                "role": choice.role,
                "content": "".join(choice.content) if choice.saw_content else None,
            }
            if choice.reasoning:
                message["reasoning_content"] = "".join(choice.reasoning)
            if choice.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": slot["id"],
                        "type": slot["type"],
                        "function": {"name": slot["name"], "arguments": "".join(slot["arguments"])},
                    }
                    for _, slot in sorted(choice.tool_calls.items())
                ]
            choices.append(
                {"index": index, "message": message, "finish_reason": choice.finish_reason}
            )
        body: dict[str, Any] = {
            "id": self._meta.get("id", "chatcmpl-vlcache"),
            "object": "chat.completion",
            "created": self._meta.get("created", int(time.time())),
            "model": self._meta.get("model", ""),
            "choices": choices,
        }
        if "system_fingerprint" in self._meta:
            body["system_fingerprint"] = self._meta["system_fingerprint"]
        if self._usage is not None:
            body["usage"] = self._usage
        return body


def replay_frames(completion: dict[str, Any], *, include_usage: bool) -> Iterator[bytes]:
    """SSE frames streaming ``completion`` as a model would, ending in ``data: [DONE]``."""
    base = {
        "id": completion.get("id", "chatcmpl-vlcache"),
        "object": "chat.completion.chunk",
        "created": completion.get("created", int(time.time())),
        "model": completion.get("model", ""),
    }
    if "system_fingerprint" in completion:
        base["system_fingerprint"] = completion["system_fingerprint"]

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    for choice in completion.get("choices", []):
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        yield frame([_delta(index, {"role": message.get("role", "assistant"), "content": ""})])
        for piece in text_pieces(message.get("reasoning_content") or ""):
            yield frame([_delta(index, {"reasoning_content": piece})])
        for piece in text_pieces(message.get("content") or ""):
            yield frame([_delta(index, {"content": piece})])
        for number, call in enumerate(message.get("tool_calls") or []):
            yield frame([_delta(index, {"tool_calls": [{"index": number, **call}]})])
        yield frame([_delta(index, {}, choice.get("finish_reason", "stop"))])
    if include_usage and completion.get("usage") is not None:
        yield frame([], usage=completion["usage"])
    yield b"data: [DONE]\n\n"


def _delta(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_pieces(text: str) -> list[str]:
    """Split ``text`` into a few chunks (on word boundaries where possible)."""
    if not text:
        return []
    size = max(len(text) // _REPLAY_PIECES, 1)
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        space = text.find(" ", end)
        end = space if 0 < space - end < 16 else end
        pieces.append(text[start:end])
        start = end
    return pieces

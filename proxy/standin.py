"""``StandIn``: a built-in stand-in for a Qwen3-VL endpoint, for the demo and benchmarks.

It speaks both request shapes the proxy understands, streamed or not: OpenAI chat completions
(``stream: true``) and the native ``input``/``parameters`` form (streamed when asked with
``X-DashScope-SSE: enable``, new text per frame unless ``incremental_output`` is false, as
Qwen3-VL does). It answers deterministically (the answer names a digest of the request body, so a
different image or question gets a different answer), takes a configurable time to answer like a
real model (the seed article measured 800-1500 ms), and keeps a record of every request it
received.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .native_sse import asks_for_stream, native_frames

MODEL = "qwen3-vl-8b-instruct"


@dataclass(frozen=True, slots=True)
class ReceivedCall:
    """One request the stand-in received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """A deterministic model endpoint; ``app()`` builds its aiohttp application."""

    latency: float = 0.0
    calls: list[ReceivedCall] = field(default_factory=list)

    def app(self) -> web.Application:
        """The aiohttp application serving this stand-in."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    @property
    def chat_calls(self) -> list[ReceivedCall]:
        """The calls that were POSTs (model runs)."""
        return [c for c in self.calls if c.method == "POST"]

    async def _models(self, request: web.Request) -> web.Response:
        self._note(request, b"")
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._note(request, body)
        if request.method != "POST":
            return web.json_response({"path": request.path, "method": request.method})
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(doc, dict):
            return _error(400, "request body must be a JSON object")
        return await self.answer(request, doc, body)

    async def answer(
        self, request: web.Request, doc: dict[str, Any], body: bytes
    ) -> web.StreamResponse:
        """Answer a parsed chat request after the configured latency."""
        if self.latency:
            await asyncio.sleep(self.latency)
        text = answer_text(body)
        model = str(doc.get("model") or MODEL)
        if "input" in doc:
            answer = native_answer(model, text)
            if asks_for_stream(request.headers):
                params = doc.get("parameters")
                full = isinstance(params, dict) and params.get("incremental_output") is False
                return await self._stream_native(request, answer, incremental=not full)
            return web.json_response(answer)
        if doc.get("stream") is True:
            options = doc.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, model, text, usage)
        return web.json_response(openai_answer(model, text))

    async def _stream(
        self, request: web.Request, model: str, text: str, usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = _chunk(model, {"content": piece}, None)
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: " + orjson.dumps(_chunk(model, {}, "stop")) + b"\n\n")
        if usage:
            last = {
                **_chunk(model, {}, None),
                "choices": [],
                "usage": openai_answer(model, text)["usage"],
            }
            await response.write(b"data: " + orjson.dumps(last) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream_native(
        self, request: web.Request, answer: dict[str, Any], *, incremental: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream;charset=UTF-8"})
        await response.prepare(request)
        for frame in native_frames(answer, incremental=incremental):
            await response.write(frame)
        await response.write_eof()
        return response

    def _note(self, request: web.Request, body: bytes) -> None:
        self.calls.append(
            ReceivedCall(request.method, request.path_qs, dict(request.headers), body)
        )


def answer_text(body: bytes) -> str:
    """The deterministic answer to a request body."""
    digest = hashlib.sha256(body).hexdigest()[:12]
    return f"This is the stand-in model's answer {digest}: a smartphone with 5G support."


def openai_answer(model: str, text: str, finish_reason: str = "stop") -> dict[str, Any]:
    """An OpenAI ``chat.completion`` body."""
    return {
        "id": "chatcmpl-" + hashlib.sha256(text.encode()).hexdigest()[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240},
    }


def native_answer(model: str, text: str, finish_reason: str = "stop") -> dict[str, Any]:
    """A native (DashScope multimodal) answer body."""
    return {
        "output": {
            "choices": [
                {
                    "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": [{"text": text}]},
                }
            ]
        },
        "usage": {"input_tokens": 1200, "output_tokens": 40},
        "request_id": hashlib.sha256(text.encode()).hexdigest()[:32],
        "model": model,
    }


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stream",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _error(status: int, message: str) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    return web.json_response(body, status=status)

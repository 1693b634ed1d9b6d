"""Test doubles: ``FakeUpstream`` is the product's stand-in model plus scripted faults."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy.standin import StandIn, native_answer, openai_answer


@dataclass
class Reply:
    """One scripted upstream reply (used once, in order, before the default answers)."""

    status: int = 200
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str | None = None
    hang: float = 0.0
    cut_off: bool = False
    stream_frames: list[bytes] | None = None  # raw SSE frames to send instead of JSON
    frame_delay: float = 0.0
    cut_after_frames: int | None = None


@dataclass
class FakeUpstream(StandIn):
    """A real aiohttp model endpoint that records every call and plays scripted replies."""

    script: deque[Reply] = field(default_factory=deque)
    sign_answers: bool = False  # end each answer with "for <the caller's key>"

    def push(self, reply: Reply) -> None:
        """Play ``reply`` for the next chat request."""
        self.script.append(reply)

    async def answer(
        self, request: web.Request, doc: dict[str, Any], body: bytes
    ) -> web.StreamResponse:
        if not self.script and not self.sign_answers:
            return await super().answer(request, doc, body)
        if not self.script:
            await asyncio.sleep(self.latency)
            key = request.headers.get("Authorization", "anonymous").removeprefix("Bearer ")
            answer = openai_answer(str(doc.get("model")), f"answer for {key}")
            return web.json_response(answer)
        reply = self.script.popleft()
        if reply.hang:
            await asyncio.sleep(reply.hang)
        if reply.stream_frames is not None:
            return await self._scripted_stream(request, reply)
        if reply.cut_off:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 1000
            await response.prepare(request)
            await response.write(b'{"choices": [')
            assert request.transport is not None
            request.transport.close()
            return response
        payload = reply.json
        if payload is None:
            text = f"scripted answer {len(self.calls)}"
            model = str(doc.get("model"))
            reason = reply.finish_reason or "stop"
            payload = (
                native_answer(model, text, reason)
                if "input" in doc
                else openai_answer(model, text, reason)
            )
        return web.Response(
            status=reply.status,
            body=orjson.dumps(payload),
            headers={"Content-Type": "application/json", **reply.headers},
        )

    async def _scripted_stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        response = web.StreamResponse(
            status=reply.status, headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)
        assert reply.stream_frames is not None
        for number, frame in enumerate(reply.stream_frames):
            if reply.cut_after_frames is not None and number == reply.cut_after_frames:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(frame)
            if reply.frame_delay:
                await asyncio.sleep(reply.frame_delay)
        await response.write_eof()
        return response

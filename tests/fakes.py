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


@dataclass
class FakeUpstream(StandIn):
    """A real aiohttp model endpoint that records every call and plays scripted replies."""

    script: deque[Reply] = field(default_factory=deque)

    def push(self, reply: Reply) -> None:
        """Play ``reply`` for the next chat request."""
        self.script.append(reply)

    async def answer(
        self, request: web.Request, doc: dict[str, Any], body: bytes
    ) -> web.StreamResponse:
        if not self.script:
            return await super().answer(request, doc, body)
        reply = self.script.popleft()
        if reply.hang:
            await asyncio.sleep(reply.hang)
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

"""Streams served by the cache: a stored answer replayed as frames, a miss's stream fanned out.

A hit for a streaming request is replayed in its format's frames (``replay``). And a streamed
miss is handed to identical requests while it passes (``StreamFanout``): N identical requests
arriving together make one upstream call (coalescing), and when the first of them, the leader,
streams, its followers should not wait for the whole answer before their first byte: each one
that asked for the same stream shape gets what the leader got so far at once, then every later
chunk as the leader relays it. The leader pushes chunks and ends the fan-out; followers iterate
``follow()``. Chunks are kept until the stream ends (an answer's size).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Mapping

import orjson
from aiohttp import web

from store.records import StoredAnswer

from .native_sse import NativeStreamAssembler, incremental_output, native_frames
from .protocol import ChatRequest
from .sse import StreamAssembler, replay_frames
from .upstream import Relayed

log = logging.getLogger(__name__)


class StreamFanout:
    """Chunks of one upstream stream for followers that join at any point of it."""

    def __init__(self, shape: Hashable) -> None:
        self.shape = shape  # what the stream's bytes depend on besides the exact key
        self.followers = 0  # followers reading right now
        self._chunks: list[bytes] = []
        self._grown = asyncio.Event()
        self._complete: bool | None = None  # None while the stream lasts

    @property
    def ended(self) -> bool:
        """The leader has ended the stream (completely or not)."""
        return self._complete is not None

    @property
    def complete(self) -> bool:
        """The stream reached its end (only meaningful once ``ended``)."""
        return self._complete is True

    @property
    def broken(self) -> bool:
        """The stream ended before its end: a follower joining now would get a truncated one."""
        return self._complete is False

    def followed(self) -> bool:
        """Someone reads the stream right now (the leader's relay reads on for them)."""
        return self.followers > 0

    async def carry(self, relaying: Awaitable[Relayed]) -> Relayed:
        """The leader's relay, ending the fan-out as the relay ends.

        If the leader's handler is cancelled (its client left, under a server that cancels
        handlers; ``vlcache serve`` does not) while followers read, the relay goes on to the end
        for them.
        """
        task = asyncio.ensure_future(relaying)
        try:
            relayed = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not self.followers:
                task.cancel()
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            relayed = await task
        self.end(complete=relayed.complete)
        return relayed

    def push(self, chunk: bytes) -> None:
        """The leader relayed ``chunk``."""
        self._chunks.append(chunk)
        self._wake()

    def end(self, *, complete: bool) -> None:
        """The stream is over: all of it went through (``complete``) or it broke off."""
        if self._complete is None:
            self._complete = complete
            self._wake()

    async def follow(self) -> AsyncGenerator[bytes, None]:
        """Every chunk from the first, as the leader relays them, until the stream ends."""
        self.followers += 1
        try:
            sent = 0
            while True:
                while sent < len(self._chunks):
                    sent += 1
                    yield self._chunks[sent - 1]
                if self._complete is not None:
                    return
                grown = self._grown
                await grown.wait()
        finally:
            self.followers -= 1

    def _wake(self) -> None:
        # One event per generation: every waiter wakes, later waiters wait for the next chunk.
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()


class Flight:
    """An identical request with the model right now (in-process coalescing): its answer once
    known (None when it cannot be shared), and its stream's fan-out once the leader streams."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future[StoredAnswer | None] = loop.create_future()
        # Resolved when the leader's upstream answer starts: its fan-out, or None (not a
        # stream, not a success, not storable: followers wait for the answer instead).
        self.fanout: asyncio.Future[StreamFanout | None] = loop.create_future()

    def streams(self, fanout: StreamFanout | None) -> None:
        """The leader's answer has started: as ``fanout``, or not to be followed live."""
        if not self.fanout.done():
            self.fanout.set_result(fanout)

    def land(self, answer: StoredAnswer | None) -> None:
        """The leader is done: ``answer`` is what it stored (None: nothing to share)."""
        self.streams(None)
        self.answer.set_result(answer)


def stream_shape(chat: ChatRequest) -> Hashable:
    """What a streamed answer's bytes depend on besides the exact key (None: not streamed).

    An exact key leaves out how the answer is delivered, so a follower shares a leader's stream
    only when it asked for the same frames: the same format, and usage chunks (OpenAI) or
    incremental text (native DashScope) asked for alike.
    """
    if not chat.stream:
        return None
    if chat.format == "native":
        return ("native", incremental_output(chat.params))
    return ("openai", _asks_for_usage(chat))


async def follow_live(
    request: web.Request, fanout: StreamFanout, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Write ``fanout``'s stream to a follower as it passes. If the leader's stream breaks off,
    the follower's connection is cut too (as the leader's is), so that no one mistakes a
    truncated stream for a whole one."""
    out = await _event_stream(request, headers)
    try:
        async with contextlib.aclosing(fanout.follow()) as chunks:
            async for chunk in chunks:
                await out.write(chunk)
        if fanout.complete:
            await out.write_eof()
        elif request.transport is not None:
            request.transport.abort()
    except ConnectionResetError:
        log.info("client went away during a coalesced stream")
    return out


def feeding(
    assembler: StreamAssembler | NativeStreamAssembler, fanout: StreamFanout | None
) -> Callable[[bytes], None]:
    """The relay's chunk callback: the assembler always, the fan-out when there is one."""
    if fanout is None:
        return assembler.feed

    def feed(chunk: bytes) -> None:
        assembler.feed(chunk)
        fanout.push(chunk)

    return feed


async def replay(
    request: web.Request, chat: ChatRequest, answer: StoredAnswer, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Serve a stored answer to a streaming request as its format's frames: OpenAI
    ``chat.completion.chunk`` frames, or native DashScope ``event:result`` frames."""
    stored = orjson.loads(answer.body)
    if chat.format == "native":
        frames = native_frames(stored, incremental=incremental_output(chat.params))
    else:
        frames = replay_frames(stored, include_usage=_asks_for_usage(chat))
    out = await _event_stream(request, headers)
    try:
        for frame in frames:
            await out.write(frame)
    except ConnectionResetError:
        log.info("client went away during a replay")
        return out
    await out.write_eof()
    return out


def _asks_for_usage(chat: ChatRequest) -> bool:
    """An OpenAI stream request asking for a last chunk with the usage."""
    options = chat.params.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _event_stream(request: web.Request, headers: Mapping[str, str]) -> web.StreamResponse:
    """A 200 ``text/event-stream`` response with ``headers``, its head sent."""
    out = web.StreamResponse(
        status=200,
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await out.prepare(request)
    return out

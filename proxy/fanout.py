"""``StreamFanout``: a streamed miss's bytes, handed to identical requests while they pass.

N identical requests arriving together make one upstream call (coalescing). When the first of
them, the leader, streams, its followers should not wait for the whole answer before their first
byte: each follower that asked for the same stream shape gets what the leader got so far at once,
then every later chunk as the leader relays it. The leader pushes chunks and ends the fan-out;
followers iterate ``follow()``. Chunks are kept until the stream ends (an answer's size).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Hashable

from store.records import StoredAnswer

from .native_sse import incremental_output
from .protocol import ChatRequest


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
    options = chat.params.get("stream_options")
    return ("openai", isinstance(options, dict) and options.get("include_usage") is True)

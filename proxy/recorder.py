"""``Recorder``: one JSON line per completed chat exchange (``--record``), the warm-up format.

Each line::

    {"v": 1, "ts": 1764052800.1, "namespace": "key:ab12...", "method": "POST",
     "path": "/v1/chat/completions", "format": "openai", "model": "...", "stream": false,
     "cache": "MISS", "match": null, "latency_ms": 812.3,
     "request": {...the request body...},
     "response": {"status_code": 200, "content_type": "application/json", "body": {...}}}

Headers are not recorded, so credentials never reach the file; the namespace is the one-way hash
the cache itself keys by. A streamed answer is recorded as the ``chat.completion`` it spelled out.
Lines are serialised and written by a thread of their own (the event loop only queues them) and
the file rotates by size through the standard library's ``RotatingFileHandler``. When the disk
cannot keep up, lines are dropped (and counted) rather than holding memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import orjson

from .failures import FailureLog

log = logging.getLogger(__name__)

# Bytes of request and answer bodies waiting for the writer beyond which new lines are dropped.
_MAX_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Exchange:
    """One completed chat exchange, as the proxy saw it."""

    namespace: str
    method: str
    path: str
    request_format: str
    model: str
    stream: bool
    cache: str
    match: str | None
    latency_ms: float
    request: bytes
    status: int
    content_type: str
    response: bytes
    at: float

    @property
    def size(self) -> int:
        """Bytes this exchange holds while queued."""
        return len(self.request) + len(self.response)

    def line(self) -> str:
        """The JSON line (parsed bodies, so a pretty-printed request still takes one line)."""
        document = {
            "v": 1,
            "ts": round(self.at, 3),
            "namespace": self.namespace,
            "method": self.method,
            "path": self.path,
            "format": self.request_format,
            "model": self.model,
            "stream": self.stream,
            "cache": self.cache,
            "match": self.match,
            "latency_ms": round(self.latency_ms, 3),
            "request": _json_or_text(self.request),
            "response": {
                "status_code": self.status,
                "content_type": self.content_type,
                "body": _json_or_text(self.response),
            },
        }
        return orjson.dumps(document).decode()


def _json_or_text(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


class Recorder:
    """Appends exchanges to a size-rotated JSON Lines file from a writer thread."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._queue: queue.SimpleQueue[Exchange | None] = queue.SimpleQueue()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failures = FailureLog(log)  # used by the writer thread only

    async def start(self) -> None:
        """Open the file (in a worker thread) and start the writer."""
        handler = await asyncio.to_thread(self._open)
        self._thread = threading.Thread(
            target=self._write_forever, args=(handler,), name="vlcache-recorder", daemon=True
        )
        self._thread.start()
        log.info("recording chat exchanges to %s", self.path)

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def write(self, exchange: Exchange) -> bool:
        """Queue ``exchange``; False when the writer is too far behind (the caller counts it)."""
        with self._lock:
            if self._pending_bytes + exchange.size > _MAX_PENDING_BYTES:
                return False
            self._pending_bytes += exchange.size
        self._queue.put(exchange)
        return True

    def _open(self) -> RotatingFileHandler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(
            self.path, maxBytes=self._max_bytes, backupCount=self._backups, encoding="utf-8"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler

    def _write_forever(self, handler: RotatingFileHandler) -> None:
        try:
            while (exchange := self._queue.get()) is not None:
                try:
                    record = logging.LogRecord(
                        "vlcache.record", logging.INFO, "", 0, exchange.line(), None, None
                    )
                    record.created = time.time()
                    handler.handle(record)
                except Exception:
                    # A full disk fails every line the same way: one traceback per burst.
                    self._failures.report("recording an exchange failed")
                finally:
                    with self._lock:
                        self._pending_bytes -= exchange.size
        finally:
            handler.close()

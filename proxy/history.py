"""Historical chat logs for warm-up: each JSON line becomes one logged exchange, or a reason not.

Three shapes are recognised, line by line (a file may mix them):

- the proxy's own ``--record`` lines (``proxy.recorder``): ``{"v": 1, "namespace", "cache",
  "match", "latency_ms", "request", "response": {"status_code", "content_type", "body"}, ...}``;
- OpenAI Batch-style lines: ``{"custom_id", "body" | "request", "response": {"status_code",
  "body"}}``, where ``request`` may also be a batch input line's ``{"method", "url", "body"}``;
- plain pairs ``{"request", "response"}``, the response being the answer itself or
  ``{"status_code", "body"}`` around it.

Images may be data URIs, http(s) URLs (fetched later, as the proxy fetches them) or local files:
paths relative to the log file, absolute paths or ``file://`` URIs. A file is inlined here as a
data URI, so the request is keyed exactly as if a client had sent those bytes (the exact key
hashes image bytes; the question fingerprint only sees image positions).

Everything here is synchronous file and JSON work: the warm-up runs it in a worker thread.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeGuard
from urllib.parse import unquote

import orjson
import pybase64

# A scheme other than file:// (oss://, s3://, ...): left for the request parser to refuse.
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_REMOTE = ("data:", "http://", "https://")


@dataclass(frozen=True, slots=True)
class Location:
    """Where a line is: the file as named on the command line, and its 1-based line number."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class Skip(Exception):
    """A line that is not imported: ``reason`` groups it in the report, ``detail`` is its own."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Unreadable(Skip):
    """A log file that could not be read to its end (an error of the run, not of a line)."""


@dataclass(frozen=True, slots=True)
class LoggedExchange:
    """One logged request and its answer, ready to be keyed."""

    request: bytes  # the request body as JSON, local image files inlined as data URIs
    namespace: str | None  # the recording's own namespace, when the line has one
    status: int
    content_type: str
    answer: bytes
    upstream_ms: float
    answered_at: float | None  # when the answer was given, when the line says


# What one line turns into: an exchange, the reason it is skipped, or None for a blank line.
LineItem: TypeAlias = "LoggedExchange | Skip | None"


def count_lines(path: Path) -> int:
    """Lines in ``path`` (a last line without a newline counts), read in large blocks."""
    lines = 0
    last = b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


class LogLines:
    """The lines of several log files in order, read a chunk at a time (from a worker thread)."""

    def __init__(self, files: Sequence[Path], *, max_image_bytes: int) -> None:
        self._files = list(files)
        self._max_image_bytes = max_image_bytes
        self._lines = self._all_lines()

    def take(self, count: int) -> list[tuple[Location, LineItem]]:
        """Up to ``count`` more lines, each read into a ``LineItem``; empty at the end."""
        chunk: list[tuple[Location, LineItem]] = []
        for location, base, raw in self._lines:
            if isinstance(raw, Unreadable):
                chunk.append((location, raw))
            elif raw.isspace():
                chunk.append((location, None))
            else:
                chunk.append((location, read_line(raw, base, self._max_image_bytes)))
            if len(chunk) >= count:
                break
        return chunk

    def close(self) -> None:
        """Close the file being read, if any."""
        self._lines.close()

    def _all_lines(self) -> Generator[tuple[Location, Path, bytes | Unreadable], None, None]:
        for path in self._files:
            base = path.parent
            number = 0
            try:
                with path.open("rb") as f:
                    for number, raw in enumerate(f, start=1):
                        yield Location(str(path), number), base, raw
            except OSError as exc:
                yield (
                    Location(str(path), number + 1),
                    base,
                    Unreadable("log file unreadable", str(exc)),
                )


def read_line(raw: bytes, base: Path, max_image_bytes: int) -> LoggedExchange | Skip:
    """The exchange one line holds, or why it is skipped; image paths are relative to ``base``."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Skip("not valid JSON", str(exc).split(":", 1)[0])
    try:
        if not isinstance(doc, dict):
            raise Skip("line is not a JSON object")
        if "v" in doc:
            return _recording(doc, base, max_image_bytes)
        if "custom_id" in doc or "body" in doc:
            return _batch_line(doc, base, max_image_bytes)
        if "request" in doc and "response" in doc:
            return _plain_pair(doc, base, max_image_bytes)
        raise Skip("not a recording, batch or request/response line")
    except Skip as skip:
        return skip


def _recording(doc: dict[str, Any], base: Path, max_image_bytes: int) -> LoggedExchange:
    if doc["v"] != 1 or isinstance(doc["v"], bool):
        raise Skip("unsupported recording version", str(doc["v"])[:20])
    if doc.get("cache") == "HIT" and doc.get("match") == "semantic":
        # The answer of a similar picture: the proxy never stores it under this picture's key.
        raise Skip("semantic hit (answered from a similar picture)")
    namespace = doc.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise Skip("namespace is not a non-empty string")
    response = doc.get("response")
    if not isinstance(response, dict):
        raise Skip("response is not a JSON object")
    status, answer = _wrapped_answer(response)
    content_type = response.get("content_type", "application/json")
    if not isinstance(content_type, str):
        raise Skip("content_type is not a string")
    # A hit's latency is the cache's, not the model's: only a model's answer saved that time.
    latency = doc.get("latency_ms") if doc.get("cache") != "HIT" else None
    answered_at = doc.get("ts")
    return LoggedExchange(
        request=_request_body(doc.get("request"), base, max_image_bytes),
        namespace=namespace,
        status=status,
        content_type=content_type,
        answer=answer,
        upstream_ms=max(float(latency), 0.0) if _is_number(latency) else 0.0,
        answered_at=float(answered_at) if _is_number(answered_at) else None,
    )


def _batch_line(doc: dict[str, Any], base: Path, max_image_bytes: int) -> LoggedExchange:
    request = doc["body"] if "body" in doc else doc.get("request")
    if isinstance(request, dict) and "body" in request and not _is_chat(request):
        request = request["body"]  # a batch input line: {"method", "url", "body"}
    response = doc.get("response")
    if response is None:
        raise Skip("batch line without a response", _error_code(doc.get("error")))
    if not isinstance(response, dict):
        raise Skip("response is not a JSON object")
    status, answer = _wrapped_answer(response)
    return _exchange(request, status, answer, base, max_image_bytes)


def _plain_pair(doc: dict[str, Any], base: Path, max_image_bytes: int) -> LoggedExchange:
    response = doc["response"]
    if isinstance(response, dict) and "status_code" in response and "body" in response:
        status, answer = _wrapped_answer(response)
    else:
        status, answer = 200, _answer_bytes(response)
    return _exchange(doc["request"], status, answer, base, max_image_bytes)


def _exchange(
    request: Any, status: int, answer: bytes, base: Path, max_image_bytes: int
) -> LoggedExchange:
    return LoggedExchange(
        request=_request_body(request, base, max_image_bytes),
        namespace=None,
        status=status,
        content_type="application/json",
        answer=answer,
        upstream_ms=0.0,
        answered_at=None,
    )


def _wrapped_answer(response: dict[str, Any]) -> tuple[int, bytes]:
    status = response.get("status_code")
    if not isinstance(status, int) or isinstance(status, bool):
        raise Skip("status_code is not an integer")
    if status != 200:
        raise Skip("answer status is not 200", str(status))
    if "body" not in response:
        raise Skip("response has no body")
    return status, _answer_bytes(response["body"])


def _answer_bytes(body: Any) -> bytes:
    if isinstance(body, dict | list):
        return orjson.dumps(body)
    if isinstance(body, str):
        return body.encode()
    raise Skip("answer is neither JSON nor text")


def _request_body(request: Any, base: Path, max_image_bytes: int) -> bytes:
    if not isinstance(request, dict):
        raise Skip("request is not a JSON object")
    _inline_files(request, base, max_image_bytes)
    return orjson.dumps(request)


def _is_chat(doc: dict[str, Any]) -> bool:
    return "messages" in doc or "input" in doc


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _error_code(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("code") or error.get("message") or "")[:80]
    return ""


def _inline_files(request: dict[str, Any], base: Path, max_image_bytes: int) -> None:
    """Replace every local image path of ``request`` by a data URI of the file (in place).

    Parts are recognised as ``proxy.protocol.parse_chat`` reads them; anything malformed is left
    alone for the parser to report.
    """
    messages = request.get("messages")
    if messages is None and isinstance(request.get("input"), dict):
        messages = request["input"].get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in (None, "text") and "text" in part:
                continue
            if kind == "image_url":
                holder, field = part, "image_url"
                if isinstance(part.get("image_url"), dict):
                    holder, field = part["image_url"], "url"
            elif kind in (None, "image") and "image" in part:
                holder, field = part, "image"
            else:
                continue
            value = holder.get(field)
            if isinstance(value, str) and _is_local(value):
                holder[field] = _file_data_uri(_resolve(value, base), max_image_bytes)


def _is_local(value: str) -> bool:
    if value.startswith(_REMOTE):
        return False
    return value.startswith("file://") or not _OTHER_SCHEME.match(value)


def _resolve(value: str, base: Path) -> Path:
    if value.startswith("file://"):
        value = unquote(value.removeprefix("file://"))
    return base / value  # an absolute path stays as it is


def _file_data_uri(path: Path, max_image_bytes: int) -> str:
    try:
        size = path.stat().st_size
        if size > max_image_bytes:
            raise Skip("image larger than the per-image limit", f"{path} ({size} bytes)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise Skip("image file not found", str(path)) from None
    except OSError as exc:
        raise Skip("image file unreadable", f"{path}: {exc.strerror}") from None
    media = mimetypes.guess_type(path.name)[0]
    if media is None or not media.startswith("image/"):
        media = "image/unknown"  # the label is never hashed; the bytes are
    return f"data:{media};base64,{pybase64.b64encode(data).decode('ascii')}"

"""Reading chat requests and answers: only what the cache key and the store need.

Two request shapes are understood, on any path:

- OpenAI chat completions: ``{"model", "messages": [{"role", "content": str | [parts]}]}`` with
  ``text`` and ``image_url`` parts (data URIs or http(s) URLs);
- the native Qwen/DashScope form: ``{"model", "input": {"messages": [...]}, "parameters": {...}}``
  with ``{"text": ...}`` and ``{"image": ...}`` parts, answered in ``output``.

``parse_chat`` returns None for anything that is not a chat (it is passed through untouched) and
raises ``Uncacheable`` for a chat the cache must not key (also passed through, and counted).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import pybase64

from embeddings.keys import Turn

from .errors import Uncacheable

RequestFormat = Literal["openai", "native"]

_TURN_EXTRAS = ("name", "tool_calls", "tool_call_id", "function_call")
_QUESTION_PREVIEW = 500
# Deepest nesting of lists and objects in a chat the cache keys. The key builder and the recorder
# write the request's parts again, a level deeper, with orjson, whose writer stops at 255 levels
# (its reader at 1024); real requests, JSON schemas of tools included, stay far below this.
_MAX_NESTING = 240


@dataclass(frozen=True, slots=True)
class ImageSource:
    """Where one image of a request comes from: inline bytes or a URL to fetch."""

    position: int
    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat request that the cache reads."""

    format: RequestFormat
    model: str
    turns: tuple[Turn, ...]
    params: dict[str, Any]
    images: tuple[ImageSource, ...]
    stream: bool
    question: str


def parse_chat(
    body: bytes, *, max_images: int, max_image_bytes: int, sse_requested: bool = False
) -> ChatRequest | None:
    """Parse ``body``; None when it is not a chat request at all.

    ``sse_requested``: the request carried ``X-DashScope-SSE: enable``, which is how a native
    request asks to be streamed (its ``incremental_output`` only shapes the frames of a stream).
    """
    lifted = _lift_data_uris(body)
    if lifted is not None:
        reduced, uris = lifted
        try:
            chat = _parse(reduced, uris, max_images, max_image_bytes, sse_requested)
        except (Uncacheable, _NotLifted):
            chat = None
        # Only a complete success stands: every lifted string was an image's data URI and
        # decoded, so the whole body parses to the same request. Anything else is decided by
        # parsing the body as it came (a lifted string elsewhere, a refusal, not a chat).
        if chat is not None:
            return chat
    return _parse(body, (), max_images, max_image_bytes, sse_requested)


def _parse(
    body: bytes,
    lifted: tuple[_Lifted, ...],
    max_images: int,
    max_image_bytes: int,
    sse_requested: bool,
) -> ChatRequest | None:
    """``parse_chat`` of ``body`` whose data URI strings ``lifted`` were replaced by tokens."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    if "messages" in doc:
        request_format: RequestFormat = "openai"
        messages = doc["messages"]
        params = {k: v for k, v in doc.items() if k not in ("messages", "model")}
    elif isinstance(doc.get("input"), dict) and "messages" in doc["input"]:
        request_format = "native"
        messages = doc["input"]["messages"]
        params = doc.get("parameters", {})
        if not isinstance(params, dict):
            raise Uncacheable("parameters is not an object")
    else:
        return None
    if _nested_deeper(doc, _MAX_NESTING):
        raise Uncacheable(f"JSON nested more than {_MAX_NESTING} levels deep")
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise Uncacheable("model is not a string")
    if not isinstance(messages, list) or not messages:
        raise Uncacheable("messages is not a non-empty list")
    reader = _MessageReader(max_images=max_images, max_image_bytes=max_image_bytes, lifted=lifted)
    turns = tuple(reader.read(message) for message in messages)
    if reader.lifted_used != len(lifted):
        raise _NotLifted  # a lifted string is somewhere else than an image URL
    stream = params.get("stream") is True if request_format == "openai" else sse_requested
    return ChatRequest(
        format=request_format,
        model=model,
        turns=turns,
        params=params,
        images=tuple(reader.images),
        stream=stream,
        question=_question_preview(turns),
    )


class _MessageReader:
    """Turns messages into ``Turn``s, collecting their images in order."""

    def __init__(
        self, *, max_images: int, max_image_bytes: int, lifted: tuple[_Lifted, ...] = ()
    ) -> None:
        self.images: list[ImageSource] = []
        self.lifted_used = 0
        self._max_images = max_images
        self._max_image_bytes = max_image_bytes
        self._lifted = lifted

    def read(self, message: Any) -> Turn:
        if not isinstance(message, dict):
            raise Uncacheable("a message is not an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise Uncacheable("a message has no string role")
        content = message.get("content")
        if content is None:
            parts: tuple[str | int, ...] = ()
        elif isinstance(content, str):
            parts = (content,)
        elif isinstance(content, list):
            parts = tuple(self._part(part) for part in content)
        else:
            raise Uncacheable("message content is neither text nor a list of parts")
        extras = {k: message[k] for k in _TURN_EXTRAS if message.get(k) is not None}
        return Turn(role=role, parts=parts, extras=extras)

    def _part(self, part: Any) -> str | int:
        if isinstance(part, str):
            return part
        if not isinstance(part, dict):
            raise Uncacheable("a content part is not an object")
        kind = part.get("type")
        if kind in (None, "text") and "text" in part:
            text = part["text"]
            if not isinstance(text, str):
                raise Uncacheable("a text part is not a string")
            return text
        if kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            return self._image(url)
        if kind in (None, "image") and "image" in part:
            return self._image(part["image"])
        raise Uncacheable(f"content part of type {str(kind)[:40]!r} is not cacheable")

    def _image(self, url: Any) -> int:
        if not isinstance(url, str):
            raise Uncacheable("an image URL is not a string")
        position = len(self.images)
        if position >= self._max_images:
            raise Uncacheable(f"more than {self._max_images} images")
        if url.startswith(_LIFTED) and self._lifted:
            header, payload = self._lifted[int(url[1:])]
            data = _decode_image(header, payload, self._max_image_bytes)
            self.lifted_used += 1
            self.images.append(ImageSource(position, data=data))
        elif url.startswith("data:"):
            data = decode_data_uri(url, max_bytes=self._max_image_bytes)
            self.images.append(ImageSource(position, data=data))
        elif url.startswith(("http://", "https://")):
            self.images.append(ImageSource(position, url=url))
        else:
            raise Uncacheable("image is neither a data URI nor an http(s) URL")
        return position


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:image/...`` URI; ``Uncacheable`` when it is not one."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise Uncacheable("data URI without a comma")
    return _decode_image(header, payload, max_bytes)


def _decode_image(header: str, payload: str | memoryview, max_bytes: int) -> bytes:
    media = header[5:].split(";")
    if not media[0].lower().startswith("image/") or "base64" not in media[1:]:
        raise Uncacheable("data URI is not a base64 image")
    if media[0].lower().startswith("image/svg"):
        raise Uncacheable("SVG images are not cached")
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise Uncacheable("image larger than the per-image limit")
    try:
        # pybase64 (SIMD) decodes a 200 KB image in ~11 us where binascii takes ~450 us; both
        # refuse the same malformed input (bad characters, whitespace, bad padding).
        return pybase64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise Uncacheable(f"corrupt base64 image: {exc}") from exc


# Inline images are most of a chat body's bytes (a 150 KB photo is ~200 KB of base64). Parsed as
# JSON strings, each becomes a str that the key only decodes again: orjson takes ~85 us for a
# 200 KB body here, of which all but a few go to that string. So long ``"data:...;base64,..."``
# strings are lifted out of the body first (found by a byte search), the rest is parsed with a
# short token in their place, and an image whose URL is a token is decoded straight from the
# body's bytes (``parse_chat`` of that body: ~36 us instead of ~117). A token is a NUL and the
# lifted string's index: no string of the body can be one, since a body that spells ``\u0000``
# outside the lifted strings is parsed as it came, and a raw NUL is not JSON.
_LIFTED = "\0"
_LIFT_MIN_BYTES = 1024
_LIFT_HEADER_BYTES = 256
# Candidates looked at per body: a chat caches a few images (--max-images), and a body of many
# short "data:" strings must not keep the loop in this Python loop (those left are parsed as
# they came, by orjson).
_LIFT_CANDIDATES = 16


# A lifted data URI: its header (``data:image/jpeg;base64``) and its payload, in the body.
_Lifted = tuple[str, memoryview]


class _NotLifted(Exception):
    """The lifted parse cannot stand for the whole body's; parse the body as it came."""


def _lift_data_uris(body: bytes) -> tuple[bytes, tuple[_Lifted, ...]] | None:
    """``body`` with its long data URI strings replaced by tokens, and those strings' header and
    payload; None when there is nothing to lift.

    What is lifted runs from a quote before ``data:`` to the next quote, holds no backslash and
    starts with a short printable ASCII header before its comma; its payload is checked when it
    is decoded as base64 (``_decode_image``), which accepts nothing a JSON string could not
    hold. Where that quote opens a string, the lifted bytes are that whole string as it parses,
    and a token in its place parses alike. Where it does not (it is escaped inside another
    string, or the body is no JSON), the token is no string of its own, so it cannot be an
    image's URL: the parse ends with a token unused, and the body is parsed as it came. So does
    a token used as an object key, or as any value but an image's URL.
    """
    start = body.find(b'"data:')
    if start < 0:
        return None
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    lifted: list[_Lifted] = []
    kept = 0
    for _ in range(_LIFT_CANDIDATES):
        end = body.find(b'"', start + 1)
        if end < 0:
            break
        header = _liftable_header(body, start, end)
        if header is not None:
            pieces += [view[kept:start], f'"\\u0000{len(lifted)}"'.encode()]
            lifted.append((header, view[start + 2 + len(header) : end]))
            kept = end + 1
        start = body.find(b'"data:', end + 1)
        if start < 0:
            break
    if not lifted:
        return None
    pieces.append(view[kept:])
    reduced = b"".join(pieces)
    # Searched in what is left, not the whole body (a lifted string holds no backslash): in a
    # 200 KB body, ``in`` takes ~150 us to not find it among the base64.
    if reduced.count(b"\\u0000") != len(lifted):
        return None  # the body spells a NUL of its own: it could pose as a token
    return reduced, tuple(lifted)


def _liftable_header(body: bytes, start: int, end: int) -> str | None:
    """The header of the string between the quotes at ``start`` and ``end``, if it is liftable."""
    if end - start < _LIFT_MIN_BYTES:
        return None
    comma = body.find(b",", start, min(end, start + _LIFT_HEADER_BYTES))
    if comma < 0:
        return None
    try:
        header = body[start + 1 : comma].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not header.isprintable():
        return None  # a raw control character: the body is no JSON
    # An escape would make the lifted bytes differ from the string they spell (the header's
    # "image/\u0073vg" is an SVG), and an escaped quote could be the one that ends them.
    return header if body.find(b"\\", start, end) < 0 else None


def _nested_deeper(doc: Any, limit: int) -> bool:
    """True when lists and objects in ``doc`` nest more than ``limit`` levels deep."""
    pending = [(doc, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list):
                if depth == limit:
                    return True
                pending.append((child, depth + 1))
    return False


def _question_preview(turns: tuple[Turn, ...]) -> str:
    """The text of the last user turn, shortened, for people inspecting entries."""
    for turn in reversed(turns):
        if turn.role == "user":
            text = " ".join(p for p in turn.parts if isinstance(p, str))
            return text[:_QUESTION_PREVIEW]
    return ""


@dataclass(frozen=True, slots=True)
class AnswerFacts:
    """What the cache needs to know of an upstream answer."""

    complete: bool
    prompt_tokens: int
    completion_tokens: int


def read_answer(request_format: RequestFormat, body: bytes) -> AnswerFacts:
    """Whether a 200 answer is complete (every finish_reason is "stop") and its token usage."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return AnswerFacts(False, 0, 0)
    if not isinstance(doc, dict):
        return AnswerFacts(False, 0, 0)
    if request_format == "openai":
        reasons = _finish_reasons(doc.get("choices"))
        usage = doc.get("usage")
        prompt_key, completion_key = "prompt_tokens", "completion_tokens"
    else:
        output = doc.get("output")
        output = output if isinstance(output, dict) else {}
        reasons = _finish_reasons(output.get("choices"))
        if "finish_reason" in output:
            reasons.append(output["finish_reason"])
        usage = doc.get("usage")
        prompt_key, completion_key = "input_tokens", "output_tokens"
    complete = bool(reasons) and all(reason == "stop" for reason in reasons)
    usage = usage if isinstance(usage, dict) else {}
    return AnswerFacts(complete, _count(usage.get(prompt_key)), _count(usage.get(completion_key)))


def _finish_reasons(choices: Any) -> list[Any]:
    if not isinstance(choices, list):
        return []
    return [c.get("finish_reason") if isinstance(c, dict) else None for c in choices]


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

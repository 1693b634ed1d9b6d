"""Server-sent events of the native DashScope API: assemble a stream, replay an answer.

DashScope streams a native request when the request carries the header ``X-DashScope-SSE:
enable`` (the Python SDK's ``stream=True`` only sets that header; nothing in the body asks for a
stream). Every event is one frame of the answer in its non-streamed shape::

    id:1
    event:result
    :HTTP_STATUS/200
    data:{"output":{"choices":[{"message":{"content":[{"text":"这是"}],"role":"assistant"},
          "finish_reason":"null"}]},"usage":{"input_tokens":1200,"output_tokens":2},
          "request_id":"..."}

``finish_reason`` is the string ``"null"`` until the last frame, which says ``"stop"`` (or
``"length"``, ...); no ``[DONE]`` follows. A failure is an ``event:error`` frame whose data holds
``code``, ``message`` and ``request_id``. ``parameters.incremental_output`` chooses what a frame
carries: only the new text (true) or all the text so far (false). A request that does not say gets
the model's default: true for the Qwen3 family (Qwen3-VL, Qwen3-Max, open-source Qwen3), QwQ and
QVQ, false for the others. The ``text`` result format (``output.text`` and
``output.finish_reason`` instead of ``output.choices``) streams the same way.

``NativeStreamAssembler`` rebuilds the non-streamed answer from the bytes as they pass and calls
it complete only when every choice finished with "stop", no error came, and the frames can be
read one way only. ``native_frames`` streams a stored answer back as such frames.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from .sse import MAX_ASSEMBLED_BYTES, EventSplitter, text_pieces

# Models that stream only the new text unless the request says otherwise (DashScope API reference,
# ``incremental_output``). Commercial Qwen3 models are named qwen-plus, qwen-flash...: false.
_INCREMENTAL_BY_DEFAULT = re.compile(r"(qwen3|qwq|qvq)", re.IGNORECASE)
_STATUS = b":HTTP_STATUS/"
_OUTPUT_FIELDS = ("choices", "text", "finish_reason")
_MESSAGE_FIELDS = ("role", "content", "reasoning_content")


def asks_for_stream(headers: CIMultiDictProxy[str]) -> bool:
    """True when a native request asks DashScope to stream (``X-DashScope-SSE: enable``)."""
    return headers.get("X-DashScope-SSE", "").strip().lower() == "enable"


def incremental_output(params: Mapping[str, Any]) -> bool | None:
    """The request's ``incremental_output``; None when it leaves the choice to the model."""
    value = params.get("incremental_output")
    return value if isinstance(value, bool) else None


@dataclass
class _Text:
    """One text field of one choice, as the frames spelled it (new text or all text so far)."""

    pieces: list[str] = field(default_factory=list)
    snapshots: bool = True  # every piece extends the one before, as all-text-so-far frames do

    def add(self, piece: str) -> None:
        # An empty piece says nothing new in either reading (reasoning frames carry content "").
        if not piece:
            return
        if self.pieces and not piece.startswith(self.pieces[-1]):
            self.snapshots = False
        self.pieces.append(piece)

    @property
    def ambiguous(self) -> bool:
        """True when new-text and all-text readings give different texts."""
        return len(self.pieces) > 1

    def text(self, incremental: bool) -> str:
        if incremental:
            return "".join(self.pieces)
        return self.pieces[-1] if self.pieces else ""


@dataclass
class _Choice:
    role: str = "assistant"
    content: _Text = field(default_factory=_Text)
    reasoning: _Text = field(default_factory=_Text)
    listed: bool = False  # content is a list of parts (multimodal), not a string
    finish_reason: str | None = None

    def message(self, incremental: bool) -> dict[str, Any]:
        text = self.content.text(incremental)
        content: Any = ([{"text": text}] if text else []) if self.listed else text
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.reasoning.pieces:
            message["reasoning_content"] = self.reasoning.text(incremental)
        return message


class NativeStreamAssembler:
    """Rebuilds a native DashScope answer from the SSE bytes of a streamed one."""

    def __init__(
        self, *, model: str, incremental: bool | None, max_bytes: int = MAX_ASSEMBLED_BYTES
    ) -> None:
        self._events = EventSplitter(max_bytes)
        self._incremental = incremental
        self._incremental_by_default = _INCREMENTAL_BY_DEFAULT.match(model) is not None
        self._choices: dict[int, _Choice] = {}
        self._text_form: bool | None = None
        self._extras: dict[str, Any] = {}
        self._usage: Any = None
        self._request_id: Any = None
        self._broken = False

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream (any split)."""
        if self._broken:
            return
        for event in self._events.feed(chunk):
            self._event(event)
        self._broken = self._broken or self._events.overflowed

    def _event(self, event: bytes) -> None:
        kind, data = b"", []
        for line in event.split(b"\n"):
            if line.startswith(_STATUS):
                self._broken = self._broken or line[len(_STATUS) :].strip() != b"200"
            elif line.startswith(b"event:"):
                kind = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:])
        if kind == b"error":
            self._broken = True
        if self._broken or not data:
            return
        try:
            frame = orjson.loads(b"\n".join(data))
        except orjson.JSONDecodeError:
            self._broken = True
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("output"), dict):
            self._broken = True
            return
        self._frame(frame)

    def _frame(self, frame: dict[str, Any]) -> None:
        if frame.get("usage") is not None:
            self._usage = frame["usage"]
        if frame.get("request_id") is not None:
            self._request_id = frame["request_id"]
        output = frame["output"]
        choices = output.get("choices")
        text_form = not isinstance(choices, list)
        if self._text_form not in (None, text_form):
            self._broken = True
            return
        self._text_form = text_form
        self._extras.update((k, v) for k, v in output.items() if k not in _OUTPUT_FIELDS)
        if text_form:
            choice = self._choices.setdefault(0, _Choice())
            self._piece(choice.content, output.get("text"))
            self._finish(choice, output.get("finish_reason"))
            return
        assert isinstance(choices, list)
        for position, raw in enumerate(choices):
            index = raw.get("index", position) if isinstance(raw, dict) else None
            if not isinstance(raw, dict) or not isinstance(index, int):
                self._broken = True
                return
            self._choice(self._choices.setdefault(index, _Choice()), raw)

    def _choice(self, choice: _Choice, raw: dict[str, Any]) -> None:
        message = raw.get("message") or {}
        if not isinstance(message, dict):
            self._broken = True
            return
        for key, value in message.items():
            if key == "role" and isinstance(value, str):
                choice.role = value
            elif key == "content":
                text = _joined_text(value)
                if value is not None and text is None:
                    self._broken = True  # images, audio...: not a text answer to rebuild
                choice.listed = isinstance(value, list)
                self._piece(choice.content, text)
            elif key == "reasoning_content":
                self._piece(choice.reasoning, value)
            elif value not in (None, "", [], {}):
                # Tool calls and other parts are not rebuilt from frames: never store half of one.
                self._broken = True
        self._finish(choice, raw.get("finish_reason"))

    def _piece(self, text: _Text, value: Any) -> None:
        if isinstance(value, str):
            text.add(value)
        elif value is not None:
            self._broken = True

    @staticmethod
    def _finish(choice: _Choice, reason: Any) -> None:
        if reason not in (None, "null"):
            choice.finish_reason = str(reason)

    def _reading(self) -> bool | None:
        """True: frames carry new text; False: all text so far; None: cannot tell, or neither."""
        texts = [t for c in self._choices.values() for t in (c.content, c.reasoning)]
        snapshots = all(t.snapshots for t in texts)
        if self._incremental is not None:
            return self._incremental if self._incremental or snapshots else None
        if not snapshots or not any(t.ambiguous for t in texts):
            return True
        # Each frame extends the one before: all text so far, unless this model streams new text
        # by default, where "1" then "1" may as well have been "11".
        return None if self._incremental_by_default else False

    @property
    def complete(self) -> bool:
        """True when every choice finished with "stop", without an error, readable one way."""
        return (
            not self._broken
            and bool(self._choices)
            and all(c.finish_reason == "stop" for c in self._choices.values())
            and self._reading() is not None
        )

    def completion(self) -> dict[str, Any]:
        """The non-streamed answer the stream spelled out (meaningful when ``complete``)."""
        incremental = self._reading() is not False
        if self._text_form:
            choice = self._choices[0]
            output = {
                **self._extras,
                "text": choice.content.text(incremental),
                "finish_reason": choice.finish_reason,
            }
        else:
            output = {
                **self._extras,
                "choices": [
                    {
                        "finish_reason": self._choices[index].finish_reason,
                        "message": self._choices[index].message(incremental),
                    }
                    for index in sorted(self._choices)
                ],
            }
        answer: dict[str, Any] = {"output": output}
        if self._usage is not None:
            answer["usage"] = self._usage
        if self._request_id is not None:
            answer["request_id"] = self._request_id
        return answer


def _joined_text(content: Any) -> str | None:
    """The text of a message's content (a string, or text parts); None when it is not text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.keys() == {"text"} and isinstance(p["text"], str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def native_frames(answer: dict[str, Any], *, incremental: bool | None) -> Iterator[bytes]:
    """SSE frames streaming a stored native answer as DashScope would.

    ``incremental`` true: each frame carries the new text; false: all the text so far; None (the
    request left it to the model): the whole answer in one frame, which reads the same both ways.
    """
    output = answer.get("output")
    output = output if isinstance(output, dict) else {}
    extras = {k: v for k, v in output.items() if k not in _OUTPUT_FIELDS}
    choices = output.get("choices")
    if isinstance(choices, list):
        tracks = [_Track.of_choice(c if isinstance(c, dict) else {}) for c in choices]
    else:
        tracks = [_Track(str(output.get("text") or ""), output.get("finish_reason"))]
    envelope = {k: answer[k] for k in ("usage", "request_id") if answer.get(k) is not None}

    def frame(number: int, parts: list[dict[str, Any]]) -> bytes:
        body = {**extras, "choices": parts} if isinstance(choices, list) else {**extras, **parts[0]}
        data = orjson.dumps({"output": body, **envelope})
        return b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:%b\n\n" % (number, data)

    steps = [track.steps() for track in tracks] if incremental is not None else []
    count = max((len(s) for s in steps), default=0)
    for number in range(count):
        parts = []
        for track, done in zip(tracks, steps, strict=True):
            if incremental:
                reasoning, content = done[number] if number < len(done) else ("", "")
            else:
                reasoning = "".join(r for r, _ in done[: number + 1])
                content = "".join(c for _, c in done[: number + 1])
            parts.append(track.part(reasoning, content, last=False))
        yield frame(number + 1, parts)
    yield frame(
        count + 1,
        [
            track.part("", "", last=True)
            if incremental
            else track.part(track.reasoning or "", track.content, last=True)
            for track in tracks
        ],
    )


@dataclass
class _Track:
    """One choice of a stored answer, to be streamed."""

    content: str
    reason: Any
    reasoning: str | None = None
    listed: bool | None = None  # None: the text result format (output.text)
    role: str = "assistant"
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_choice(cls, choice: dict[str, Any]) -> _Track:
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        content = message.get("content")
        reasoning = message.get("reasoning_content")
        return cls(
            content=str(_joined_text(content) or ""),
            reason=choice.get("finish_reason", "stop"),
            reasoning=str(reasoning or "") if "reasoning_content" in message else None,
            listed=isinstance(content, list),
            role=str(message.get("role", "assistant")),
            extras={k: v for k, v in message.items() if k not in _MESSAGE_FIELDS},
        )

    def steps(self) -> list[tuple[str, str]]:
        """(reasoning, content) pieces, one pair per frame: the reasoning first, then the answer."""
        return [(p, "") for p in text_pieces(self.reasoning or "")] + [
            ("", p) for p in text_pieces(self.content)
        ]

    def part(self, reasoning: str, content: str, *, last: bool) -> dict[str, Any]:
        """This choice's part of one frame; the last frame carries the finish reason and the
        message's other fields (tool calls...)."""
        reason = self.reason if last else "null"
        if self.listed is None:
            return {"finish_reason": reason, "text": content}
        message: dict[str, Any] = {
            "content": ([{"text": content}] if content else []) if self.listed else content,
            "role": self.role,
        }
        if self.reasoning is not None:
            message["reasoning_content"] = reasoning
        if last:
            message.update(self.extras)
        return {"finish_reason": reason, "message": message}

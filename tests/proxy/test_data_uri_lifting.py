"""Long data URIs are lifted out of a chat body before it is parsed: never a different outcome.

``parse_chat`` parses a body with its long ``data:...;base64,...`` strings replaced by tokens and
decodes those images straight from the body's bytes. Whatever the body, the outcome (the request,
None, or the refusal and its reason) must be the one of parsing the body as it came.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import Uncacheable
from proxy.protocol import _lift_data_uris, _parse, parse_chat

MAX_IMAGE_BYTES = 4096


def outcome(parse: Any, body: bytes) -> object:
    try:
        return ("parsed", parse(body))
    except Uncacheable as exc:
        return ("refused", str(exc))


def lifted(body: bytes) -> object:
    return outcome(lambda b: parse_chat(b, max_images=3, max_image_bytes=MAX_IMAGE_BYTES), body)


def as_sent(body: bytes) -> object:
    return outcome(lambda b: _parse(b, (), 3, MAX_IMAGE_BYTES, False), body)


def photo(seed: int, size: int) -> str:
    return base64.b64encode(bytes((seed * 31 + i * 7) % 256 for i in range(size))).decode()


# Long strings that start like a data URI: good images, and every way one can be refused.
uris = st.builds(
    lambda head, seed, size, tail: head + photo(seed, size) + tail,
    st.sampled_from(
        [
            "data:image/jpeg;base64,",
            "data:image/png;name=a.png;base64,",
            "data:IMAGE/JPEG;base64,",
            "data:image/svg+xml;base64,",
            "data:text/plain;base64,",
            "data:image/jpeg,",
            "data:image/jpeg;base64;",
            "data:image/jpe\tg;base64,",
            "data:image/jpég;base64,",
        ]
    ),
    st.integers(0, 255),
    st.sampled_from([600, 3000, 3000, 3000, 5000]),  # under and over the lift size and the limit
    st.sampled_from(["", "", "", "", "", "=", "==", "!", " ", "\n", "\\", '"', "\u0000", "é"]),
)
texts = st.one_of(st.text(max_size=12), uris, st.just("\u0000"), st.just("a\\u0000"))
parts = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": uris})}
    ),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": uris}),
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"image": uris}),
    st.fixed_dictionaries({"text": texts}),
)
messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant"]),
        "content": st.one_of(texts, st.lists(parts, max_size=4)),
    }
)
extras = st.dictionaries(
    st.one_of(st.text(max_size=5), uris),
    st.one_of(texts, st.integers(-(2**63), 2**63 - 1)),
    max_size=2,
)
openai_docs = st.builds(
    lambda model, msgs, more: {"model": model, "messages": msgs, **more},
    st.one_of(st.just("qwen3-vl"), uris),
    st.lists(messages, min_size=1, max_size=3),
    extras,
)
native_docs = st.builds(
    lambda msgs, params: {"model": "qwen3-vl", "input": {"messages": msgs}, "parameters": params},
    st.lists(messages, min_size=1, max_size=3),
    extras,
)


def serialise(doc: object, style: str) -> bytes:
    """One document written as different JSON writers write it (all of them valid JSON)."""
    if style == "orjson":
        return orjson.dumps(doc)
    if style == "spaced":
        return json.dumps(doc, separators=(" , ", " : ")).encode()
    if style == "ascii":
        return json.dumps(doc).encode()  # non-ASCII as \\u escapes
    # PHP's json_encode escapes every slash: "data:image\/jpeg;base64,..."
    return json.dumps(doc, ensure_ascii=False).replace("/", "\\/").encode()


def damage(body: bytes, how: str, at: int) -> bytes:
    """The body as it came, or broken: cut short, or a stray byte in the middle."""
    if how == "none" or not body:
        return body
    at %= len(body)
    if how == "cut":
        return body[:at]
    return body[:at] + {"nul": b"\x00", "quote": b'"', "newline": b"\n"}[how] + body[at:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(openai_docs, native_docs),
    st.sampled_from(["orjson", "orjson", "spaced", "ascii", "slashes"]),
    st.sampled_from(["none", "none", "none", "cut", "nul", "quote", "newline"]),
    st.integers(0, 2**20),
)
def test_lifting_never_changes_what_a_body_parses_to(
    doc: object, style: str, how: str, at: int
) -> None:
    body = damage(serialise(doc, style), how, at)
    assert lifted(body) == as_sent(body)


good_uris = st.builds(
    lambda head, seed, size: head + photo(seed, size),
    st.sampled_from(["data:image/jpeg;base64,", "data:image/png;name=a.png;base64,"]),
    st.integers(0, 255),
    st.integers(800, 3000),
)
good_parts = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": good_uris})}
    ),
    st.fixed_dictionaries({"image": good_uris}),
    st.fixed_dictionaries(
        # Any text but a NUL (a body that spells one is parsed as it came, tested above).
        {"type": st.just("text"), "text": st.text(max_size=12).filter(lambda t: "\0" not in t)}
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(good_parts, min_size=1, max_size=4).filter(
        lambda parts: any("text" not in part for part in parts)
    ),
    st.sampled_from(["orjson", "spaced", "ascii"]),
)
def test_inline_images_are_lifted_and_parse_as_sent(parts: list[object], style: str) -> None:
    body = serialise({"model": "qwen3-vl", "messages": [{"role": "user", "content": parts}]}, style)
    assert _lift_data_uris(body) is not None
    assert lifted(body) == as_sent(body)


def chat(*content: object, **more: object) -> bytes:
    return orjson.dumps(
        {"model": "qwen3-vl", "messages": [{"role": "user", "content": list(content)}], **more}
    )


def image(uri: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": uri}}


URI = "data:image/jpeg;base64," + photo(1, 3000)


def test_an_inline_image_is_lifted_and_decoded_from_the_body_bytes() -> None:
    body = chat(image(URI), {"type": "text", "text": "What is this?"})
    found = _lift_data_uris(body)
    assert found is not None
    reduced, strings = found
    assert len(reduced) < 200
    assert [(header + "," + bytes(payload).decode()) for header, payload in strings] == [URI]
    request = parse_chat(body, max_images=3, max_image_bytes=MAX_IMAGE_BYTES)
    assert request is not None
    assert [i.data for i in request.images] == [base64.b64decode(photo(1, 3000))]
    assert lifted(body) == as_sent(body)


@pytest.mark.parametrize(
    "body",
    [
        # A question whose text is a data URI: it stays text, as sent.
        chat({"type": "text", "text": URI}),
        chat(image(URI), model=URI),
        # The same string as an object key is left in place.
        chat(image(URI), metadata={URI: 1}),
        # A body that spells a NUL could pose as a token: parsed as it came.
        chat(image(URI), {"type": "text", "text": "\u0000" + "0"}),
        # Escaped quotes: a data URI quoted inside a question.
        chat({"type": "text", "text": f'look: "{URI}"'}, image(URI)),
    ],
)
def test_data_uris_that_are_not_images_parse_as_sent(body: bytes) -> None:
    assert lifted(body) == as_sent(body)
    outcome_kind, request = lifted(body)
    assert outcome_kind == "parsed" and request is not None


def handmade(url: str, text: str = "What is this?") -> bytes:
    """A chat body written by hand (JSON escapes that no writer above produces)."""
    return (
        '{"model": "qwen3-vl", "messages": [{"role": "user", "content": ['
        f'{{"type": "image_url", "image_url": {{"url": "{url}"}}}}, '
        f'{{"type": "text", "text": "{text}"}}]}}]}}'
    ).encode()


PAYLOAD = photo(2, 3000)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # An escape in the header: "image/\u0073vg" is an SVG (refused), whatever the bytes say.
        (handmade("data:image/\\u0073vg+xml;base64," + PAYLOAD), "refused"),
        # A raw control character in the header: no JSON, so no chat.
        (handmade("data:image/jpeg;\x01;base64," + PAYLOAD), None),
        # The body's own "\u00000" poses as a token in an image's place; the data URI is text.
        (handmade("\\u00000", "data:image/jpeg;base64," + PAYLOAD), "refused"),
        # A header that is not ASCII is left for orjson to read.
        (handmade("data:image/jpég;base64," + PAYLOAD), "parsed"),
        # ... which refuses one that is not even UTF-8: no JSON, so no chat.
        (handmade("data:image/jpXg;base64," + PAYLOAD).replace(b"jpXg", b"jp\xffg"), None),
        # An escaped slash, as PHP writes them: a picture all the same.
        (handmade("data:image\\/jpeg;base64," + PAYLOAD), "parsed"),
    ],
)
def test_escapes_and_stray_bytes_parse_as_sent(body: bytes, expected: str | None) -> None:
    assert lifted(body) == as_sent(body)
    kind, request = lifted(body)
    assert (None if kind == "parsed" and request is None else kind) == expected


def test_many_short_data_strings_are_parsed_as_sent() -> None:
    # 100,000 "data:" strings, then an image: only the first few candidates are looked at.
    many = chat(*(["data:"] * 100_000), image(URI))
    kind, request = lifted(many)
    assert (kind, request) == as_sent(many)
    assert request is not None and len(request.images) == 1


def test_a_corrupt_lifted_image_is_refused_with_the_reason_of_the_body_as_sent() -> None:
    body = chat(image(URI[:-4] + "!!!!"))
    assert _lift_data_uris(body) is not None
    assert lifted(body) == as_sent(body) == ("refused", lifted(body)[1])
    assert "corrupt base64" in str(lifted(body)[1])

"""Property tests: any JSON into the parser and key builder, only declared outcomes out."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.keys import question_fingerprint
from proxy.errors import Uncacheable
from proxy.protocol import ChatRequest, parse_chat, read_answer

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    # Embedder tests flush denormals on the main thread (torch.set_flush_denormal): hypothesis
    # cannot draw subnormal floats after that, and the parser treats them like any other float.
    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
part = st.one_of(
    json_values,
    st.fixed_dictionaries({"type": st.just("text"), "text": json_values}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": json_values})}
    ),
    st.fixed_dictionaries(
        {"image": st.sampled_from(["data:image/png;base64,iVBO", "x", "data:,"])}
    ),
)
message = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"role": json_values, "content": st.one_of(json_values, st.lists(part, max_size=3))}
    ),
)
chat_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"model": json_values, "messages": st.lists(message, max_size=3)}),
    st.fixed_dictionaries(
        {
            "model": json_values,
            "input": st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}),
            "parameters": json_values,
        }
    ),
)


def parse(body: bytes) -> ChatRequest | None:
    try:
        return parse_chat(body, max_images=4, max_image_bytes=1 << 20)
    except Uncacheable:
        return None


@settings(max_examples=300, deadline=None)
@given(chat_bodies)
def test_any_json_parses_to_a_keyable_request_or_a_declared_refusal(doc: object) -> None:
    chat = parse(orjson.dumps(doc))
    if chat is not None:
        fingerprint = question_fingerprint(chat.format, chat.model, chat.turns, chat.params)
        assert len(fingerprint) == 64
        assert len(chat.images) <= 4


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_never_raise(body: bytes) -> None:
    parse(body)
    read_answer("openai", body)
    read_answer("native", body)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_answer_json_reads_without_raising(doc: object) -> None:
    for request_format in ("openai", "native"):
        facts = read_answer(request_format, orjson.dumps(doc))
        assert facts.prompt_tokens >= 0 and facts.completion_tokens >= 0


def test_deeply_nested_and_huge_message_lists_are_handled() -> None:
    nested: object = "x"
    for _ in range(200):
        nested = [nested]
    body = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi", "x": nested}]}
    )
    assert parse(body) is not None
    many = {"model": "m", "messages": [{"role": "user", "content": f"m{i}"} for i in range(10_000)]}
    chat = parse(orjson.dumps(many))
    assert chat is not None and len(chat.turns) == 10_000

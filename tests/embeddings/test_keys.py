"""Question keys: what makes two requests the same question, and what keeps tenants apart."""

from __future__ import annotations

from embeddings.keys import (
    Turn,
    exact_key,
    image_digest,
    namespace_for,
    normalize_text,
    question_fingerprint,
)


def fp(*turns: Turn, model: str = "m", fmt: str = "openai", **params: object) -> str:
    return question_fingerprint(fmt, model, turns, params)


def test_text_normalisation_is_nfkc_whitespace_and_case() -> None:
    assert normalize_text("  What   PHONE\n is\tthis? ") == "what phone is this?"
    assert normalize_text("能用５Ｇ吗？") == normalize_text("能用5G吗?")
    assert normalize_text("Straße") == normalize_text("STRASSE")


def test_fingerprint_ignores_sampling_and_keeps_answer_shaping_params() -> None:
    turn = Turn("user", (0, "What is it?"))
    base = fp(turn)
    assert fp(turn, temperature=0.1, top_p=0.5, max_tokens=10, stream=True, user="u") == base
    for shaping in (
        {"seed": 1},
        {"n": 2},
        {"stop": ["\n"]},
        {"response_format": {"type": "json"}},
        {"tools": [{"type": "function"}]},
        {"logprobs": True},
    ):
        assert fp(turn, **shaping) != base, shaping
    assert fp(turn, model="other") != base
    assert fp(turn, fmt="native") != base


def test_fingerprint_sees_order_roles_image_positions_and_history() -> None:
    ask = Turn("user", (0, "What is it?"))
    assert fp(Turn("user", ("What is it?", 0))) != fp(ask)
    assert fp(Turn("system", (0, "What is it?"))) != fp(ask)
    assert fp(Turn("user", (0, 1, "What is it?"))) != fp(ask)
    history = (Turn("user", ("hi",)), Turn("assistant", ("hello",)), ask)
    assert fp(*history) != fp(ask)
    assert fp(Turn("tool", ("42",), {"tool_call_id": "a"})) != fp(
        Turn("tool", ("42",), {"tool_call_id": "b"})
    )


def test_namespaces_separate_credentials_and_never_contain_them() -> None:
    a, b = namespace_for("Bearer sk-secret-a"), namespace_for("Bearer sk-secret-b")
    assert a != b and "secret" not in a
    assert namespace_for(None) == namespace_for("") == "anonymous"
    assert namespace_for("Bearer x", shared="shop") == namespace_for("Bearer y", shared="shop")
    assert namespace_for("Bearer x", tenant="t1") != namespace_for("Bearer x", tenant="t2")


def test_exact_key_depends_on_every_part() -> None:
    d1, d2 = image_digest(b"one"), image_digest(b"two")
    key = exact_key("ns", "fp", [d1, d2])
    assert key != exact_key("ns", "fp", [d2, d1])
    assert key != exact_key("ns2", "fp", [d1, d2])
    assert key != exact_key("ns", "fp2", [d1, d2])
    assert len(key) == 64

"""Cache keys: the tenant namespace, the question fingerprint and the exact key.

Two requests share an answer only when they share a namespace (the tenant), a question
fingerprint (what is asked, and every parameter that shapes the answer) and, per image position,
either the same bytes (exact tier) or a near-duplicate picture (semantic tier).

The fingerprint is a sha256 over a canonical form: the request format, the model, every message
in order (role, text after Unicode NFKC + whitespace collapse + case-fold, each image replaced by
its position) and the answer-shaping parameters. Sampling knobs (temperature, top_p, penalties),
``stream``, ``user`` and ``max_tokens`` are deliberately left out: a complete answer to the same
question is a valid answer whatever the sampling settings were.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

KEY_VERSION = 1

# Parameters that change what a correct answer looks like, so they are part of the question.
# Beyond DESIGN.md's list: top_logprobs (with logprobs), the legacy functions API, native
# DashScope's result_format (text vs message body), and Qwen3's thinking switches.
ANSWER_SHAPING_PARAMS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "stop",
    "n",
    "seed",
    "logprobs",
    "top_logprobs",
    "result_format",
    "enable_thinking",
    "chat_template_kwargs",
)

_SPACE = re.compile(r"\s+")
_ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation, as plain data.

    ``parts`` holds text (``str``) and images (``int``: the image's position in the request, so
    the fingerprint says *where* images are without saying *which*). ``extras`` holds the other
    fields that shape the answer (``name``, ``tool_calls``, ``tool_call_id``).
    """

    role: str
    parts: tuple[str | int, ...]
    extras: Mapping[str, Any] = field(default_factory=dict)


def normalize_text(text: str) -> str:
    """Canonical text: NFKC, whitespace runs collapsed to one space, trimmed, case-folded."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def question_fingerprint(
    request_format: str, model: str, turns: Sequence[Turn], params: Mapping[str, Any]
) -> str:
    """Hex sha256 of the canonical question; equal for requests that must get equal answers."""
    canonical = {
        "v": KEY_VERSION,
        "format": request_format,
        "model": model.strip(),
        "turns": [
            [
                turn.role.strip().lower(),
                [normalize_text(p) if isinstance(p, str) else {"image": p} for p in turn.parts],
                dict(turn.extras),
            ]
            for turn in turns
        ],
        "params": {k: params[k] for k in ANSWER_SHAPING_PARAMS if params.get(k) is not None},
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def namespace_for(
    credential: str | None, *, shared: str | None = None, tenant: str | None = None
) -> str:
    """The cache namespace of a caller.

    ``shared`` (operator opt-in) puts every caller in one namespace; otherwise ``tenant`` (a
    trusted tenant header) or a hash of the credential, so two API keys never share answers. The
    credential itself is never stored: only this one-way hash is.
    """
    if shared is not None:
        return "shared:" + shared
    if tenant:
        return "tenant:" + hashlib.sha256(tenant.encode()).hexdigest()[:32]
    if not credential:
        return _ANONYMOUS
    digest = hashlib.sha256(b"vlcache/namespace/v1\0" + credential.encode()).hexdigest()
    return "key:" + digest[:32]


def image_digest(data: bytes) -> str:
    """Hex sha256 of one image's bytes: the exact-tier identity of a picture."""
    return hashlib.sha256(data).hexdigest()


def exact_key(namespace: str, fingerprint: str, image_digests: Iterable[str]) -> str:
    """Hex sha256 naming one exact cache slot: namespace + question + images in order."""
    joined = "\n".join([namespace, fingerprint, *image_digests])
    return hashlib.sha256(joined.encode()).hexdigest()

"""Plain records crossing the store's edge (the proxy builds them; the store keeps them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A cached answer as served on a hit."""

    entry_id: int
    status: int
    content_type: str
    body: bytes
    model: str
    prompt_tokens: int
    completion_tokens: int
    upstream_ms: float
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class NewImage:
    """One image of a new entry: position, byte hash, size and, when embedded, its vector.

    ``embedding`` is the float32 vector's bytes, made by the embedder named ``embedder``;
    ``thumbnail`` is what the verifier compares a near-duplicate against.
    """

    position: int
    sha256: str
    byte_size: int
    embedder: str | None = None
    embedding: bytes | None = None
    thumbnail: bytes | None = None


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A complete upstream answer about to be cached."""

    entry_id: int
    namespace: str
    fingerprint: str
    exact_key: str
    model: str
    request_format: str
    question: str
    images: tuple[NewImage, ...]
    status: int
    content_type: str
    body: bytes
    prompt_tokens: int
    completion_tokens: int
    upstream_ms: float
    created_at: float
    expires_at: float | None = None

    def with_vectors(
        self, embedder: str, vectors: npt.NDArray[Any], thumbnails: Sequence[bytes]
    ) -> NewEntry:
        """This entry with its images' vectors (rows by position, made by ``embedder``) and
        verifier thumbnails."""
        images = tuple(
            NewImage(
                image.position,
                image.sha256,
                image.byte_size,
                embedder,
                np.asarray(vectors[image.position], dtype=np.float32).tobytes(),
                thumbnails[image.position],
            )
            for image in self.images
        )
        return dataclasses.replace(self, images=images)

    def answer(self) -> StoredAnswer:
        """The answer as a hit will serve it."""
        return StoredAnswer(
            entry_id=self.entry_id,
            status=self.status,
            content_type=self.content_type,
            body=self.body,
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            upstream_ms=self.upstream_ms,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )

    def entry_row(self, origin: str) -> dict[str, Any]:
        """Column values of the ``entries`` row, written by the process ``origin``."""
        return {
            "id": self.entry_id,
            "namespace": self.namespace,
            "fingerprint": self.fingerprint,
            "exact_key": self.exact_key,
            "model": self.model,
            "request_format": self.request_format,
            "question": self.question,
            "image_count": len(self.images),
            "status": self.status,
            "content_type": self.content_type,
            "body": self.body,
            "size_bytes": len(self.body)
            + sum(len(i.embedding or b"") + len(i.thumbnail or b"") for i in self.images),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": None,
            "upstream_ms": self.upstream_ms,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "hit_count": 0,
            "last_hit_at": None,
            "deleted": False,
            "deleted_at": None,
            "origin": origin,
        }

    def image_rows(self) -> list[dict[str, Any]]:
        """Column values of the ``entry_images`` rows."""
        return [
            {
                "entry_id": self.entry_id,
                "position": image.position,
                "sha256": image.sha256,
                "byte_size": image.byte_size,
                "embedder": image.embedder,
                "embedding": image.embedding,
                "thumbnail": image.thumbnail,
            }
            for image in self.images
        ]

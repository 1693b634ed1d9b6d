"""``SemanticTier``: near-duplicate pictures get the cached answer, verified pixel by pixel.

For each image of a request: decode it (bounded pixel count, JPEG draft mode) and make its
verifier thumbnail in the CPU pool, then embed it through the micro-batcher (one forward pass for
images of concurrent requests, on the embedder's own thread). A lookup asks the store for entries
of the same namespace + question whose every image reaches the threshold, best first, and accepts
the first whose stored thumbnails pass the verifier at every position (the embedding cannot tell
"¥2999" from "¥3999"; the verifier can).

Everything here can fail (undecodable image, embedder error, saturated queue, time budget
exceeded): the caller treats a failure as "no semantic answer" and goes upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from embeddings.images import decode_image
from embeddings.verifier import make_thumbnail, verify
from store.cache import CacheStore
from store.records import StoredAnswer

from .batcher import MicroBatcher

if TYPE_CHECKING:
    from embeddings.embedder import Embedder

log = logging.getLogger(__name__)

# The verifier compares thumbnails of a few hundred pixels: decode at least that large.
DECODE_SIZE = 512
_CANDIDATES_VERIFIED = 3
# Candidates this far under the threshold are reported as near-misses (never served).
NEAR_MISS_MARGIN = 0.05
BELOW = "below threshold"
REJECTED = "verifier rejected"


@dataclass(frozen=True, slots=True)
class EmbeddedImages:
    """A request's images as the semantic tier sees them, in position order."""

    vectors: np.ndarray  # (k, dim) float32, unit rows
    thumbnails: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SemanticHit:
    """A verified near-duplicate answer."""

    answer: StoredAnswer
    similarity: float


@dataclass(frozen=True, slots=True)
class Closest:
    """The nearest entry of a look-up that found no hit, and why it was not served."""

    entry_id: int
    similarity: float
    reason: str


@dataclass(frozen=True, slots=True)
class SemanticLookup:
    """A semantic look-up's hit, or the closest near-miss (either may be None)."""

    hit: SemanticHit | None
    closest: Closest | None


class SemanticTier:
    """Embeds request images and finds verified near-duplicate entries."""

    def __init__(
        self,
        embedder: Embedder,
        batcher: MicroBatcher[Image.Image, np.ndarray],
        cpu_pool: Executor,
        *,
        threshold: float,
        max_pixels: int,
        budget: float,
    ) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self._batcher = batcher
        self._cpu_pool = cpu_pool
        self._max_pixels = max_pixels
        self._budget = budget

    @property
    def queue_depth(self) -> int:
        """Images waiting for the embedder."""
        return self._batcher.depth

    async def embed(self, images: Sequence[bytes]) -> EmbeddedImages:
        """Vectors and thumbnails of ``images``, within the time budget (``TimeoutError``)."""
        async with asyncio.timeout(self._budget):
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self._cpu_pool, self._decode, data) for data in images)
            )
            # The thumbnails are made while the embedder works: they are off its critical path.
            vectors, thumbnails = await asyncio.gather(
                asyncio.gather(*(self._batcher.submit(image) for image in decoded)),
                asyncio.gather(
                    *(loop.run_in_executor(self._cpu_pool, make_thumbnail, i) for i in decoded)
                ),
            )
        return EmbeddedImages(np.stack(vectors), tuple(thumbnails))

    def _decode(self, data: bytes) -> Image.Image:
        return decode_image(data, max_pixels=self._max_pixels, size=DECODE_SIZE)

    async def lookup(
        self, store: CacheStore, namespace: str, fingerprint: str, query: EmbeddedImages
    ) -> SemanticLookup:
        """The best verified near-duplicate entry of this question, and else the closest one."""
        floor = max(self.threshold - NEAR_MISS_MARGIN, 0.0)
        candidates = await store.find_similar(namespace, fingerprint, query.vectors, floor)
        loop = asyncio.get_running_loop()
        closest = None
        for candidate in candidates[:_CANDIDATES_VERIFIED]:
            if candidate.similarity < self.threshold:
                # Best first: this and every later candidate is under the threshold.
                closest = closest or Closest(candidate.entry_id, candidate.similarity, BELOW)
                break
            stored = await store.thumbnails(candidate.entry_id)
            if len(stored) != len(query.thumbnails) or any(t is None for t in stored):
                continue
            passed = await loop.run_in_executor(
                self._cpu_pool, _verify_all, query.thumbnails, stored
            )
            if not passed:
                log.debug(
                    "entry %d: similar (%.4f) but rejected by the verifier",
                    candidate.entry_id,
                    candidate.similarity,
                )
                closest = closest or Closest(candidate.entry_id, candidate.similarity, REJECTED)
                continue
            answer = await store.answer_by_id(candidate.entry_id)
            if answer is not None:
                return SemanticLookup(SemanticHit(answer, candidate.similarity), None)
        return SemanticLookup(None, closest)


def _verify_all(query: Sequence[bytes], stored: Sequence[bytes | None]) -> bool:
    return all(
        thumb is not None and verify(mine, thumb).passed
        for mine, thumb in zip(query, stored, strict=True)
    )


def embed_batch(embedder: Embedder, images: list[Image.Image]) -> list[np.ndarray]:
    """The batch function of the embedder's micro-batcher: one forward pass, one row each."""
    return list(embedder.embed(images))

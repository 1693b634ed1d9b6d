"""``SemanticTier``: near-duplicate pictures get the cached answer, verified pixel by pixel.

For each image of a request: decode it in the CPU pool (bounded pixel count, JPEG draft mode, no
more pixels than the embedder and the verifier's thumbnail need), then embed it through the
micro-batcher (one forward pass for images of concurrent requests, on the embedder's own thread)
while the CPU pool makes its verifier thumbnail (and, for a look-up, prepares it for
comparison). A lookup asks the store for entries of the same namespace + question whose every
image reaches the threshold, best first, and accepts the first whose stored thumbnails pass the
verifier at every position (the embedding cannot tell "¥2999" from "¥3999"; the verifier can).
Stored thumbnails are kept prepared in a small LRU (hot entries skip the SQL read and the
preparation), and the answer is read while the verifier runs.

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
from embeddings.verifier import SOURCE_AREA, Prepared, make_thumbnail, prepare, verify_prepared
from store.cache import CacheStore
from store.memory import ByteLRU
from store.records import StoredAnswer

from .batcher import MicroBatcher

if TYPE_CHECKING:
    from embeddings.embedder import Embedder

log = logging.getLogger(__name__)

# The embedders' input side (ViT-B-32 and EfficientNet-Lite0 both take 224 x 224).
EMBED_SIDE = 224
_CANDIDATES_VERIFIED = 3
# Prepared stored thumbnails kept in memory (a 460 x 345 thumbnail prepares to ~1.3 MB).
PREPARED_CACHE_BYTES = 64 * 2**20
# Candidates this far under the threshold are reported as near-misses (never served).
NEAR_MISS_MARGIN = 0.05
BELOW = "below threshold"
REJECTED = "verifier rejected"


@dataclass(frozen=True, slots=True)
class EmbeddedImages:
    """A request's images as the semantic tier sees them, in position order."""

    vectors: np.ndarray  # (k, dim) float32, unit rows
    thumbnails: tuple[bytes, ...]  # the verifier's thumbnails, as stored with an entry
    prepared: tuple[Prepared, ...] = ()  # the same, ready to compare (for a look-up only)


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
        # Prepared stored thumbnails by entry id.
        self._prepared: ByteLRU[int, tuple[Prepared, ...]] = ByteLRU(PREPARED_CACHE_BYTES, _nbytes)

    @property
    def queue_depth(self) -> int:
        """Images waiting for the embedder."""
        return self._batcher.depth

    async def embed(self, images: Sequence[bytes], *, for_lookup: bool) -> EmbeddedImages:
        """Vectors and thumbnails of ``images``, within the time budget (``TimeoutError``);
        ``for_lookup``: the thumbnails also prepared for the verifier (only a look-up compares
        them; an answer to store needs their bytes alone)."""
        make = _prepared_thumbnail if for_lookup else make_thumbnail
        async with asyncio.timeout(self._budget):
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self._cpu_pool, self._decode, data) for data in images)
            )
            # The thumbnails are made and prepared while the embedder works: off its critical
            # path on a machine with a second core.
            vectors, made = await asyncio.gather(
                asyncio.gather(*(self._batcher.submit(image) for image in decoded)),
                asyncio.gather(*(loop.run_in_executor(self._cpu_pool, make, i) for i in decoded)),
            )
        if for_lookup:
            prepared = tuple(made)
            return EmbeddedImages(np.stack(vectors), tuple(p.thumbnail for p in prepared), prepared)
        return EmbeddedImages(np.stack(vectors), tuple(made))

    def _decode(self, data: bytes) -> Image.Image:
        return decode_picture(data, self._max_pixels)

    async def lookup(
        self, store: CacheStore, namespace: str, fingerprint: str, query: EmbeddedImages
    ) -> SemanticLookup:
        """The best verified near-duplicate entry of this question, and else the closest one."""
        floor = max(self.threshold - NEAR_MISS_MARGIN, 0.0)
        candidates = await store.find_similar(namespace, fingerprint, query.vectors, floor)
        closest = None
        for candidate in candidates[:_CANDIDATES_VERIFIED]:
            if candidate.similarity < self.threshold:
                # Best first: this and every later candidate is under the threshold.
                closest = closest or Closest(candidate.entry_id, candidate.similarity, BELOW)
                break
            stored = await self._stored(store, candidate.entry_id)
            if stored is None or len(stored) != len(query.prepared):
                continue
            # Read the answer while the verifier works: most candidates that get here pass.
            reading = asyncio.ensure_future(store.answer_by_id(candidate.entry_id))
            try:
                passed = await asyncio.get_running_loop().run_in_executor(
                    self._cpu_pool, _verify_all, query.prepared, stored
                )
            except BaseException:
                _ignore(reading)
                raise
            if not passed:
                _ignore(reading)
                log.debug(
                    "entry %d: similar (%.4f) but rejected by the verifier",
                    candidate.entry_id,
                    candidate.similarity,
                )
                closest = closest or Closest(candidate.entry_id, candidate.similarity, REJECTED)
                continue
            answer = await reading
            if answer is not None:
                return SemanticLookup(SemanticHit(answer, candidate.similarity), None)
        return SemanticLookup(None, closest)

    async def _stored(self, store: CacheStore, entry_id: int) -> tuple[Prepared, ...] | None:
        """An entry's thumbnails, prepared (None when one is missing)."""
        prepared = self._prepared.get(entry_id)
        if prepared is None:
            blobs = await store.thumbnails(entry_id)
            present = [blob for blob in blobs if blob is not None]
            if not present or len(present) != len(blobs):
                return None
            loop = asyncio.get_running_loop()
            prepared = tuple(await loop.run_in_executor(self._cpu_pool, _prepare_all, present))
            self._prepared.put(entry_id, prepared)
        return prepared


def _nbytes(item: tuple[Prepared, ...]) -> int:
    return sum(p.nbytes for p in item)


def _ignore(read: asyncio.Future[StoredAnswer | None]) -> None:
    """Let an unwanted read finish on its own (cancelling a query mid-flight can cost the
    connection) and retrieve its outcome, so that a failure is not reported as unretrieved."""
    read.add_done_callback(lambda done: done.cancelled() or done.exception())


def decode_picture(data: bytes, max_pixels: int) -> Image.Image:
    """A picture decoded as the semantic tier uses it (for a look-up and for storing an entry):
    enough pixels for the embedder's input and for the verifier's thumbnail, and no more."""
    return decode_image(data, max_pixels=max_pixels, size=EMBED_SIDE, min_area=SOURCE_AREA)


def _prepared_thumbnail(image: Image.Image) -> Prepared:
    return prepare(make_thumbnail(image))


def _prepare_all(blobs: Sequence[bytes]) -> list[Prepared]:
    return [prepare(blob) for blob in blobs]


def _verify_all(query: Sequence[Prepared], stored: Sequence[Prepared]) -> bool:
    return all(
        verify_prepared(mine, theirs).passed for mine, theirs in zip(query, stored, strict=True)
    )


def embed_batch(embedder: Embedder, images: list[Image.Image]) -> list[np.ndarray]:
    """The batch function of the embedder's micro-batcher: one forward pass, one row each."""
    return list(embedder.embed(images))

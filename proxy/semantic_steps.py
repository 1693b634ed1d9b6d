"""``SemanticSteps``: the semantic tier as one request uses it, its failures contained.

A request whose question already has entries is embedded before its look-up; a novel one is
embedded beside its upstream call, for the entry to be stored with. Every failure of the tier
(a slow, busy or broken embedder, an index error) is counted and answered as "no semantic
answer": the request goes on to the upstream (the cache fails open).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeAlias

from embeddings.errors import ImageDecodeError
from store.cache import CacheStore
from store.errors import StoreError
from store.records import NewEntry

from .accounting import Accounting, NearMiss
from .batcher import BatcherSaturated
from .calls import CachedCall
from .semantic import EmbeddedImages, SemanticHit, SemanticTier

log = logging.getLogger(__name__)

# The images' vectors of a miss: ready, being computed beside the upstream call, or none.
Embedding: TypeAlias = "EmbeddedImages | asyncio.Task[EmbeddedImages | None] | None"

# Embedding an answer to store: attempts while the embedder is saturated, first backoff (s).
_STORE_EMBED_ATTEMPTS = 5
_STORE_EMBED_BACKOFF = 0.25


class SemanticSteps:
    """The semantic tier's steps for the request path (all no-ops without a tier)."""

    def __init__(
        self,
        tier: SemanticTier | None,
        store: CacheStore,
        accounting: Accounting,
        fail: Callable[[str, str], None],
    ) -> None:
        """``fail(component, what)`` counts and logs a failure of a cache component."""
        self._tier = tier
        self._store = store
        self._accounting = accounting
        self._fail = fail

    @property
    def embedder_id(self) -> str | None:
        """The embedder's identity (None without a semantic tier)."""
        return self._tier.embedder.id if self._tier is not None else None

    def with_vectors(self, entry: NewEntry, embedded: EmbeddedImages | None) -> NewEntry:
        """``entry`` with its images' vectors and thumbnails, when they were computed."""
        if embedded is None or self._tier is None:
            return entry
        return entry.with_vectors(self._tier.embedder.id, embedded.vectors, embedded.thumbnails)

    def wants_lookup(self, call: CachedCall) -> bool:
        """True when the question already has entries with as many images (worth a look-up)."""
        return (
            self._tier is not None
            and bool(call.image_data)
            and self._store.has_similar_group(
                call.namespace, call.fingerprint, len(call.image_data)
            )
        )

    async def embed(self, call: CachedCall) -> tuple[EmbeddedImages | None, bool]:
        """The request's vectors for a look-up, and whether a failure was only for now (the
        embedder busy or slow: worth trying again for the answer to store)."""
        if self._tier is None or not call.image_data:
            return None, False
        embedding = time.perf_counter()
        try:
            embedded = await self._tier.embed(call.image_data, for_lookup=True)
            self._accounting.metrics.embed_seconds.observe(time.perf_counter() - embedding)
            return embedded, False
        except TimeoutError:
            # Over the budget: the request goes on without the tier. A slow or hung embedder
            # is a failure of the tier, counted and logged once per burst.
            self._fail("embedder", "embedding took longer than --embed-timeout, skipped")
            return None, True
        except BatcherSaturated:
            # Busy: a load matter, not a failure of the tier.
            log.info("cache=semantic-skipped reason=BatcherSaturated")
            return None, True
        except ImageDecodeError:
            # Not a picture the tier can use (bomb, SVG, corrupt): a client matter.
            log.info("cache=semantic-skipped reason=ImageDecodeError")
            return None, False
        except Exception:
            self._fail("embedder", "embedding failed, answering without the semantic tier")
            return None, False

    def embed_beside(self, call: CachedCall) -> asyncio.Task[EmbeddedImages | None] | None:
        """Start embedding a novel question's images while the upstream answers."""
        if self._tier is None or not call.image_data or not call.store:
            return None
        return asyncio.create_task(self._embed_to_store(call))

    async def _embed_to_store(self, call: CachedCall) -> EmbeddedImages | None:
        """The vectors an entry is stored with; retried while the embedder is busy or slow.

        An entry stored without vectors could never be a semantic hit, so a saturated queue or
        an embedding over the budget is waited out (with backoff) rather than given up at once.
        Nobody waits for this but the entry's write; the exact tier serves it meanwhile.
        """
        assert self._tier is not None
        for attempt in range(_STORE_EMBED_ATTEMPTS):
            try:
                return await self._tier.embed(call.image_data, for_lookup=False)
            except (TimeoutError, BatcherSaturated):
                await asyncio.sleep(_STORE_EMBED_BACKOFF * 2**attempt)
            except ImageDecodeError:
                return None  # not a picture the tier can use (bomb, SVG, corrupt)
            except Exception:
                self._fail("embedder", "embedding an answer to store failed")
                return None
        log.warning(
            "embedder busy for %d attempts: answer stored without vectors (exact tier only)",
            _STORE_EMBED_ATTEMPTS,
        )
        return None

    async def lookup(self, call: CachedCall, embedded: EmbeddedImages) -> SemanticHit | None:
        """A verified near-duplicate entry's answer, or None (a near-miss is reported)."""
        semantic = self._tier
        assert semantic is not None
        looking = time.perf_counter()
        try:
            found = await semantic.lookup(self._store, call.namespace, call.fingerprint, embedded)
        except StoreError:
            self._fail("store", "semantic lookup failed, answering from the upstream")
            return None
        except Exception:
            self._fail("index", "semantic verification failed, answering from the upstream")
            return None
        finally:
            self._accounting.metrics.lookup_seconds.observe(time.perf_counter() - looking)
        if found.closest is not None:
            closest = found.closest
            self._accounting.near_miss(
                NearMiss(
                    at=time.time(),
                    model=call.chat.model,
                    similarity=closest.similarity,
                    threshold=semantic.threshold,
                    entry_id=closest.entry_id,
                    reason=closest.reason,
                )
            )
        return found.hit

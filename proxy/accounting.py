"""``Accounting``: every request outcome counted once, everywhere it is reported.

One call per request feeds the persistent ledger (through the store: hourly rows, all replicas,
survives restarts), the Prometheus metrics and this process's rolling windows (hit rate over the
last 5 minutes, hour and day), and prices what a hit saved with the operator's price table.
Recent near-misses (similar, but under the threshold or rejected by the verifier) are kept for the
dashboard.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from store.cache import CacheStore

from .metrics import Metrics
from .pricing import Pricing

WINDOWS = {"5m": 300, "1h": 3600, "1d": 86400}
_BUCKET_SECONDS = 10
_NEAR_MISSES_KEPT = 50


@dataclass(frozen=True, slots=True)
class NearMiss:
    """A semantic look-up that came close: the best candidate and why it was not served."""

    at: float
    model: str
    similarity: float
    threshold: float
    entry_id: int
    reason: str  # "below threshold" | "verifier rejected"


class RollingWindows:
    """Requests and hits of this process in 10-second buckets over the last day."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [bucket start, requests, hits]

    def count(self, hit: bool, now: float) -> None:
        """Count one request at ``now``."""
        start = int(now) // _BUCKET_SECONDS * _BUCKET_SECONDS
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append([start, 0, 0])
            horizon = start - max(WINDOWS.values())
            while self._buckets[0][0] < horizon:
                self._buckets.popleft()
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += hit

    def totals(self, seconds: int, now: float) -> tuple[int, int]:
        """(requests, hits) in the last ``seconds`` before ``now``."""
        since = now - seconds
        requests = hits = 0
        for start, n, h in reversed(self._buckets):
            if start + _BUCKET_SECONDS <= since:
                break
            requests += n
            hits += h
        return requests, hits


class Accounting:
    """Counts outcomes into the ledger, the metrics and the rolling windows."""

    def __init__(self, store: CacheStore, metrics: Metrics, pricing: Pricing) -> None:
        self.metrics = metrics
        self.pricing = pricing
        self.windows = RollingWindows()
        self.near_misses: deque[NearMiss] = deque(maxlen=_NEAR_MISSES_KEPT)
        self.started_at = time.time()
        self.entries = (0, 0)  # live entries and their bytes, as last read from the store
        self.last_failure: dict[str, float] = {}  # component -> when it last failed
        self._store = store

    def count(
        self,
        outcome: str,
        namespace: str,
        model: str,
        *,
        seconds: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        time_ms: float = 0.0,
        entry_id: int | None = None,
    ) -> None:
        """Count one chat request's outcome.

        For hits, the tokens are the stored answer's usage and ``time_ms`` the time saved; for
        misses they are what the upstream call spent.
        """
        cost = self.pricing.cost(model, prompt_tokens, completion_tokens)
        self._store.record(
            outcome,
            namespace,
            model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            time_ms=time_ms,
            entry_id=entry_id,
        )
        self.metrics.count(
            outcome,
            seconds=seconds,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            saved_seconds=time_ms / 1000,
        )
        self.windows.count(outcome.startswith("hit_"), time.time())

    def failure(self, component: str) -> None:
        """Count one failure of a cache component (the request was answered anyway)."""
        self.metrics.failures.labels(component).inc()
        self.last_failure[component] = time.time()

    def near_miss(self, miss: NearMiss) -> None:
        """Remember a near-miss for the dashboard."""
        self.near_misses.append(miss)

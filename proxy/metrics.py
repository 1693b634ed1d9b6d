"""Prometheus metrics of one proxy process, in a registry of its own.

Label values come from fixed sets only (outcome, token kind, component, currency from the
operator's price table): never a namespace, a key, a model name or anything else a client sends,
so the number of series stays bounded whatever the traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

OUTCOMES = ("hit_exact", "hit_semantic", "hit_coalesced", "miss", "bypass", "error")
COMPONENTS = ("store", "embedder", "keying", "index", "recorder")

# From a memory-tier hit (~0.5 ms) to a slow model answer (minutes).
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

Gauges = Callable[[], dict[str, float]]


class Metrics:
    """The proxy's counters and histograms; ``render`` gives the text exposition format."""

    def __init__(self, currency: str | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._currency = currency or ""
        self.requests = Counter(
            "vlcache_requests", "Chat requests by outcome.", ["outcome"], registry=registry
        )
        self.coalesced = Counter(
            "vlcache_coalesced_followers",
            "Requests answered by an identical request already with the model.",
            registry=registry,
        )
        self.failures = Counter(
            "vlcache_failures",
            "Failures of a cache component; the request was answered by the upstream.",
            ["component"],
            registry=registry,
        )
        for component in COMPONENTS:
            self.failures.labels(component)
        self.saved_tokens = Counter(
            "vlcache_saved_tokens",
            "Tokens the model did not have to process, by kind (prompt or completion).",
            ["kind"],
            registry=registry,
        )
        self.saved_cost = Counter(
            "vlcache_saved_cost",
            "Cost of the saved tokens, from the price table (0 without one).",
            ["currency"],
            registry=registry,
        )
        self.saved_seconds = Counter(
            "vlcache_saved_seconds",
            "Time saved: each hit's stored upstream latency minus the hit's own latency.",
            registry=registry,
        )
        self.lookup_seconds = Histogram(
            "vlcache_lookup_seconds",
            "Time to look a request up in the cache (exact and semantic tiers).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.embed_seconds = Histogram(
            "vlcache_embed_seconds",
            "Time to decode, embed and thumbnail one request's images.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "vlcache_upstream_seconds",
            "Time the upstream took to answer a miss (to the last byte).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            "vlcache_request_seconds",
            "Time from a chat request's body to its answer, by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # Every series exists from the start: rate() and ratios need no "absent" special cases.
        # The children are kept: ``labels()`` takes a lock and builds a key on every call, and a
        # hit counts four of them.
        self._by_outcome = {
            outcome: (self.requests.labels(outcome), self.request_seconds.labels(outcome))
            for outcome in OUTCOMES
        }
        self._saved = (
            self.saved_tokens.labels("prompt"),
            self.saved_tokens.labels("completion"),
            self.saved_cost.labels(self._currency),
        )

    def add_gauges(self, read: Gauges, help_texts: dict[str, str]) -> None:
        """Expose the values ``read()`` returns at scrape time as gauges named by its keys."""
        self.registry.register(_ReadCollector(read, help_texts, GaugeMetricFamily))

    def add_counters(self, read: Gauges, help_texts: dict[str, str]) -> None:
        """Expose totals kept elsewhere (``read()`` at scrape time) as counters."""
        self.registry.register(_ReadCollector(read, help_texts, CounterMetricFamily))

    def count(
        self,
        outcome: str,
        *,
        seconds: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost: float,
        saved_seconds: float,
    ) -> None:
        """Count one request; for hits the tokens, cost and time are what it saved."""
        requests, request_seconds = self._by_outcome[outcome]
        requests.inc()
        if seconds is not None:
            request_seconds.observe(seconds)
        if outcome.startswith("hit_"):
            prompt, completion, saved_cost = self._saved
            prompt.inc(prompt_tokens)
            completion.inc(completion_tokens)
            saved_cost.inc(cost)
            self.saved_seconds.inc(saved_seconds)
            if outcome == "hit_coalesced":
                self.coalesced.inc()

    def render(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


class _ReadCollector(Collector):
    def __init__(
        self,
        read: Gauges,
        help_texts: dict[str, str],
        family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    ) -> None:
        self._read = read
        self._help = help_texts
        self._family = family

    def collect(self) -> Iterable[Metric]:
        values = self._read()
        for name, help_text in self._help.items():
            yield self._family(name, help_text, value=values.get(name, 0.0))

    def describe(self) -> Iterable[Metric]:
        for name, help_text in self._help.items():
            yield self._family(name, help_text)

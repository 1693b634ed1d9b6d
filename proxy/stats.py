"""The figures operators watch, as one JSON document (``/stats``, ``vlcache stats --json``).

All-time counts, savings, per-model figures and the hourly series come from the savings ledger in
the database (every replica, across restarts). The 5-minute / hour / day hit rates come from this
process's own rolling counters when a running proxy answers (``"windows": "process"``), and from
the ledger's hourly rows when ``vlcache stats`` reads the database (``"windows": "ledger"``: whole
hours, so "1h" covers the current and the previous clock hour, and there is no "5m").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from store.cache import CacheStore
from store.reports import EntrySummary, LedgerReport, Sums

from .accounting import WINDOWS, Accounting
from .metrics import OUTCOMES
from .pricing import Pricing

SERIES_HOURS = 48
# Requests passed through before their model was read (e.g. more images than allowed).
UNKNOWN_MODEL = "(unknown)"
TOP_ENTRIES = 10


@dataclass(frozen=True, slots=True)
class TierInfo:
    """What the semantic tier looks like right now (all None/0 when it is off)."""

    embedder: str | None = None
    threshold: float | None = None
    vectors: int = 0
    embed_queue: int = 0


def hit_rate(requests: int, hits: int) -> float | None:
    """Hits over chat requests, or None when there were none."""
    return round(hits / requests, 4) if requests else None


async def stats_document(
    store: CacheStore,
    pricing: Pricing,
    tier: TierInfo,
    accounting: Accounting | None = None,
) -> dict[str, Any]:
    """The ``/stats`` document (see the module docstring for where each figure comes from)."""
    now = time.time()
    this_hour = int(now // 3600) * 3600
    first_hour = this_hour - (SERIES_HOURS - 1) * 3600
    report = await store.ledger_report(first_hour)
    entries, entry_bytes = await store.entry_totals()
    top = await store.top_entries(TOP_ENTRIES)
    totals = _requests_and_hits(report.outcomes)
    document: dict[str, Any] = {
        "generated_at": round(now, 3),
        "started_at": round(accounting.started_at, 3) if accounting else None,
        "currency": pricing.currency,
        "windows": "process" if accounting else "ledger",
        "hit_rate": {"all": hit_rate(*totals)},
        "requests": {"all": totals[0]},
        "outcomes": {outcome: report.outcomes[outcome].requests for outcome in OUTCOMES},
        "saved": _figures(_hits(report.outcomes), pricing),
        "spent": _figures(_misses(report.outcomes), pricing),
        "entries": {"count": entries, "bytes": entry_bytes},
        "index": {"embedder": tier.embedder, "vectors": tier.vectors, "threshold": tier.threshold},
        "embed_queue": tier.embed_queue,
        "models": [
            _model_figures(model, outcomes, pricing)
            for model, outcomes in sorted(report.models.items())
        ],
        "series": _series(report, first_hour, pricing),
        "top_entries": [_top_entry(entry, pricing) for entry in top],
        "near_misses": [],
    }
    for name, seconds in WINDOWS.items():
        if accounting is not None:
            requests, hits = accounting.windows.totals(seconds, now)
        elif seconds >= 3600:
            hours = {h: o for h, o in report.hours.items() if h > now - seconds - 3600}
            requests, hits = _window_from_hours(hours)
        else:
            document["hit_rate"][name] = document["requests"][name] = None
            continue
        document["hit_rate"][name] = hit_rate(requests, hits)
        document["requests"][name] = requests
    if accounting is not None:
        document["near_misses"] = [
            {
                "at": round(miss.at, 3),
                "model": miss.model,
                "similarity": round(miss.similarity, 4),
                "threshold": round(miss.threshold, 4),
                "entry_id": str(miss.entry_id),
                "reason": miss.reason,
            }
            for miss in reversed(accounting.near_misses)
        ]
    return document


def _model_figures(model: str, outcomes: dict[str, Sums], pricing: Pricing) -> dict[str, Any]:
    requests, hits = _requests_and_hits(outcomes)
    return {
        "model": model or UNKNOWN_MODEL,
        "requests": requests,
        "hit_rate": hit_rate(requests, hits),
        "outcomes": {outcome: outcomes[outcome].requests for outcome in OUTCOMES},
        "saved": _figures(_hits(outcomes), pricing),
    }


def _requests_and_hits(outcomes: dict[str, Sums]) -> tuple[int, int]:
    requests = sum(sums.requests for sums in outcomes.values())
    return requests, _hits(outcomes).requests


def _hits(outcomes: dict[str, Sums]) -> Sums:
    total = Sums()
    for outcome, sums in outcomes.items():
        if outcome.startswith("hit_"):
            total.add(sums)
    return total


def _misses(outcomes: dict[str, Sums]) -> Sums:
    return outcomes.get("miss", Sums())


def _cost(value: float, pricing: Pricing) -> float | None:
    return round(value, 6) if pricing.priced or value else None


def _figures(sums: Sums, pricing: Pricing) -> dict[str, Any]:
    return {
        "requests": sums.requests,
        "prompt_tokens": sums.prompt_tokens,
        "completion_tokens": sums.completion_tokens,
        "tokens": sums.prompt_tokens + sums.completion_tokens,
        "cost": _cost(sums.cost, pricing),
        "time_s": round(sums.time_ms / 1000, 3),
    }


def _window_from_hours(hours: dict[int, Any]) -> tuple[int, int]:
    requests = hits = 0
    for outcomes in hours.values():
        n, h = _requests_and_hits(outcomes)
        requests += n
        hits += h
    return requests, hits


def _series(report: LedgerReport, first_hour: int, pricing: Pricing) -> list[dict[str, Any]]:
    series = []
    for hour in range(first_hour, first_hour + SERIES_HOURS * 3600, 3600):
        outcomes: dict[str, Sums] = report.hours.get(hour, {})
        requests, hits = _requests_and_hits(outcomes)
        saved = _hits(outcomes)
        series.append(
            {
                "hour": hour,
                "requests": requests,
                "hits": hits,
                "hit_rate": hit_rate(requests, hits),
                "saved_tokens": saved.prompt_tokens + saved.completion_tokens,
                "saved_cost": _cost(saved.cost, pricing),
                "saved_time_s": round(saved.time_ms / 1000, 3),
            }
        )
    return series


def _top_entry(entry: EntrySummary, pricing: Pricing) -> dict[str, Any]:
    prompt, completion = entry.hits * entry.prompt_tokens, entry.hits * entry.completion_tokens
    return {
        "id": str(entry.id),
        "model": entry.model,
        "question": entry.question,
        "images": entry.images,
        "hits": entry.hits,
        "saved_tokens": prompt + completion,
        "saved_cost": (
            round(pricing.cost(entry.model, prompt, completion), 6) if pricing.priced else None
        ),
        "created_at": round(entry.created_at, 3),
        "last_hit_at": None if entry.last_hit_at is None else round(entry.last_hit_at, 3),
    }


def format_table(document: dict[str, Any]) -> str:
    """The document as a short plain-text report for a terminal."""
    currency = document["currency"] or ""
    rates = document["hit_rate"]
    windows = ", ".join(
        f"{name}: {_percent(rates.get(name))}" for name in WINDOWS if rates.get(name) is not None
    )
    saved, spent = document["saved"], document["spent"]
    outcomes = "  ".join(f"{name} {count:,}" for name, count in document["outcomes"].items())
    lines = [
        f"requests   {document['requests']['all']:,}   hit rate {_percent(rates['all'])}"
        + (f" ({windows})" if windows else ""),
        f"outcomes   {outcomes}",
        f"saved      {_money_line(saved, currency)}",
        f"spent      {_money_line(spent, currency)} (misses)",
        f"entries    {document['entries']['count']:,} ({_bytes(document['entries']['bytes'])})",
    ]
    if document["models"]:
        lines.append("")
        header = f"{'model':<40} {'requests':>10} {'hit rate':>9} {'tokens saved':>14}"
        lines.append(header + f" {'cost saved':>12}")
        for model in document["models"]:
            cost = model["saved"]["cost"]
            lines.append(
                f"{model['model'][:40]:<40} {model['requests']:>10,} "
                f"{_percent(model['hit_rate']):>9} {model['saved']['tokens']:>14,} "
                f"{'-' if cost is None else f'{cost:,.4f}':>12}"
            )
    return "\n".join(lines)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _money_line(figures: dict[str, Any], currency: str) -> str:
    cost = figures["cost"]
    priced = "cost unpriced" if cost is None else f"cost {cost:,.4f} {currency}".rstrip()
    return (
        f"{figures['requests']:,} requests, {figures['tokens']:,} tokens "
        f"({figures['prompt_tokens']:,} in, {figures['completion_tokens']:,} out), "
        f"{priced}, {_duration(figures['time_s'])}"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"

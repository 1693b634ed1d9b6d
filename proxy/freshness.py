"""How long a new entry may be served: ``--ttl``, shortened by the request or the upstream.

The operator's ``--ttl`` is the ceiling. A request can only lower it (``X-Cache-TTL: <seconds>``),
and so can the upstream's answer (``Cache-Control: max-age=<seconds>`` or ``s-maxage``, the
shared-cache form, which wins when both are given). A limit of 0 or less means "do not store".
"""

from __future__ import annotations

from collections.abc import Mapping

TTL_HEADER = "X-Cache-TTL"


def entry_ttl(
    ceiling: float | None, request: Mapping[str, str], response: Mapping[str, str]
) -> float | None:
    """Seconds the entry may live (None: no limit), the smallest of the limits given."""
    limits = [ceiling, _seconds(request.get(TTL_HEADER)), _max_age(response.get("Cache-Control"))]
    given = [limit for limit in limits if limit is not None]
    return min(given) if given else None


def _max_age(value: str | None) -> float | None:
    if not value:
        return None
    ages: dict[str, float] = {}
    for token in value.split(","):
        name, _, raw = token.strip().partition("=")
        seconds = _seconds(raw.strip().strip('"'))
        if seconds is not None:
            ages[name.strip().lower()] = seconds
    return ages.get("s-maxage", ages.get("max-age"))


def _seconds(raw: str | None) -> float | None:
    """A non-negative number of seconds, or None when absent or not a number (ignored)."""
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    if seconds != seconds or seconds == float("inf"):  # NaN, inf: not a limit
        return None
    return max(seconds, 0.0)

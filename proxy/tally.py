"""``Tally``: what a warm-up did with each line, as counts and, per reason, where.

Every line ends in one outcome: imported (perhaps without vectors, for the exact tier only), a
duplicate of an answer already cached, skipped (the line's own problem: bad JSON, an answer that
is not complete, an image that cannot be had...) or an error (the run's problem: the store or the
embedder failed). Skips, errors and entries without vectors are grouped by reason, each with the
``file:line`` of the first lines it concerned (``KEPT`` of them; the counts go on beyond).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .history import Location

Outcome = Literal["imported", "duplicate", "skipped", "error", "blank"]

KEPT = 100  # lines kept per reason
_SHOWN = 5  # of them in the printed report
_DETAIL_CHARS = 200


@dataclass
class Reason:
    """How many lines one reason concerned, and the first ``KEPT`` of them."""

    count: int = 0
    lines: list[tuple[Location, str]] = field(default_factory=list)

    def add(self, location: Location, detail: str) -> None:
        """Count one more line."""
        self.count += 1
        if len(self.lines) < KEPT:
            self.lines.append((location, detail[:_DETAIL_CHARS]))

    def as_json(self) -> dict[str, Any]:
        """``{"count", "lines": [{"file", "line", "detail"}, ...]}``."""
        return {
            "count": self.count,
            "lines": [
                {"file": where.file, "line": where.line, "detail": detail}
                for where, detail in self.lines
            ],
        }

    def listing(self) -> str:
        """The first few lines as ``file:line (detail)``, and how many more there are."""
        shown = [
            f"{where} ({detail})" if detail else str(where) for where, detail in self.lines[:_SHOWN]
        ]
        more = self.count - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more else "")


class Tally:
    """The outcome of every line of a warm-up."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.lines = 0
        self.imported = 0
        self.duplicates = 0
        self.without_vectors: dict[str, Reason] = {}
        self.skipped: dict[str, Reason] = {}
        self.errors: dict[str, Reason] = {}
        self.seconds = 0.0

    def count(
        self, outcome: Outcome, location: Location, reason: str = "", detail: str = ""
    ) -> None:
        """Record one line's outcome (``reason`` of an import: why it has no vectors)."""
        self.lines += 1
        if outcome == "imported":
            self.imported += 1
            if reason:
                self.without_vectors.setdefault(reason, Reason()).add(location, detail)
        elif outcome == "duplicate":
            self.duplicates += 1
        elif outcome == "skipped":
            self.skipped.setdefault(reason, Reason()).add(location, detail)
        elif outcome == "error":
            self.errors.setdefault(reason, Reason()).add(location, detail)

    @property
    def skipped_count(self) -> int:
        """Lines skipped, every reason."""
        return sum(reason.count for reason in self.skipped.values())

    @property
    def error_count(self) -> int:
        """Lines lost to errors, every reason."""
        return sum(reason.count for reason in self.errors.values())

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON document (``--report-json``)."""
        return {
            "files": self.files,
            "lines": self.lines,
            "seconds": round(self.seconds, 3),
            "imported": self.imported,
            "imported_without_vectors": _group_json(self.without_vectors),
            "duplicates": self.duplicates,
            "skipped": _group_json(self.skipped),
            "errors": _group_json(self.errors),
        }

    def text(self) -> str:
        """The report as people read it."""
        rate = self.lines / self.seconds if self.seconds > 0 else 0.0
        unvectored = sum(reason.count for reason in self.without_vectors.values())
        out = [
            f"warm-up: {self.lines:,} lines of {len(self.files)} file(s) in {self.seconds:.1f} s "
            f"({rate:,.1f} lines/s)",
            f"  imported    {self.imported:>9,}"
            + (f"  ({unvectored:,} without vectors: exact tier only)" if unvectored else ""),
            f"  duplicates  {self.duplicates:>9,}  (already cached)",
            f"  skipped     {self.skipped_count:>9,}",
            f"  errors      {self.error_count:>9,}",
        ]
        for title, group in (
            ("skipped", self.skipped),
            ("imported without vectors", self.without_vectors),
            ("errors", self.errors),
        ):
            if group:
                out.append(f"{title}, by reason:")
                for name, reason in sorted(group.items(), key=lambda item: -item[1].count):
                    out.append(f"  {reason.count:>9,}  {name}")
                    out.append(f"             {reason.listing()}")
        return "\n".join(out)


def _group_json(group: dict[str, Reason]) -> dict[str, Any]:
    return {
        "count": sum(reason.count for reason in group.values()),
        "reasons": {name: reason.as_json() for name, reason in group.items()},
    }

"""``FailureLog``: log a failing cache component once per burst, not once per request.

When the database goes away, every request fails the same way; one traceback says it all. The
first failure of a burst is logged with its traceback, later ones are only counted, and a summary
line says how many were suppressed once the quiet period has passed.
"""

from __future__ import annotations

import logging
import time


class FailureLog:
    """Rate-limited error logging for fail-open paths (call inside an ``except`` block)."""

    def __init__(self, logger: logging.Logger, *, quiet_seconds: float = 60.0) -> None:
        self._log = logger
        self._quiet = quiet_seconds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, what: str) -> None:
        """Count one failure of ``what``; log it with its traceback unless logged recently."""
        now = time.monotonic()
        last = self._last.get(what)
        if last is not None and now - last < self._quiet:
            self._suppressed[what] = self._suppressed.get(what, 0) + 1
            return
        self._last[what] = now
        suppressed = self._suppressed.pop(what, 0)
        note = f" ({suppressed} more since the last report)" if suppressed else ""
        self._log.exception("%s%s", what, note)

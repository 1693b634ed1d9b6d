"""``MissClaims``: identical misses coalesced across processes that share one database.

Several vlcache processes on one PostgreSQL database each see misses of the same request. The
first to miss claims its exact key in the store (``store/claims.py``, a lease renewed while the
model works); the others wait for the entry that claim produces instead of asking the model too.
On by default with PostgreSQL, off with SQLite (one process); ``--coalesce-across-processes``
decides. In-process coalescing (``Flight``, streams.py) comes first: a process's own identical
requests follow its one leader, and only that leader claims.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from store.cache import CacheStore
from store.errors import StoreError
from store.records import StoredAnswer

from .calls import CachedCall
from .settings import Settings


class MissClaims:
    """This process's claims on misses, and its waits for other processes' claims."""

    def __init__(
        self,
        settings: Settings,
        store: CacheStore,
        fail: Callable[[str, str], None],
        in_background: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        """``fail`` reports a failure of the store; ``in_background`` runs a release as a task
        that the service's shutdown waits for."""
        self._store = store
        self._lease = settings.claim_lease
        self._longest_wait = settings.read_timeout
        self._fail = fail
        self._in_background = in_background
        coalesce = settings.coalesce_across_processes
        self._enabled = (
            coalesce if coalesce is not None else settings.database_url.startswith("postgresql")
        )
        # Misses this process claimed: key -> its entry is on its way to the store?
        self._held: dict[str, bool] = {}

    async def follow(self, call: CachedCall) -> StoredAnswer | None:
        """Claim this miss for this process, or wait for the process that holds the claim.

        None means "ask the upstream": the claim is ours, or its holder gave up or died, or
        cross-process coalescing is off. ``StoreError``: the store cannot say (fail open).
        """
        if not self._enabled or not call.lookup or not call.store:
            return None
        try:
            if await self._store.claim(call.exact_key, self._lease):
                self._held[call.exact_key] = False
                return None
            # A holder renews its claim while its upstream call lasts; never wait longer than
            # that call itself could.
            async with asyncio.timeout(self._longest_wait):
                return await self._store.await_claimed(call.exact_key)
        except TimeoutError:
            return None

    def storing(self, exact_key: str) -> None:
        """The answer of this miss is being stored: the entry's commit drops its claim."""
        if exact_key in self._held:
            self._held[exact_key] = True
            self._store.storing_claimed(exact_key)

    def settle(self, exact_key: str) -> None:
        """After this process's miss: a stored entry drops its claim when committed; else drop
        the claim now."""
        stored = self._held.pop(exact_key, None)
        if stored is False:
            self._in_background(self._release(exact_key))

    async def _release(self, exact_key: str) -> None:
        try:
            await self._store.release(exact_key)
        except StoreError:
            # Its lease runs out on its own: followers wait at most that long.
            self._fail("store", "releasing a cross-process claim failed")

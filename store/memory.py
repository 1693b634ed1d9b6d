"""``MemoryAnswers``: a byte-bounded LRU map of exact keys to answers, in front of SQL."""

from __future__ import annotations

from collections import OrderedDict

from .records import StoredAnswer

# Per-entry bookkeeping beyond the body (the key, the record, the dict slot), roughly.
_OVERHEAD = 400


class MemoryAnswers:
    """Least-recently-used answers, bounded by the bytes of their bodies."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, StoredAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes currently held (bodies plus a fixed overhead per answer)."""
        return self._bytes

    def get(self, key: str) -> StoredAnswer | None:
        """The answer under ``key``, marked as recently used."""
        answer = self._items.get(key)
        if answer is not None:
            self._items.move_to_end(key)
        return answer

    def put(self, key: str, answer: StoredAnswer) -> None:
        """Hold ``answer`` under ``key``, evicting the least recently used beyond the budget."""
        size = len(answer.body) + _OVERHEAD
        if size > self._max_bytes:
            self.discard(key)
            return
        self.discard(key)
        self._items[key] = answer
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted.body) + _OVERHEAD

    def discard(self, key: str) -> None:
        """Forget ``key`` if held."""
        answer = self._items.pop(key, None)
        if answer is not None:
            self._bytes -= len(answer.body) + _OVERHEAD

    def clear(self) -> None:
        """Forget every answer."""
        self._items.clear()
        self._bytes = 0

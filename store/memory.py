"""Byte-bounded LRU maps: ``ByteLRU``, and ``MemoryAnswers`` (exact keys to answers, before SQL)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from .records import StoredAnswer

K = TypeVar("K")
V = TypeVar("V")

# Per-answer bookkeeping beyond the body (the key, the record, the dict slot), roughly.
_OVERHEAD = 400


class ByteLRU(Generic[K, V]):
    """Least-recently-used values, bounded by the bytes ``size`` says each one holds."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self._max_bytes = max_bytes
        self._size = size
        self._bytes = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def get(self, key: K) -> V | None:
        """The value under ``key``, marked as recently used."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Hold ``value`` under ``key``, evicting the least recently used beyond the budget
        (a value larger than the whole budget is not held)."""
        self.discard(key)
        size = self._size(value)
        if size > self._max_bytes:
            return
        self._items[key] = value
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= self._size(evicted)

    def discard(self, key: K) -> None:
        """Forget ``key`` if held."""
        value = self._items.pop(key, None)
        if value is not None:
            self._bytes -= self._size(value)

    def clear(self) -> None:
        """Forget every value."""
        self._items.clear()
        self._bytes = 0


def _answer_size(answer: StoredAnswer) -> int:
    return len(answer.body) + _OVERHEAD


class MemoryAnswers(ByteLRU[str, StoredAnswer]):
    """Least-recently-used answers, bounded by the bytes of their bodies (plus an overhead)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, _answer_size)

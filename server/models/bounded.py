"""A map bounded in bytes: the least recently used entry leaves first, to keep what is held under the bound.

What the prompt cache and the result cache keep across requests; thread-safe, since workers and the
event loop reach one at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

__all__ = ["BytesBoundedLRU"]


class BytesBoundedLRU(Generic[V]):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """What the entries held take, in bytes, as their sizes were given."""
        return self._bytes

    def get(self, key: Hashable) -> V | None:
        """The value under ``key``, now the most recently used; None when there is none."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def values(self) -> list[V]:
        """What is held now, least recently used first; using none of it."""
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep ``value`` (``size`` bytes) under ``key``, in place of what was there; one larger than the
        bound is not kept."""
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

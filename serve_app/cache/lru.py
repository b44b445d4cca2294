"""A bounded in-process LRU with per-entry expiry: the L1 tier of the response cache.

It is bounded twice, by entries and by bytes (sizes are the caller's estimate of what an entry
holds), so neither many small answers nor a few huge ones can grow a replica without limit.
Each entry carries its own deadline, so the L1 never outlives the L2 entry it copies. Plain
Python with an injectable clock: unit-tested in milliseconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    expires_at: float


class TtlLru(Generic[V]):
    """Least-recently-used eviction within `max_entries` and `max_bytes`; expired is absent.

    Not thread-safe: it lives on one replica's event loop.
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            self.expirations += 1
            return None
        self._data.move_to_end(key)
        return entry.value

    def put(self, key: str, value: V, size: int, ttl_s: float) -> bool:
        """Store `value` for at most `ttl_s` seconds; False when it cannot fit at all."""
        self._remove(key)
        if ttl_s <= 0 or size > self.max_bytes or self.max_entries <= 0:
            self.rejected += 1
            return False
        self._data[key] = _Entry(value, size, self._clock() + ttl_s)
        self.bytes += size
        self._shrink(self.max_entries, self.max_bytes)
        return True

    def resize(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._shrink(max_entries, max_bytes)

    def remove_where(self, predicate: Callable[[str], bool]) -> int:
        doomed = [k for k in self._data if predicate(k)]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def clear(self) -> int:
        count = len(self._data)
        self._data.clear()
        self.bytes = 0
        return count

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._data),
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "rejected": self.rejected,
        }

    def _remove(self, key: str) -> _Entry[V] | None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def _shrink(self, max_entries: int, max_bytes: int) -> None:
        while self._data and (len(self._data) > max_entries or self.bytes > max_bytes):
            _, entry = self._data.popitem(last=False)
            self.bytes -= entry.size
            self.evictions += 1

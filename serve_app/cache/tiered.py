"""The response cache as the service sees it: L1 in process, L2 in Redis, single-flight on top.

For each prompt of a request: the L1 answers, else the L2 (and the L1 keeps a copy that expires
no later than the L2 entry), else exactly one caller runs the model while identical requests
in flight wait for its answer; across ingress replicas a Redis marker does the same. Only the
caller that ran the model gets `Source.GENERATED`; everyone else is answered from cache.

No Redis import here: the L2 is handed in (or absent, when the cache runs L1-only), and every
L2 failure has already become a miss by the time it gets here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from serve_app.cache.keys import key_prefix, memory_size
from serve_app.cache.lru import TtlLru
from serve_app.cache.singleflight import SingleFlight
from serve_app.config import CacheOptions
from serve_app.domain import Generation

if TYPE_CHECKING:
    from serve_app.cache.redis_tier import RedisTier


class Source(str, Enum):
    L1 = "l1"
    L2 = "l2"
    COALESCED = "coalesced"  # waited for an identical request's generation
    GENERATED = "generated"


@dataclass(frozen=True)
class Served:
    value: Generation
    source: Source

    @property
    def cached(self) -> bool:
        return self.source is not Source.GENERATED


@dataclass
class CacheCounters:
    lookups: int = 0
    l1_hits: int = 0
    l2_hits: int = 0
    l2_misses: int = 0
    coalesced: int = 0
    coalesced_remote: int = 0  # of which: another ingress replica generated the answer
    fills: int = 0  # answers generated through the cache

    @property
    def hits(self) -> int:
        return self.l1_hits + self.l2_hits


class TieredCache:
    def __init__(
        self,
        options: CacheOptions,
        l2: RedisTier | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.l2 = l2
        self.l1: TtlLru[Generation] = TtlLru(options.l1_max_entries, options.l1_max_bytes, clock)
        self.flights: SingleFlight[tuple[Generation, bool]] = SingleFlight()
        self.counters = CacheCounters()

    @property
    def enabled(self) -> bool:
        return self.options.enabled

    def configure(self, options: CacheOptions) -> None:
        """Apply live tunables (TTLs, L1 bounds, compression, timeouts)."""
        self.options = options
        self.l1.resize(options.l1_max_entries, options.l1_max_bytes)
        if self.l2 is not None:
            self.l2.configure(options)

    async def fetch(
        self,
        keys: Sequence[str],
        generate: Callable[[int], Awaitable[Generation]],
        storable: Callable[[Generation], bool] = lambda _: True,
    ) -> list[Served]:
        """Answer `keys[i]` from cache, or by `generate(i)` at most once per distinct key.

        A generated value is stored only if `storable(value)`: the caller's check that it is
        what the key describes (the weights that made it, for one)."""
        counters = self.counters
        counters.lookups += len(keys)
        out: list[Served | None] = [None] * len(keys)
        missing: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            value = self.l1.get(key)
            if value is None:
                missing.setdefault(key, []).append(i)
            else:
                out[i] = Served(value, Source.L1)
                counters.l1_hits += 1
        if not missing:
            return out  # type: ignore[return-value]

        if self.l2 is not None:
            found = await self.l2.get_many(list(missing))
            for key, hit in zip(list(missing), found, strict=True):
                if hit is None:
                    counters.l2_misses += len(missing[key])
                    continue
                value, ttl_left = hit
                self._remember(key, value, ttl_left)
                positions = missing.pop(key)
                for i in positions:
                    out[i] = Served(value, Source.L2)
                counters.l2_hits += len(positions)

        flights = await asyncio.gather(
            *(
                self.flights.run(
                    key, lambda key=key, i=idx[0]: self._fill(key, generate, i, storable)
                )
                for key, idx in missing.items()
            )
        )
        for (_key, idx), ((value, generated_here), leader) in zip(
            missing.items(), flights, strict=True
        ):
            first = Source.GENERATED if leader and generated_here else Source.COALESCED
            out[idx[0]] = Served(value, first)
            for i in idx[1:]:
                out[i] = Served(value, Source.COALESCED)
            counters.coalesced += len(idx) - int(first is Source.GENERATED)
        return out  # type: ignore[return-value]

    async def lookup(self, key: str) -> Generation | None:
        """The cached answer for `key` (L1, else L2), or None; no single-flight (a stream
        that misses generates its own answer)."""
        self.counters.lookups += 1
        value = self.l1.get(key)
        if value is not None:
            self.counters.l1_hits += 1
            return value
        if self.l2 is not None:
            (hit,) = await self.l2.get_many([key])
            if hit is not None:
                self._remember(key, *hit)
                self.counters.l2_hits += 1
                return hit[0]
            self.counters.l2_misses += 1
        return None

    async def store(self, key: str, value: Generation) -> None:
        """Cache a freshly generated answer in both tiers."""
        self.counters.fills += 1
        self._remember(key, value, self.options.ttl_s)
        if self.l2 is not None:
            await self.l2.put_many({key: value}, self.options.ttl_s)

    async def _fill(
        self,
        key: str,
        generate: Callable[[int], Awaitable[Generation]],
        index: int,
        storable: Callable[[Generation], bool],
    ) -> tuple[Generation, bool]:
        """Generate the answer for `key` (or take another replica's), and store it."""
        token = None
        if self.l2 is not None and self.options.lock_ttl_s > 0:
            claim = await self.l2.claim(key, self.options.lock_ttl_s)
            if claim.held_elsewhere:
                landed = await self.l2.wait_for_value(key, self.options.lock_ttl_s)
                if landed is not None:
                    self._remember(key, *landed)
                    self.counters.coalesced_remote += 1
                    return landed[0], False
            token = claim.token
        try:
            value = await generate(index)
            if storable(value):
                # L1 first with the full TTL, then L2 with the same: the L1 copy expires first.
                await self.store(key, value)
        finally:
            if token is not None and self.l2 is not None:
                await self.l2.release(key, token)
        return value, True

    def _remember(self, key: str, value: Generation, ttl_left_s: float | None) -> None:
        if self.l1.max_entries <= 0:
            return  # L1 switched off
        ttl = self.options.ttl_s if ttl_left_s is None else min(ttl_left_s, self.options.ttl_s)
        if self.options.l1_ttl_s is not None:
            ttl = min(ttl, self.options.l1_ttl_s)
        self.l1.put(key, value, memory_size(value) + len(key), ttl)

    def forget(self, model_id: str | None) -> int:
        """Drop L1 entries (all, or one model's); what another replica's invalidation calls."""
        if model_id is None:
            return self.l1.clear()
        prefix = key_prefix(self.options.prefix, model_id)
        return self.l1.remove_where(lambda key: key.startswith(prefix))

    async def invalidate(self, model_id: str | None) -> dict[str, int]:
        """Delete from both tiers. Raises if the L2 cannot be cleared (after clearing the L1)."""
        try:
            l2 = await self.l2.delete(model_id) if self.l2 is not None else 0
        finally:
            l1 = self.forget(model_id)
        return {"l1": l1, "l2": l2}

    def snapshot(self) -> dict[str, Any]:
        c = self.counters
        l2: dict[str, Any] = {"hits": c.l2_hits, "misses": c.l2_misses}
        if self.l2 is not None:
            l2.update(self.l2.snapshot())
        return {
            "enabled": self.enabled,
            "lookups": c.lookups,
            "hits": c.hits,
            "misses": c.lookups - c.hits,
            "hit_ratio": round(c.hits / c.lookups, 4) if c.lookups else 0.0,
            "coalesced": c.coalesced,
            "coalesced_remote": c.coalesced_remote,
            "fills": c.fills,
            "in_flight": len(self.flights),
            "l1": {"hits": c.l1_hits, "misses": c.lookups - c.l1_hits, **self.l1.stats()},
            "l2": l2,
        }

    async def health(self) -> dict[str, Any]:
        if self.l2 is None:
            return {"status": "disabled"}
        return await self.l2.health()

    async def close(self) -> None:
        if self.l2 is not None:
            await self.l2.close()

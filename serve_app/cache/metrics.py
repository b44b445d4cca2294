"""Ray metrics for the response cache, exported from the counters it keeps anyway.

The request path only increments plain integers; a background task turns them into Ray
metrics every `interval_s` (Ray itself exports every few seconds), so a cache hit pays nothing
for metrics and the cache modules stay free of Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from serve_app.cache.breaker import STATE_LEVEL, BreakerState
from serve_app.telemetry.metrics import metric

logger = logging.getLogger("ray.serve").getChild(__name__)


def cumulative_counts(stats: dict[str, Any]) -> dict[tuple[str, str], int]:
    """The cache's cumulative counters, as (metric, tier) -> count, from a `/stats` block."""
    l2 = stats.get("l2", {})
    return {
        ("hits", "l1"): stats["l1"]["hits"],
        ("hits", "l2"): l2.get("hits", 0),
        ("misses", "l1"): stats["l1"]["misses"],
        ("misses", "l2"): l2.get("misses", 0),
        ("misses", "all"): stats["misses"],
        ("coalesced", "local"): stats["coalesced"] - stats["coalesced_remote"],
        ("coalesced", "remote"): stats["coalesced_remote"],
        ("redis_errors", "l2"): l2.get("errors", 0),
    }


def breaker_level(stats: dict[str, Any]) -> int:
    """0 closed, 1 half-open, 2 open; 0 when there is no L2 (nothing to break)."""
    state = stats.get("l2", {}).get("breaker", {}).get("state", BreakerState.CLOSED.value)
    return STATE_LEVEL[BreakerState(state)]


class CacheMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], interval_s: float = 2.0) -> None:
        self.stats = stats
        self.interval_s = interval_s
        self.counters = {
            name: metric(f"gpt2serve_cache_{name}")
            for name in ("hits", "misses", "coalesced", "redis_errors")
        }
        self.breaker = metric("gpt2serve_cache_breaker_state")
        self.l1_entries = metric("gpt2serve_cache_l1_entries")
        self.l1_bytes = metric("gpt2serve_cache_l1_bytes")
        self._exported: dict[tuple[str, str], int] = {}

    def export(self) -> None:
        stats = self.stats()
        for (name, tier), total in cumulative_counts(stats).items():
            delta = total - self._exported.get((name, tier), 0)
            if delta > 0:
                self.counters[name].inc(delta, tags={"tier": tier})
                self._exported[(name, tier)] = total
        self.breaker.set(breaker_level(stats))
        self.l1_entries.set(stats["l1"]["entries"])
        self.l1_bytes.set(stats["l1"]["bytes"])

    async def run(self) -> None:
        while True:
            try:
                self.export()
            except Exception as exc:  # metrics must never take the replica down
                logger.warning("exporting cache metrics failed: %r", exc)
            await asyncio.sleep(self.interval_s)

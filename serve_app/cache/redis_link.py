"""Which Redis an Ingress replica talks to, and keeping it that way.

Redis holds the response cache's L2 and the rate limiter's buckets. An external `redis_url` is
used as given. The embedded one belongs to the RedisHost deployment: its URL is asked for at
start, and asked for again while the connection is failing, since a replaced RedisHost replica
listens on a new port; whoever registered with `on_connect` then gets the new URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from serve_app.cache.breaker import BreakerState
from serve_app.cache.redis_tier import RedisTier, redis_client
from serve_app.cache.tiered import TieredCache

logger = logging.getLogger("ray.serve").getChild(__name__)


class RedisLink:
    """Points `cache.l2` (when the cache is on) and the `on_connect` listeners at the external
    Redis, the app's embedded one, or nothing."""

    def __init__(
        self,
        cache: TieredCache,
        url: str | None,
        host: Any = None,
        recheck_s: float = 2.0,
        ask_timeout_s: float = 10.0,
    ) -> None:
        self.cache = cache
        self.url = url
        self.host = host  # DeploymentHandle of RedisHost, when no URL is configured
        self.recheck_s = recheck_s
        self.ask_timeout_s = ask_timeout_s
        self._listeners: list[Callable[[str], None]] = []
        self._follower: asyncio.Task[None] | None = None

    @property
    def mode(self) -> str:
        if self.url is None and self.host is None:
            return "disabled"
        return "external" if self.host is None else "embedded"

    def on_connect(self, listener: Callable[[str], None]) -> None:
        """Call `listener(url)` at start and whenever the embedded server moves."""
        self._listeners.append(listener)

    async def start(self) -> None:
        if self.host is not None:
            self.url = await asyncio.wait_for(self.host.url.remote(), self.ask_timeout_s)
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        if self.url is not None:
            self._connect(self.url)

    def _connect(self, url: str) -> None:
        self.url = url
        if self.cache.enabled:
            old = self.cache.l2
            self.cache.l2 = RedisTier(url, self.cache.options, on_invalidate=self.cache.forget)
            self.cache.l2.start_listening()
            if old is not None:
                asyncio.get_running_loop().create_task(old.close())
        for listener in self._listeners:
            listener(url)

    async def _healthy(self) -> bool:
        l2 = self.cache.l2
        if l2 is not None:
            # A PING as well as the breaker: an idle replica's breaker sees no failures.
            return l2.breaker.state is BreakerState.CLOSED and (await l2.health())["status"] == "ok"
        probe = redis_client(self.url, self.cache.options.timeout_s)
        try:
            await asyncio.wait_for(probe.ping(), self.cache.options.timeout_s)
            return True
        except Exception:
            return False
        finally:
            await probe.aclose()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_s)
            if await self._healthy():
                continue
            try:
                url = await asyncio.wait_for(self.host.url.remote(), self.ask_timeout_s)
            except Exception as exc:  # RedisHost being replaced: ask again later
                logger.debug("embedded redis address unavailable: %r", exc)
                continue
            if url != self.url:
                logger.warning("embedded redis-server moved to %s: reconnecting", url)
                self._connect(url)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

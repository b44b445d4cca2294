"""The Redis L2 of the response cache, built never to hold a request up.

Every call is bounded by `timeout_s`, and any failure is a miss, never an error. Failures feed a
circuit breaker: once it opens, requests skip Redis at no cost while a background task probes
it and closes the breaker when Redis answers again.

Redis also carries what the ingress replicas share beyond values: a short-lived marker so only
one replica generates a given answer (the others wait for it to appear), and a pub/sub channel
that tells every replica to drop L1 entries after `DELETE /cache`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from serve_app.cache.breaker import BreakerState, CircuitBreaker
from serve_app.cache.keys import decode_value, encode_value, key_prefix
from serve_app.config import CacheOptions
from serve_app.domain import Generation
from serve_app.errors import DependencyUnavailableError

logger = logging.getLogger("ray.serve").getChild(__name__)

T = TypeVar("T")
FAILURES = (RedisError, OSError, asyncio.TimeoutError)
SCAN_BATCH = 1000
POLL_S = (0.005, 0.1)  # first and longest pause between two looks for another replica's answer

_NOT_INVALIDATED = "redis is unavailable, so the shared cache (L2) was not invalidated; retry later"
# Delete the marker only if it is still ours (a lease that expired may belong to someone else).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to become the one replica that generates an answer."""

    token: str | None  # ours to release; None when we hold nothing
    held_elsewhere: bool  # another replica is generating it right now


class RedisTier:
    def __init__(
        self,
        url: str,
        options: CacheOptions,
        on_invalidate: Callable[[str | None], None] | None = None,
    ) -> None:
        self.options = options
        self.url = url
        self.redis = redis_client(url, options.timeout_s)
        self.breaker = CircuitBreaker(
            options.breaker_failures, options.breaker_reset_s, options.breaker_max_reset_s
        )
        self.on_invalidate = on_invalidate
        self.channel = f"{options.prefix}:invalidate"
        self.sender = uuid.uuid4().hex
        self.errors = 0
        self.skipped = 0
        self.decode_errors = 0
        self.last_error: str | None = None
        self._release = self.redis.register_script(_RELEASE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening = False

    # ---- plumbing -------------------------------------------------------------------------

    def configure(self, options: CacheOptions) -> None:
        """Live tunables; a changed `timeout_s` bounds every call from now on, and the socket
        timeouts of connections opened from now on."""
        self.options = options
        self.redis.connection_pool.connection_kwargs.update(
            socket_timeout=options.timeout_s, socket_connect_timeout=options.timeout_s
        )

    async def _bounded(self, what: str, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """(True, result), or (False, None) when the breaker is open or the call failed."""
        if not self.breaker.allows_calls:
            self.skipped += 1
            return False, None
        try:
            result = await asyncio.wait_for(call(), self.options.timeout_s)
        except FAILURES as exc:
            self._failed(what, exc)
            return False, None
        self.breaker.record_success()
        return True, result

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(exc).__name__}"
        was = self.breaker.state
        self.breaker.record_failure(self.last_error)
        if was is not BreakerState.OPEN and self.breaker.state is BreakerState.OPEN:
            logger.warning(
                "redis %s failed (%r): circuit breaker open, serving without the L2", what, exc
            )
            self._spawn(self._probe_until_closed())
        else:
            logger.debug("redis %s failed: %r", what, exc)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_until_closed(self) -> None:
        while self.breaker.state is not BreakerState.CLOSED:
            await asyncio.sleep(self.breaker.seconds_to_probe())
            if not self.breaker.begin_probe():
                continue
            try:
                await asyncio.wait_for(self.redis.ping(), self.options.timeout_s)
            except FAILURES as exc:
                self.breaker.record_failure(f"probe: {type(exc).__name__}")
            else:
                self.breaker.record_success()
                logger.warning("redis answers again: circuit breaker closed")

    # ---- values ---------------------------------------------------------------------------

    async def get_many(self, keys: list[str]) -> list[tuple[Generation, float | None] | None]:
        """Each key's value and remaining lifetime in seconds (None: no expiry), or None."""
        if not keys:
            return []

        async def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            return await pipe.execute()

        ok, raw = await self._bounded("get", read)
        if not ok or raw is None:
            return [None] * len(keys)
        out: list[tuple[Generation, float | None] | None] = []
        for blob, pttl in zip(raw[::2], raw[1::2], strict=True):
            if blob is None:
                out.append(None)
                continue
            try:
                value = decode_value(blob)
            except ValueError:
                self.decode_errors += 1  # written by another version: a miss, overwritten later
                out.append(None)
                continue
            out.append((value, None if pttl == -1 else max(pttl, 0) / 1000))
        return out

    async def put_many(self, entries: dict[str, Generation], ttl_s: int) -> bool:
        if not entries:
            return True
        compress_min = self.options.compress_min_bytes

        async def write() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for key, value in entries.items():
                pipe.set(key, encode_value(value, compress_min), ex=ttl_s)
            return await pipe.execute()

        ok, _ = await self._bounded("set", write)
        return ok

    # ---- cross-replica single-flight ------------------------------------------------------

    async def claim(self, key: str, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        lease_ms = max(1, int(lease_s * 1000))
        ok, won = await self._bounded(
            "claim", lambda: self.redis.set(f"{key}:lock", token, nx=True, px=lease_ms)
        )
        if not ok:
            return Claim(None, held_elsewhere=False)  # no Redis: generate without a marker
        return Claim(token, False) if won else Claim(None, held_elsewhere=True)

    async def release(self, key: str, token: str) -> None:
        await self._bounded("release", lambda: self._release(keys=[f"{key}:lock"], args=[token]))

    async def wait_for_value(
        self, key: str, within_s: float
    ) -> tuple[Generation, float | None] | None:
        """The answer another replica is generating, once it lands; None if it never does
        (its marker vanished or expired without an answer, or Redis failed): generate then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        pause = POLL_S[0]

        async def look() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            pipe.exists(f"{key}:lock")
            return await pipe.execute()

        while loop.time() < deadline:
            await asyncio.sleep(pause)
            ok, raw = await self._bounded("wait", look)
            if not ok or raw is None:
                return None
            blob, pttl, locked = raw
            if blob is not None:
                try:
                    return decode_value(blob), None if pttl == -1 else max(pttl, 0) / 1000
                except ValueError:
                    self.decode_errors += 1
                    return None
            if not locked:
                return None
            pause = min(pause * 2, POLL_S[1])
        return None

    # ---- invalidation ---------------------------------------------------------------------

    async def delete(self, model_id: str | None) -> int:
        """Remove every response entry (or one model's); raises when Redis cannot do it, since
        an invalidation that silently did nothing would be a lie."""
        if not self.breaker.allows_calls:
            raise DependencyUnavailableError(_NOT_INVALIDATED)
        pattern = _glob_escape(key_prefix(self.options.prefix, model_id)) + "*"
        deleted = 0
        cursor: int | bytes = 0
        timeout = self.options.timeout_s * 4  # a SCAN page and an UNLINK of 1000 keys
        try:
            while True:
                cursor, keys = await asyncio.wait_for(
                    self.redis.scan(cursor=cursor, match=pattern, count=SCAN_BATCH), timeout
                )
                if keys:
                    deleted += await asyncio.wait_for(self.redis.unlink(*keys), timeout)
                if int(cursor) == 0:
                    break
            message = json.dumps({"sender": self.sender, "model": model_id})
            await asyncio.wait_for(self.redis.publish(self.channel, message), timeout)
        except FAILURES as exc:
            self._failed("delete", exc)
            raise DependencyUnavailableError(_NOT_INVALIDATED) from None
        return deleted

    def start_listening(self) -> None:
        """Follow other replicas' invalidations (needs a running event loop)."""
        if not self._listening and self.on_invalidate is not None:
            self._listening = True
            self._spawn(self._listen())

    async def _listen(self) -> None:
        # A connection of its own without a read timeout: it waits for messages indefinitely.
        subscriber = Redis.from_url(
            self.url, socket_connect_timeout=self.options.timeout_s, health_check_interval=30
        )
        backoff, connected_before = 0.5, False
        try:
            while True:
                try:
                    async with subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.subscribe(self.channel)
                        if connected_before and self.on_invalidate is not None:
                            # Messages sent while we were away are lost: forget the whole L1.
                            self.on_invalidate(None)
                        connected_before, backoff = True, 0.5
                        async for message in pubsub.listen():
                            self._invalidated(message)
                except FAILURES as exc:
                    logger.debug("invalidation channel lost (%r), reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.options.breaker_max_reset_s)
        finally:
            await subscriber.aclose()

    def _invalidated(self, message: dict[str, Any]) -> None:
        try:
            body = json.loads(message["data"])
            sender, model = body["sender"], body["model"]
        except (ValueError, KeyError, TypeError):
            return
        if sender != self.sender and self.on_invalidate is not None:
            self.on_invalidate(model)

    # ---- health ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        state = self.breaker.state
        if state is not BreakerState.CLOSED:
            return {"status": "unavailable", "breaker": state.value, "error": self.last_error}
        try:
            await asyncio.wait_for(self.redis.ping(), self.options.timeout_s)
        except FAILURES as exc:
            return {"status": "unavailable", "breaker": state.value, "error": type(exc).__name__}
        return {"status": "ok", "breaker": state.value}

    def snapshot(self) -> dict[str, Any]:
        return {
            "errors": self.errors,
            "skipped": self.skipped,
            "decode_errors": self.decode_errors,
            "breaker": self.breaker.snapshot(),
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.redis.aclose()


def redis_client(url: str, timeout_s: float) -> Redis:
    # One quick retry: after a Redis restart the first command on a pooled connection fails.
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)

"""Response cache: which requests may be answered from cache, under which key, and a Redis
client that degrades to "miss" instead of failing when Redis is slow or gone.

Only deterministic requests are cached (greedy, or sampling with an explicit seed). The key
covers the model id, the weights' identity (a stand-in and the real `gpt2` never share entries),
the prompt and every generation parameter that can change the output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from serve_app.config import CacheOptions
from serve_app.domain import SamplingParams

logger = logging.getLogger(__name__)

KEY_VERSION = 1


def is_cacheable(params: SamplingParams) -> bool:
    return params.deterministic


def cache_key(
    prefix: str, model_id: str, model_revision: str, prompt: str, params: SamplingParams
) -> str:
    payload = json.dumps(
        {
            "v": KEY_VERSION,
            "model": model_id,
            "revision": model_revision,
            "prompt": prompt,
            "params": asdict(params.normalized()),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return f"{prefix}:resp:{model_id}:{digest}"


@dataclass(frozen=True)
class CachedResponse:
    completion: str
    prompt_tokens: int
    completion_tokens: int
    model_source: str
    model_revision: str

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> CachedResponse:
        return cls(**json.loads(raw))


class ResponseCache:
    """Redis-backed; every call bounded by `timeout_s`; any failure is a miss, never an error."""

    def __init__(self, redis: Redis | None, options: CacheOptions) -> None:
        self.redis = redis
        self.options = options
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.options.enabled and self.redis is not None

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(exc).__name__}"
        self.last_error_at = time.time()
        logger.warning("redis %s failed, serving without cache: %r", what, exc)

    async def get_many(self, keys: list[str]) -> list[CachedResponse | None]:
        if not self.enabled or not keys:
            return [None] * len(keys)
        try:
            raw = await asyncio.wait_for(self.redis.mget(keys), self.options.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed("get", exc)
            return [None] * len(keys)
        out: list[CachedResponse | None] = []
        for value in raw:
            try:
                out.append(CachedResponse.loads(value) if value is not None else None)
            except (ValueError, TypeError):
                out.append(None)  # an entry from an incompatible version: treat as a miss
        return out

    async def put_many(self, entries: dict[str, CachedResponse]) -> None:
        if not self.enabled or not entries:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key, value in entries.items():
                pipe.set(key, value.dumps(), ex=self.options.ttl_s)
            await asyncio.wait_for(pipe.execute(), self.options.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed("set", exc)

    async def health(self) -> dict[str, object]:
        if self.redis is None:
            return {"status": "disabled"}
        try:
            await asyncio.wait_for(self.redis.ping(), self.options.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            return {"status": "unavailable", "error": type(exc).__name__}
        return {"status": "ok"}

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

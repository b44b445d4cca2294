"""Who may call what, and how often: API keys and per-key rate limits, as one middleware.

Keys are known only by their SHA-256: a request's key is hashed and compared with every stored
hash in constant time, and only the key's name is logged or stored with the records it asks
for. The rate limit is a token bucket per key (per client address when keys are off) kept in
Redis, so every ingress replica spends from the same bucket; when Redis fails, requests go
through unmetered (fail open), with a log line and a counter.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from serve_app.asgi import HTTPMiddleware
from serve_app.config import AccessOptions, ApiKey, RateLimit
from serve_app.errors import ForbiddenError, RateLimitedError, ServeError, UnauthorizedError
from serve_app.http.errors import serve_error_response
from serve_app.telemetry import requests as request_telemetry
from serve_app.telemetry.metrics import metric

logger = logging.getLogger("ray.serve").getChild(__name__)

# Open whatever the keys: probes, the API docs, and the playground page with its assets.
PUBLIC_PATHS = frozenset({"/livez", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/"})
PUBLIC_PATHS |= {"/openapi.json", "/favicon.ico"}
PUBLIC_PREFIXES = ("/static/",)
ADMIN_ROUTES = frozenset({("DELETE", "/cache")})


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: the key's name (None when keys are off) and its rights."""

    key_name: str | None = None
    admin: bool = False


OPEN = Caller()
caller: ContextVar[Caller | None] = ContextVar("caller", default=None)


def current_key_name() -> str | None:
    return (caller.get() or OPEN).key_name


def owner_scope() -> str | None:
    """The key name a caller's reads are limited to: its own, unless it is an admin (or keys
    are off), which sees every record."""
    who = caller.get() or OPEN
    return None if who.admin else who.key_name


def scoped_key_name(asked: str | None) -> str | None:
    """The `key_name` filter of a read: what was asked for, for an admin (or with keys off);
    a key's own name otherwise, which may not ask for another key's records."""
    own = owner_scope()
    if own is None:
        return asked
    if asked is not None and asked != own:
        raise ForbiddenError("an API key reads only its own records", param="key_name")
    return own


def visible(record: Any) -> bool:
    """Whether a record read by id exists for this caller (another key's is a 404)."""
    if record is None:
        return False
    own = owner_scope()
    return own is None or record.key_name == own


class KeyRing:
    def __init__(self, keys: list[ApiKey], required: bool) -> None:
        self.keys = list(keys)
        self.required = required

    def identify(self, authorization: str | None) -> ApiKey | None:
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        digest = hashlib.sha256(secret.strip().encode()).hexdigest().encode()
        found = None
        for key in self.keys:  # every hash compared, so the time says nothing of a match
            if hmac.compare_digest(key.sha256.encode(), digest):
                found = key
        return found

    def authorize(self, method: str, path: str, authorization: str | None) -> Caller:
        if is_public(path):
            return OPEN
        admin_route = (method, path) in ADMIN_ROUTES
        if not admin_route and not self.required:
            return OPEN
        if admin_route and not any(k.admin for k in self.keys):
            raise ForbiddenError(
                f"{method} {path} is disabled: configure an admin API key (env ADMIN_API_KEYS)"
            )
        key = self.identify(authorization)
        if key is None:
            raise UnauthorizedError(
                "a valid API key is required: send 'Authorization: Bearer <key>'"
            )
        if admin_route and not key.admin:
            raise ForbiddenError(f"{method} {path} needs an admin API key")
        return Caller(key.name, key.admin)


# KEYS[1]: the bucket. ARGV: capacity, tokens per millisecond, TTL (ms). Redis's clock, so
# every replica agrees. Returns {allowed (0/1), tokens left (as text: Lua numbers would be
# truncated to integers on the way back)}.
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * per_ms)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {allowed, tostring(tokens)}
"""


@dataclass(frozen=True)
class Quota:
    """One request's outcome against its bucket, and the headers that tell the client."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until one request is allowed (0 when allowed)

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(math.ceil(self.reset_s)),
        }


class RateLimiter:
    FAIL_OPEN_LOG_EVERY_S = 10.0

    def __init__(self, rate: RateLimit, redis: Redis, prefix: str) -> None:
        self.rate = rate
        self.redis = redis
        self.prefix = prefix
        self.script = redis.register_script(TOKEN_BUCKET)
        self._per_ms = rate.requests / (rate.period_s * 1000)
        self._failed_open = 0
        self._logged_at = 0.0

    async def take(self, subject: str) -> Quota | None:
        """Spend one token of `subject`'s bucket; None when Redis failed (fail open)."""
        ttl_ms = math.ceil(self.rate.period_s * 1000) + 1000
        try:
            allowed, left = await self.script(
                keys=[f"{self.prefix}:ratelimit:{subject}"],
                args=[self.rate.requests, repr(self._per_ms), ttl_ms],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail_open(exc)
            return None
        tokens = float(left)
        per_s = self._per_ms * 1000
        return Quota(
            allowed=bool(int(allowed)),
            limit=self.rate.requests,
            remaining=math.floor(tokens),
            reset_s=(self.rate.requests - tokens) / per_s,
            retry_after_s=0.0 if int(allowed) else (1 - tokens) / per_s,
        )

    def _fail_open(self, exc: BaseException) -> None:
        metric("gpt2serve_rate_limit_fail_open").inc()
        self._failed_open += 1
        now = time.monotonic()
        if now - self._logged_at >= self.FAIL_OPEN_LOG_EVERY_S:
            logger.warning(
                "rate limiter's Redis failed (%s); %d requests let through unmetered",
                type(exc).__name__,
                self._failed_open,
            )
            self._logged_at, self._failed_open = now, 0


class Access:
    """What the middleware consults; the Ingress replica builds it from its settings."""

    def __init__(self, options: AccessOptions, limiter: RateLimiter | None) -> None:
        self.keys = KeyRing(options.api_keys, options.keys_required)
        self.limiter = limiter

    async def admit(self, request: Request) -> tuple[Caller, Quota | None]:
        path = request.url.path
        who = self.keys.authorize(request.method, path, request.headers.get("authorization"))
        if self.limiter is None or is_public(path) or who.admin:  # operators are not metered
            return who, None
        if who.key_name is not None:
            subject = f"key:{who.key_name}"
        else:
            subject = f"ip:{request.client.host if request.client else 'unknown'}"
        quota = await self.limiter.take(subject)
        if quota is not None and not quota.allowed:
            metric("gpt2serve_requests_refused").inc(tags={"reason": "rate_limited"})
            raise RateLimitedError(
                f"rate limit of {self.limiter.rate} exceeded; retry later",
                retry_after_s=quota.retry_after_s,
                headers=quota.headers(),
            )
        return who, quota


def install_access(app: FastAPI, access: Access | None) -> None:
    """Set what the middleware enforces (the Ingress replica's constructor does)."""
    app.state.access = access


def add_access_middleware(app: FastAPI) -> None:
    app.add_middleware(AccessControl)


class AccessControl(HTTPMiddleware):
    """API keys and rate limits, before the body is read."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        access: Access | None = getattr(scope["app"].state, "access", None)
        if access is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            who, quota = await access.admit(request)
        except ServeError as exc:
            if isinstance(exc, UnauthorizedError | ForbiddenError):
                metric("gpt2serve_requests_refused").inc(tags={"reason": exc.error_type})
            await serve_error_response(request, exc)(scope, receive, send)
            return
        info = request_telemetry.current.get()
        if info is not None:
            info.key = who.key_name
        extra = [(k.encode(), v.encode()) for k, v in quota.headers().items()] if quota else []

        async def send_with_quota(message: dict) -> None:
            if extra and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        token = caller.set(who)
        try:
            await self.app(scope, receive, send_with_quota)
        finally:
            caller.reset(token)

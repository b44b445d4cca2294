"""API keys and rate limits: the key ring, the token bucket on a real redis-server, and the
middleware on a small FastAPI app (the real app is driven in tests/integration/test_access.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from serve_app.cache.redis_tier import redis_client
from serve_app.config import (
    AccessOptions,
    ApiKey,
    AppArgs,
    EnvSettings,
    RateLimit,
    parse_keys,
    resolve_args,
)
from serve_app.errors import ForbiddenError, UnauthorizedError
from serve_app.http.access import (
    Access,
    KeyRing,
    RateLimiter,
    add_access_middleware,
    current_key_name,
    install_access,
)
from serve_app.http.errors import install_error_handlers
from tests.conftest import free_port

ALICE, BOB, ROOT = "sk-alice-0123456789", "sk-bob-0123456789", "sk-root-0123456789"
KEYS = [
    ApiKey.from_secret(ALICE, "alice"),
    ApiKey.from_secret(BOB, "bob"),
    ApiKey.from_secret(ROOT, "root", admin=True),
]


class TestConfiguration:
    def test_env_keys_are_hashed_and_named(self):
        args = AppArgs(models=[{"id": "m"}])
        env = EnvSettings(API_KEYS=f"alice={ALICE}, {BOB}", ADMIN_API_KEYS=f"root={ROOT}")
        keys = resolve_args(args, env).access.api_keys
        assert [(k.name, k.admin) for k in keys] == [
            ("alice", False),
            (keys[1].name, False),
            ("root", True),
        ]
        assert keys[1].name.startswith("key-")
        assert ALICE not in repr(keys) and BOB not in repr(args) + repr(keys)

    def test_the_cache_admin_token_is_an_admin_key(self):
        args = AppArgs(models=[{"id": "m"}])
        access = resolve_args(args, EnvSettings(CACHE_ADMIN_TOKEN="t0ken")).access
        assert [(k.name, k.admin) for k in access.api_keys] == [("cache-admin", True)]
        assert not access.keys_required  # an admin key alone does not lock the API

    @pytest.mark.parametrize(
        ("text", "requests", "period_s"),
        [("20/minute", 20, 60), ("5/s", 5, 1), ("100/hours", 100, 3600), ("7/day", 7, 86400)],
    )
    def test_rate_limits_parse(self, text, requests, period_s):
        assert RateLimit.parse(text) == RateLimit(requests=requests, period_s=period_s)

    @pytest.mark.parametrize("text", ["20", "x/minute", "0/minute", "20/fortnight", "/s"])
    def test_bad_rate_limits_are_refused(self, text):
        with pytest.raises(ValueError):
            RateLimit.parse(text)

    def test_duplicate_key_names_are_refused(self):
        with pytest.raises(ValueError, match="unique"):
            AccessOptions(api_keys=parse_keys("a=1,a=2"))


class TestKeyRing:
    ring = KeyRing(KEYS, required=True)

    def test_a_known_key_names_its_caller(self):
        assert self.ring.authorize("POST", "/generate", f"Bearer {ALICE}").key_name == "alice"
        assert self.ring.authorize("POST", "/generate", f"bearer  {BOB} ").key_name == "bob"

    @pytest.mark.parametrize(
        "header", [None, "", "Bearer", "Bearer nope", f"Basic {ALICE}", ALICE, f"Bearer {ALICE}x"]
    )
    def test_anything_else_is_unauthorized(self, header):
        with pytest.raises(UnauthorizedError):
            self.ring.authorize("POST", "/generate", header)

    @pytest.mark.parametrize("path", ["/livez", "/healthz", "/docs", "/openapi.json", "/"])
    def test_public_paths_need_no_key(self, path):
        assert self.ring.authorize("GET", path, None).key_name is None

    def test_admin_routes_need_an_admin_key(self):
        with pytest.raises(ForbiddenError):
            self.ring.authorize("DELETE", "/cache", f"Bearer {ALICE}")
        assert self.ring.authorize("DELETE", "/cache", f"Bearer {ROOT}").admin

    def test_without_admin_keys_admin_routes_are_disabled(self):
        ring = KeyRing(KEYS[:2], required=False)
        assert ring.authorize("POST", "/generate", None).key_name is None  # open API
        with pytest.raises(ForbiddenError):
            ring.authorize("DELETE", "/cache", f"Bearer {ALICE}")


@pytest.fixture
async def redis(redis_server):
    client = redis_client(redis_server.url, 0.5)
    await client.flushdb()
    yield client
    await client.aclose()


class TestTokenBucket:
    async def test_a_bucket_allows_its_size_then_refuses_until_refilled(self, redis: Redis):
        limiter = RateLimiter(RateLimit(requests=3, period_s=0.6), redis, "t")
        quotas = [await limiter.take("key:a") for _ in range(4)]
        assert [q.allowed for q in quotas] == [True, True, True, False]
        assert [q.remaining for q in quotas[:3]] == [2, 1, 0]
        refused = quotas[3]
        assert 0 < refused.retry_after_s <= 0.2 + 0.01
        assert refused.headers()["x-ratelimit-limit"] == "3"
        await asyncio.sleep(refused.retry_after_s + 0.05)
        assert (await limiter.take("key:a")).allowed  # refilled evenly
        assert (await limiter.take("key:b")).remaining == 2  # buckets are per subject

    async def test_replicas_share_one_bucket(self, redis: Redis, redis_server):
        other = redis_client(redis_server.url, 0.5)
        try:
            one = RateLimiter(RateLimit(requests=2, period_s=60), redis, "t")
            two = RateLimiter(RateLimit(requests=2, period_s=60), other, "t")
            allowed = [(await lim.take("key:shared")).allowed for lim in (one, two, one, two)]
            assert allowed == [True, True, False, False]
        finally:
            await other.aclose()

    async def test_a_failing_redis_fails_open_and_says_so(self, caplog):
        dead = redis_client(f"redis://127.0.0.1:{free_port()}/0", 0.2)
        limiter = RateLimiter(RateLimit(requests=1, period_s=60), dead, "t")
        with caplog.at_level(logging.WARNING):
            assert await limiter.take("key:a") is None
            assert await limiter.take("key:a") is None
        assert sum("unmetered" in r.getMessage() for r in caplog.records) == 1
        await dead.aclose()


def _app(access: Access) -> FastAPI:
    app = FastAPI()
    add_access_middleware(app)
    install_error_handlers(app)
    install_access(app, access)

    @app.post("/generate")
    async def generate() -> dict:
        return {"key": current_key_name()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"key": current_key_name()}

    @app.get("/livez")
    async def livez() -> dict:
        return {"status": "ok"}

    return app


class TestMiddleware:
    def test_keys_on_401_in_both_error_shapes_and_the_name_reaches_the_route(self):
        client = TestClient(_app(Access(AccessOptions(api_keys=KEYS), None)))
        r = client.post("/generate")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        r = client.get("/v1/models", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert ALICE not in r.text
        r = client.post("/generate", headers={"authorization": f"Bearer {ALICE}"})
        assert r.status_code == 200 and r.json() == {"key": "alice"}
        assert client.get("/livez").status_code == 200

    def test_keys_off_everything_is_open(self):
        client = TestClient(_app(Access(AccessOptions(), None)))
        assert client.post("/generate").json() == {"key": None}

    def test_rate_limited_requests_get_429_with_headers(self, redis_server):
        async def flush() -> None:
            client = redis_client(redis_server.url, 0.5)
            await client.flushdb()
            await client.aclose()

        asyncio.run(flush())
        options = AccessOptions(api_keys=KEYS, rate_limit="2/minute")
        with TestClient(_app(Access(options, None))) as client:
            # The limiter's client is made on the app's own event loop.
            limiter = RateLimiter(options.rate_limit, redis_client(redis_server.url, 0.5), "m")
            install_access(client.app, Access(options, limiter))
            alice = {"authorization": f"Bearer {ALICE}"}
            bob = {"authorization": f"Bearer {BOB}"}
            ok = [client.post("/generate", headers=alice) for _ in range(2)]
            assert [r.status_code for r in ok] == [200, 200]
            assert ok[1].headers["x-ratelimit-remaining"] == "0"
            limited = client.post("/generate", headers=alice)
            assert limited.status_code == 429
            assert limited.json()["error"]["type"] == "rate_limited"
            assert 1 <= int(limited.headers["retry-after"]) <= 30
            assert limited.headers["x-ratelimit-limit"] == "2"
            assert client.post("/generate", headers=bob).status_code == 200  # a bucket per key
            r = client.get("/v1/models", headers=alice)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"

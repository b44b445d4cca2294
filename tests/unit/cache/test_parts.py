"""Pure parts of the response cache, in milliseconds: value format, L1 LRU, circuit breaker,
single-flight, the tiered cache running L1-only, live config, metric mapping."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from serve_app.cache.breaker import BreakerState, CircuitBreaker
from serve_app.cache.keys import decode_value, encode_value
from serve_app.cache.lru import TtlLru
from serve_app.cache.metrics import breaker_level, cumulative_counts
from serve_app.cache.singleflight import SingleFlight
from serve_app.cache.tiered import Source, TieredCache
from serve_app.config import (
    AppArgs,
    CacheOptions,
    EnvSettings,
    apply_cache_user_config,
    resolve_args,
)
from serve_app.domain import Generation
from tests.unit.cache.samples import value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestValueFormat:
    def test_roundtrip_small_is_plain_json(self):
        blob = encode_value(value("héllo ☃"), compress_min_bytes=1024)
        assert blob.startswith(b"j")
        assert decode_value(blob) == value("héllo ☃")

    def test_what_belongs_to_one_request_is_not_cached(self):
        mine = value().replace(id="x", user_id="alice", cached=True, latency_ms=5.0)
        assert decode_value(encode_value(mine)) == value()

    def test_large_values_are_compressed(self):
        big = value("the same words again " * 200)
        blob = encode_value(big, compress_min_bytes=1024)
        assert blob.startswith(b"z")
        assert len(blob) < len(big.completion) / 4
        assert decode_value(blob) == big

    def test_threshold_is_respected(self):
        big = value("x" * 5000)
        assert encode_value(big, compress_min_bytes=10_000).startswith(b"j")
        assert encode_value(big, compress_min_bytes=100).startswith(b"z")

    @pytest.mark.parametrize(
        "blob",
        [
            b"",
            b"{json",
            b'{"completion": "x"}',
            b'j{"completion": "x"}',
            b'j["x",2,1,"standin:tiny","rev-1"]',  # the format before KEY_VERSION 3
            b"j[1,2]",
            b"jnot json",
            b"z\x00\x01",
        ],
    )
    def test_foreign_or_corrupt_values_are_rejected(self, blob):
        with pytest.raises(ValueError):
            decode_value(blob)


class TestTtlLru:
    def test_bounded_by_entries_evicting_least_recently_used(self):
        lru: TtlLru[int] = TtlLru(max_entries=3, max_bytes=10_000, clock=Clock())
        for k in "abc":
            lru.put(k, ord(k), size=1, ttl_s=60)
        assert lru.get("a") == ord("a")  # a is now the most recently used
        lru.put("d", 4, size=1, ttl_s=60)
        assert lru.get("b") is None and lru.get("a") is not None
        assert len(lru) == 3 and lru.evictions == 1

    def test_bounded_by_bytes(self):
        lru: TtlLru[str] = TtlLru(max_entries=100, max_bytes=250, clock=Clock())
        for i in range(5):
            lru.put(f"k{i}", "v", size=100, ttl_s=60)
        assert len(lru) == 2 and lru.bytes == 200
        assert [lru.get(f"k{i}") for i in range(5)] == [None, None, None, "v", "v"]

    def test_an_entry_larger_than_the_bound_is_not_stored(self):
        lru: TtlLru[str] = TtlLru(max_entries=10, max_bytes=100, clock=Clock())
        lru.put("small", "v", size=10, ttl_s=60)
        assert lru.put("huge", "v", size=101, ttl_s=60) is False
        assert lru.get("huge") is None and lru.get("small") == "v"

    def test_entries_expire(self):
        clock = Clock()
        lru: TtlLru[str] = TtlLru(max_entries=10, max_bytes=100, clock=clock)
        lru.put("k", "v", size=10, ttl_s=5)
        clock.now += 4.9
        assert lru.get("k") == "v"
        clock.now += 0.2
        assert lru.get("k") is None
        assert lru.bytes == 0 and lru.expirations == 1

    def test_overwrite_keeps_byte_count_exact(self):
        lru: TtlLru[str] = TtlLru(max_entries=10, max_bytes=1000, clock=Clock())
        lru.put("k", "a", size=100, ttl_s=60)
        lru.put("k", "b", size=30, ttl_s=60)
        assert lru.bytes == 30 and lru.get("k") == "b"

    def test_resize_and_selective_removal(self):
        lru: TtlLru[int] = TtlLru(max_entries=10, max_bytes=1000, clock=Clock())
        for i in range(6):
            lru.put(f"{'a' if i % 2 else 'b'}:{i}", i, size=10, ttl_s=60)
        assert lru.remove_where(lambda k: k.startswith("a:")) == 3
        lru.resize(max_entries=1, max_bytes=1000)
        assert len(lru) == 1 and lru.get("b:4") == 4
        assert lru.clear() == 1 and lru.bytes == 0


class TestCircuitBreaker:
    def test_opens_after_consecutive_failures_only(self):
        breaker = CircuitBreaker(failure_threshold=3, clock=Clock())
        breaker.record_failure("x")
        breaker.record_failure("x")
        breaker.record_success()  # not consecutive any more
        breaker.record_failure("x")
        breaker.record_failure("x")
        assert breaker.allows_calls
        breaker.record_failure("timeout")
        assert breaker.state is BreakerState.OPEN and not breaker.allows_calls
        assert breaker.snapshot()["last_error"] == "timeout"

    def test_probe_after_reset_then_close(self):
        clock = Clock()
        breaker = CircuitBreaker(failure_threshold=1, reset_after_s=1.0, clock=clock)
        breaker.record_failure("x")
        assert breaker.begin_probe() is False
        assert breaker.seconds_to_probe() == pytest.approx(1.0)
        clock.now += 1.0
        assert breaker.begin_probe() is True
        assert breaker.state is BreakerState.HALF_OPEN and not breaker.allows_calls
        assert breaker.begin_probe() is False  # one probe at a time
        breaker.record_success()
        assert breaker.state is BreakerState.CLOSED and breaker.allows_calls

    def test_failed_probes_back_off_up_to_a_cap(self):
        clock = Clock()
        breaker = CircuitBreaker(1, reset_after_s=1.0, max_reset_after_s=3.0, clock=clock)
        breaker.record_failure("x")
        waits = []
        for _ in range(4):
            waits.append(breaker.seconds_to_probe())
            clock.now += waits[-1]
            assert breaker.begin_probe()
            breaker.record_failure("still down")
        assert waits == [1.0, 2.0, 3.0, 3.0]
        clock.now += 3.0
        assert breaker.begin_probe()
        breaker.record_success()
        breaker.record_failure("x")  # backoff starts over after a close
        assert breaker.seconds_to_probe() == 1.0

    def test_a_late_success_does_not_close_an_open_breaker(self):
        breaker = CircuitBreaker(failure_threshold=1, clock=Clock())
        breaker.record_failure("x")
        breaker.record_success()
        assert breaker.state is BreakerState.OPEN


class TestSingleFlight:
    async def test_concurrent_callers_share_one_run(self):
        flights: SingleFlight[str] = SingleFlight()
        runs = 0
        release = asyncio.Event()

        async def work() -> str:
            nonlocal runs
            runs += 1
            await release.wait()
            return "answer"

        callers = [asyncio.create_task(flights.run("k", work)) for _ in range(10)]
        await asyncio.sleep(0)
        assert len(flights) == 1
        release.set()
        results = await asyncio.gather(*callers)
        assert runs == 1
        assert [r for r, _ in results] == ["answer"] * 10
        assert sum(leader for _, leader in results) == 1
        assert len(flights) == 0
        assert await flights.run("k", work) == ("answer", True)  # finished work is not reused
        assert runs == 2

    async def test_errors_reach_every_caller(self):
        flights: SingleFlight[str] = SingleFlight()

        async def work() -> str:
            await asyncio.sleep(0.01)
            raise KeyError("boom")

        results = await asyncio.gather(
            *(flights.run("k", work) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, KeyError) for r in results)
        assert len(flights) == 0

    async def test_a_cancelled_leader_does_not_cancel_the_work(self):
        flights: SingleFlight[str] = SingleFlight()
        release = asyncio.Event()

        async def work() -> str:
            await release.wait()
            return "done"

        leader = asyncio.create_task(flights.run("k", work))
        await asyncio.sleep(0)
        follower = asyncio.create_task(flights.run("k", work))
        await asyncio.sleep(0)
        leader.cancel()
        release.set()
        assert await follower == ("done", False)
        with pytest.raises(asyncio.CancelledError):
            await leader


def l1_only(clock: Clock | None = None, **options) -> TieredCache:
    return TieredCache(CacheOptions(**{"ttl_s": 60, **options}), None, clock or Clock())


class Generator:
    """Counts generations; each answer depends on the prompt index it was asked for."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay_s = delay_s

    async def __call__(self, index: int) -> Generation:
        self.calls.append(index)
        await asyncio.sleep(self.delay_s)
        return value(f"answer {index}")


class TestTieredCacheL1Only:
    async def test_miss_then_hit_per_prompt(self):
        cache, gen = l1_only(), Generator()
        first = await cache.fetch(["a"], gen)
        assert [s.source for s in first] == [Source.GENERATED]
        mixed = await cache.fetch(["x", "a", "y"], gen)
        assert [s.source for s in mixed] == [Source.GENERATED, Source.L1, Source.GENERATED]
        assert [s.cached for s in mixed] == [False, True, False]
        assert mixed[1].value == first[0].value
        stats = cache.snapshot()
        assert (stats["lookups"], stats["hits"], stats["misses"], stats["fills"]) == (4, 1, 3, 3)
        assert stats["hit_ratio"] == 0.25
        assert stats["l1"]["entries"] == 3

    async def test_identical_concurrent_requests_generate_once(self):
        cache, gen = l1_only(), Generator(delay_s=0.02)
        results = await asyncio.gather(*(cache.fetch(["same"], gen) for _ in range(8)))
        sources = [r[0].source for r in results]
        assert len(gen.calls) == 1
        assert sources.count(Source.GENERATED) == 1
        assert sources.count(Source.COALESCED) == 7
        assert all(r[0].value == results[0][0].value for r in results)
        assert cache.snapshot()["coalesced"] == 7

    async def test_duplicate_prompts_in_one_request_generate_once(self):
        cache, gen = l1_only(), Generator()
        served = await cache.fetch(["k", "k", "other", "k"], gen)
        assert gen.calls == [0, 2]
        assert [s.source for s in served] == [
            Source.GENERATED,
            Source.COALESCED,
            Source.GENERATED,
            Source.COALESCED,
        ]

    async def test_a_failed_generation_is_not_cached(self):
        cache = l1_only()

        async def fail(index: int) -> Generation:
            raise RuntimeError("model down")

        with pytest.raises(RuntimeError):
            await cache.fetch(["k"], fail)
        gen = Generator()
        assert (await cache.fetch(["k"], gen))[0].source is Source.GENERATED

    async def test_l1_ttl_and_cap(self):
        clock = Clock()
        cache, gen = l1_only(clock, ttl_s=60, l1_ttl_s=5), Generator()
        await cache.fetch(["k"], gen)
        clock.now += 4
        assert (await cache.fetch(["k"], gen))[0].source is Source.L1
        clock.now += 2
        assert (await cache.fetch(["k"], gen))[0].source is Source.GENERATED

    async def test_l1_bound_holds(self):
        cache, gen = l1_only(l1_max_entries=5), Generator()
        await cache.fetch([f"k{i}" for i in range(10)], gen)
        stats = cache.snapshot()["l1"]
        assert stats["entries"] == 5 and stats["evictions"] == 5
        cache.configure(CacheOptions(ttl_s=60, l1_max_entries=5, l1_max_bytes=1000))
        shrunk = cache.snapshot()["l1"]
        assert 0 < shrunk["bytes"] <= 1000 and shrunk["entries"] < 5

    async def test_forget_by_model(self):
        cache, gen = l1_only(prefix="p"), Generator()
        await cache.fetch(["p:resp:m1:aa", "p:resp:m2:bb", "p:resp:m1x:cc"], gen)
        assert cache.forget("m1") == 1  # m1x is another model
        assert cache.snapshot()["l1"]["entries"] == 2
        assert await cache.invalidate(None) == {"l1": 2, "l2": 0}


class TestCacheConfig:
    def test_live_fields_apply_others_are_refused(self):
        base = CacheOptions(ttl_s=100, prefix="p")
        live = apply_cache_user_config(base, {"ttl_s": 5, "l1_max_entries": 7})
        assert (live.ttl_s, live.l1_max_entries, live.prefix) == (5, 7, "p")
        with pytest.raises(ValueError, match="prefix"):
            apply_cache_user_config(base, {"prefix": "other"})
        with pytest.raises(ValidationError):
            apply_cache_user_config(base, {"ttl_s": 0})

    def test_prefix_must_be_glob_safe(self):
        with pytest.raises(ValidationError):
            CacheOptions(prefix="a*b")

    def test_admin_token_from_env_and_never_printed(self):
        args = AppArgs.model_validate({"models": [{"id": "m"}]})
        resolved = resolve_args(args, EnvSettings(CACHE_ADMIN_TOKEN="s3cret"))
        assert resolved.cache.admin_token.get_secret_value() == "s3cret"
        assert "s3cret" not in repr(resolved)
        assert resolve_args(args, EnvSettings()).cache.admin_token is None


class TestMetricMapping:
    async def test_counts_and_breaker_level_come_from_the_stats_block(self):
        cache, gen = l1_only(), Generator()
        await cache.fetch(["a", "b"], gen)
        await cache.fetch(["a"], gen)
        counts = cumulative_counts(cache.snapshot())
        assert counts[("hits", "l1")] == 1 and counts[("misses", "all")] == 2
        assert counts[("misses", "l1")] == 2 and counts[("hits", "l2")] == 0
        assert breaker_level(cache.snapshot()) == 0  # no L2: nothing to break
        open_l2 = {"l2": {"breaker": {"state": "open"}}}
        assert breaker_level(open_l2) == 2

    async def test_l1_can_be_switched_off(self):
        cache, gen = l1_only(l1_max_entries=0), Generator()
        await cache.fetch(["a"], gen)
        assert (await cache.fetch(["a"], gen))[0].source is Source.GENERATED
        assert cache.snapshot()["l1"]["entries"] == 0

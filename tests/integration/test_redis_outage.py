"""Redis dies mid-run and comes back on the same port: the app keeps answering correctly,
reports the degraded state, and heals by itself.

It stops the session's own redis-server (the `redis_server` fixture, never the machine's), so
this module is named to run after every other module that uses the session app."""

from __future__ import annotations

import time

import pytest
import redis

from tests.integration.test_http_api import PREFIX, generate, unique

pytestmark = pytest.mark.integration
RECOVERY_S = 20


def test_requests_survive_a_redis_outage_and_the_cache_heals(tiny_app, redis_server):
    port = redis_server.port
    # A generous client timeout: a request that hangs on a dead Redis fails the test.
    with tiny_app.client() as client, redis.Redis.from_url(tiny_app.redis_url) as rds:
        warm, during = unique("before outage"), unique("during outage")
        (cached_before,) = generate(client, prompts=[warm], max_new_tokens=12)
        (reference,) = generate(client, prompts=[during], max_new_tokens=12, cache=False)

        redis_server.stop()
        try:
            answers = [
                generate(client, prompts=[warm, during], max_new_tokens=12) for _ in range(4)
            ]
            health = client.get("/healthz")
            during_stats = client.get("/stats").json()["cache"]
        finally:
            redis_server.start(port=port)

        for pair in answers:  # 200s with the right text, from the L1 or the model
            assert [a["generated_text"] for a in pair] == [
                cached_before["generated_text"],
                reference["generated_text"],
            ]
        assert answers[0][0]["cached"] is True  # the L1 still answers
        assert [p[1]["cached"] for p in answers] == [False, True, True, True]
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert health.json()["redis"]["status"] == "unavailable"
        assert during_stats["l2"]["breaker"]["state"] != "closed"
        assert during_stats["l2"]["errors"] > 0

        # Back on the same port: the breaker probes and closes with no traffic needed.
        deadline = time.monotonic() + RECOVERY_S
        while True:
            redis_health = client.get("/healthz").json()["redis"]
            if redis_health == {"status": "ok", "mode": "external", "breaker": "closed"}:
                break
            assert time.monotonic() < deadline, f"cache did not recover: {redis_health}"
            time.sleep(0.2)

        after = unique("after outage")
        assert generate(client, prompts=[after], max_new_tokens=6)[0]["cached"] is False
        assert list(rds.scan_iter(f"{PREFIX}:resp:*"))  # written to the restarted Redis
        assert generate(client, prompts=[after], max_new_tokens=6)[0]["cached"] is True
        assert client.get("/stats").json()["cache"]["l2"]["breaker"]["state"] == "closed"

"""The response cache through the real app over HTTP: per-prompt answers, key isolation,
opt-out, single-flight, invalidation and what `/stats` reports. Real Redis, real SQLite.

Runs on the session app; each test uses its own prompts, and reads counters as deltas."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ADMIN_TOKEN
from tests.integration.test_http_api import PREFIX, assert_error, generate, unique

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def stats(client) -> dict:
    r = client.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()


def response_keys(rds, model: str = "*") -> set[bytes]:
    return {k for k in rds.scan_iter(f"{PREFIX}:resp:{model}:*") if not k.endswith(b":lock")}


def test_livez_answers_without_dependencies(client):
    r = client.get("/livez")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["x-response-time"].endswith("ms")


def test_each_parameter_and_the_model_make_their_own_entry(client, rds):
    prompt = unique("isolation")
    variants = [
        {"max_new_tokens": 6},
        {"max_new_tokens": 7},
        {"max_new_tokens": 6, "temperature": 0.9, "seed": 1},
        {"max_new_tokens": 6, "temperature": 0.9, "seed": 2},
        {"max_new_tokens": 6, "temperature": 0.5, "seed": 1},
        {"max_new_tokens": 6, "temperature": 0.9, "top_p": 0.5, "seed": 1},
        {"max_new_tokens": 6, "model": "tiny-b"},
    ]
    before = response_keys(rds)
    first = [generate(client, prompts=[prompt], **v)[0] for v in variants]
    assert [r["cached"] for r in first] == [False] * len(variants)
    added = response_keys(rds) - before
    assert len(added) == len(variants)
    assert sum(k.startswith(f"{PREFIX}:resp:tiny-b:".encode()) for k in added) == 1
    again = [generate(client, prompts=[prompt], **v)[0] for v in variants]
    assert [r["cached"] for r in again] == [True] * len(variants)
    assert [r["generated_text"] for r in again] == [r["generated_text"] for r in first]


def test_sampling_without_a_seed_never_hits_even_when_greedy_is_cached(client, rds):
    prompt = unique("seedless")
    generate(client, prompts=[prompt], max_new_tokens=8)
    assert generate(client, prompts=[prompt], max_new_tokens=8)[0]["cached"] is True
    before_keys, before = response_keys(rds), stats(client)
    body = {"prompts": [prompt], "max_new_tokens": 8, "temperature": 1.0}
    assert [generate(client, **body)[0]["cached"] for _ in range(3)] == [False] * 3
    after = stats(client)
    assert after["generations"] - before["generations"] == 3
    assert after["cache"]["uncacheable"] - before["cache"]["uncacheable"] == 3
    assert response_keys(rds) == before_keys


def test_one_prompt_of_ten_hits_while_the_others_miss(client):
    warm = unique("warm")
    (cold_answer,) = generate(client, prompts=[warm], max_new_tokens=5)
    prompts = [unique(f"cold {i}") for i in range(9)]
    prompts.insert(4, warm)
    before = stats(client)
    records = generate(client, prompts=prompts, max_new_tokens=5)
    after = stats(client)
    assert [r["prompt"] for r in records] == prompts
    assert [r["cached"] for r in records] == [i == 4 for i in range(10)]
    assert records[4]["generated_text"] == cold_answer["generated_text"]
    assert after["generations"] - before["generations"] == 9
    assert after["cache"]["hits"] - before["cache"]["hits"] == 1
    assert after["cache"]["misses"] - before["cache"]["misses"] == 9


def test_opting_out_neither_reads_nor_writes(client, rds):
    prompt = unique("opt out")
    keys_before, before = response_keys(rds), stats(client)
    first = generate(client, prompts=[prompt], max_new_tokens=6, cache=False)[0]
    assert first["cached"] is False
    assert response_keys(rds) == keys_before  # nothing written
    assert generate(client, prompts=[prompt], max_new_tokens=6)[0]["cached"] is False
    assert generate(client, prompts=[prompt], max_new_tokens=6)[0]["cached"] is True
    last = generate(client, prompts=[prompt], max_new_tokens=6, cache=False)[0]
    assert last["cached"] is False  # an entry exists, and is not read
    assert last["generated_text"] == first["generated_text"]
    after = stats(client)
    assert after["generations"] - before["generations"] == 3
    assert after["cache"]["bypassed"] - before["cache"]["bypassed"] == 2


def test_identical_concurrent_requests_run_the_model_once(client):
    prompt, n = unique("stampede"), 16
    before = stats(client)
    start = threading.Barrier(n)

    def one(_):
        start.wait()
        return client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 128})

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
    records = [r.json()[0] for r in responses]
    after = stats(client)
    assert after["generations"] - before["generations"] == 1
    assert sum(not r["cached"] for r in records) == 1
    assert len({r["generated_text"] for r in records}) == 1
    coalesced = after["cache"]["coalesced"] - before["cache"]["coalesced"]
    hits = after["cache"]["hits"] - before["cache"]["hits"]
    assert coalesced >= 1  # they overlapped: the wait happened in flight, not in the cache
    assert coalesced + hits == n - 1
    # every request still has its own history row, with its own cached flag
    ids = {r["id"] for r in records}
    assert len(ids) == n
    stored = [client.get(f"/history/{i}").json() for i in ids]
    assert sorted(s["cached"] for s in stored) == [False] + [True] * (n - 1)


def test_delete_cache_needs_the_admin_token(client):
    assert_error(client.delete("/cache"), 401, "unauthorized")
    assert_error(client.delete("/cache", headers={"authorization": "Bearer nope"}), 401)
    assert_error(client.delete("/cache", headers={"authorization": f"Basic {ADMIN_TOKEN}"}), 401)
    assert_error(client.delete("/cache", params={"model": "gpt5"}, headers=AUTH), 404)


def test_delete_cache_by_model_then_everything(client, rds):
    pa, pb = unique("invalidate a"), unique("invalidate b")
    generate(client, prompts=[pa], model="tiny-a", max_new_tokens=4)
    generate(client, prompts=[pb], model="tiny-b", max_new_tokens=4)
    assert response_keys(rds, "tiny-a") and response_keys(rds, "tiny-b")

    r = client.delete("/cache", params={"model": "tiny-a"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-a" and body["deleted_l2"] >= 1 and body["deleted_l1"] >= 1
    assert not response_keys(rds, "tiny-a") and response_keys(rds, "tiny-b")
    assert generate(client, prompts=[pa], model="tiny-a", max_new_tokens=4)[0]["cached"] is False
    assert generate(client, prompts=[pb], model="tiny-b", max_new_tokens=4)[0]["cached"] is True

    r = client.delete("/cache", headers=AUTH)
    assert r.status_code == 200 and r.json()["model"] is None
    assert not response_keys(rds)
    assert generate(client, prompts=[pb], model="tiny-b", max_new_tokens=4)[0]["cached"] is False


def test_stats_report_both_tiers_and_the_breaker(client):
    prompt = unique("stats tiers")
    generate(client, prompts=[prompt], max_new_tokens=3)
    generate(client, prompts=[prompt], max_new_tokens=3)
    cache = stats(client)["cache"]
    assert cache["enabled"] is True
    assert cache["hits"] == cache["l1"]["hits"] + cache["l2"]["hits"] > 0
    assert cache["misses"] == cache["lookups"] - cache["hits"]
    assert cache["hit_ratio"] == round(cache["hits"] / cache["lookups"], 4)
    assert cache["coalesced"] >= 0 and cache["fills"] > 0
    l1 = cache["l1"]
    assert 0 < l1["entries"] <= l1["max_entries"] and 0 < l1["bytes"] <= l1["max_bytes"]
    assert cache["l2"]["breaker"]["state"] == "closed"
    assert cache["l2"]["errors"] == 0

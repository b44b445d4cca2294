"""The real app (configs/tiny.yaml) under Ray Serve, over real HTTP, with a real Redis and a real
SQLite file. Each test uses its own unique prompts/user ids, so order does not matter."""

from __future__ import annotations

import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

pytestmark = pytest.mark.integration
PREFIX = "gpt2serve-tiny"


def unique(text: str = "prompt") -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


def generate(client, **body):
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(response, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "x-response-time" in response.headers
    error = response.json()["error"]
    assert error["message"]
    if error_type:
        assert error["type"] == error_type, error
    return error


def test_one_prompt(client):
    prompt = unique("Hello world")
    r = client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.headers["x-response-time"].endswith("ms")
    (rec,) = r.json()
    assert rec["prompt"] == prompt
    assert rec["generated_text"].startswith(prompt)
    assert rec["generated_text"] == prompt + rec["completion"]
    assert rec["model_name"] == "tiny-a"
    assert rec["cached"] is False
    assert 1 <= rec["usage"]["completion_tokens"] <= 8
    assert rec["usage"]["prompt_tokens"] > 0
    assert rec["finish_reason"] == ("length" if rec["usage"]["completion_tokens"] == 8 else "stop")
    assert datetime.fromisoformat(rec["created_at"].replace("Z", "+00:00")).tzinfo is not None


def test_ten_prompts_in_order(client):
    prompts = [unique(f"number {i}") for i in range(10)]
    records = generate(client, prompts=prompts, max_new_tokens=4)
    assert [r["prompt"] for r in records] == prompts
    assert len({r["id"] for r in records}) == 10


def test_max_length_is_total_tokens(client):
    (rec,) = generate(client, prompts=[unique("count")], max_length=40)
    assert rec["usage"]["prompt_tokens"] + rec["usage"]["completion_tokens"] <= 40
    assert rec["usage"]["completion_tokens"] >= 1


def test_greedy_is_deterministic_without_the_cache(client):
    prompt = unique("determinism")
    (first,) = generate(client, prompts=[prompt], max_new_tokens=16)
    # opting out of the cache forces a second real generation
    (second,) = generate(client, prompts=[prompt], max_new_tokens=16, cache=False)
    assert first["cached"] is False and second["cached"] is False
    assert first["generated_text"] == second["generated_text"]


def test_cache_hit_on_repeat_with_ttl_and_own_history_row(client, rds, tiny_app):
    prompt, user = unique("cache me"), unique("user")
    (miss,) = generate(client, prompts=[prompt], max_new_tokens=6, user_id=user)
    (hit,) = generate(client, prompts=[prompt], max_new_tokens=6, user_id=user)
    assert miss["cached"] is False and hit["cached"] is True
    assert hit["generated_text"] == miss["generated_text"]
    assert hit["id"] != miss["id"]
    keys = list(rds.scan_iter(f"{PREFIX}:resp:tiny-a:*"))
    assert keys
    assert all(0 < rds.ttl(k) <= 600 for k in keys)
    page = client.get("/history", params={"user_id": user}).json()
    assert [i["cached"] for i in page["items"]] == [True, False]
    # a different budget is a different entry
    (other,) = generate(client, prompts=[prompt], max_new_tokens=5, user_id=user)
    assert other["cached"] is False


def test_sampling_without_seed_is_never_cached(client, rds):
    prompt = unique("sample")
    before = set(rds.scan_iter(f"{PREFIX}:resp:*"))
    body = {"prompts": [prompt], "max_new_tokens": 8, "temperature": 1.0}
    a, b = generate(client, **body)[0], generate(client, **body)[0]
    assert a["cached"] is False and b["cached"] is False
    assert set(rds.scan_iter(f"{PREFIX}:resp:*")) == before


def test_sampling_with_seed_is_cached(client):
    body = {"prompts": [unique("seeded")], "max_new_tokens": 8, "temperature": 0.8, "seed": 3}
    a, b = generate(client, **body)[0], generate(client, **body)[0]
    assert a["cached"] is False and b["cached"] is True
    assert a["generated_text"] == b["generated_text"]


def test_history_pagination_and_filters(client):
    user = unique("pager")
    made = []
    for _ in range(3):
        made += generate(
            client, prompts=[unique("h1"), unique("h2")], user_id=user, max_new_tokens=2
        )
    made += generate(client, prompts=[unique("h3")], user_id=user, model="tiny-b", max_new_tokens=2)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"user_id": user, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/history", params=params).json()
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(i["id"] for i in seen) == sorted(r["id"] for r in made)  # each exactly once
    stamps = [i["created_at"] for i in seen]
    assert stamps == sorted(stamps, reverse=True)  # newest first
    only_b = client.get("/history", params={"user_id": user, "model": "tiny-b"}).json()
    assert [i["model_name"] for i in only_b["items"]] == ["tiny-b"]
    assert only_b["next_cursor"] is None
    one = client.get(f"/history/{made[0]['id']}")
    assert one.status_code == 200 and one.json()["generated_text"] == made[0]["generated_text"]


def test_history_errors(client):
    assert_error(client.get("/history/does-not-exist"), 404, "not_found")
    assert_error(client.get("/history", params={"cursor": "garbage!!"}), 400, "invalid_cursor")
    assert_error(client.get("/history", params={"limit": 0}), 422)
    assert_error(client.get("/history", params={"limit": 101}), 400, "invalid_request")  # the cap
    assert_error(client.get("/history", params={"limit": 1001}), 422)


def test_records_are_in_the_sqlite_file(client, tiny_app):
    prompt, user = unique("durable"), unique("db-user")
    (rec,) = generate(client, prompts=[prompt], user_id=user, max_new_tokens=3)
    with sqlite3.connect(tiny_app.db_path) as db:
        row = db.execute(
            "SELECT prompt, generated_text, model_name, user_id, cached, completion_tokens, "
            "finish_reason FROM generations WHERE id = ?",
            (rec["id"],),
        ).fetchone()
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert row == (
        prompt,
        rec["generated_text"],
        "tiny-a",
        user,
        0,
        rec["usage"]["completion_tokens"],
        rec["finish_reason"],
    )
    assert rec["finish_reason"] in ("length", "stop")
    assert client.get(f"/history/{rec['id']}").json()["finish_reason"] == rec["finish_reason"]
    page = client.get("/history", params={"user_id": user}).json()
    assert [item["finish_reason"] for item in page["items"]] == [rec["finish_reason"]]
    assert mode == "wal"


def test_model_switching_with_eviction(client):
    before = client.get("/stats").json()["generator"]
    prompt = unique("switch")
    texts = {}
    for model in ("tiny-a", "tiny-b"):
        texts[model] = generate(client, prompts=[prompt], model=model, max_new_tokens=8)[0]
    r = client.post(
        "/generate",
        json={"prompts": [prompt], "max_new_tokens": 8},
        headers={"serve_multiplexed_model_id": "tiny-c"},
    )
    assert r.status_code == 200, r.text
    texts["tiny-c"] = r.json()[0]
    assert {m: t["model_name"] for m, t in texts.items()} == {m: m for m in texts}
    assert len({t["completion"] for t in texts.values()}) == 3  # three different models
    after = client.get("/stats").json()["generator"]
    assert after["evictions"] - before["evictions"] >= 1
    assert sorted(after["resident_models"]) == ["tiny-b", "tiny-c"]  # LRU, 2 per replica
    # back to tiny-a (a new prompt, so the cache cannot answer): it is loaded again
    generate(client, prompts=[unique("switch back")], model="tiny-a", max_new_tokens=8)
    again = client.get("/stats").json()["generator"]
    assert again["loads"]["tiny-a"] > after["loads"].get("tiny-a", 0)


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"prompts": []}, 422, "validation_error"),
        ({"prompts": ["x"] * 65}, 422, "validation_error"),
        ({"prompts": ["x"] * 33}, 400, "invalid_request"),  # limits.max_prompts_per_request
        ({"prompts": ["x"], "max_new_tokens": 1025}, 400, "invalid_request"),
        ({"prompts": [""]}, 422, "validation_error"),
        ({"prompts": ["x"], "max_new_tokens": 0}, 422, "validation_error"),
        ({"prompts": ["x"], "max_new_tokens": 10000}, 422, "validation_error"),
        ({"prompts": ["x"], "temperature": 3}, 422, "validation_error"),
        ({}, 422, "validation_error"),
        ({"prompts": ["x"], "model": "nope"}, 404, "unknown_model"),
        ({"prompts": ["I hate this"]}, 400, "forbidden_content"),
        ({"prompts": ["word " * 700]}, 400, "prompt_too_long"),
        ({"prompts": ["abc def"], "max_length": 1}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_a_json_4xx(client, body, status, error_type):
    assert_error(client.post("/generate", json=body), status, error_type)


def test_unknown_model_lists_valid_ids(client):
    error = assert_error(client.post("/generate", json={"prompts": ["x"], "model": "gpt5"}), 404)
    assert error["valid_ids"] == ["tiny-a", "tiny-b", "tiny-c"]
    assert "tiny-b" in error["message"]


def test_bad_json_is_a_400(client):
    r = client.post(
        "/generate", content=b'{"prompts": [', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_json")
    assert_error(client.get("/no-such-route"), 404)


def test_models(client):
    body = client.get("/models").json()
    assert body["default"] == "tiny-a"
    assert [m["id"] for m in body["models"]] == ["tiny-a", "tiny-b", "tiny-c"]
    for m in body["models"]:
        assert m["kind"] == "standin" and m["real_weights"] is False
        assert m["revision"].startswith("standin")
        # The kernels named per model, for this machine's CPU, e.g. "oneDNN float32 (AVX2)".
        assert m["device"] == "auto" and " float32 (" in m["kernel"], m
    assert len({m["revision"] for m in body["models"]}) == 3


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["redis"] == {"status": "ok", "mode": "external", "breaker": "closed"}
    assert body["database"]["status"] == "ok"
    assert body["generator"]["status"] == "ok"


def test_stats(client):
    generate(client, prompts=[unique("stats")], max_new_tokens=2)
    body = client.get("/stats").json()
    for field in ("requests", "prompts", "generations", "records_total"):
        assert isinstance(body[field], int) and body[field] > 0, field
    assert {"hits", "misses", "hit_ratio"} <= set(body["cache"])
    assert 0.0 <= body["cache"]["hit_ratio"] <= 1.0


def test_concurrent_requests_are_batched(client):
    before = client.get("/stats").json()["generator"]

    def one(i):
        return client.post(
            "/generate", json={"prompts": [unique(f"concurrent {i}")], "max_new_tokens": 16}
        )

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
    after = client.get("/stats").json()["generator"]
    admitted = after["admitted_requests"] - before["admitted_requests"]
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert admitted == 32
    assert 1 < after["max_rows_per_step"] <= 8  # configs/tiny.yaml: max_batch_size 8
    assert steps < tokens  # requests shared forward passes


def test_a_vanishing_temperature_decodes_greedily(client):
    """Numeric edge cases are input, not an outage: 1.25e-239 once failed the sampler (500)."""
    prompt = unique("tiny temperature")
    (greedy,) = generate(client, prompts=[prompt], max_new_tokens=6, cache=False)
    (tiny,) = generate(
        client, prompts=[prompt], max_new_tokens=6, temperature=1.25e-239, cache=False
    )
    assert tiny["completion"] == greedy["completion"]


def test_a_body_over_the_cap_is_refused_before_it_is_parsed(client):
    """1 MiB by default: 20 MB used to be read and parsed whole."""
    big = b'{"prompts": ["' + b"x" * (2 << 20) + b'"]}'
    r = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    (ok,) = generate(client, prompts=[unique("small")], max_new_tokens=2)
    assert ok["usage"]["completion_tokens"] >= 1


def test_a_lone_surrogate_is_a_client_error_not_a_500(client):
    """JSON can carry `\\ud800`, which no tokenizer, database or answer can hold."""
    headers = {"content-type": "application/json"}
    r = client.post("/generate", content='{"prompts": ["a \\ud800 b"]}', headers=headers)
    error = assert_error(r, 422, "validation_error")
    assert "prompts[0]" in error["message"] and "Unicode" in error["message"]
    body = '{"model": "tiny-a", "prompt": "x", "stop": ["\\udfff"]}'
    r = client.post("/v1/completions", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    (fine,) = generate(client, prompts=[unique("héllo ☃ ünïcode")], max_new_tokens=2)
    assert "☃" in fine["prompt"]


def test_nul_is_refused_at_the_door_on_every_database(client):
    """PostgreSQL cannot store U+0000 in text, so it is refused before the model runs, on
    SQLite too: an answer never depends on the database behind the service."""
    r = client.post("/generate", json={"prompts": ["a \u0000 b"], "max_new_tokens": 2})
    error = assert_error(r, 422, "validation_error")
    assert "NUL" in error["message"]
    chat = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi\u0000"}]}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "NUL" in r.json()["error"]["message"]

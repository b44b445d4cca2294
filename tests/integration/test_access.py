"""API keys and rate limits on the real app: two keys, an admin key and a rate limit, on
PostgreSQL when TEST_POSTGRES_URL is set (SQLite otherwise), driven over HTTP and with the real
openai client. Also the bad-row case on this database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import POSTGRES_URL, ROOT, private_postgres_database, start_app, stop_app

pytestmark = pytest.mark.integration

ALICE, BOB, ADMIN = (f"sk-{who}-{uuid.uuid4().hex}" for who in ("alice", "bob", "admin"))
LIMIT = 15  # requests per minute per key: bob's tests stay under it, alice exhausts it


@pytest.fixture(scope="module")
def keyed_app(tmp_path_factory, redis_server) -> Iterator:
    env = {
        "API_KEYS": f"alice={ALICE},bob={BOB}",
        "ADMIN_API_KEYS": f"root={ADMIN}",
        "RATE_LIMIT": f"{LIMIT}/minute",
    }
    workdir = tmp_path_factory.mktemp("keyed-app")

    def run(database_url: str | None) -> Iterator:
        proc, app = start_app(
            ROOT / "configs" / "tiny.yaml", workdir, redis_server.url, database_url, env=env
        )
        try:
            yield app
        finally:
            stop_app(proc)

    if POSTGRES_URL:
        with private_postgres_database("test_keys") as url:
            yield from run(url)
    else:
        yield from run(None)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def generate(client: httpx.Client, key: str, prompt: str) -> dict:
    r = client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 3}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()[0]


def test_without_a_valid_key_only_probes_and_docs_answer(keyed_app):
    with keyed_app.client() as client:
        body = {"prompts": ["hi"], "max_new_tokens": 2}
        r = client.post("/generate", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        r = client.post("/generate", json=body, headers=auth("sk-nope"))
        assert r.status_code == 401
        r = client.post("/v1/completions", json={"model": "tiny-a", "prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/history").status_code == 401
        for path in ("/livez", "/healthz", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_the_openai_client_works_with_a_key(keyed_app):
    good = openai.OpenAI(base_url=f"{keyed_app.base_url}/v1", api_key=BOB, max_retries=0)
    done = good.completions.create(model="tiny-a", prompt="Hello", max_tokens=3)
    assert done.choices[0].text is not None
    bad = openai.OpenAI(base_url=f"{keyed_app.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-a", prompt="Hello", max_tokens=3)


def test_records_carry_the_key_name_and_keys_read_only_their_own(keyed_app):
    with keyed_app.client() as client:
        mine = generate(client, BOB, f"bob's {uuid.uuid4().hex}")
        assert mine["key_name"] == "bob"
        page = client.get("/history", params={"limit": 50}, headers=auth(BOB)).json()
        assert page["items"] and {i["key_name"] for i in page["items"]} == {"bob"}
        r = client.get(f"/history/{mine['id']}", headers=auth(ADMIN))
        assert r.status_code == 200 and r.json()["key_name"] == "bob"
        r = client.get("/history", params={"key_name": "bob"}, headers=auth(ADMIN))
        assert mine["id"] in {i["id"] for i in r.json()["items"]}
        r = client.get("/history", params={"key_name": "bob"}, headers=auth(ALICE))
        assert r.status_code == 403
        assert client.get(f"/history/{mine['id']}", headers=auth(ALICE)).status_code == 404
        feedback = {"rating": 5}
        r = client.post(f"/generations/{mine['id']}/feedback", json=feedback, headers=auth(ALICE))
        assert r.status_code == 404
        r = client.post(f"/generations/{mine['id']}/feedback", json=feedback, headers=auth(BOB))
        assert r.status_code == 200 and r.json()["feedback"]["rating"] == 5


def test_admin_routes_need_the_admin_key(keyed_app):
    with keyed_app.client() as client:
        assert client.delete("/cache", headers=auth(BOB)).status_code == 403
        assert client.delete("/cache").status_code == 401
        assert client.delete("/cache", headers=auth(ADMIN)).status_code == 200


def test_keys_never_reach_the_logs(keyed_app):
    with keyed_app.client() as client:
        generate(client, BOB, "a logged request")
    log = keyed_app.log.read_text(errors="replace")
    assert '"key": "bob"' in log  # the request log line names the key
    for secret in (ALICE, BOB, ADMIN):
        assert secret not in log


def test_a_key_over_its_rate_limit_gets_429_and_others_do_not(keyed_app):
    with keyed_app.client() as client:
        codes, limited = [], None
        for i in range(LIMIT + 2):
            r = client.post(
                "/generate",
                json={"prompts": [f"rate {i}"], "max_new_tokens": 1},
                headers=auth(ALICE),
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                limited = r
                break
        assert limited is not None, codes
        assert set(codes[:-1]) == {200} and len(codes) <= LIMIT + 1
        assert limited.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60 / LIMIT + 1
        assert limited.headers["x-ratelimit-limit"] == str(LIMIT)
        assert limited.headers["x-ratelimit-remaining"] == "0"
        ok = client.get("/v1/models", headers=auth(BOB))
        assert ok.status_code == 200
        assert int(ok.headers["x-ratelimit-remaining"]) < LIMIT


async def _mixed_batch(base_url: str, key: str) -> list[httpx.Response]:
    """40 concurrent requests, 5 of them with text the database could not store."""
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def one(i: int) -> httpx.Response:
            prompt = f"row {tag} {i}" + ("\x00 nul" if i % 8 == 3 else "")
            body = {"prompts": [prompt], "max_new_tokens": 4, "cache": False}
            headers = auth(key) if key else {}
            for _ in range(30):  # the tiny config queues 16: overflow is retried, as clients do
                r = await client.post("/generate", json=body, headers=headers)
                if r.status_code != 503 or r.json()["error"]["type"] != "overloaded":
                    return r
                await asyncio.sleep(min(2.0, float(r.headers["retry-after"])))
            return r

        return await asyncio.gather(*(one(i) for i in range(40)))


def check_bad_rows_fail_alone(base_url: str, key: str | None = None) -> None:
    for _ in range(3):
        responses = asyncio.run(_mixed_batch(base_url, key))
        bad = [r for i, r in enumerate(responses) if i % 8 == 3]
        good = [r for i, r in enumerate(responses) if i % 8 != 3]
        assert [r.status_code for r in bad] == [422] * 5
        assert all("NUL" in r.json()["error"]["message"] for r in bad)
        assert [r.status_code for r in good] == [200] * 35, [r.text for r in good][:3]
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for r in good[:5]:
                record = r.json()[0]
                stored = client.get(f"/history/{record['id']}", headers=auth(key) if key else {})
                assert stored.status_code == 200 and stored.json()["prompt"] == record["prompt"]


def test_bad_rows_fail_alone_on_this_database(keyed_app):
    check_bad_rows_fail_alone(keyed_app.base_url, ADMIN)  # admin keys are not rate limited


def test_bad_rows_fail_alone_on_sqlite(tiny_app):
    check_bad_rows_fail_alone(tiny_app.base_url)

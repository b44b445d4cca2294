"""The system of record end to end, on SQLite and (when TEST_POSTGRES_URL is set) PostgreSQL:
feedback, conditional history pages, time filters, paging while rows arrive, and zero loss when
the generator and persistence replicas are killed under load.

Each engine gets its own app (module scope), because killing replicas would disturb the session
app. Named to run before test_http_api.py, so this module's apps are gone before the session
app starts (two Ray clusters at once would crowd a 2-core machine).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from tests.conftest import (
    ROOT,
    RunningApp,
    descendant_commands,
    needs_postgres,
    private_postgres_database,
    start_app,
    stop_app,
)

pytestmark = pytest.mark.integration
APP_NAME = "gpt2-tiny"  # configs/tiny.yaml


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


RETENTION_DAYS = 30
WRITE_TIMEOUT_S = 2.0
GENERATE_TIMEOUT_S = 20.0  # a SIGKILLed generator must not hold a client longer
EXPIRED_ID = "00000000-0000-7000-8000-0000000000e1"


def seed_expired_row(database_url: str) -> None:
    """A record older than the retention age, in the database before the app starts."""
    from sqlalchemy import insert

    from serve_app.storage.store import Store
    from serve_app.storage.tables import GenerationRow

    async def seed() -> None:
        store = Store(database_url)
        await store.start()
        try:
            async with store.engine.begin() as conn:
                await conn.execute(
                    insert(GenerationRow),
                    {
                        "id": EXPIRED_ID,
                        "created_at": datetime.now(timezone.utc).replace(tzinfo=None)
                        - timedelta(days=RETENTION_DAYS + 1),
                        "prompt": "old",
                        "generated_text": "old text",
                        "model_name": "tiny-a",
                        "model_source": "standin",
                        "model_revision": "r",
                        "params": {},
                        "user_id": "retention",
                        "cached": False,
                        "prompt_tokens": 1,
                        "completion_tokens": 1,
                        "latency_ms": 1.0,
                    },
                )
        finally:
            await store.close()

    asyncio.run(seed())


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def app(request, tmp_path_factory, redis_server) -> Iterator[RunningApp]:
    """The tiny app with a retention age, on a database that already holds an expired record."""
    workdir = tmp_path_factory.mktemp(f"durability-{request.param}")
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{workdir / 'app.db'}"  # the file start_app uses
        else:
            url = stack.enter_context(private_postgres_database("test_app"))
        seed_expired_row(url)
        proc, running = start_app(
            ROOT / "configs" / "tiny.yaml",
            workdir,
            redis_server.url,
            url,
            persistence={"retention_days": RETENTION_DAYS, "write_timeout_s": WRITE_TIMEOUT_S},
            timeouts={"generate_s": GENERATE_TIMEOUT_S, "read_s": 10},
        )
        try:
            yield running
        finally:
            stop_app(proc)


@pytest.fixture(scope="module")
def client(app: RunningApp) -> Iterator[httpx.Client]:
    with app.client() as c:
        yield c


def generate(client: httpx.Client, **body) -> list[dict]:
    r = client.post("/generate", json={"max_new_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stored_texts(app: RunningApp, ids: list[str]) -> dict[str, str]:
    """generated_text by id, read from the database directly (not through the app)."""
    if app.database_url.startswith("sqlite"):
        with closing(sqlite3.connect(app.db_path)) as db:
            rows = db.execute("SELECT id, generated_text FROM generations").fetchall()
        wanted = set(ids)
        return {i: t for i, t in rows if i in wanted}
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(app.database_url)

    async def fetch() -> dict[str, str]:
        conn = await asyncpg.connect(
            host=url.host, port=url.port or 5432, user=url.username, database=url.database
        )
        try:
            rows = await conn.fetch(
                "SELECT id, generated_text FROM generations WHERE id = ANY($1::varchar[])", ids
            )
        finally:
            await conn.close()
        return {r["id"]: r["generated_text"] for r in rows}

    return asyncio.run(fetch())


def test_retention_deletes_expired_records_and_keeps_the_rest(client, app) -> None:
    (fresh,) = generate(client, prompts=[unique("keep me")])
    deadline = time.monotonic() + 30  # the replica purges in the background once it starts
    while client.get(f"/history/{EXPIRED_ID}").status_code != 404:
        assert time.monotonic() < deadline, "the expired record was not purged"
        time.sleep(0.5)
    assert stored_texts(app, [EXPIRED_ID, fresh["id"]]) == {fresh["id"]: fresh["generated_text"]}
    assert client.get("/stats").json()["persistence"]["purged"] >= 1


def test_feedback_is_stored_and_visible_on_the_record(client: httpx.Client) -> None:
    (rec,) = generate(client, prompts=[unique("rate me")])
    assert rec["feedback"] is None
    r = client.post(f"/generations/{rec['id']}/feedback", json={"rating": 4, "comment": "nice"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == rec["id"] and body["generated_text"] == rec["generated_text"]
    assert body["feedback"]["rating"] == 4 and body["feedback"]["comment"] == "nice"
    given = datetime.fromisoformat(body["feedback"]["created_at"].replace("Z", "+00:00"))
    assert given >= datetime.fromisoformat(rec["created_at"].replace("Z", "+00:00"))

    again = client.post(f"/generations/{rec['id']}/feedback", json={"rating": 2})
    assert again.status_code == 200
    seen = client.get(f"/history/{rec['id']}").json()["feedback"]
    assert (seen["rating"], seen["comment"]) == (2, None)  # replaced, comment cleared


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type"),
    [
        ("/generations/{id}/feedback", {"rating": 0}, 422, "validation_error"),
        ("/generations/{id}/feedback", {"rating": 6}, 422, "validation_error"),
        ("/generations/{id}/feedback", {"rating": "good"}, 422, "validation_error"),
        ("/generations/{id}/feedback", {"rating": True}, 422, "validation_error"),
        ("/generations/{id}/feedback", {"rating": 4.5}, 422, "validation_error"),
        ("/generations/{id}/feedback", {"rating": 3, "comment": "x" * 2001}, 422, None),
        ("/generations/{id}/feedback", {"rating": 3, "extra": 1}, 422, "validation_error"),
        ("/generations/{id}/feedback", {}, 422, "validation_error"),
        ("/generations/00000000-0000-7000-8000-000000000000/feedback", {"rating": 3}, 404, None),
        ("/generations/not-an-id/feedback", {"rating": 3}, 404, "not_found"),
    ],
)
def test_bad_feedback_is_a_json_4xx(client, path, body, status, error_type) -> None:
    if "{id}" in path:
        path = path.format(id=generate(client, prompts=[unique("bad feedback")])[0]["id"])
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if error_type:
        assert error["type"] == error_type


def test_history_pages_answer_304_until_something_on_them_changes(client) -> None:
    user = unique("etag-user")
    made = generate(client, prompts=[unique("e1"), unique("e2")], user_id=user)
    params = {"user_id": user}
    first = client.get("/history", params=params)
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")

    unchanged = client.get("/history", params=params, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b"" and unchanged.headers["etag"] == etag
    assert (
        client.get("/history", params=params, headers={"If-None-Match": '"other"'}).status_code
        == 200
    )

    # Feedback on a row of the page changes what the client would see: a new ETag.
    client.post(f"/generations/{made[0]['id']}/feedback", json={"rating": 5})
    after_feedback = client.get("/history", params=params, headers={"If-None-Match": etag})
    assert after_feedback.status_code == 200 and after_feedback.headers["etag"] != etag
    # So does a new row.
    etag = after_feedback.headers["etag"]
    generate(client, prompts=[unique("e3")], user_id=user)
    after_insert = client.get("/history", params=params, headers={"If-None-Match": etag})
    assert after_insert.status_code == 200 and len(after_insert.json()["items"]) == 3

    item = client.get(f"/history/{made[1]['id']}")
    cached = client.get(
        f"/history/{made[1]['id']}", headers={"If-None-Match": item.headers["etag"]}
    )
    assert cached.status_code == 304


def test_history_since_until(client) -> None:
    user = unique("window-user")
    early = generate(client, prompts=[unique("w1")], user_id=user)[0]
    time.sleep(0.05)
    late = generate(client, prompts=[unique("w2")], user_id=user)[0]
    cut = datetime.fromisoformat(late["created_at"].replace("Z", "+00:00"))

    def ids(**params) -> list[str]:
        r = client.get("/history", params={"user_id": user, **params})
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["items"]]

    assert ids(since=cut.isoformat()) == [late["id"]]  # inclusive
    assert ids(until=cut.isoformat()) == [early["id"]]  # exclusive
    naive_utc = cut.replace(tzinfo=None).isoformat()  # no offset: taken as UTC
    assert ids(since=naive_utc) == [late["id"]]
    assert ids(since=(cut + timedelta(hours=1)).isoformat()) == []

    bad_order = client.get(
        "/history", params={"since": cut.isoformat(), "until": early["created_at"]}
    )
    assert bad_order.status_code == 400 and bad_order.json()["error"]["type"] == "invalid_request"
    bad_date = client.get("/history", params={"since": "yesterday"})
    assert bad_date.status_code == 422


def test_paging_walks_every_row_once_while_rows_are_inserted(client, app) -> None:
    user = unique("walker")
    existing = []
    for _ in range(4):
        existing += generate(client, prompts=[unique(f"old {i}") for i in range(5)], user_id=user)
    stop = threading.Event()
    inserted: list[str] = []

    def writer() -> None:
        with app.client() as own:
            while not stop.is_set():
                inserted.extend(
                    r["id"] for r in generate(own, prompts=[unique("new")], user_id=user)
                )

    with ThreadPoolExecutor(2) as pool:
        writers = [pool.submit(writer) for _ in range(2)]
        try:
            seen, cursor, first_page = [], None, None
            while True:
                params = {"user_id": user, "limit": 3, **({"cursor": cursor} if cursor else {})}
                page = client.get("/history", params=params).json()
                first_page = first_page or [i["id"] for i in page["items"]]
                seen += [i["id"] for i in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
                time.sleep(0.1)  # rows arrive between pages
        finally:
            stop.set()
            for w in writers:
                w.result()
    assert inserted, "no rows were inserted during the walk"
    assert len(seen) == len(set(seen))  # nothing twice
    old_ids = [r["id"] for r in existing]
    assert set(old_ids) <= set(seen)  # nothing missed
    assert [i for i in seen if i in set(old_ids)] == old_ids[::-1]  # newest first
    assert set(seen[len(first_page) :]) <= set(old_ids)  # later pages never shift


def replica_pids(app: RunningApp, deployment: str) -> set[int]:
    """Replica processes of this app's cluster, found by the title Ray gives them."""
    title = f"ServeReplica:{APP_NAME}:{deployment}".encode()
    return {pid for pid, command in descendant_commands(app.pid).items() if title in command}


class Load:
    """Clients sending unique prompts back to back; keeps every answer and every failure."""

    def __init__(self, app: RunningApp, clients: int) -> None:
        self.app = app
        self.ok: list[dict] = []
        self.failed: list[tuple[int, dict]] = []
        self.slowest_s = 0.0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]

    def _run(self, k: int) -> None:
        with self.app.client() as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                prompts = [unique(f"load {k} {n} {j}") for j in range(1 + n % 3)]
                started = time.monotonic()
                r = client.post("/generate", json={"prompts": prompts, "max_new_tokens": 4})
                with self.lock:
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                    if r.status_code == 200:
                        self.ok += r.json()
                    else:
                        self.failed.append((r.status_code, r.json()))

    def ok_count(self) -> int:
        with self.lock:
            return len(self.ok)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _kill_and_wait_for_restart(app: RunningApp, load: Load, deployment: str) -> None:
    (victim,) = replica_pids(app, deployment)
    before = load.ok_count()
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: replica_pids(app, deployment) - {victim}, 90, f"a new {deployment} replica")
    _wait(lambda: load.ok_count() >= before + 20, 90, f"answers after the {deployment} restart")


def test_a_write_slower_than_write_timeout_is_a_503_not_a_hang(client, app) -> None:
    """A writer holding the SQLite file longer than `write_timeout_s` (but shorter than the
    store's 5 s busy timeout): the request gets a JSON 503 after the write timeout, and the
    service answers normally once the lock is gone."""
    if not app.database_url.startswith("sqlite"):
        pytest.skip("locks the SQLite file directly")
    generate(client, prompts=[unique("warm")])  # generator and store ready: only the write waits
    blocker = sqlite3.connect(app.db_path, timeout=10, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        r = client.post("/generate", json={"prompts": [unique("blocked")], "max_new_tokens": 3})
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert r.status_code == 503, r.text
    assert "in time" in r.json()["error"]["message"]
    assert WRITE_TIMEOUT_S <= elapsed < 4.5, elapsed  # the write timeout, not the busy timeout
    generate(client, prompts=[unique("after the lock")])


def test_zero_loss_when_replicas_are_killed_under_load(app: RunningApp) -> None:
    """Every id a client got with a 200 is in the database with the text the client got;
    every request that failed got a 5xx JSON error, none hung or was silently dropped."""
    with Load(app, clients=4) as load:
        _wait(lambda: load.ok_count() >= 20, 60, "answers before the kills")
        _kill_and_wait_for_restart(app, load, "Generator")
        _kill_and_wait_for_restart(app, load, "Persistence")
    assert not any(t.is_alive() for t in load.threads), "a client request hung"
    # No request waited past the ingress's timeouts (the generator's, then the write's).
    assert load.slowest_s < GENERATE_TIMEOUT_S + WRITE_TIMEOUT_S + 5, load.slowest_s

    for status, body in load.failed:
        assert 500 <= status < 600, (status, body)
        assert body["error"]["type"] and body["error"]["message"]
    answered = {rec["id"]: rec["generated_text"] for rec in load.ok}
    assert len(answered) == len(load.ok)  # ids are unique
    stored = stored_texts(app, list(answered))
    missing = sorted(set(answered) - set(stored))
    assert not missing, f"{len(missing)} acknowledged ids are not in the database: {missing[:5]}"
    assert stored == answered
    print(f"zero-loss: {len(answered)} answered rows stored, {len(load.failed)} requests got 5xx")

"""The system of record against real databases: a SQLite file always, PostgreSQL when
TEST_POSTGRES_URL is set (each run gets a private database, each test an empty table)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from serve_app.errors import InvalidCursorError, InvalidRequestError
from serve_app.store import (
    Base,
    Generation,
    NewGeneration,
    Store,
    StoredGeneration,
    _MonotonicUtcClock,
    decode_cursor,
    encode_cursor,
    new_id,
)

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _row(i: int, user_id: str | None = None, model: str = "gpt2") -> NewGeneration:
    return NewGeneration(
        prompt=f"prompt {i}",
        generated_text=f"text {i}",
        model_name=model,
        model_source="openai-community/gpt2",
        model_revision="607a30d",
        params={"temperature": 0.7, "max_new_tokens": 16, "i": i},
        user_id=user_id,
        cached=i % 2 == 0,
        prompt_tokens=3 + i,
        completion_tokens=16,
        latency_ms=12.5 + i,
    )


def _as_new(stored: StoredGeneration) -> NewGeneration:
    return NewGeneration(
        **{f: getattr(stored, f) for f in NewGeneration.__dataclass_fields__},
    )


async def _walk(store: Store, limit: int, **filters: str) -> list[list[StoredGeneration]]:
    """Every page of history, following next_cursor until it is None."""
    pages, cursor = [], None
    while True:
        items, cursor = await store.history(limit, cursor, **filters)
        pages.append(items)
        if cursor is None:
            return pages
        assert len(pages) <= 100, "pagination does not terminate"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres_database() -> AsyncIterator[str | None]:
    """A database of its own for this run, so parallel runs and other suites never collide."""
    if not POSTGRES_URL:
        yield None
        return
    asyncpg = pytest.importorskip("asyncpg")
    base = make_url(POSTGRES_URL)
    name = f"test_store_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(
            host=base.host,
            port=base.port or 5432,
            user=base.username,
            password=base.password,
            database=base.database,
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    yield base.set(database=name).render_as_string(hide_password=False)
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="TEST_POSTGRES_URL not set"),
        ),
    ]
)
async def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_database: str | None
) -> str:
    if request.param == "sqlite":
        # A missing parent directory: start() must create it.
        return f"sqlite+aiosqlite:///{tmp_path}/data/nested/generations.db"
    assert postgres_database is not None
    engine = create_async_engine(postgres_database)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    finally:
        await engine.dispose()
    return postgres_database


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = Store(store_url)
    await store.start()
    yield store
    await store.close()


async def test_insert_many_is_readable_from_a_fresh_store(store_url: str) -> None:
    rows = [_row(i, user_id="alice") for i in range(3)]
    writer = Store(store_url)
    await writer.start()
    await writer.start()  # idempotent
    stored = await writer.insert_many(rows)
    await writer.close()

    assert [_as_new(s) for s in stored] == rows
    assert len({s.id for s in stored}) == 3
    for s in stored:
        parsed = uuid.UUID(s.id)
        assert str(parsed) == s.id and parsed.version == 7
        assert s.created_at.tzinfo is not None and s.created_at.utcoffset() == timedelta(0)
        assert abs(datetime.now(timezone.utc) - s.created_at) < timedelta(minutes=5)
    assert stored[0].created_at < stored[1].created_at < stored[2].created_at

    reader = Store(store_url)
    await reader.start()
    try:
        await reader.ping()
        assert await reader.count() == 3
        for s in stored:
            assert await reader.get(s.id) == s  # microseconds and UTC survive the round trip
        items, cursor = await reader.history(10)
        assert items == stored[::-1] and cursor is None
    finally:
        await reader.close()


async def test_committed_rows_survive_a_killed_process(store_url: str) -> None:
    """insert_many returns only after commit: a writer dying right after still leaves the row."""
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from serve_app.store import NewGeneration, Store

async def main():
    store = Store({store_url!r})
    await store.start()
    [row] = await store.insert_many([NewGeneration(**{_row(7).__dict__!r})])
    print(row.id, flush=True)
    os._exit(0)  # no close(), no interpreter shutdown

asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    row_id = out.decode().strip()

    store = Store(store_url)
    await store.start()
    try:
        got = await store.get(row_id)
    finally:
        await store.close()
    assert got is not None and _as_new(got) == _row(7)


async def test_sqlite_connections_use_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "generations.db"
    store = Store(f"sqlite+aiosqlite:///{path}")
    await store.start()
    try:
        async with store.engine.connect() as conn:
            pragma = {
                name: (await conn.execute(text(f"PRAGMA {name}"))).scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
    finally:
        await store.close()
    assert pragma == {
        "journal_mode": "wal",
        "synchronous": 2,
        "busy_timeout": 5000,
        "foreign_keys": 1,
    }
    # WAL is a property of the file itself: any other reader sees it too.
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_relative_url_creates_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store("sqlite+aiosqlite:///var/db/generations.db")
    await store.start()
    try:
        [row] = await store.insert_many([_row(1)])
    finally:
        await store.close()
    with closing(sqlite3.connect(tmp_path / "var" / "db" / "generations.db")) as raw:
        assert raw.execute("SELECT id FROM generations").fetchall() == [(row.id,)]


async def test_history_is_newest_first(store: Store) -> None:
    first = await store.insert_many([_row(0), _row(1)])
    second = await store.insert_many([_row(2)])
    items, cursor = await store.history(10)
    assert [s.id for s in items] == [s.id for s in (first + second)[::-1]]
    assert cursor is None


@pytest.mark.parametrize("total", [9, 10])  # 9: the last page is exactly full
async def test_pagination_walks_every_row_once(store: Store, total: int) -> None:
    stored = await store.insert_many([_row(i) for i in range(total)])
    pages = await _walk(store, 3)
    assert [len(p) for p in pages] == [3, 3, 3] + ([1] if total == 10 else [])
    assert [s.id for p in pages for s in p] == [s.id for s in stored[::-1]]


async def test_pagination_orders_equal_timestamps_by_id(store: Store) -> None:
    """Rows from other processes can share a created_at; the id must break the tie."""
    tied_at = datetime(2024, 5, 1, 12, 0, 0, 123456)
    tied = [{"id": new_id(), "created_at": tied_at, **_row(i).__dict__} for i in range(7)]
    older = {"id": new_id(), "created_at": tied_at - timedelta(microseconds=1), **_row(9).__dict__}
    async with store.engine.begin() as conn:
        await conn.execute(insert(Generation), [*tied, older])
    newer = await store.insert_many([_row(10)])

    walked = [s.id for p in await _walk(store, 2) for s in p]
    tied_ids = sorted((r["id"] for r in tied), reverse=True)
    assert walked == [newer[0].id, *tied_ids, older["id"]]


@pytest.mark.parametrize(
    "filters",
    [{"user_id": "alice"}, {"model": "distilgpt2"}, {"user_id": "alice", "model": "distilgpt2"}],
)
async def test_filters_page_through_matching_rows_only(store: Store, filters: dict) -> None:
    users, models = ["alice", "bob", None], ["gpt2", "distilgpt2"]
    stored = await store.insert_many([_row(i, users[i % 3], models[i % 2]) for i in range(24)])
    expected = [
        s.id
        for s in stored[::-1]
        if s.user_id == filters.get("user_id", s.user_id)
        and s.model_name == filters.get("model", s.model_name)
    ]
    assert len(expected) >= 4  # at least two pages of two
    pages = await _walk(store, 2, **filters)
    assert [s.id for p in pages for s in p] == expected
    assert all(len(p) == 2 for p in pages[:-1])


def _forge(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()


async def test_bad_cursors_are_client_errors(store: Store) -> None:
    await store.insert_many([_row(i) for i in range(3)])
    _, good = await store.history(1)
    assert good is not None
    at, row_id = decode_cursor(good)
    assert encode_cursor(at, row_id) == good
    bad = [
        "",
        "not a cursor!",
        "Zm9v",  # base64 of "foo"
        good[:-5],  # truncated
        good + "A",  # extended
        good + "==",  # padded
        "A" * 10_000,
        _forge(f"{at.isoformat()},{row_id}"),  # +00:00 instead of Z
        _forge(f"{at.replace(tzinfo=None).isoformat(timespec='microseconds')}Z,{'x' * 36}"),
        _forge(f"2024-13-45T00:00:00.000000Z,{row_id}"),
        _forge(f"{at.replace(tzinfo=None).isoformat(timespec='microseconds')}Z,{row_id.upper()}"),
        "\u00e9" * 8,
    ]
    for cursor in bad:
        with pytest.raises(InvalidCursorError):
            await store.history(1, cursor)
    with pytest.raises(InvalidRequestError):
        await store.history(0)


async def test_get_unknown_id_is_none(store: Store) -> None:
    await store.insert_many([_row(1)])
    assert await store.get(new_id()) is None
    assert await store.get("not-an-id") is None


async def test_pagination_is_stable_while_rows_arrive(store: Store) -> None:
    existing = await store.insert_many([_row(i) for i in range(10)])
    seen: list[str] = []
    items, cursor = await store.history(3)
    seen += [s.id for s in items]
    while cursor is not None:
        await store.insert_many([_row(100), _row(101)])
        items, cursor = await store.history(3, cursor)
        seen += [s.id for s in items]
    assert seen == [s.id for s in existing[::-1]]
    assert await store.count() == 10 + 2 * 3


async def test_concurrent_group_commits_all_land(store: Store) -> None:
    batches = await asyncio.gather(
        *(store.insert_many([_row(task * 10 + i) for i in range(5)]) for task in range(20))
    )
    stored = [s for batch in batches for s in batch]
    assert await store.count() == 100
    assert len({s.id for s in stored}) == 100
    assert len({s.created_at for s in stored}) == 100  # the clock never repeats in a process
    walked = [s.id for p in await _walk(store, 40) for s in p]
    assert sorted(walked) == sorted(s.id for s in stored)


def test_created_at_clock_is_strictly_increasing() -> None:
    """Calls within one microsecond, or after the wall clock steps back, still move forward."""
    t0 = datetime(2024, 5, 1, 12, 0, 0)
    readings = iter([t0, t0, t0 - timedelta(seconds=2), t0 + timedelta(seconds=1)])
    clock = _MonotonicUtcClock(wall_clock=lambda: next(readings))
    one = timedelta(microseconds=1)
    assert [clock.now() for _ in range(4)] == [
        t0,
        t0 + one,
        t0 + 2 * one,
        t0 + timedelta(seconds=1),
    ]


async def test_to_dict_is_json_ready(store: Store) -> None:
    [row] = await store.insert_many([_row(4, user_id="carol")])
    data = json.loads(json.dumps(row.to_dict()))
    assert data["id"] == row.id and data["params"] == _row(4).params
    assert data["created_at"].endswith(("Z", "+00:00"))
    stamp = data["created_at"].replace("Z", "+00:00")
    assert datetime.fromisoformat(stamp) == row.created_at

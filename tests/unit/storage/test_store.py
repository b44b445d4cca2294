"""The system of record against real databases: a SQLite file always, PostgreSQL when
TEST_POSTGRES_URL is set (fixtures in tests/unit/conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import sys
import uuid
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url

from serve_app.domain import Generation, new_id
from serve_app.errors import InvalidCursorError, InvalidRequestError
from serve_app.http.schemas import GenerationRecord
from serve_app.storage.store import Store, decode_cursor, encode_cursor
from serve_app.storage.tables import GenerationRow, MonotonicUtcClock, to_values
from tests.unit.storage.rows import make_row

REPO_ROOT = Path(__file__).resolve().parents[3]
_row = make_row


def _as_new(stored: Generation) -> Generation:
    """The record as it was handed to the store, before it assigned id and created_at."""
    return stored.replace(id=None, created_at=None)


async def _walk(store: Store, limit: int, **filters: str) -> list[list[Generation]]:
    """Every page of history, following next_cursor until it is None."""
    pages, cursor = [], None
    while True:
        items, cursor = await store.history(limit, cursor, **filters)
        pages.append(items)
        if cursor is None:
            return pages
        assert len(pages) <= 100, "pagination does not terminate"


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
from serve_app.domain import Generation, new_id
from serve_app.http.schemas import GenerationRecord
from serve_app.storage.store import Store

async def main():
    store = Store({store_url!r})
    await store.start()
    [row] = await store.insert_many([Generation(**{_row(7).__dict__!r})])
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
    tied = [to_values(_row(i), new_id(), tied_at) for i in range(7)]
    older = to_values(_row(9), new_id(), tied_at - timedelta(microseconds=1))
    async with store.engine.begin() as conn:
        await conn.execute(insert(GenerationRow), [*tied, older])
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
        and s.model == filters.get("model", s.model)
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
    clock = MonotonicUtcClock(wall_clock=lambda: next(readings))
    one = timedelta(microseconds=1)
    assert [clock.now() for _ in range(4)] == [
        t0,
        t0 + one,
        t0 + 2 * one,
        t0 + timedelta(seconds=1),
    ]


async def test_a_stored_record_maps_to_the_wire(store: Store) -> None:
    [row] = await store.insert_many([_row(4, user_id="carol")])
    data = json.loads(GenerationRecord.from_generation(row).model_dump_json())
    assert data["id"] == row.id and data["user_id"] == "carol"
    assert data["generated_text"] == row.prompt + row.completion
    assert data["created_at"].endswith("Z")
    stamp = data["created_at"].replace("Z", "+00:00")
    assert datetime.fromisoformat(stamp) == row.created_at


async def test_schema_is_migrated_to_head_and_matches_the_models(store: Store) -> None:
    """The Alembic scripts and the ORM models describe the same tables, indexes and types."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from serve_app.storage.migrations import current_revision, head_revision
    from serve_app.storage.tables import Base

    def inspect_schema(conn):
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
        return current_revision(conn), diff

    async with store.engine.connect() as conn:
        revision, diff = await conn.run_sync(inspect_schema)
    assert revision == head_revision() == store.schema_revision
    assert diff == []


async def test_a_database_from_before_migrations_keeps_its_rows(store_url: str) -> None:
    """Tables made by create_all (no alembic_version) are stamped as the baseline and upgraded."""
    from alembic import command
    from sqlalchemy.ext.asyncio import create_async_engine

    from serve_app.storage.migrations import BASELINE, alembic_config, head_revision

    if store_url.startswith("sqlite"):
        Path(make_url(store_url).database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(store_url)
    legacy = to_values(_row(1), new_id(), datetime(2024, 1, 2, 3, 4, 5))
    for later in ("finish_reason", "messages", "ttft_ms", "metadata", "key_name"):  # later ones
        del legacy[later]

    def make_legacy(conn):
        command.upgrade(alembic_config(conn), BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(insert(GenerationRow.__table__).values(**legacy))

    try:
        async with engine.begin() as conn:
            await conn.run_sync(make_legacy)
    finally:
        await engine.dispose()

    store = Store(store_url)
    await store.start()
    try:
        assert store.schema_revision == head_revision() != BASELINE
        got = await store.get(legacy["id"])
        assert got is not None and _as_new(got) == _row(1) and got.feedback is None
        assert got.finish_reason is None  # not recorded before revision 0004
        assert await store.set_feedback(legacy["id"], 4) is not None  # the new column works
    finally:
        await store.close()


async def test_since_and_until_bound_the_history(store: Store) -> None:
    base = datetime(2024, 5, 1, 12, 0, 0)
    rows = [to_values(_row(i, "dana"), new_id(), base + timedelta(minutes=i)) for i in range(6)]
    async with store.engine.begin() as conn:
        await conn.execute(insert(GenerationRow), rows)
    since, until = base + timedelta(minutes=1), base + timedelta(minutes=4)  # [1, 4)
    pages = await _walk(store, 2, user_id="dana", since=since, until=until)
    assert [s.id for p in pages for s in p] == [rows[i]["id"] for i in (3, 2, 1)]
    aware = since.replace(tzinfo=timezone.utc)  # aware datetimes mean the same instants
    items, _ = await store.history(10, since=aware)
    assert [s.id for s in items] == [rows[i]["id"] for i in (5, 4, 3, 2, 1)]
    items, _ = await store.history(10, until=base)
    assert items == []
    with pytest.raises(InvalidRequestError):
        await store.history(10, since=until, until=since)


async def test_finish_reason_is_stored_and_read_back(store: Store) -> None:
    stopped, cut = await store.insert_many(
        [_row(1).replace(finish_reason="stop"), _row(2).replace(finish_reason="length")]
    )
    assert (await store.get(stopped.id)).finish_reason == "stop"
    assert (await store.get(cut.id)).finish_reason == "length"
    items, _ = await store.history(10)
    assert {g.id: g.finish_reason for g in items} == {stopped.id: "stop", cut.id: "length"}
    assert GenerationRecord.from_generation(items[0]).finish_reason == "length"


async def test_feedback_is_stored_replaced_and_visible(store: Store) -> None:
    [row, other] = await store.insert_many([_row(1), _row(2)])
    first = await store.set_feedback(row.id, 2, "meh")
    assert first is not None
    assert first.feedback is not None
    assert (first.feedback.rating, first.feedback.comment) == (2, "meh")
    assert first.feedback.created_at >= row.created_at
    second = await store.set_feedback(row.id, 5)
    assert second is not None and second.feedback is not None
    assert (second.feedback.rating, second.feedback.comment) == (5, None)
    assert await store.get(row.id) == second
    items, _ = await store.history(10)
    assert {s.id: s.feedback and s.feedback.rating for s in items} == {row.id: 5, other.id: None}
    wire = GenerationRecord.from_generation(second).model_dump()
    assert wire["feedback"]["created_at"].endswith("Z")
    assert await store.set_feedback(new_id(), 3) is None
    for rating in (0, 6):
        with pytest.raises(InvalidRequestError):
            await store.set_feedback(row.id, rating)
    assert (await store.get(row.id)) == second


async def test_purge_deletes_only_older_rows_in_chunks(store: Store) -> None:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    old = [to_values(_row(i), new_id(), now - timedelta(days=40, minutes=i)) for i in range(7)]
    async with store.engine.begin() as conn:
        await conn.execute(insert(GenerationRow), old)
    fresh = await store.insert_many([_row(100), _row(101)])
    assert await store.purge(now - timedelta(days=30), chunk_rows=3) == 7
    assert await store.count() == 2
    assert {s.id for s in (await store.history(10))[0]} == {s.id for s in fresh}
    assert await store.purge(now - timedelta(days=30)) == 0


async def test_pagination_walks_every_row_once_under_concurrent_inserts(store: Store) -> None:
    """A walker and writers at the same time: every row older than the walk's first page is
    seen exactly once, and rows inserted meanwhile never shift the pages."""
    existing = await store.insert_many([_row(i, "walker") for i in range(40)])
    stop = asyncio.Event()

    async def writer(k: int) -> int:
        n = 0
        while not stop.is_set():
            await store.insert_many([_row(1000 + k, "walker"), _row(2000 + k, "walker")])
            n += 2
            await asyncio.sleep(0)
        return n

    writers = [asyncio.create_task(writer(k)) for k in range(3)]
    try:
        seen: list[str] = []
        items, cursor = await store.history(7, user_id="walker")
        first_page_ids = [s.id for s in items]
        seen += first_page_ids
        while cursor is not None:
            await asyncio.sleep(0.005)  # let the writers commit between pages
            items, cursor = await store.history(7, cursor, user_id="walker")
            seen += [s.id for s in items]
    finally:
        stop.set()
        inserted = sum(await asyncio.gather(*writers))
    assert inserted > 0
    assert len(seen) == len(set(seen))
    existing_ids = [s.id for s in existing[::-1]]
    assert [i for i in seen if i in set(existing_ids)] == existing_ids  # each once, in order
    # Rows inserted during the walk are newer than any cursor: only the first page can hold them.
    assert set(seen[len(first_page_ids) :]) <= set(existing_ids)

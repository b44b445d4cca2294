"""The system of record for generations: one table, written in group commits, read newest first.

Plain async SQLAlchemy with no Ray import, so the Persistence deployment stays a thin wrapper and
this module is tested against a real SQLite file (and PostgreSQL) in milliseconds.

History is paged by keyset on `(created_at, id)`, never OFFSET: a page costs the same however
deep the client has walked, and rows inserted while a client pages never shift or repeat rows.

`Store.start()` applies the Alembic scripts in `storage.migrations`, which own the schema.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, event, func, insert, or_, select, text, true, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from serve_app.domain import Generation, new_id
from serve_app.errors import InvalidCursorError, InvalidRequestError
from serve_app.storage.migrations import upgrade_to_head
from serve_app.storage.tables import (
    GenerationRow,
    MonotonicUtcClock,
    from_row,
    iso_z,
    naive_utc,
    to_values,
)

_clock = MonotonicUtcClock()

_CURSOR_MAX_LEN = 128  # a real cursor is ~86 characters


def encode_cursor(created_at: datetime, generation_id: str) -> str:
    """Opaque, url-safe position after the row (created_at, generation_id)."""
    payload = f"{iso_z(created_at)},{generation_id}".encode("ascii")
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of `encode_cursor`: (aware UTC created_at, id); anything else is a client error.

    Only canonical cursors this module could have produced are accepted (re-encoding must give
    the same string), so a truncated or edited cursor is a 400, never a 500 or a wrong page.
    The cursor is not signed: a well-formed forged one only names another position to page from,
    and the query's filters still apply.
    """
    error = InvalidCursorError("Invalid pagination cursor: pass back next_cursor unchanged.")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= _CURSOR_MAX_LEN:
        raise error
    try:
        raw = base64.b64decode(
            cursor.replace("-", "+").replace("_", "/") + "=" * (-len(cursor) % 4), validate=True
        ).decode("ascii")
        stamp, sep, generation_id = raw.partition(",")
        if not sep or not stamp.endswith("Z"):
            raise error
        created_at = datetime.fromisoformat(stamp[:-1]).replace(tzinfo=timezone.utc)
        canonical_id = str(uuid.UUID(generation_id))
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise error from exc
    if canonical_id != generation_id or encode_cursor(created_at, generation_id) != cursor:
        raise error
    return created_at, generation_id


def _filtered(
    stmt,
    user_id: str | None,
    model: str | None,
    metadata: dict[str, str] | None,
    key_name: str | None = None,
):
    if key_name is not None:
        stmt = stmt.where(GenerationRow.key_name == key_name)
    if user_id is not None:
        stmt = stmt.where(GenerationRow.user_id == user_id)
    if model is not None:
        stmt = stmt.where(GenerationRow.model_name == model)
    for key, value in (metadata or {}).items():  # JSON_EXTRACT on SQLite, ->> on PostgreSQL
        stmt = stmt.where(GenerationRow.metadata_[key].as_string() == value)
    return stmt


# Order matters: busy_timeout first so the switch to WAL waits for another writer instead of
# failing. synchronous=FULL fsyncs the WAL on every commit, so a row whose insert_many returned
# survives a power loss or OS crash; NORMAL (the usual WAL pairing) can lose the last commits
# there. Group commit amortises the extra fsync over every row in the batch.
_SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout=5000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)


def _set_sqlite_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


class Store:
    """Async access to the generations table on any SQLAlchemy async URL (SQLite or PostgreSQL).

    One instance per process owns one engine and its connection pool; `start()` must be awaited
    before use; `close()` releases the pool.
    """

    def __init__(self, url: str) -> None:
        self._url = make_url(url)
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker | None = None
        self._start_lock = asyncio.Lock()
        self.schema_revision: str | None = None

    @property
    def engine(self) -> AsyncEngine:
        """The running engine, for diagnostics (pool status, PRAGMA checks)."""
        if self._engine is None:
            raise RuntimeError("Store.start() has not been awaited")
        return self._engine

    @property
    def _is_sqlite(self) -> bool:
        return self._url.get_backend_name() == "sqlite"

    async def start(self) -> None:
        """Create the engine and migrate the schema to the newest revision; again is a no-op."""
        async with self._start_lock:
            if self._engine is not None:
                return
            if self._is_sqlite:
                database = self._url.database
                if database and database != ":memory:" and not database.startswith("file:"):
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                engine = create_async_engine(self._url)
                event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
            else:
                engine = create_async_engine(self._url, pool_pre_ping=True)
            try:
                self.schema_revision = await self._migrate(engine)
            except BaseException:
                await engine.dispose()
                raise
            self._engine = engine
            self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @staticmethod
    async def _migrate(engine: AsyncEngine) -> str:
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(upgrade_to_head)
        except DBAPIError:
            # On SQLite, two processes starting together (a replica and `python -m serve_app.storage
            # upgrade`) can both see "no table" and both CREATE; the loser fails. Its second pass
            # finds the newest revision and does nothing. PostgreSQL serialises them with a lock.
            async with engine.begin() as conn:
                return await conn.run_sync(upgrade_to_head)

    async def close(self) -> None:
        """Release the pool; safe to call twice or before start()."""
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    def _session_factory(self) -> async_sessionmaker:
        if self._sessions is None:
            raise RuntimeError("Store.start() has not been awaited")
        return self._sessions

    async def insert_many(self, records: list[Generation]) -> list[Generation]:
        """Insert all records in one transaction (group commit); returns them once committed,
        with their created_at and, unless the caller chose one (a streamed answer's id is sent
        before it is stored), a new id."""
        if not records:
            return []
        # Core insert (one executemany) skips the ORM unit of work.
        values = [to_values(record, record.id or new_id(), _clock.now()) for record in records]
        async with self.engine.begin() as conn:
            await conn.execute(insert(GenerationRow.__table__), values)
        return [
            record.replace(id=v["id"], created_at=v["created_at"].replace(tzinfo=timezone.utc))
            for record, v in zip(records, values, strict=True)
        ]

    async def get(self, id: str) -> Generation | None:
        """One row by id, or None."""
        async with self._session_factory()() as session:
            row = await session.get(GenerationRow, id)
            return None if row is None else from_row(row)

    async def history(
        self,
        limit: int,
        cursor: str | None = None,
        user_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        metadata: dict[str, str] | None = None,
        key_name: str | None = None,
    ) -> tuple[list[Generation], str | None]:
        """A page of rows, newest first, and the cursor of the next page (None on the last).

        `since` is inclusive and `until` exclusive; naive datetimes are taken as UTC. A row
        matches `metadata` when it holds every one of its pairs.
        """
        if limit < 1:
            raise InvalidRequestError("limit must be at least 1", limit=limit)
        if since is not None and until is not None and naive_utc(since) > naive_utc(until):
            raise InvalidRequestError("since must not be later than until")
        stmt = _filtered(select(GenerationRow), user_id, model, metadata, key_name)
        if since is not None:
            stmt = stmt.where(GenerationRow.created_at >= naive_utc(since))
        if until is not None:
            stmt = stmt.where(GenerationRow.created_at < naive_utc(until))
        if cursor is not None:
            after_at, after_id = decode_cursor(cursor)
            after_at = naive_utc(after_at)
            stmt = stmt.where(
                # Redundant with the OR below, but it is what lets SQLite and PostgreSQL seek
                # the (…, created_at, id) index instead of scanning it from the newest row.
                GenerationRow.created_at <= after_at,
                or_(
                    GenerationRow.created_at < after_at,
                    and_(GenerationRow.created_at == after_at, GenerationRow.id < after_id),
                ),
            )
        newest_first = (GenerationRow.created_at.desc(), GenerationRow.id.desc())
        stmt = stmt.order_by(*newest_first).limit(limit + 1)
        async with self._session_factory()() as session:
            rows = (await session.scalars(stmt)).all()
            items = [from_row(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(items[-1].created_at, items[-1].id)
        return items, next_cursor

    async def chats(
        self,
        limit: int,
        after: str | None = None,
        order: str = "asc",
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        key_name: str | None = None,
    ) -> tuple[list[Generation], bool]:
        """Stored chat completions (OpenAI's listing): oldest first (`order="asc"`) or newest
        first, after the record `after`; returns a page and whether more follow."""
        stmt = _filtered(select(GenerationRow), None, model, metadata, key_name).where(
            GenerationRow.messages.is_not(None)
        )
        async with self._session_factory()() as session:
            if after is not None:
                anchor = await session.get(GenerationRow, after)
                if anchor is None or anchor.messages is None:
                    raise InvalidRequestError(f"no chat completion {after!r}", param="after")
                at, key = anchor.created_at, anchor.id
                later = or_(
                    GenerationRow.created_at > at,
                    and_(GenerationRow.created_at == at, GenerationRow.id > key),
                )
                earlier = or_(
                    GenerationRow.created_at < at,
                    and_(GenerationRow.created_at == at, GenerationRow.id < key),
                )
                stmt = stmt.where(later if order == "asc" else earlier)
            columns = (GenerationRow.created_at, GenerationRow.id)
            ordered = columns if order == "asc" else tuple(c.desc() for c in columns)
            rows = (await session.scalars(stmt.order_by(*ordered).limit(limit + 1))).all()
            return [from_row(row) for row in rows[:limit]], len(rows) > limit

    async def set_feedback(
        self, id: str, rating: int, comment: str | None = None, key_name: str | None = None
    ) -> Generation | None:
        """Attach a 1-5 rating (and comment) to a record, replacing earlier feedback.

        Returns the updated record once committed, or None if there is no such id (or, with
        `key_name`, none that key asked for).
        """
        if not 1 <= rating <= 5:
            raise InvalidRequestError("rating must be between 1 and 5", rating=rating)
        stmt = (
            update(GenerationRow)
            .where(GenerationRow.id == id)
            .where(GenerationRow.key_name == key_name if key_name is not None else true())
            .values(feedback_rating=rating, feedback_comment=comment, feedback_at=_clock.now())
            .execution_options(synchronize_session=False)
        )
        async with self._session_factory().begin() as session:
            if (await session.execute(stmt)).rowcount == 0:
                return None
            row = await session.get(GenerationRow, id, populate_existing=True)
            return None if row is None else from_row(row)

    async def purge(self, older_than: datetime, chunk_rows: int = 5000) -> int:
        """Delete rows created before `older_than`; returns how many.

        Deletes oldest first in transactions of at most `chunk_rows`, so writers waiting on
        SQLite's single write lock are held up for one short transaction at a time.
        """
        cutoff = naive_utc(older_than)
        oldest = (
            select(GenerationRow.id)
            .where(GenerationRow.created_at < cutoff)
            .order_by(GenerationRow.created_at)
            .limit(chunk_rows)
        )
        stmt = (
            delete(GenerationRow)
            .where(GenerationRow.id.in_(oldest.scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        total = 0
        while True:
            async with self._session_factory().begin() as session:
                deleted = (await session.execute(stmt)).rowcount
            total += deleted
            if deleted < chunk_rows:
                return total

    async def count(self) -> int:
        """Number of stored generations."""
        async with self._session_factory()() as session:
            return int(await session.scalar(select(func.count()).select_from(GenerationRow)) or 0)

    async def ping(self) -> None:
        """Round-trip to the database; raises if it is unreachable (for readiness checks)."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

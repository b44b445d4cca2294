"""The system of record for generations: one table, written in group commits, read newest first.

Plain async SQLAlchemy with no Ray import, so the Persistence deployment stays a thin wrapper and
this module is tested against a real SQLite file (and PostgreSQL) in milliseconds.

History is paged by keyset on `(created_at, id)`, never OFFSET: a page costs the same however
deep the client has walked, and rows inserted while a client pages never shift or repeat rows.

The schema is owned by the Alembic scripts in `serve_app.migrations`; `Store.start()` applies
them, so the models here and the newest revision must agree (a unit test compares them).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    and_,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from serve_app.errors import InvalidCursorError, InvalidRequestError
from serve_app.migrations import upgrade_to_head

__all__ = [
    "Generation",
    "NewGeneration",
    "Receipt",
    "Store",
    "StoredGeneration",
    "decode_cursor",
    "encode_cursor",
    "new_id",
]


class Base(DeclarativeBase):
    pass


class Generation(Base):
    """One served completion, with what produced it (model, revision, params) and its cost."""

    __tablename__ = "generations"
    # The keyset-paging paths: all rows, one user's, one model's, one user's with one model.
    # Their leading columns also serve plain `user_id = ?` / `model_name = ?` lookups (and the
    # purge's `created_at < ?`), so single-column indexes would only add write cost.
    __table_args__ = (
        Index("ix_generations_created_at_id", "created_at", "id"),
        Index("ix_generations_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_generations_model_name_created_at_id", "model_name", "created_at", "id"),
        Index(
            "ix_generations_user_id_model_name_created_at_id",
            "user_id",
            "model_name",
            "created_at",
            "id",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Naive UTC: TIMESTAMP WITHOUT TIME ZONE on PostgreSQL, a fixed-width ISO string on SQLite.
    # Both keep microseconds and compare in time order.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)
    prompt: Mapped[str] = mapped_column(Text)
    generated_text: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(64))
    model_source: Mapped[str] = mapped_column(String(256))
    model_revision: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_id: Mapped[str | None] = mapped_column(String(128))
    cached: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    feedback_rating: Mapped[int | None] = mapped_column(Integer)
    feedback_comment: Mapped[str | None] = mapped_column(Text)
    feedback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=False))


@dataclass(frozen=True)
class NewGeneration:
    """What a caller hands over; the store assigns id and created_at so they are trustworthy."""

    prompt: str
    generated_text: str
    model_name: str
    model_source: str
    model_revision: str
    params: dict[str, Any]
    user_id: str | None
    cached: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


_NEW_FIELDS = tuple(f.name for f in dataclasses.fields(NewGeneration))


@dataclass(frozen=True)
class Receipt:
    """Proof that a row committed: what the store assigned to it. The writer already holds the
    rest, so only this travels back across a DeploymentHandle."""

    id: str
    created_at: datetime  # aware, UTC


@dataclass(frozen=True)
class StoredGeneration:
    """A committed row, detached from the ORM so it pickles cleanly across a DeploymentHandle."""

    id: str
    created_at: datetime  # aware, UTC
    prompt: str
    generated_text: str
    model_name: str
    model_source: str
    model_revision: str
    params: dict[str, Any]
    user_id: str | None
    cached: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    feedback_rating: int | None = None
    feedback_comment: str | None = None
    feedback_at: datetime | None = None  # aware, UTC

    @classmethod
    def committed(cls, row: NewGeneration, receipt: Receipt) -> StoredGeneration:
        """The stored form of `row`, from its receipt."""
        return cls(
            id=receipt.id,
            created_at=receipt.created_at,
            **{f: getattr(row, f) for f in _NEW_FIELDS},
        )

    def receipt(self) -> Receipt:
        return Receipt(self.id, self.created_at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; timestamps as ISO 8601 with a `Z` suffix."""
        out = dataclasses.asdict(self)
        out["created_at"] = _iso_z(self.created_at)
        out["feedback_at"] = None if self.feedback_at is None else _iso_z(self.feedback_at)
        return out


def new_id() -> str:
    """A UUIDv7 (RFC 9562) string: 48-bit Unix ms, then random bits, so ids sort by time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(uuid.uuid4().bytes, "big")  # 122 random bits; we keep 74
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def _wall_clock_utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class _MonotonicUtcClock:
    """Naive-UTC now, strictly increasing within the process even if the wall clock steps back.

    Makes ORDER BY (created_at, id) equal insertion order for one process; across processes the
    id breaks ties.
    """

    def __init__(self, wall_clock: Callable[[], datetime] = _wall_clock_utc) -> None:
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # Ray replicas may call from more than one thread
        self._last: datetime | None = None

    def now(self) -> datetime:
        now = self._wall_clock()
        with self._lock:
            if self._last is not None and now <= self._last:
                now = self._last + timedelta(microseconds=1)
            self._last = now
            return now


_clock = _MonotonicUtcClock()


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def _iso_z(value: datetime) -> str:
    return _naive_utc(value).isoformat(timespec="microseconds") + "Z"


_CURSOR_MAX_LEN = 128  # a real cursor is ~86 characters


def encode_cursor(created_at: datetime, generation_id: str) -> str:
    """Opaque, url-safe position after the row (created_at, generation_id)."""
    payload = f"{_iso_z(created_at)},{generation_id}".encode("ascii")
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


def _stored(row: Generation) -> StoredGeneration:
    return StoredGeneration(
        id=row.id,
        created_at=row.created_at.replace(tzinfo=timezone.utc),
        prompt=row.prompt,
        generated_text=row.generated_text,
        model_name=row.model_name,
        model_source=row.model_source,
        model_revision=row.model_revision,
        params=row.params,
        user_id=row.user_id,
        cached=row.cached,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        latency_ms=row.latency_ms,
        feedback_rating=row.feedback_rating,
        feedback_comment=row.feedback_comment,
        feedback_at=None
        if row.feedback_at is None
        else row.feedback_at.replace(tzinfo=timezone.utc),
    )


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
            # On SQLite, two processes starting together (a replica and `python -m serve_app.db
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

    async def insert_many(self, rows: list[NewGeneration]) -> list[StoredGeneration]:
        """Insert all rows in one transaction (group commit) and return them once committed."""
        if not rows:
            return []
        # Shallow copies: dataclasses.asdict deep-copies `params` and was half the cost of a
        # 64-row commit. Core insert (one executemany) skips the ORM unit of work.
        values = [
            {
                "id": new_id(),
                "created_at": _clock.now(),
                **{f: getattr(row, f) for f in _NEW_FIELDS},
            }
            for row in rows
        ]
        async with self.engine.begin() as conn:
            await conn.execute(insert(Generation.__table__), values)
        return [
            StoredGeneration(**{**v, "created_at": v["created_at"].replace(tzinfo=timezone.utc)})
            for v in values
        ]

    async def get(self, id: str) -> StoredGeneration | None:
        """One row by id, or None."""
        async with self._session_factory()() as session:
            row = await session.get(Generation, id)
            return None if row is None else _stored(row)

    async def history(
        self,
        limit: int,
        cursor: str | None = None,
        user_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> tuple[list[StoredGeneration], str | None]:
        """A page of rows, newest first, and the cursor of the next page (None on the last).

        `since` is inclusive and `until` exclusive; naive datetimes are taken as UTC.
        """
        if limit < 1:
            raise InvalidRequestError("limit must be at least 1", limit=limit)
        if since is not None and until is not None and _naive_utc(since) > _naive_utc(until):
            raise InvalidRequestError("since must not be later than until")
        stmt = select(Generation)
        if user_id is not None:
            stmt = stmt.where(Generation.user_id == user_id)
        if model is not None:
            stmt = stmt.where(Generation.model_name == model)
        if since is not None:
            stmt = stmt.where(Generation.created_at >= _naive_utc(since))
        if until is not None:
            stmt = stmt.where(Generation.created_at < _naive_utc(until))
        if cursor is not None:
            after_at, after_id = decode_cursor(cursor)
            after_at = _naive_utc(after_at)
            stmt = stmt.where(
                # Redundant with the OR below, but it is what lets SQLite and PostgreSQL seek
                # the (…, created_at, id) index instead of scanning it from the newest row.
                Generation.created_at <= after_at,
                or_(
                    Generation.created_at < after_at,
                    and_(Generation.created_at == after_at, Generation.id < after_id),
                ),
            )
        stmt = stmt.order_by(Generation.created_at.desc(), Generation.id.desc()).limit(limit + 1)
        async with self._session_factory()() as session:
            rows = (await session.scalars(stmt)).all()
            items = [_stored(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(items[-1].created_at, items[-1].id)
        return items, next_cursor

    async def set_feedback(
        self, id: str, rating: int, comment: str | None = None
    ) -> StoredGeneration | None:
        """Attach a 1-5 rating (and comment) to a record, replacing earlier feedback.

        Returns the updated record once committed, or None if there is no such id.
        """
        if not 1 <= rating <= 5:
            raise InvalidRequestError("rating must be between 1 and 5", rating=rating)
        stmt = (
            update(Generation)
            .where(Generation.id == id)
            .values(feedback_rating=rating, feedback_comment=comment, feedback_at=_clock.now())
            .execution_options(synchronize_session=False)
        )
        async with self._session_factory().begin() as session:
            if (await session.execute(stmt)).rowcount == 0:
                return None
            row = await session.get(Generation, id, populate_existing=True)
            return None if row is None else _stored(row)

    async def purge(self, older_than: datetime, chunk_rows: int = 5000) -> int:
        """Delete rows created before `older_than`; returns how many.

        Deletes oldest first in transactions of at most `chunk_rows`, so writers waiting on
        SQLite's single write lock are held up for one short transaction at a time.
        """
        cutoff = _naive_utc(older_than)
        oldest = (
            select(Generation.id)
            .where(Generation.created_at < cutoff)
            .order_by(Generation.created_at)
            .limit(chunk_rows)
        )
        stmt = (
            delete(Generation)
            .where(Generation.id.in_(oldest.scalar_subquery()))
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
            return int(await session.scalar(select(func.count()).select_from(Generation)) or 0)

    async def ping(self) -> None:
        """Round-trip to the database; raises if it is unreachable (for readiness checks)."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

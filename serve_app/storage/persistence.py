"""The Persistence deployment: the system of record for every answered generation.

`record()` returns only after the transaction holding the caller's rows has committed, and the
ingress answers only after `record()` returns, so a client never holds an id that is not stored.
Concurrent callers share transactions through `GroupCommitter`: one fsync per group, not per row.
It answers with receipts (id, created_at), not the rows: the caller has those already.

The schema is migrated to the newest Alembic revision when the replica starts. With
`retention_days` set, the replica deletes older records every `purge_interval_s`.

Run one replica on SQLite (one writer per file); PostgreSQL can take more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from ray import serve
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from serve_app.config import PersistenceOptions, PersistenceTuning
from serve_app.domain import Generation, Receipt
from serve_app.errors import DependencyUnavailableError, RecordRefusedError
from serve_app.storage.group_commit import GroupCommitter
from serve_app.storage.preflight import describe_failure
from serve_app.storage.store import Store
from serve_app.telemetry.metrics import metric

logger = logging.getLogger("ray.serve").getChild(__name__)


START_TIMEOUT_S = 20.0


def _value_refused(exc: DBAPIError) -> bool:
    """The database refused a value or a constraint (SQLSTATE classes 22 and 23), as opposed
    to failing as a whole. The asyncpg adapter raises a plain DBAPIError, so the SQLSTATE
    decides, where the driver gives one."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    code = code or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return isinstance(code, str) and code[:2] in ("22", "23")


def _refused(exc: Exception) -> bool:
    return isinstance(exc, RecordRefusedError)


@asynccontextmanager
async def _database_errors(action: str) -> AsyncIterator[None]:
    """A failing database is the caller's 503, a refused value a 422; the reason goes to the
    replica's log only."""
    try:
        yield
    except DBAPIError as exc:
        if not _value_refused(exc):
            logger.warning("database error while %s: %r", action, exc)
            raise DependencyUnavailableError(f"the database failed while {action}") from None
        logger.warning("database refused a value while %s: %r", action, exc)
        raise RecordRefusedError(f"the database refused the record while {action}") from None
    except OSError as exc:
        logger.warning("database error while %s: %r", action, exc)
        raise DependencyUnavailableError(f"the database failed while {action}") from None


@serve.deployment
class Persistence:
    async def __init__(self, database_url: str, options: PersistenceOptions | None = None) -> None:
        self.options = options or PersistenceOptions()
        self.store = Store(database_url)
        tuning = PersistenceTuning()
        # Each row is a call of its own: when the database refuses one row of a group, the
        # others are written again without it and only that row's request fails.
        self.committer: GroupCommitter[Generation, Generation] = GroupCommitter(
            self._insert,
            max_rows=tuning.max_rows_per_commit,
            group=tuning.group_commit,
            isolate_failures=_refused,
        )
        self._started = asyncio.Lock()
        self._ready = False
        self.purged = 0
        await self._start(database_url)
        self._retention: asyncio.Task[None] | None = None
        if self.options.retention_days is not None:
            self._retention = asyncio.get_running_loop().create_task(self._retention_loop())

    async def _start(self, database_url: str) -> None:
        """Connect and migrate, or stop the replica with one line naming the problem (a
        driver missing, a server that does not answer, a file that cannot be written): an
        app that came up green and answered every request 503 would hide it."""
        try:
            await asyncio.wait_for(self.store.start(), START_TIMEOUT_S)
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                exc = TimeoutError(f"no answer within {START_TIMEOUT_S:g} s")
            line = describe_failure(database_url, exc)
            logger.error(line)
            raise RuntimeError(line) from None
        self._ready = True
        logger.info("database schema at revision %s", self.store.schema_revision)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        tuning = PersistenceTuning.model_validate(user_config)
        self.committer.configure(tuning.max_rows_per_commit, tuning.group_commit)

    async def _store(self) -> Store:
        if not self._ready:
            async with self._started:
                if not self._ready:
                    async with _database_errors("migrating the schema"):
                        await self.store.start()
                    logger.info("database schema at revision %s", self.store.schema_revision)
                    self._ready = True
        return self.store

    async def _insert(self, rows: list[Generation]) -> list[Generation]:
        store = await self._store()
        started = time.perf_counter()
        try:
            async with _database_errors("storing records"):
                stored = await store.insert_many(rows)
        except Exception:
            metric("gpt2serve_persistence_write_errors").inc()
            raise
        metric("gpt2serve_persistence_commit_seconds").observe(time.perf_counter() - started)
        metric("gpt2serve_persistence_rows_per_commit").observe(len(rows))
        return stored

    async def record(self, rows: list[Generation]) -> list[Receipt | RecordRefusedError]:
        """Store `rows`; returns one outcome per row, in order, once they have committed: a
        receipt, or the error of a row the database refused (the others still commit). A
        database that fails as a whole fails the call (503)."""
        outcomes = await asyncio.gather(
            *(self.committer.submit([row]) for row in rows), return_exceptions=True
        )
        answer: list[Receipt | RecordRefusedError] = []
        for outcome in outcomes:
            if isinstance(outcome, RecordRefusedError):
                answer.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                answer.append(Receipt(outcome[0].id, outcome[0].created_at))
        return answer

    async def get(self, generation_id: str) -> Generation | None:
        store = await self._store()
        async with _database_errors("reading a record"):
            return await store.get(generation_id)

    async def history(
        self, limit: int, cursor: str | None = None, **filters: Any
    ) -> tuple[list[Generation], str | None]:
        """A page of history: `Store.history`'s arguments."""
        store = await self._store()
        async with _database_errors("reading history"):
            return await store.history(limit, cursor, **filters)

    async def chats(self, limit: int, **query: Any) -> tuple[list[Generation], bool]:
        """Stored chat completions: `Store.chats`'s arguments."""
        store = await self._store()
        async with _database_errors("listing chat completions"):
            return await store.chats(limit, **query)

    async def set_feedback(
        self, generation_id: str, rating: int, comment: str | None, key_name: str | None = None
    ) -> Generation | None:
        store = await self._store()
        async with _database_errors("storing feedback"):
            return await store.set_feedback(generation_id, rating, comment, key_name)

    async def purge(self, older_than: datetime) -> int:
        store = await self._store()
        async with _database_errors("purging old records"):
            deleted = await store.purge(older_than)
        self.purged += deleted
        return deleted

    async def _retention_loop(self) -> None:
        max_age = timedelta(days=self.options.retention_days or 0)
        while True:
            try:
                deleted = await self.purge(datetime.now(timezone.utc) - max_age)
                if deleted:
                    logger.info("retention: deleted %d records older than %s", deleted, max_age)
            except Exception as exc:
                logger.warning(
                    "retention purge failed, next try in %ss: %r",
                    self.options.purge_interval_s,
                    exc,
                )
            await asyncio.sleep(self.options.purge_interval_s)

    async def count(self) -> int:
        store = await self._store()
        async with _database_errors("counting records"):
            return await store.count()

    async def stats(self) -> dict[str, Any]:
        return {
            **self.committer.stats(),
            "purged": self.purged,
            "retention_days": self.options.retention_days,
        }

    async def health(self) -> dict[str, Any]:
        store = await self._store()
        async with _database_errors("checking health"):
            await store.ping()
        return {
            "status": "ok",
            "backend": store.engine.dialect.name,
            "schema_revision": store.schema_revision,
        }

"""The Persistence deployment: the system of record for every answered generation.

It owns the async SQLAlchemy engine. Concurrent `record()` calls are gathered by `@serve.batch`
into one transaction (group commit): on SQLite with `synchronous=FULL` each commit is an fsync,
so throughput grows with concurrency instead of being capped by fsyncs. A caller's `record()`
returns only after the transaction holding its rows has committed.

Run one replica on SQLite (one writer per file); PostgreSQL can take more.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from serve_app.store import NewGeneration, Store, StoredGeneration

logger = logging.getLogger("ray.serve")


@serve.deployment
class Persistence:
    def __init__(self, database_url: str) -> None:
        self.store = Store(database_url)
        self._started = asyncio.Lock()
        self._ready = False

    async def _store(self) -> Store:
        if not self._ready:
            async with self._started:
                if not self._ready:
                    await self.store.start()
                    self._ready = True
        return self.store

    async def record(self, rows: list[NewGeneration]) -> list[StoredGeneration]:
        if not rows:
            return []
        return await self._record_group(rows)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _record_group(self, calls: list[list[NewGeneration]]) -> list[list[StoredGeneration]]:
        store = await self._store()
        flat = [row for rows in calls for row in rows]
        stored = await store.insert_many(flat)  # one transaction for every caller in the group
        out: list[list[StoredGeneration]] = []
        offset = 0
        for rows in calls:
            out.append(stored[offset : offset + len(rows)])
            offset += len(rows)
        return out

    async def get(self, generation_id: str) -> StoredGeneration | None:
        return await (await self._store()).get(generation_id)

    async def history(
        self,
        limit: int,
        cursor: str | None = None,
        user_id: str | None = None,
        model: str | None = None,
    ) -> tuple[list[StoredGeneration], str | None]:
        store = await self._store()
        return await store.history(limit=limit, cursor=cursor, user_id=user_id, model=model)

    async def count(self) -> int:
        return await (await self._store()).count()

    async def health(self) -> dict[str, Any]:
        store = await self._store()
        await store.ping()
        return {"status": "ok", "backend": store.engine.dialect.name}

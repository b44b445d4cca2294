"""Database fixtures for the persistence tests: a real SQLite file always, and PostgreSQL too
when TEST_POSTGRES_URL is set (a private database per run, an empty schema per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from serve_app.storage.store import Store
from tests.conftest import POSTGRES_URL, needs_postgres, private_postgres_database


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str | None]:
    if not POSTGRES_URL:
        yield None
        return
    pytest.importorskip("asyncpg")
    with private_postgres_database("test_store") as url:
        yield url


async def reset_postgres(url: str) -> None:
    """Drop every table, the migration record included, so the next start migrates afresh."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE IF EXISTS generations, alembic_version"))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
async def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_database: str | None
) -> str:
    if request.param == "sqlite":
        # A missing parent directory: start() must create it.
        return f"sqlite+aiosqlite:///{tmp_path}/data/nested/generations.db"
    assert postgres_database is not None
    await reset_postgres(postgres_database)
    return postgres_database


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = Store(store_url)
    await store.start()
    yield store
    await store.close()

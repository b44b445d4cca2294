"""Fail fast at start: a database URL the service cannot use stops the deploy with one line
that names the problem, instead of an app that comes up green and answers every request 503.

`check_database` runs where the app is built, so a failure leaves the application
DEPLOY_FAILED with that line (`serve status`) and no replica running: the URL parses, its
driver is installed, a SQLite file's directory can be written, a server answers. A Persistence
replica that starts later and cannot connect stops the same way (`describe_failure`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError


class DatabaseConfigError(ValueError):
    """The database URL cannot work; the message is the one line an operator reads."""


def safe_url(url: str | URL) -> str:
    """The URL as it may be logged: never its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def check_database(url: str, timeout_s: float = 10.0) -> None:
    """`check_database_url`, then one connection to a server database."""
    check_database_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        try:
            asyncio.run(asyncio.wait_for(_connect(url), timeout_s))
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                exc = TimeoutError(f"no answer within {timeout_s:g} s")
            raise DatabaseConfigError(describe_failure(url, exc)) from None


async def _connect(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect():
            pass
    finally:
        await engine.dispose()


def check_database_url(url: str) -> None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseConfigError(
            "DATABASE_URL is not a database URL (expected e.g. sqlite+aiosqlite:///data/x.db "
            "or postgresql+asyncpg://user@host/db)"
        ) from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise DatabaseConfigError(
            f"DATABASE_URL {safe_url(parsed)}: no SQLAlchemy dialect {parsed.drivername!r}"
        ) from None
    if not dialect.is_async:
        raise DatabaseConfigError(
            f"DATABASE_URL {safe_url(parsed)}: driver {parsed.get_driver_name()!r} is not "
            "async; use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    try:
        dialect.import_dbapi()
    except ImportError:
        raise DatabaseConfigError(
            f"DATABASE_URL {safe_url(parsed)}: its driver {parsed.get_driver_name()!r} is not "
            f"installed (pip install {parsed.get_driver_name()})"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed)


def _check_sqlite_path(url: URL) -> None:
    database = url.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    directory = path.parent
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"cannot write in {existing}"
    elif path.exists() and not os.access(path, os.R_OK | os.W_OK):
        problem = f"cannot write {path}"
    if problem:
        raise DatabaseConfigError(f"DATABASE_URL {safe_url(url)}: SQLite file unusable: {problem}")


def describe_failure(url: str, exc: BaseException) -> str:
    """One line for a database that failed at start: the URL without its password and the
    driver's own words (its first line), never a traceback."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = reason[0] if reason else type(exc).__name__
    return f"database {safe_url(url)} is unusable at start-up: {first[:300]}"

"""Database commands for operators: migrate, show the schema revision, apply retention.

    python -m serve_app.storage upgrade         # migrate to the newest revision
    python -m serve_app.storage current         # print the revision in the database
    python -m serve_app.storage purge           # delete records older than retention_days
    python -m serve_app.storage purge --older-than-days 30   # ... or than an explicit age

The database is the one the app would use: `database_url` of the Serve config file (`--config`,
default serve_config.yaml), overridden by env DATABASE_URL like the app does, or `--database-url`.
Run it from the directory you start `serve run` in, so a relative SQLite path means the same file.
The app applies migrations itself at start-up; `upgrade` is for doing it ahead of a deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from serve_app.config import AppArgs, resolve_args
from serve_app.storage.migrations import current_revision
from serve_app.storage.store import Store


def _app_args(config: Path, app_name: str | None) -> AppArgs:
    spec = yaml.safe_load(config.read_text())
    apps = spec.get("applications", [])
    app = next((a for a in apps if app_name in (None, a.get("name"))), None)
    if app is None:
        raise SystemExit(f"{config}: no application {app_name or ''} with args")
    return resolve_args(AppArgs.model_validate(app.get("args", {})))


def _settings(ns: argparse.Namespace) -> tuple[str, AppArgs | None]:
    if ns.database_url:
        return ns.database_url, None
    args = _app_args(ns.config, ns.app)
    return args.database_url, args


async def _upgrade(url: str) -> str:
    store = Store(url)
    try:
        await store.start()  # migrates to head
        return store.schema_revision or "none"
    finally:
        await store.close()


async def _current(url: str) -> str | None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(current_revision)
    finally:
        await engine.dispose()


async def _purge(url: str, older_than: datetime) -> int:
    store = Store(url)
    try:
        await store.start()
        return await store.purge(older_than)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.storage", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--app", help="application name in the config (default: the first)")
    parser.add_argument("--database-url", help="SQLAlchemy async URL; overrides the config")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="migrate the schema to the newest revision")
    commands.add_parser("current", help="print the schema revision of the database")
    purge = commands.add_parser("purge", help="delete records older than the retention age")
    purge.add_argument(
        "--older-than-days", type=float, help="age limit; default: the config's retention_days"
    )
    ns = parser.parse_args(argv)

    url, args = _settings(ns)
    where = make_url(url).render_as_string(hide_password=True)
    try:
        return _run(parser, ns, url, where, args)
    except (DBAPIError, OSError) as exc:
        print(f"{where}: {type(exc).__name__}: {getattr(exc, 'orig', exc)}", file=sys.stderr)
        return 1


def _run(
    parser: argparse.ArgumentParser,
    ns: argparse.Namespace,
    url: str,
    where: str,
    args: AppArgs | None,
) -> int:
    if ns.command == "upgrade":
        print(f"{where}: schema at revision {asyncio.run(_upgrade(url))}")
    elif ns.command == "current":
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
            revision = None  # looking must not create the file
        else:
            revision = asyncio.run(_current(url))
        print(f"{where}: schema at revision {revision or 'none'}")
    else:
        days = ns.older_than_days
        if days is None and args is not None:
            days = args.persistence.retention_days
        if days is None or days <= 0:
            parser.error("purge needs --older-than-days > 0 or persistence.retention_days set")
        cutoff = datetime.now(timezone.utc) - timedelta(days=days)
        deleted = asyncio.run(_purge(url, cutoff))
        print(f"{where}: deleted {deleted} records created before {cutoff.isoformat()}")
    return 0

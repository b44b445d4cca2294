"""Alembic migrations of the generations schema, shipped inside the package.

Alembic is driven from code (no alembic.ini): `alembic_config()` points it at this directory, and
`upgrade_to_head()` runs on a connection the caller already holds, so the app (at start-up),
the `python -m serve_app.storage` command and the tests all migrate the same way on SQLite and
PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

__all__ = ["BASELINE", "alembic_config", "current_revision", "head_revision", "upgrade_to_head"]

SCRIPT_LOCATION = Path(__file__).resolve().parent
# The revision whose schema equals what `metadata.create_all` made before migrations existed.
BASELINE = "0001"
# Any constant: serialises migrations of replicas (or a command) starting together on PostgreSQL.
_PG_MIGRATION_LOCK = 0x67656E73  # "gens"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for this package's scripts, optionally bound to an open connection."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration scripts in {SCRIPT_LOCATION}")
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(connection: Connection) -> str:
    """Bring the schema on `connection` to the newest revision; returns it.

    A database created before migrations existed (the table but no `alembic_version`) is first
    stamped with the baseline, so its data is kept and only later revisions run.
    """
    if connection.dialect.name == "postgresql":
        # Held until the caller's transaction ends; a second starter waits, then finds head.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    config = alembic_config(connection)
    tables = set(inspect(connection).get_table_names())
    if "generations" in tables and "alembic_version" not in tables:
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    revision = current_revision(connection)
    if revision is None:
        raise RuntimeError("migration did not record a revision")
    return revision

"""Alembic environment: runs on the connection handed over in `config.attributes["connection"]`
(see `serve_app.storage.migrations.upgrade_to_head`), or emits SQL in offline mode (`--sql`)."""

from alembic import context

from serve_app.storage.tables import Base

config = context.config


def _configure(**kwargs: object) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite (copy-and-move under the hood).
    context.configure(
        target_metadata=Base.metadata, render_as_batch=True, compare_type=True, **kwargs
    )


if context.is_offline_mode():
    _configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
else:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "run migrations through `python -m serve_app.storage upgrade` (it opens the connection)"
        )
    _configure(connection=connection)

with context.begin_transaction():
    context.run_migrations()

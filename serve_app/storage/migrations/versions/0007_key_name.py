"""Keep the name of the API key that asked for each answer (never the key itself).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

With keys on, a key reads only its own records, so history is filtered by key name: indexed
like the other keyset-paging paths.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("key_name", sa.String(64), nullable=True))
    op.create_index(
        "ix_generations_key_name_created_at_id", "generations", ["key_name", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_generations_key_name_created_at_id", table_name="generations")
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("key_name")

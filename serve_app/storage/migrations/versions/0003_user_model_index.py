"""Index history filtered by user and model together.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

With only (user_id, created_at, id) and (model_name, created_at, id), a query filtering on both
left SQLite to guess; without statistics it picked the model index and scanned most of a
popular model's rows (30 ms on 1M rows). Two equality columns ahead of the keyset make the
choice unambiguous on any engine.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_generations_user_id_model_name_created_at_id",
        "generations",
        ["user_id", "model_name", "created_at", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_generations_user_id_model_name_created_at_id", table_name="generations")

"""Create the generations table and its keyset-paging indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

The schema `metadata.create_all` produced before migrations existed: such databases are stamped
with this revision, not re-created.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("generated_text", sa.Text(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_source", sa.String(length=256), nullable=False),
        sa.Column("model_revision", sa.String(length=128), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("feedback_rating", sa.Integer(), nullable=True),
        sa.Column("feedback_comment", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_generations_created_at_id", "generations", ["created_at", "id"])
    op.create_index(
        "ix_generations_user_id_created_at_id", "generations", ["user_id", "created_at", "id"]
    )
    op.create_index(
        "ix_generations_model_name_created_at_id",
        "generations",
        ["model_name", "created_at", "id"],
    )


def downgrade() -> None:
    op.drop_table("generations")

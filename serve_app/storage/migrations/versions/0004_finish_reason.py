"""Record why each generation stopped: "length" (its token budget) or "stop" (end of text).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Rows stored before this revision keep NULL: why they stopped was not recorded.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("finish_reason", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("finish_reason")

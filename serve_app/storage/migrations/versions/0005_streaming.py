"""Keep each answer's chat messages and its time to first token.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

`messages`: the chat a /v1/chat/completions prompt was rendered from (NULL otherwise).
`ttft_ms`: time from the request to the first streamed text (NULL when not streamed).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("messages", sa.JSON(), nullable=True))
    op.add_column("generations", sa.Column("ttft_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("ttft_ms")
        batch.drop_column("messages")

"""Deliveries carry the attempt that owns them, so every ledger transition is a compare-and-set.

`owner` is the token of the `deliver` attempt (workflow run, activity id, attempt number)
or of `give_up_delivery` that last took the row; `owner_attempt` orders `deliver` attempts,
so a newer attempt may take a `claimed` row over from a stalled one, never the reverse.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("owner", sa.String(300), nullable=True))
    op.add_column("deliveries", sa.Column("owner_attempt", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("deliveries", "owner_attempt")
    op.drop_column("deliveries", "owner")

"""Send slots can be released: a later round of the same delivery replaced them.

A released slot no longer counts toward the sender's or the person's caps.

Revision ID: 0007_send_slot_release
Revises: 0004_sender_breaker
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_send_slot_release"
down_revision = "0004_sender_breaker"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("send_slots", sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("send_slots", "released_at")

"""Mailbox watcher state: UIDVALIDITY/UID high-water mark, first-connect time, status.

Revision ID: 0008_mailbox_states
Revises: 0007_sender_dkim
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_mailbox_states"
down_revision = "0007_sender_dkim"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_states",
        sa.Column("sender_id", sa.BigInteger(), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("mode", sa.String(length=8), nullable=True),
        sa.Column("poll_seconds", sa.Float(), nullable=True),
        sa.Column("messages", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("resyncs", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["sender_id"], ["sender_accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sender_id"),
    )


def downgrade() -> None:
    op.drop_table("mailbox_states")

"""Sender accounts carry a circuit breaker: paused with a kind and a reason, until when.

A sender whose own credentials are refused (SMTP 535, HTTP 401), whose bounce rate passes
the threshold or that keeps being throttled (421/429) is paused instead of failing the
leads that reach it; `senders resume` (or a successful probe after `paused_until`) closes
it. `breaker_since` starts the bounce-rate window again after a resume.

Revision ID: 0004_sender_breaker
Revises: 0005_suppression_memory
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_sender_breaker"
down_revision = "0005_suppression_memory"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("sender_accounts", sa.Column("paused_at", TZ, nullable=True))
    op.add_column("sender_accounts", sa.Column("paused_kind", sa.String(16), nullable=True))
    op.add_column("sender_accounts", sa.Column("paused_reason", sa.Text(), nullable=True))
    op.add_column("sender_accounts", sa.Column("paused_until", TZ, nullable=True))
    op.add_column("sender_accounts", sa.Column("breaker_since", TZ, nullable=True))
    op.add_column("sender_accounts", sa.Column("throttle_strikes", sa.Integer(), nullable=False, server_default="0"))
    op.create_check_constraint(
        "ck_sender_accounts_paused_kind",
        "sender_accounts",
        "paused_kind IS NULL OR paused_kind IN ('manual','auth','bounce_rate','throttle')",
    )
    op.create_index("ix_deliveries_sender_id", "deliveries", ["sender_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_sender_id", table_name="deliveries")
    op.drop_constraint("ck_sender_accounts_paused_kind", "sender_accounts", type_="check")
    for column in ("throttle_strikes", "breaker_since", "paused_until", "paused_reason", "paused_kind", "paused_at"):
        op.drop_column("sender_accounts", column)

"""Provider webhooks: replay tokens (Mailgun signs a token, not the body) and matching
events to deliveries by the provider's message id.

Revision ID: 0004_provider_webhooks
Revises: 0003_sender_connections
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_provider_webhooks"
down_revision = "0003_sender_connections"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_tokens",
        sa.Column("provider", sa.String(32), primary_key=True),
        sa.Column("token", sa.String(200), primary_key=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_webhook_tokens_seen_at", "webhook_tokens", ["seen_at"])
    op.create_index("ix_deliveries_provider_message_id", "deliveries", ["provider_message_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_provider_message_id", table_name="deliveries")
    op.drop_index("ix_webhook_tokens_seen_at", table_name="webhook_tokens")
    op.drop_table("webhook_tokens")

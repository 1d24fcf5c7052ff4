"""DKIM keys on sender accounts: selector, domain and the private key (encrypted with SECRETS_KEY).

Revision ID: 0007_sender_dkim
Revises: 0007_send_slot_release
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_sender_dkim"
down_revision = "0007_send_slot_release"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sender_accounts", sa.Column("dkim_selector", sa.String(length=63), nullable=True))
    op.add_column("sender_accounts", sa.Column("dkim_domain", sa.String(length=253), nullable=True))
    op.add_column("sender_accounts", sa.Column("dkim_private_key", sa.Text(), nullable=True))
    op.create_check_constraint(
        "ck_sender_accounts_dkim_complete",
        "sender_accounts",
        "(dkim_selector IS NULL) = (dkim_private_key IS NULL)",
    )


def downgrade() -> None:
    op.drop_constraint("ck_sender_accounts_dkim_complete", "sender_accounts", type_="check")
    op.drop_column("sender_accounts", "dkim_private_key")
    op.drop_column("sender_accounts", "dkim_domain")
    op.drop_column("sender_accounts", "dkim_selector")

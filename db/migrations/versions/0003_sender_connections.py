"""Sender connections: a sender's own SMTP and IMAP settings, secrets encrypted.

One row per (sender, kind). `secret` is the password or, for XOAUTH2, the refresh
token, encrypted with SECRETS_KEY (services/secret_box.py); `oauth_client_secret` too.
`status`/`status_reason`/`status_at` hold the last check or watcher outcome (why a
mailbox cannot log in), shown by `senders list`.

Revision ID: 0003_sender_connections
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_sender_connections"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sender_connections",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("sender_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("security", sa.String(length=16), nullable=False),
        sa.Column("username", sa.String(length=320), nullable=True),
        sa.Column("auth", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("folder", sa.String(length=255), nullable=True),
        sa.Column("oauth_token_url", sa.String(length=1000), nullable=True),
        sa.Column("oauth_client_id", sa.String(length=500), nullable=True),
        sa.Column("oauth_client_secret", sa.Text(), nullable=True),
        sa.Column("oauth_scope", sa.String(length=1000), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["sender_id"], ["sender_accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sender_id", "kind", name="uq_sender_connections_sender_kind"),
        sa.CheckConstraint("kind IN ('smtp','imap')", name="ck_sender_connections_kind"),
        sa.CheckConstraint("security IN ('tls','starttls','plain')", name="ck_sender_connections_security"),
        sa.CheckConstraint("auth IN ('password','xoauth2','none')", name="ck_sender_connections_auth"),
        sa.CheckConstraint("port BETWEEN 1 AND 65535", name="ck_sender_connections_port"),
        sa.CheckConstraint(
            "auth = 'none' OR (username IS NOT NULL AND secret IS NOT NULL)", name="ck_sender_connections_login"
        ),
        sa.CheckConstraint("kind = 'smtp' OR auth <> 'none'", name="ck_sender_connections_imap_login"),
    )


def downgrade() -> None:
    op.drop_table("sender_connections")

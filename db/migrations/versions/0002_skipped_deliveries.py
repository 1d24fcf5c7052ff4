"""Deliveries may be `skipped`: the person has no identity on the step's channel.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD = "status IN ('claimed','sending','sent','failed','bounced','uncertain','suppressed')"
NEW = "status IN ('claimed','sending','sent','failed','bounced','uncertain','suppressed','skipped')"


def upgrade() -> None:
    op.drop_constraint("ck_deliveries_status", "deliveries", type_="check")
    op.create_check_constraint("ck_deliveries_status", "deliveries", NEW)


def downgrade() -> None:
    op.execute("UPDATE deliveries SET status = 'failed' WHERE status = 'skipped'")
    op.drop_constraint("ck_deliveries_status", "deliveries", type_="check")
    op.create_check_constraint("ck_deliveries_status", "deliveries", OLD)

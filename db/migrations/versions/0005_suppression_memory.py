"""Suppressions that outlive the person rows; TRUNCATE refused on the events log.

`suppressed_identities` remembers every suppressed identity by a hash of its channel and
canonical value (SHA-256 hex of "channel:value"), with no foreign key: deleting a person
(which cascades to their identities and suppressions) leaves it. Two triggers keep it
true whatever code writes:

* a new suppression remembers the identity it names, or every identity of the person;
* a new identity whose hash was suppressed before (a re-import of someone deleted) gets
  an identity suppression at once, so the import's report, the enrollment's dry run
  and the send gate all see it; so does an identity added to a suppressed person.

`events` already refused UPDATE and DELETE row by row; TRUNCATE (a statement-level
operation that row triggers do not see) is refused now too.

Revision ID: 0005_suppression_memory
Revises: 0004_provider_webhooks
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_suppression_memory"
down_revision = "0004_provider_webhooks"
branch_labels = None
depends_on = None


UPGRADE = [
    """
        CREATE FUNCTION identity_hash(channel text, value text) RETURNS text
        LANGUAGE sql IMMUTABLE STRICT AS $$
            SELECT encode(sha256(convert_to(channel || ':' || value, 'UTF8')), 'hex')
        $$;
    """,
    """
        CREATE FUNCTION suppressions_remember() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO suppressed_identities (hash, channel, reason, source)
            SELECT identity_hash(i.channel, i.value), i.channel, NEW.reason, NEW.source
            FROM identities i
            WHERE i.id = NEW.identity_id OR (NEW.identity_id IS NULL AND i.person_id = NEW.person_id)
            ON CONFLICT (hash) DO NOTHING;
            RETURN NULL;
        END $$;
    """,
    """
        CREATE TRIGGER suppressions_remember AFTER INSERT ON suppressions
        FOR EACH ROW EXECUTE FUNCTION suppressions_remember();
    """,
    """
        CREATE FUNCTION identities_suppressed_before() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            h text := identity_hash(NEW.channel, NEW.value);
            earlier record;
        BEGIN
            -- an identity added to a person who is suppressed as a whole is remembered too
            INSERT INTO suppressed_identities (hash, channel, reason, source)
            SELECT h, NEW.channel, s.reason, s.source FROM suppressions s
            WHERE s.person_id = NEW.person_id AND s.identity_id IS NULL
            ORDER BY s.id LIMIT 1
            ON CONFLICT (hash) DO NOTHING;
            SELECT reason, created_at INTO earlier FROM suppressed_identities WHERE hash = h;
            IF FOUND AND NOT EXISTS (SELECT 1 FROM suppressions WHERE identity_id = NEW.id) THEN
                INSERT INTO suppressions (identity_id, reason, source)
                VALUES (NEW.id, earlier.reason,
                        'suppressed before (' || to_char(earlier.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ')');
            END IF;
            RETURN NULL;
        END $$;
    """,
    """
        CREATE TRIGGER identities_suppressed_before AFTER INSERT OR UPDATE OF channel, value ON identities
        FOR EACH ROW EXECUTE FUNCTION identities_suppressed_before();
    """,
    """
        INSERT INTO suppressed_identities (hash, channel, reason, source)
        SELECT DISTINCT ON (identity_hash(i.channel, i.value))
               identity_hash(i.channel, i.value), i.channel, s.reason, s.source
        FROM suppressions s
        JOIN identities i ON i.id = s.identity_id OR (s.identity_id IS NULL AND i.person_id = s.person_id)
        ORDER BY identity_hash(i.channel, i.value), s.id
        ON CONFLICT (hash) DO NOTHING;
    """,
    """
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();
    """,
]


def upgrade() -> None:
    op.create_table(
        "suppressed_identities",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in (
        "DROP TRIGGER IF EXISTS events_no_truncate ON events",
        "DROP TRIGGER IF EXISTS identities_suppressed_before ON identities",
        "DROP FUNCTION IF EXISTS identities_suppressed_before()",
        "DROP TRIGGER IF EXISTS suppressions_remember ON suppressions",
        "DROP FUNCTION IF EXISTS suppressions_remember()",
        "DROP FUNCTION IF EXISTS identity_hash(text, text)",
    ):
        op.execute(statement)
    op.drop_table("suppressed_identities")

"""The schema, as SQLAlchemy 2.0 typed ORM classes.

Alembic migrations in `db/migrations/` are the source of truth for the live schema;
these classes mirror them for queries. Every timestamp carries a time zone. The
`events` table is append-only: a trigger in the migration rejects UPDATE and DELETE.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models.outcomes import LEDGER_STATES, DeliveryStatus, EnrollmentStatus, InboundStatus

TZ = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base for every table."""

    type_annotation_map = {dict[str, Any]: JSONB, datetime: TZ}


class Person(Base):
    """A human being, whatever channels we know them on."""

    __tablename__ = "persons"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    company: Mapped[str | None] = mapped_column(String(300))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC", server_default="UTC")
    fields: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (Index("ix_persons_company", "company"),)


class Identity(Base):
    """One address of a person on one channel (email, x, x_handle, linkedin, xmtp)."""

    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("persons.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(32))
    value: Mapped[str] = mapped_column(String(512))
    consent: Mapped[str] = mapped_column(String(16), default="unknown", server_default="unknown")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (
        UniqueConstraint("channel", "value", name="uq_identities_channel_value"),
        Index("ix_identities_person", "person_id"),
        CheckConstraint("consent IN ('unknown','granted','denied')", name="ck_identities_consent"),
    )


class SenderAccount(Base):
    """A sending identity (mailbox, X account, LinkedIn seat, XMTP key) and its caps."""

    __tablename__ = "sender_accounts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(512))
    display_name: Mapped[str | None] = mapped_column(String(200))
    per_hour: Mapped[int] = mapped_column(Integer)
    per_day: Mapped[int] = mapped_column(Integer)
    min_spacing_seconds: Mapped[float] = mapped_column(default=60.0)
    jitter_seconds: Mapped[float] = mapped_column(default=0.0)
    warmup_start_per_day: Mapped[int | None] = mapped_column(Integer)
    warmup_days: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    timezone: Mapped[str] = mapped_column(String(64), default="UTC", server_default="UTC")
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    last_slot_at: Mapped[datetime | None] = mapped_column()
    #: The circuit breaker (services/sender_breaker.py): paused since, why, until when.
    paused_at: Mapped[datetime | None] = mapped_column()
    paused_kind: Mapped[str | None] = mapped_column(String(16))
    paused_reason: Mapped[str | None] = mapped_column(Text)
    paused_until: Mapped[datetime | None] = mapped_column()
    breaker_since: Mapped[datetime | None] = mapped_column()
    throttle_strikes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    #: DKIM signing by Sequencer (when the relay does not sign): `selector._domainkey.domain`
    #: publishes the public key; the private key is a SECRETS_KEY token (services/secret_box.py).
    dkim_selector: Mapped[str | None] = mapped_column(String(63))
    dkim_domain: Mapped[str | None] = mapped_column(String(253))
    dkim_private_key: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("channel", "address", name="uq_sender_accounts_channel_address"),
        CheckConstraint(
            "paused_kind IS NULL OR paused_kind IN ('manual','auth','bounce_rate','throttle')",
            name="ck_sender_accounts_paused_kind",
        ),
        CheckConstraint(
            "(dkim_selector IS NULL) = (dkim_private_key IS NULL)", name="ck_sender_accounts_dkim_complete"
        ),
    )


class SenderConnection(Base):
    """A sender's own SMTP or IMAP connection; `secret` is encrypted (services/secret_box.py).

    `secret` is the password (`auth='password'`) or the OAuth refresh token
    (`auth='xoauth2'`); `status*` is the last outcome of a check or of the mailbox watcher.
    """

    __tablename__ = "sender_connections"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sender_id: Mapped[int] = mapped_column(ForeignKey("sender_accounts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    security: Mapped[str] = mapped_column(String(16))
    username: Mapped[str | None] = mapped_column(String(320))
    auth: Mapped[str] = mapped_column(String(16))
    secret: Mapped[str | None] = mapped_column(Text)
    folder: Mapped[str | None] = mapped_column(String(255))
    oauth_token_url: Mapped[str | None] = mapped_column(String(1000))
    oauth_client_id: Mapped[str | None] = mapped_column(String(500))
    oauth_client_secret: Mapped[str | None] = mapped_column(Text)
    oauth_scope: Mapped[str | None] = mapped_column(String(1000))
    status: Mapped[str | None] = mapped_column(String(32))
    status_reason: Mapped[str | None] = mapped_column(Text)
    status_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (
        UniqueConstraint("sender_id", "kind", name="uq_sender_connections_sender_kind"),
        CheckConstraint("kind IN ('smtp','imap')", name="ck_sender_connections_kind"),
        CheckConstraint("security IN ('tls','starttls','plain')", name="ck_sender_connections_security"),
        CheckConstraint("auth IN ('password','xoauth2','none')", name="ck_sender_connections_auth"),
        CheckConstraint("port BETWEEN 1 AND 65535", name="ck_sender_connections_port"),
        CheckConstraint(
            "auth = 'none' OR (username IS NOT NULL AND secret IS NOT NULL)", name="ck_sender_connections_login"
        ),
        CheckConstraint("kind = 'smtp' OR auth <> 'none'", name="ck_sender_connections_imap_login"),
    )


class SendSlot(Base):
    """A time granted by a sender's governor to one delivery (idempotent per key)."""

    __tablename__ = "send_slots"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sender_id: Mapped[int] = mapped_column(ForeignKey("sender_accounts.id", ondelete="CASCADE"))
    person_id: Mapped[int | None] = mapped_column(ForeignKey("persons.id", ondelete="SET NULL"))
    delivery_key: Mapped[str] = mapped_column(String(200), unique=True)
    slot_at: Mapped[datetime] = mapped_column()
    counts_as_touch: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    released_at: Mapped[datetime | None] = mapped_column()
    """Set when a later round of the same delivery replaced this slot: it holds no cap any more."""

    __table_args__ = (
        Index("ix_send_slots_sender_at", "sender_id", "slot_at"),
        Index("ix_send_slots_person_at", "person_id", "slot_at"),
    )


class Sequence(Base):
    """A named sequence; its content lives in immutable versions."""

    __tablename__ = "sequences"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class SequenceVersion(Base):
    """An immutable, validated sequence graph; same content hash means same version."""

    __tablename__ = "sequence_versions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sequence_id: Mapped[int] = mapped_column(ForeignKey("sequences.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    definition: Mapped[dict[str, Any]] = mapped_column()
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (
        UniqueConstraint("sequence_id", "content_hash", name="uq_sequence_versions_hash"),
        UniqueConstraint("sequence_id", "version", name="uq_sequence_versions_version"),
    )


class Segment(Base):
    """An audience: a static snapshot (CSV import) or a versioned rule."""

    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="static")
    rule: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (CheckConstraint("kind IN ('static','rule')", name="ck_segments_kind"),)


class SegmentMember(Base):
    """Membership of a person in a segment snapshot."""

    __tablename__ = "segment_members"

    segment_id: Mapped[int] = mapped_column(ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("persons.id", ondelete="CASCADE"), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Enrollment(Base):
    """One person in one sequence: mirrors the enrollment workflow for SQL queries."""

    __tablename__ = "enrollments"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sequence_id: Mapped[int] = mapped_column(ForeignKey("sequences.id", ondelete="CASCADE"))
    sequence_version_id: Mapped[int] = mapped_column(ForeignKey("sequence_versions.id"))
    person_id: Mapped[int] = mapped_column(ForeignKey("persons.id", ondelete="CASCADE"))
    workflow_id: Mapped[str] = mapped_column(String(300), unique=True)
    status: Mapped[str] = mapped_column(
        String(24), default=EnrollmentStatus.ACTIVE, server_default=EnrollmentStatus.ACTIVE.value
    )
    current_step: Mapped[str | None] = mapped_column(String(200))
    variant: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (
        UniqueConstraint("sequence_id", "person_id", name="uq_enrollments_sequence_person"),
        Index("ix_enrollments_person_status", "person_id", "status"),
        Index("ix_enrollments_sequence_status", "sequence_id", "status"),
    )


class Delivery(Base):
    """The idempotency ledger: one row per (enrollment, step, attempt), claimed first."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    channel: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    sender_id: Mapped[int | None] = mapped_column(ForeignKey("sender_accounts.id"))
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id"))
    variant: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.CLAIMED)
    message_id: Mapped[str | None] = mapped_column(String(400))
    provider_message_id: Mapped[str | None] = mapped_column(String(400))
    error: Mapped[str | None] = mapped_column(Text)
    attempts_made: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The attempt that owns the row (every transition is conditional on it) and its number.
    owner: Mapped[str | None] = mapped_column(String(300))
    owner_attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())
    sent_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ",".join(f"'{state}'" for state in LEDGER_STATES) + ")",
            name="ck_deliveries_status",
        ),
        Index("ix_deliveries_enrollment", "enrollment_id"),
        Index("ix_deliveries_message_id", "message_id"),
        Index("ix_deliveries_provider_message_id", "provider_message_id"),
        Index("ix_deliveries_status", "status"),
    )


class Event(Base):
    """Append-only log of normalized events; funnels and audits are queries over it."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime] = mapped_column(server_default=func.now())
    recorded_at: Mapped[datetime] = mapped_column(server_default=func.now())
    person_id: Mapped[int | None] = mapped_column(BigInteger)
    enrollment_id: Mapped[int | None] = mapped_column(BigInteger)
    sequence_id: Mapped[int | None] = mapped_column(BigInteger)
    sequence_version_id: Mapped[int | None] = mapped_column(BigInteger)
    step_id: Mapped[str | None] = mapped_column(String(200))
    variant: Mapped[str | None] = mapped_column(String(64))
    channel: Mapped[str | None] = mapped_column(String(32))
    delivery_id: Mapped[int | None] = mapped_column(BigInteger)
    dedup_key: Mapped[str | None] = mapped_column(String(300), unique=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")

    __table_args__ = (
        Index("ix_events_sequence_type", "sequence_id", "type"),
        Index("ix_events_person", "person_id"),
        Index("ix_events_enrollment", "enrollment_id"),
    )


class Suppression(Base):
    """Do-not-contact: a whole person or one identity, with why and from where."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    person_id: Mapped[int | None] = mapped_column(ForeignKey("persons.id", ondelete="CASCADE"))
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (
        CheckConstraint("person_id IS NOT NULL OR identity_id IS NOT NULL", name="ck_suppressions_target"),
        Index("ix_suppressions_person", "person_id"),
        Index("ix_suppressions_identity", "identity_id"),
    )


class SuppressedIdentity(Base):
    """A suppressed identity remembered by hash(channel, value), independent of person rows.

    Filled and applied by triggers (migration 0005): deleting a person keeps it, and the
    identity of someone imported again is suppressed again at once.
    """

    __tablename__ = "suppressed_identities"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class InboundEvent(Base):
    """Every webhook event received, deduplicated by (channel, provider event id)."""

    __tablename__ = "inbound_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    provider_event_id: Mapped[str] = mapped_column(String(300))
    type: Mapped[str] = mapped_column(String(32))
    from_value: Mapped[str] = mapped_column(String(512))
    person_id: Mapped[int | None] = mapped_column(ForeignKey("persons.id", ondelete="SET NULL"))
    classification: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(24), default=InboundStatus.RECEIVED)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (
        UniqueConstraint("channel", "provider_event_id", name="uq_inbound_events_provider_id"),
        Index("ix_inbound_events_person", "person_id"),
    )


class WebhookToken(Base):
    """A provider signature token already accepted (Mailgun signs a token, not the body)."""

    __tablename__ = "webhook_tokens"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    token: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (Index("ix_webhook_tokens_seen_at", "seen_at"),)


class MailboxState(Base):
    """Where a mailbox watcher is: the UIDVALIDITY/UID high-water mark and how it is doing.

    One row per watched sender. `last_uid` only moves forward (compare-and-set) after a
    message went through the inbound pipeline, so a restart, a dropped connection or a
    killed worker resumes after the last message handled; `connected_at` is when the
    mailbox was first watched (older mail is never read, also after a UIDVALIDITY change).
    """

    __tablename__ = "mailbox_states"

    sender_id: Mapped[int] = mapped_column(ForeignKey("sender_accounts.id", ondelete="CASCADE"), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger)
    connected_at: Mapped[datetime] = mapped_column()
    #: watching (IDLE), polling (NOOP every poll_seconds), connecting, login_failed, error, stopped
    status: Mapped[str] = mapped_column(String(24), default="connecting")
    reason: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str | None] = mapped_column(String(8))
    poll_seconds: Mapped[float | None] = mapped_column()
    messages: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    resyncs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_message_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

"""The typed outcomes: ledger states, inbound results and event-log types.

Each is a `StrEnum`, so a member *is* its string: rows already in PostgreSQL, events
already logged and workflow histories already saved read and compare the same, while a
typo in new code (`DeliveryStatus.SNET`) is a mypy error instead of a silent miss.
Enrollment statuses are `models.enrollment.EnrollmentStatus` (re-exported here).
"""

from __future__ import annotations

from enum import StrEnum

from models.enrollment import EnrollmentStatus

__all__ = [
    "DELIVERY_FINAL",
    "DELIVERY_IN_FLIGHT",
    "LEDGER_STATES",
    "LIVE_ENROLLMENT",
    "DeliveryStatus",
    "EnrollmentStatus",
    "EventType",
    "InboundStatus",
]


class DeliveryStatus(StrEnum):
    """A deliveries-ledger row's state, and what `deliver` answers.

    claimed -> sending -> sent | uncertain | failed | bounced, or claimed -> suppressed |
    skipped | failed. `RESCHEDULE` is only ever an answer of `deliver` (nothing was sent
    nor written: ask the governor for a new slot); it is never stored in the ledger.
    """

    CLAIMED = "claimed"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    BOUNCED = "bounced"
    UNCERTAIN = "uncertain"
    SUPPRESSED = "suppressed"
    SKIPPED = "skipped"
    RESCHEDULE = "reschedule"


#: The states a ledger row can hold (the `ck_deliveries_status` check constraint).
LEDGER_STATES: tuple[DeliveryStatus, ...] = tuple(s for s in DeliveryStatus if s is not DeliveryStatus.RESCHEDULE)
#: States no attempt moves a row out of (a hard bounce reported later aside: sent -> bounced).
DELIVERY_FINAL: frozenset[DeliveryStatus] = frozenset(
    {
        DeliveryStatus.SENT,
        DeliveryStatus.FAILED,
        DeliveryStatus.BOUNCED,
        DeliveryStatus.UNCERTAIN,
        DeliveryStatus.SUPPRESSED,
        DeliveryStatus.SKIPPED,
    }
)
#: Rows an attempt still owns (counted as `queued` by the campaign counters).
DELIVERY_IN_FLIGHT: tuple[DeliveryStatus, ...] = (DeliveryStatus.CLAIMED, DeliveryStatus.SENDING)

#: Enrollments whose workflow runs (inbound events signal them; enrolling again resumes them).
LIVE_ENROLLMENT: tuple[EnrollmentStatus, ...] = (EnrollmentStatus.ACTIVE, EnrollmentStatus.PAUSED)


class InboundStatus(StrEnum):
    """What became of one inbound event: the `inbound_events.status` column and the answers
    of the inbound pipeline (`POST /webhooks/{channel}`) and of the provider batches."""

    RECEIVED = "received"  # claimed, not finished yet (a retry takes it over)
    DUPLICATE = "duplicate"  # already finished: nothing done again
    MALFORMED = "malformed"  # mail that could not be parsed (kept for the audit trail)
    UNRECOGNIZED = "unrecognized"  # none of the known kinds
    UNKNOWN_SENDER = "unknown_sender"  # nobody we know
    UNVERIFIED = "unverified"  # matched by thread only; From is not theirs: shown, not acted on
    UNSUBSCRIBED = "unsubscribed"  # an unsubscribe reply or a complaint
    SOFT_BOUNCE = "soft_bounce"  # a temporary failure: recorded only
    SUPPRESSED_IDENTITY = "suppressed_identity"  # a hard bounce: that address is suppressed
    RESCHEDULED = "rescheduled"  # out of office: the enrollments wait
    SIGNALLED = "signalled"  # the enrollments were told (reply, acceptance, follow-back)
    # Provider batches (webhooks/providers): statistics events and what could not be matched.
    RECORDED = "recorded"
    UNKNOWN_MESSAGE = "unknown_message"
    IGNORED = "ignored"


class EventType(StrEnum):
    """The `type` of an event-log row (funnels, audits and stats are queries over these)."""

    # enrollment progress
    ENROLLED = "enrolled"
    STEP_STARTED = "step_started"
    COMPLETED = "completed"
    ENDED = "ended"  # any other terminal status (data.status says which)
    # the send path: a ledger row's final state is logged under its own name
    SENT = DeliveryStatus.SENT.value
    FAILED = DeliveryStatus.FAILED.value
    BOUNCED = DeliveryStatus.BOUNCED.value
    UNCERTAIN = DeliveryStatus.UNCERTAIN.value
    SUPPRESSED = DeliveryStatus.SUPPRESSED.value
    SKIPPED = DeliveryStatus.SKIPPED.value
    RESCHEDULED = "rescheduled"  # the moment-of-send gate sent it back to the governor
    DEFERRED_UNTIL = "deferred_until"  # no slot today: the governor's answer, with why
    IDENTITY_RESOLVED = "identity_resolved"
    SENDER_PAUSED = "sender_paused"  # the sender circuit breaker opened
    # what the other side did
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # a provider's temporary delay
    OPENED = "opened"
    CLICKED = "clicked"
    SOFT_BOUNCED = "soft_bounced"
    REPLIED = "replied"
    POSITIVE_REPLY = "positive_reply"
    REPLY_UNVERIFIED = "reply_unverified"
    OUT_OF_OFFICE = "out_of_office"
    CONNECTION_ACCEPTED = "connection_accepted"
    FOLLOWED_BACK = "followed_back"
    UNSUBSCRIBED = "unsubscribed"

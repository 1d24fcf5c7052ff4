"""The typed outcomes are the strings already stored, and the database agrees with them."""

from __future__ import annotations

import json
import re

from pydantic import BaseModel
from sqlalchemy import CheckConstraint

from db.tables import Delivery
from models.outcomes import (
    DELIVERY_FINAL,
    DELIVERY_IN_FLIGHT,
    LEDGER_STATES,
    DeliveryStatus,
    EnrollmentStatus,
    EventType,
    InboundStatus,
)


def test_ledger_states_are_the_check_constraint() -> None:
    checks = [c for c in Delivery.__table_args__ if isinstance(c, CheckConstraint)]
    (check,) = [c for c in checks if c.name == "ck_deliveries_status"]
    allowed = re.findall(r"'([a-z_]+)'", str(check.sqltext))
    assert sorted(allowed) == sorted(LEDGER_STATES)
    assert DeliveryStatus.RESCHEDULE not in LEDGER_STATES
    assert DELIVERY_FINAL.isdisjoint(DELIVERY_IN_FLIGHT)
    assert set(DELIVERY_FINAL) | set(DELIVERY_IN_FLIGHT) == set(LEDGER_STATES)


def test_members_are_their_strings_in_json_and_back() -> None:
    class Row(BaseModel):
        status: DeliveryStatus
        event: EventType
        inbound: InboundStatus

    row = Row.model_validate({"status": "sent", "event": "step_started", "inbound": "unknown_sender"})
    assert row.status is DeliveryStatus.SENT and isinstance(row.status, str) and str(row.status) == "sent"
    assert json.loads(row.model_dump_json()) == {"status": "sent", "event": "step_started", "inbound": "unknown_sender"}
    assert f"{EventType.POSITIVE_REPLY}" == "positive_reply"


def test_every_ledger_final_state_is_also_an_event_type() -> None:
    """deliver logs a final ledger state under its own name."""
    assert {str(s) for s in DELIVERY_FINAL} <= {str(t) for t in EventType}


def test_values_are_unique_and_short_enough_for_their_columns() -> None:
    for enum, width in ((DeliveryStatus, 16), (EventType, 32), (InboundStatus, 24)):
        values = [m.value for m in enum]
        assert len(values) == len(set(values))
        assert max(map(len, values)) <= width, enum


def test_the_stored_strings_never_change() -> None:
    """Rows, events and saved histories hold these strings: renaming one is a migration, not a refactor."""
    assert [s.value for s in DeliveryStatus] == [
        "claimed", "sending", "sent", "failed", "bounced", "uncertain", "suppressed", "skipped", "reschedule",
    ]  # fmt: skip
    assert [s.value for s in InboundStatus] == [
        "received", "duplicate", "malformed", "unrecognized", "unknown_sender", "unverified", "unsubscribed",
        "soft_bounce", "suppressed_identity", "rescheduled", "signalled", "recorded", "unknown_message", "ignored",
    ]  # fmt: skip
    assert sorted(t.value for t in EventType) == sorted([
        "enrolled", "step_started", "completed", "ended", "sent", "failed", "bounced", "uncertain", "suppressed",
        "skipped", "rescheduled", "deferred_until", "identity_resolved", "sender_paused", "delivered", "deferred",
        "opened", "clicked", "soft_bounced", "replied", "positive_reply", "reply_unverified", "out_of_office",
        "connection_accepted", "followed_back", "unsubscribed",
    ])  # fmt: skip
    assert [s.value for s in EnrollmentStatus] == [
        "active", "paused", "completed", "replied", "stopped", "unsubscribed", "suppressed", "failed", "expired",
    ]  # fmt: skip

"""Appending to the append-only event log, in the caller's transaction.

Every source of events (activities, the inbound pipeline, the webhook app) writes
through this one function; the log is append-only (a trigger refuses UPDATE, DELETE and
TRUNCATE) and each write is an INSERT deduplicated by a key so that retries log once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Required, TypedDict, Unpack

from sqlalchemy import CTE
from sqlalchemy.dialects.postgresql import Insert
from sqlalchemy.ext.asyncio import AsyncSession

from db.statements import insert_if
from db.tables import Event
from models.activities import EnrollmentRef
from models.outcomes import EventType

__all__ = ["append_event", "event_insert"]


class EventFields(TypedDict, total=False):
    """One event's fields (`ref` fills the person, enrollment and sequence; `occurred_at` defaults to now)."""

    type_: Required[EventType]
    ref: EnrollmentRef | None
    person_id: int | None
    step_id: str | None
    variant: str | None
    channel: str | None
    delivery_id: int | None
    occurred_at: datetime | None
    dedup_key: str | None
    data: dict[str, Any] | None


async def append_event(session: AsyncSession, **fields: Unpack[EventFields]) -> bool:
    """Insert one event in the caller's transaction; False when the dedup key exists."""
    result = await session.execute(event_insert(**fields).returning(Event.id))
    return result.scalar_one_or_none() is not None


def event_insert(
    *,
    type_: EventType,
    ref: EnrollmentRef | None = None,
    person_id: int | None = None,
    step_id: str | None = None,
    variant: str | None = None,
    channel: str | None = None,
    delivery_id: int | None = None,
    occurred_at: datetime | None = None,
    dedup_key: str | None = None,
    data: dict[str, Any] | None = None,
    after: CTE | None = None,
) -> Insert:
    """`append_event`'s INSERT (deduplicated by `dedup_key`), for a statement of several writes.

    `after`: only if that part of the statement returned its row (`db/statements.py`).
    """
    values: dict[str, Any] = {
        "type": type_,
        "person_id": ref.person_id if ref else person_id,
        "enrollment_id": ref.enrollment_id if ref else None,
        "sequence_id": ref.sequence.sequence_id if ref else None,
        "sequence_version_id": ref.sequence.version_id if ref else None,
        "step_id": step_id,
        "variant": variant,
        "channel": channel,
        "delivery_id": delivery_id,
        "occurred_at": occurred_at or datetime.now(UTC),
        "dedup_key": dedup_key,
        "data": data or {},
    }
    stmt = insert_if(Event, values, after)
    return stmt.on_conflict_do_nothing(index_elements=["dedup_key"]) if dedup_key else stmt

"""Appending to the append-only event log, in the caller's transaction.

Every source of events (activities, the inbound pipeline, the webhook app) writes
through this one function; the log is append-only (a trigger refuses UPDATE, DELETE and
TRUNCATE) and each write is an INSERT deduplicated by a key so that retries log once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from db.tables import Event
from models.activities import EnrollmentRef
from models.outcomes import EventType

__all__ = ["append_event"]


async def append_event(
    session: AsyncSession,
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
) -> bool:
    """Insert one event in the caller's transaction; False when the dedup key exists."""
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
    stmt = insert(Event).values(**values)
    if dedup_key:
        stmt = stmt.on_conflict_do_nothing(index_elements=["dedup_key"])
    result = await session.execute(stmt.returning(Event.id))
    return result.scalar_one_or_none() is not None

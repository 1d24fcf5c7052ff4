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

from db.statements import insert_if, params
from db.tables import Event
from models.activities import EnrollmentRef
from models.outcomes import EventType

__all__ = ["EVENT_COLUMNS", "append_event", "event_insert", "event_params"]


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


#: The event log's columns, each a parameter of `event_insert`.
EVENT_COLUMNS = (
    "type",
    "person_id",
    "enrollment_id",
    "sequence_id",
    "sequence_version_id",
    "step_id",
    "variant",
    "channel",
    "delivery_id",
    "occurred_at",
    "dedup_key",
    "data",
)


def event_insert(prefix: str = "e_", *, dedup: bool = True, after: CTE | None = None) -> Insert:
    """The INSERT of one event (parameters: `event_params` with the same `prefix`).

    `dedup`: nothing is inserted when the dedup key is logged already. `after`: only if that
    part of the statement returned its row (`db/statements.py`).
    """
    stmt = insert_if(Event, EVENT_COLUMNS, after, prefix)
    return stmt.on_conflict_do_nothing(index_elements=["dedup_key"]) if dedup else stmt


def event_params(prefix: str = "e_", **fields: Unpack[EventFields]) -> dict[str, Any]:
    """The parameters of `event_insert(prefix)` for one event."""
    ref = fields.get("ref")
    values: dict[str, Any] = {
        "type": fields["type_"],
        "person_id": ref.person_id if ref else fields.get("person_id"),
        "enrollment_id": ref.enrollment_id if ref else None,
        "sequence_id": ref.sequence.sequence_id if ref else None,
        "sequence_version_id": ref.sequence.version_id if ref else None,
        "step_id": fields.get("step_id"),
        "variant": fields.get("variant"),
        "channel": fields.get("channel"),
        "delivery_id": fields.get("delivery_id"),
        "occurred_at": fields.get("occurred_at") or datetime.now(UTC),
        "dedup_key": fields.get("dedup_key"),
        "data": fields.get("data") or {},
    }
    return params(prefix, values)


_APPEND = {dedup: event_insert(dedup=dedup).returning(Event.id) for dedup in (False, True)}


async def append_event(session: AsyncSession, **fields: Unpack[EventFields]) -> bool:
    """Insert one event in the caller's transaction; False when the dedup key exists."""
    result = await session.execute(_APPEND[bool(fields.get("dedup_key"))], event_params(**fields))
    return result.scalar_one_or_none() is not None

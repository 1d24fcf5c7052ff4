"""Appending to the event log and keeping the enrollments table in step with workflows.

The event log is append-only (a database trigger refuses UPDATE and DELETE); every
write here is an INSERT, deduplicated by a key so that activity retries log once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity

from db.session import SessionFactory
from db.tables import Enrollment, Event
from models.activities import (
    EnrollmentRef,
    FinishInput,
    FinishOutput,
    RecordEventInput,
    RecordEventOutput,
)


async def append_event(
    session: AsyncSession,
    *,
    type_: str,
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


class RecordActivities:
    """Event log and enrollment-row bookkeeping for the enrollment workflow."""

    def __init__(self, session_factory: SessionFactory) -> None:
        self.session_factory = session_factory

    @activity.defn(name="record_event")
    async def record_event(self, inp: RecordEventInput) -> RecordEventOutput:
        """Append an event (idempotent by dedup key) and mirror the current step."""
        async with self.session_factory() as session, session.begin():
            recorded = await append_event(
                session,
                type_=inp.type,
                ref=inp.ref,
                step_id=inp.step_id,
                variant=inp.variant,
                channel=inp.channel,
                occurred_at=inp.occurred_at,
                dedup_key=inp.dedup_key,
                data=inp.data,
            )
            values: dict[str, Any] = {}
            if inp.current_step:
                values["current_step"] = inp.current_step
            if inp.enrollment_status:
                values["status"] = inp.enrollment_status
            if values:
                await session.execute(update(Enrollment).where(Enrollment.id == inp.ref.enrollment_id).values(**values))
        return RecordEventOutput(recorded=recorded)

    @activity.defn(name="finish_enrollment")
    async def finish_enrollment(self, inp: FinishInput) -> FinishOutput:
        """Mark the enrollment finished and log how it ended."""
        async with self.session_factory() as session, session.begin():
            await session.execute(
                update(Enrollment)
                .where(Enrollment.id == inp.ref.enrollment_id)
                .values(
                    status=inp.status,
                    current_step=inp.last_step,
                    finished_at=datetime.now(UTC),
                )
            )
            await append_event(
                session,
                type_="completed" if inp.status == "completed" else "ended",
                ref=inp.ref,
                step_id=inp.last_step,
                dedup_key=f"{inp.ref.enrollment_id}:finished",
                data={"status": inp.status, "reason": inp.reason or ""},
            )
        return FinishOutput()

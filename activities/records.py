"""Appending to the event log and keeping the enrollments table in step with workflows.

The event log is append-only (a database trigger refuses UPDATE and DELETE); every
write here is an INSERT, deduplicated by a key so that activity retries log once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity

from db.events import append_event
from db.session import SessionFactory
from db.tables import Enrollment
from models.activities import (
    FinishInput,
    FinishOutput,
    RecordEventInput,
    RecordEventOutput,
)
from models.outcomes import EnrollmentStatus, EventType


async def write_event(session: AsyncSession, inp: RecordEventInput) -> bool:
    """Append the event (False when its dedup key was already logged) and mirror the current step."""
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
    return recorded


async def write_finish(session: AsyncSession, inp: FinishInput) -> None:
    """Mark the enrollment row finished and log how it ended (once: the event's key is the enrollment's)."""
    await session.execute(
        update(Enrollment)
        .where(Enrollment.id == inp.ref.enrollment_id)
        .values(status=inp.status, current_step=inp.last_step, finished_at=datetime.now(UTC))
    )
    await append_event(
        session,
        type_=EventType.COMPLETED if inp.status == EnrollmentStatus.COMPLETED else EventType.ENDED,
        ref=inp.ref,
        step_id=inp.last_step,
        dedup_key=f"{inp.ref.enrollment_id}:finished",
        data={"status": inp.status, "reason": inp.reason or ""},
    )


class RecordActivities:
    """Event log and enrollment-row bookkeeping for the enrollment workflow.

    Both are short and idempotent, so the workflow runs them as local activities since patch
    `send-step` (no server round trip); the same code also runs inside `send_step`.
    """

    def __init__(self, session_factory: SessionFactory) -> None:
        self.session_factory = session_factory

    @activity.defn(name="record_event")
    async def record_event(self, inp: RecordEventInput) -> RecordEventOutput:
        """Append an event (idempotent by dedup key) and mirror the current step."""
        async with self.session_factory() as session, session.begin():
            recorded = await write_event(session, inp)
        return RecordEventOutput(recorded=recorded)

    @activity.defn(name="finish_enrollment")
    async def finish_enrollment(self, inp: FinishInput) -> FinishOutput:
        """Mark the enrollment finished and log how it ended."""
        async with self.session_factory() as session, session.begin():
            await write_finish(session, inp)
        return FinishOutput()

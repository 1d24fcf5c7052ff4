"""Appending to the event log and keeping the enrollments table in step with workflows.

The event log is append-only (a database trigger refuses UPDATE and DELETE); every
write here is an INSERT, deduplicated by a key so that activity retries log once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import CTE, update
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity

from db.events import event_insert
from db.session import SessionFactory
from db.statements import table_of, update_if
from db.tables import Enrollment, Event
from models.activities import (
    FinishInput,
    FinishOutput,
    RecordEventInput,
    RecordEventOutput,
)
from models.outcomes import EnrollmentStatus, EventType


async def write_event(session: AsyncSession, inp: RecordEventInput) -> bool:
    """Append the event (False when its dedup key was already logged) and mirror the current step."""
    insert, *more = event_writes(inp)
    recorded = (await session.execute(insert.returning(table_of(Event).c.id))).scalar_one_or_none() is not None
    for stmt in more:
        await session.execute(stmt)
    return recorded


async def write_finish(session: AsyncSession, inp: FinishInput) -> None:
    """Mark the enrollment row finished and log how it ended (once: the event's key is the enrollment's)."""
    for stmt in finish_writes(inp):
        await session.execute(stmt)


def event_writes(inp: RecordEventInput, after: CTE | None = None) -> list[Any]:
    """`write_event`'s statements, the event's INSERT first (`after`: see `db/statements.py`)."""
    writes: list[Any] = [
        event_insert(
            type_=inp.type,
            ref=inp.ref,
            step_id=inp.step_id,
            variant=inp.variant,
            channel=inp.channel,
            occurred_at=inp.occurred_at,
            dedup_key=inp.dedup_key,
            data=inp.data,
            after=after,
        )
    ]
    values: dict[str, Any] = {}
    if inp.current_step:
        values["current_step"] = inp.current_step
    if inp.enrollment_status:
        values["status"] = inp.enrollment_status
    if values:
        enrollments = table_of(Enrollment)
        writes.append(
            update_if(update(enrollments).where(enrollments.c.id == inp.ref.enrollment_id).values(**values), after)
        )
    return writes


def finish_writes(inp: FinishInput, after: CTE | None = None) -> list[Any]:
    """`write_finish`'s statements (`after`: see `db/statements.py`)."""
    enrollments = table_of(Enrollment)
    return [
        update_if(
            update(enrollments)
            .where(enrollments.c.id == inp.ref.enrollment_id)
            .values(status=inp.status, current_step=inp.last_step, finished_at=datetime.now(UTC)),
            after,
        ),
        event_insert(
            type_=EventType.COMPLETED if inp.status == EnrollmentStatus.COMPLETED else EventType.ENDED,
            ref=inp.ref,
            step_id=inp.last_step,
            dedup_key=f"{inp.ref.enrollment_id}:finished",
            data={"status": inp.status, "reason": inp.reason or ""},
            after=after,
        ),
    ]


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

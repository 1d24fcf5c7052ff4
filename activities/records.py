"""Appending to the event log and keeping the enrollments table in step with workflows.

The event log is append-only (a database trigger refuses UPDATE and DELETE); every
write here is an INSERT, deduplicated by a key so that activity retries log once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import CTE, bindparam, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity

from db.events import event_insert, event_params
from db.session import SessionFactory
from db.statements import params, table_of, update_if
from db.tables import Delivery, Enrollment, Event, SendSlot
from models.activities import (
    FinishInput,
    FinishOutput,
    RecordEventInput,
    RecordEventOutput,
)
from models.outcomes import EnrollmentStatus, EventType


async def write_event(session: AsyncSession, inp: RecordEventInput) -> bool:
    """Append the event (False when its dedup key was already logged) and mirror the current step."""
    insert, *more = _write_event_statements(*event_shape(inp))
    values = event_write_params(inp)
    recorded = (await session.execute(insert, values)).scalar_one_or_none() is not None
    for stmt in more:
        await session.execute(stmt, values)
    return recorded


@lru_cache(maxsize=8)
def _write_event_statements(step: bool, status: bool, dedup: bool) -> list[Any]:
    insert, *more = event_writes(step, status, dedup)
    return [insert.returning(table_of(Event).c.id), *more]


async def write_finish(session: AsyncSession, inp: FinishInput) -> None:
    """Mark the enrollment row finished and log how it ended (once: the event's key is the enrollment's)."""
    values = finish_params(inp)
    for stmt in _FINISH:
        await session.execute(stmt, values)


def event_shape(inp: RecordEventInput) -> tuple[bool, bool, bool]:
    """Which of `event_writes`' parts the event takes: the current step, the status, the dedup."""
    return bool(inp.current_step), bool(inp.enrollment_status), bool(inp.dedup_key)


def event_writes(step: bool, status: bool, dedup: bool, after: CTE | None = None, prefix: str = "s_") -> list[Any]:
    """`write_event`'s statements, the event's INSERT first (shape: `event_shape`; parameters:
    `event_write_params`; `after`: see `db/statements.py`)."""
    writes: list[Any] = [event_insert(prefix + "e_", dedup=dedup, after=after)]
    values: dict[str, Any] = {}
    if step:
        values["current_step"] = bindparam(prefix + "current_step")
    if status:
        values["status"] = bindparam(prefix + "status")
    if values:
        enrollments = table_of(Enrollment)
        writes.append(
            update_if(
                update(enrollments).where(enrollments.c.id == bindparam(prefix + "enrollment")).values(**values), after
            )
        )
    return writes


def event_write_params(inp: RecordEventInput, prefix: str = "s_") -> dict[str, Any]:
    """The parameters of `event_writes` for `inp`."""
    return {
        **event_params(
            prefix + "e_",
            type_=inp.type,
            ref=inp.ref,
            step_id=inp.step_id,
            variant=inp.variant,
            channel=inp.channel,
            occurred_at=inp.occurred_at,
            dedup_key=inp.dedup_key,
            data=inp.data,
        ),
        **params(
            prefix,
            {"current_step": inp.current_step, "status": inp.enrollment_status, "enrollment": inp.ref.enrollment_id},
        ),
    }


def finish_writes(after: CTE | None = None, prefix: str = "f_") -> list[Any]:
    """`write_finish`'s statements (parameters: `finish_params`; `after`: see `db/statements.py`).

    Besides the row and the event: the enrollment's send slots that no send used are released.
    An enrollment that ends while it waits for its slot (a reply, a stop, an unsubscribe) will
    never use it, and an unreleased slot would go on holding the person's touch cap and the
    sender's hourly and daily caps. A slot is used once its delivery has a ledger row (its key
    is the slot's without the round, `<enrollment>:<step>:<attempt>`); found by the person's
    index, then the enrollment's key prefix. No clock is compared (a time-skipping server's and
    a worker's differ).
    """
    enrollments = table_of(Enrollment)
    slots = table_of(SendSlot)
    ledger = table_of(Delivery)
    used = select(1).where(ledger.c.idempotency_key == func.regexp_replace(slots.c.delivery_key, ":r[0-9]+$", ""))
    release = update(slots).where(
        slots.c.person_id == bindparam(prefix + "person"),
        slots.c.released_at.is_(None),
        slots.c.delivery_key.startswith(bindparam(prefix + "slot_prefix")),  # digits and ":": no wildcard
        ~exists(used),
    )
    return [
        update_if(release.values(released_at=bindparam(prefix + "finished_at")), after),
        update_if(
            update(enrollments)
            .where(enrollments.c.id == bindparam(prefix + "enrollment"))
            .values(
                status=bindparam(prefix + "status"),
                current_step=bindparam(prefix + "last_step"),
                finished_at=bindparam(prefix + "finished_at"),
            ),
            after,
        ),
        event_insert(prefix + "e_", after=after),
    ]


def finish_params(inp: FinishInput, prefix: str = "f_") -> dict[str, Any]:
    """The parameters of `finish_writes` for `inp`."""
    return {
        **params(
            prefix,
            {
                "enrollment": inp.ref.enrollment_id,
                "person": inp.ref.person_id,
                "slot_prefix": f"{inp.ref.enrollment_id}:",
                "status": inp.status,
                "last_step": inp.last_step,
                "finished_at": datetime.now(UTC),
            },
        ),
        **event_params(
            prefix + "e_",
            type_=EventType.COMPLETED if inp.status == EnrollmentStatus.COMPLETED else EventType.ENDED,
            ref=inp.ref,
            step_id=inp.last_step,
            dedup_key=f"{inp.ref.enrollment_id}:finished",
            data={"status": inp.status, "reason": inp.reason or ""},
        ),
    }


_FINISH = finish_writes()


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

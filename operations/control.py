"""Pause, resume, stop and status: talking to running enrollments.

A whole sequence's enrollments are found in two places, and signalled once each: Temporal
visibility (the `SequenceName` search attribute) and the database's `enrollments` rows
that are still active or paused. Visibility alone would miss enrollments whose first
workflow task has not run yet (a worker that is down or behind: the workflow writes
its search attributes in that task) and is eventually consistent besides; the rows
alone would miss nothing the engine started, but visibility also covers workflows
started by hand. Status joins the database rows with each workflow's live query.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Sequence, SequenceVersion
from models.enrollment import ControlSignal, StatusView
from models.outcomes import LIVE_ENROLLMENT
from settings import Settings
from temporal_client import connect
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for

SIGNALS = {
    "pause": EnrollmentWorkflow.pause,
    "resume": EnrollmentWorkflow.resume,
    "stop": EnrollmentWorkflow.stop,
}


async def running_workflow_ids(client: Client, sequence: str) -> list[str]:
    """Every running enrollment workflow of a sequence, from visibility."""
    escaped = sequence.replace("\\", "\\\\").replace('"', '\\"')
    query = f'WorkflowType = "Enrollment" AND SequenceName = "{escaped}" AND ExecutionStatus = "Running"'
    return [wf.id async for wf in client.list_workflows(query)]


async def live_enrollment_ids(session_factory: SessionFactory, sequence: str) -> list[str]:
    """Workflow ids of a sequence's enrollments the database holds as active or paused."""
    async with session_factory() as session:
        rows = await session.execute(
            select(Enrollment.workflow_id)
            .join(Sequence, Sequence.id == Enrollment.sequence_id)
            .where(Sequence.name == sequence, Enrollment.status.in_(LIVE_ENROLLMENT))
        )
        return list(rows.scalars())


async def signal_enrollments(
    settings: Settings,
    kind: str,
    sequence: str,
    person: int | None,
    reason: str = "",
    *,
    session_factory: SessionFactory | None = None,
    client: Client | None = None,
) -> int:
    """Send pause/resume/stop to one person's enrollment or to every running one.

    With a session factory, a whole sequence means the running workflows visibility
    knows plus the active or paused rows in the database (see the module docstring).
    Returns how many workflows took the signal (finished ones do not).
    """
    if kind not in SIGNALS:
        raise ValueError(f"unknown control {kind!r}: use one of {sorted(SIGNALS)}")
    client = client or await connect(settings)
    if person is not None:
        ids = [workflow_id_for(sequence, person)]
    else:
        ids = await running_workflow_ids(client, sequence)
        if session_factory is not None:
            ids = sorted(set(ids) | set(await live_enrollment_ids(session_factory, sequence)))
    sig = ControlSignal(reason=reason, source="cli")
    sem = asyncio.Semaphore(64)

    async def one(wid: str) -> bool:
        async with sem:
            try:
                await client.get_workflow_handle(wid).signal(SIGNALS[kind], sig)
                return True
            except RPCError:
                return False

    results = await asyncio.gather(*(one(w) for w in ids))
    if person is not None and not results[0]:
        raise LookupError(f"person {person} has no running enrollment in {sequence!r}")
    return sum(results)


@dataclass
class PersonEnrollment:
    """One row of `status --person`."""

    sequence: str
    version: int
    status: str
    current_step: str | None
    waiting_for: list[str] = field(default_factory=list)
    until: datetime | None = None
    variants: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)
    last_delivery: str | None = None


async def person_status(
    session_factory: SessionFactory,
    settings: Settings,
    person: int,
    *,
    client: Client | None = None,
) -> list[PersonEnrollment]:
    """Where a person is in each sequence: live from the workflow when it runs."""
    async with session_factory() as session:
        rows = (
            await session.execute(
                select(Enrollment, Sequence.name, SequenceVersion.version)
                .join(Sequence, Sequence.id == Enrollment.sequence_id)
                .join(SequenceVersion, SequenceVersion.id == Enrollment.sequence_version_id)
                .where(Enrollment.person_id == person)
                .order_by(Enrollment.id)
            )
        ).all()
        last = {}
        for enrollment, *_ in rows:
            delivery = (
                await session.execute(
                    select(Delivery)
                    .where(Delivery.enrollment_id == enrollment.id)
                    .order_by(Delivery.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            if delivery is not None:
                last[enrollment.id] = f"{delivery.step_id}: {delivery.status}" + (
                    f" ({delivery.error})" if delivery.error else ""
                )
    if not rows:
        return []
    client = client or await connect(settings)
    out = []
    for enrollment, name, version in rows:
        item = PersonEnrollment(
            sequence=name,
            version=version,
            status=enrollment.status,
            current_step=enrollment.current_step,
            last_delivery=last.get(enrollment.id),
        )
        handle = client.get_workflow_handle(enrollment.workflow_id)
        try:
            desc = await handle.describe()
            if desc.status == WorkflowExecutionStatus.RUNNING:
                view: StatusView = await handle.query(EnrollmentWorkflow.status)
                item.status = str(view.status)
                item.current_step = view.current_step
                item.waiting_for = view.waiting_for
                item.until = view.until
                item.variants = view.variants
                item.path = [p.step for p in view.path]
            else:
                view = await handle.query(EnrollmentWorkflow.status)
                item.path = [p.step for p in view.path]
                item.variants = view.variants
        except RPCError:
            pass  # history gone (retention): the database row is all we have
        out.append(item)
    return out

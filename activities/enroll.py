"""Starting enrollments for one page of an audience, idempotently.

The audience workflow calls `enroll_page` repeatedly with a person-id cursor, so an
audience of any size is enrolled in bounded batches that survive worker restarts.
Each person gets an `enrollments` row (unique per sequence and person) and a workflow
whose id is the business key; both steps tolerate being repeated after a crash.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from temporalio import activity
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from activities.records import append_event
from db.session import SessionFactory
from db.tables import Enrollment, Person, Segment, SegmentMember
from models.activities import EnrollmentRef, EnrollPageInput, EnrollPageOutput
from models.enrollment import EnrollmentInput, EnrollmentStatus, SequenceRef
from models.sequence import SequenceDefinition
from services.sequence_store import get_version
from services.templating import check_audience
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for
from workflows.search_attributes import (
    CURRENT_STEP,
    ENROLLMENT_STATUS,
    PERSON_ID,
    SEQUENCE_NAME,
    SEQUENCE_VERSION,
)

START_CONCURRENCY = 64


@dataclass
class EnrollTarget:
    """Where enrollment workflows are started."""

    task_queue: str


async def segment_page(
    session_factory: SessionFactory, segment_name: str, after: int, limit: int
) -> tuple[list[Person], Segment]:
    """One page of a segment's people (static snapshot or live rule), by person id."""
    from services.segment_rules import compile_rule

    async with session_factory() as session:
        segment = (
            await session.execute(select(Segment).where(Segment.name == segment_name))
        ).scalar_one_or_none()
        if segment is None:
            known = (await session.execute(select(Segment.name).order_by(Segment.name))).scalars()
            raise LookupError(
                f"unknown segment {segment_name!r} (known: {', '.join(known) or 'none'})"
            )
        query = select(Person).where(Person.id > after).order_by(Person.id).limit(limit)
        if segment.kind == "rule":
            query = query.where(compile_rule(segment.rule or ""))
        else:
            query = query.where(
                Person.id.in_(
                    select(SegmentMember.person_id).where(SegmentMember.segment_id == segment.id)
                )
            )
        people = list((await session.execute(query)).scalars())
    return people, segment


async def segment_size(session_factory: SessionFactory, segment: Segment) -> int:
    """How many people the segment holds right now."""
    from services.segment_rules import compile_rule

    async with session_factory() as session:
        if segment.kind == "rule":
            query = select(func.count()).select_from(Person).where(compile_rule(segment.rule or ""))
        else:
            query = select(func.count()).where(SegmentMember.segment_id == segment.id)
        return int((await session.execute(query)).scalar_one())


def person_timezone(person: Person, field: str) -> str | None:
    """The person's zone from the sequence's `timezone_field` (column or custom field)."""
    if field in ("", "timezone"):
        return person.timezone
    value = (person.fields or {}).get(field)
    return str(value) if value else person.timezone


class EnrollActivities:
    """Creates enrollment rows and starts their workflows."""

    def __init__(self, session_factory: SessionFactory, client: Client, target: EnrollTarget):
        self.session_factory = session_factory
        self.client = client
        self.target = target

    @activity.defn(name="enroll_page")
    async def enroll_page(self, inp: EnrollPageInput) -> EnrollPageOutput:
        """Enroll one page of the segment; returns the next cursor (None when done)."""
        try:
            version = await get_version(self.session_factory, inp.sequence_name)
            people, segment = await segment_page(
                self.session_factory, inp.segment_name, inp.after_person_id, inp.limit
            )
        except LookupError as err:
            raise ApplicationError(str(err), type="NotFound", non_retryable=True) from err
        out = EnrollPageOutput(next_after=people[-1].id if len(people) == inp.limit else None)
        if inp.count_total:
            out.total = await segment_size(self.session_factory, segment)
        if not people:
            return out
        defn = version.definition
        refused: dict[int, str] = {}
        for problem in await check_audience(self.session_factory, defn, [p.id for p in people]):
            refused.setdefault(problem.person_id, f"person {problem.person_id}: {problem}")
        if not defn.allow_concurrent:
            async with self.session_factory() as session:
                busy = await session.execute(
                    select(Enrollment.person_id, Enrollment.workflow_id).where(
                        Enrollment.person_id.in_([p.id for p in people]),
                        Enrollment.status.in_(["active", "paused"]),
                        Enrollment.sequence_id != version.sequence_id,
                    )
                )
                for person_id, wid in busy:
                    refused.setdefault(
                        person_id,
                        f"person {person_id}: already in an active enrollment ({wid}); "
                        "set allow_concurrent: true on the sequence to allow it",
                    )
        ref = SequenceRef(
            sequence_id=version.sequence_id,
            sequence_name=version.name,
            version_id=version.version_id,
            version=version.version,
        )
        sem = asyncio.Semaphore(START_CONCURRENCY)

        async def one(person: Person) -> str:
            if person.id in refused:
                return "refused"
            async with sem:
                return await self._enroll_one(person, ref, defn)

        results = await asyncio.gather(*(one(p) for p in people))
        out.started = results.count("started")
        out.already = results.count("already")
        out.refused = results.count("refused")
        out.refusals = list(refused.values())[:50]
        activity.heartbeat(out.next_after)
        return out

    async def _enroll_one(
        self, person: Person, ref: SequenceRef, defn: SequenceDefinition
    ) -> str:
        wid = workflow_id_for(ref.sequence_name, person.id)
        async with self.session_factory() as session, session.begin():
            inserted = (
                await session.execute(
                    insert(Enrollment)
                    .values(
                        sequence_id=ref.sequence_id,
                        sequence_version_id=ref.version_id,
                        person_id=person.id,
                        workflow_id=wid,
                        status="active",
                    )
                    .on_conflict_do_nothing(constraint="uq_enrollments_sequence_person")
                    .returning(Enrollment.id)
                )
            ).scalar_one_or_none()
            if inserted is None:
                row = (
                    await session.execute(
                        select(Enrollment).where(
                            Enrollment.sequence_id == ref.sequence_id,
                            Enrollment.person_id == person.id,
                        )
                    )
                ).scalar_one()
                if row.status not in ("active", "paused"):
                    return "already"
                if row.sequence_version_id != ref.version_id:
                    return "already"  # running on its own version: leave it alone
                enrollment_id = row.id
            else:
                enrollment_id = inserted
                await append_event(
                    session,
                    type_="enrolled",
                    ref=EnrollmentRef(
                        enrollment_id=enrollment_id, person_id=person.id, sequence=ref
                    ),
                    dedup_key=f"{enrollment_id}:enrolled",
                    data={"workflow_id": wid},
                )
        try:
            await self.client.start_workflow(
                EnrollmentWorkflow.run,
                EnrollmentInput(
                    enrollment_id=enrollment_id,
                    person_id=person.id,
                    person_timezone=person_timezone(person, defn.timezone_field),
                    sequence=ref,
                    definition=defn,
                ),
                id=wid,
                task_queue=self.target.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(SEQUENCE_NAME, ref.sequence_name),
                        SearchAttributePair(SEQUENCE_VERSION, ref.version),
                        SearchAttributePair(PERSON_ID, str(person.id)),
                        SearchAttributePair(CURRENT_STEP, defn.first_step.id),
                        SearchAttributePair(ENROLLMENT_STATUS, str(EnrollmentStatus.ACTIVE)),
                    ]
                ),
            )
        except WorkflowAlreadyStartedError:
            return "already"
        return "started"

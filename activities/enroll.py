"""Starting enrollments for one page of an audience, idempotently.

The audience workflow calls `enroll_page` repeatedly with a person-id cursor, so an
audience of any size is enrolled in bounded batches that survive worker restarts.
Each person gets an `enrollments` row (unique per sequence and person) and a workflow
whose id is the business key; both steps tolerate being repeated after a crash.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from temporalio import activity
from temporalio.client import Client
from temporalio.common import (
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from db.session import SessionFactory
from db.tables import Enrollment, Event, Person
from models.activities import EnrollPageInput, EnrollPageOutput
from models.enrollment import EnrollmentInput, SequenceRef
from models.outcomes import LIVE_ENROLLMENT, EnrollmentStatus, EventType
from models.sequence import SequenceDefinition, Step
from services.segments import segment_page, segment_size
from services.sequence_store import get_version
from services.templating import check_audience
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for
from workflows.patches import BASELINE

START_CONCURRENCY = 128


@dataclass
class EnrollTarget:
    """Where enrollment workflows are started."""

    task_queue: str


def person_timezone(person: Person, field: str) -> str | None:
    """The person's zone from the sequence's `timezone_field` (column or custom field)."""
    if field in ("", "timezone"):
        return person.timezone
    value = (person.fields or {}).get(field)
    return str(value) if value else person.timezone


def _first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first real error inside a (possibly nested) task group failure."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@dataclass
class _Page:
    """One page of the segment, checked and claimed, ready to start."""

    next_after: int | None
    total: int | None = None
    to_start: list[tuple[Person, int]] = field(default_factory=list)
    already: int = 0
    refused: dict[int, str] = field(default_factory=dict)


class EnrollActivities:
    """Creates enrollment rows and starts their workflows."""

    def __init__(self, session_factory: SessionFactory, client: Client, target: EnrollTarget):
        self.session_factory = session_factory
        self.client = client
        self.target = target

    @activity.defn(name="enroll_page")
    async def enroll_page(self, inp: EnrollPageInput) -> EnrollPageOutput:
        """Enroll up to `inp.pages` pages of the segment; returns the next cursor (None when done).

        The pages are pipelined: the next page is read, checked and claimed in
        PostgreSQL while the current one's workflows are being started, and starts flow
        from one page into the next without draining in between, so Temporal is never
        left idle waiting for the database. Progress is heartbeated after every page
        (in page order), and a retried attempt resumes after the last page recorded.
        """
        resumed = activity.info().heartbeat_details
        out = (
            EnrollPageOutput.model_validate(resumed[0]) if resumed else EnrollPageOutput(next_after=inp.after_person_id)
        )
        if out.next_after is None or out.pages_done >= inp.pages:
            return out
        try:
            version = await get_version(self.session_factory, inp.sequence_name)
        except LookupError as err:
            raise ApplicationError(str(err), type="NotFound", non_retryable=True) from err
        ref = SequenceRef(
            sequence_id=version.sequence_id,
            sequence_name=version.name,
            version_id=version.version_id,
            version=version.version,
        )
        defn = version.definition
        sem = asyncio.Semaphore(START_CONCURRENCY)

        async def start(person: Person, enrollment_id: int) -> str:
            try:
                return await self._start(person, enrollment_id, ref, defn)
            finally:
                sem.release()

        def settle(page: _Page, tasks: list[asyncio.Task[str]]) -> None:
            results = [t.result() for t in tasks]
            out.started += results.count("started")
            out.already += results.count("already") + page.already
            out.refused += len(page.refused)
            out.refusals = (out.refusals + list(page.refused.values()))[:50]
            out.next_after = page.next_after
            out.pages_done += 1
            activity.heartbeat(out)

        try:
            async with asyncio.TaskGroup() as group:
                prepare: asyncio.Task[_Page] | None = group.create_task(
                    self._prepare(ref, defn, inp, out.next_after, count_total=inp.count_total and out.total is None)
                )
                dispatched = out.pages_done
                in_flight: list[tuple[_Page, list[asyncio.Task[str]]]] = []
                while prepare is not None:
                    page = await prepare
                    if page.total is not None:
                        out.total = page.total
                    dispatched += 1
                    prepare = None
                    if page.next_after is not None and dispatched < inp.pages:
                        prepare = group.create_task(self._prepare(ref, defn, inp, page.next_after))
                    tasks: list[asyncio.Task[str]] = []
                    for person, enrollment_id in page.to_start:
                        await sem.acquire()
                        tasks.append(group.create_task(start(person, enrollment_id)))
                    in_flight.append((page, tasks))
                    while in_flight and all(t.done() for t in in_flight[0][1]):
                        settle(*in_flight.pop(0))
                for page, tasks in in_flight:
                    if tasks:
                        await asyncio.wait(tasks)
                    settle(page, tasks)
        except ExceptionGroup as failed:  # a start or a page failed: the rest were cancelled
            raise _first_leaf(failed) from None
        return out

    async def _prepare(
        self,
        ref: SequenceRef,
        defn: SequenceDefinition,
        inp: EnrollPageInput,
        after: int,
        *,
        count_total: bool = False,
    ) -> _Page:
        """Read one page, refuse who cannot be enrolled, and claim enrollment rows for the rest."""
        try:
            people, segment = await segment_page(self.session_factory, inp.segment_name, after, inp.limit)
        except LookupError as err:
            raise ApplicationError(str(err), type="NotFound", non_retryable=True) from err
        page = _Page(next_after=people[-1].id if len(people) == inp.limit else None)
        if count_total:
            page.total = await segment_size(self.session_factory, segment)
        if not people:
            return page
        for problem in await check_audience(self.session_factory, defn, [p.id for p in people]):
            if problem.person_id is not None:
                page.refused.setdefault(problem.person_id, str(problem))
        if not defn.allow_concurrent:
            async with self.session_factory() as session:
                busy = await session.execute(
                    select(Enrollment.person_id, Enrollment.workflow_id).where(
                        Enrollment.person_id.in_([p.id for p in people]),
                        Enrollment.status.in_(LIVE_ENROLLMENT),
                        Enrollment.sequence_id != ref.sequence_id,
                    )
                )
                for person_id, wid in busy:
                    page.refused.setdefault(
                        person_id,
                        f"person {person_id}: already in an active enrollment ({wid}); "
                        "set allow_concurrent: true on the sequence to allow it",
                    )
        candidates = [p for p in people if p.id not in page.refused]
        rows = await self._claim_rows(candidates, ref, defn.first_step)
        for person in candidates:
            enrollment_id, _fresh = rows[person.id]
            if enrollment_id is None:
                page.already += 1
            else:
                page.to_start.append((person, enrollment_id))
        return page

    async def _claim_rows(
        self, people: list[Person], ref: SequenceRef, first: Step
    ) -> dict[int, tuple[int | None, bool]]:
        """Insert enrollment rows for a page in one statement.

        Returns person id → (enrollment id to start, or None when the person is already
        enrolled and finished or on another version; whether the row is new).
        """
        if not people:
            return {}
        workflow_ids = {p.id: workflow_id_for(ref.sequence_name, p.id) for p in people}
        async with self.session_factory() as session, session.begin():
            # executemany with RETURNING: SQLAlchemy batches the rows into multi-VALUES
            # statements it compiles once, instead of one giant statement per page.
            inserted: dict[int, int] = dict(
                (
                    await session.execute(
                        insert(Enrollment)
                        .on_conflict_do_nothing(constraint="uq_enrollments_sequence_person")
                        .returning(Enrollment.person_id, Enrollment.id),
                        [
                            {
                                "sequence_id": ref.sequence_id,
                                "sequence_version_id": ref.version_id,
                                "person_id": pid,
                                "workflow_id": wid,
                                "status": EnrollmentStatus.ACTIVE,
                                "current_step": first.id,
                            }
                            for pid, wid in workflow_ids.items()
                        ],
                    )
                ).all()
            )
            result: dict[int, tuple[int | None, bool]] = {pid: (eid, True) for pid, eid in inserted.items()}
            existing = [p.id for p in people if p.id not in inserted]
            if existing:
                for row in (
                    await session.execute(
                        select(Enrollment).where(
                            Enrollment.sequence_id == ref.sequence_id,
                            Enrollment.person_id.in_(existing),
                        )
                    )
                ).scalars():
                    resumable = row.status in LIVE_ENROLLMENT and row.sequence_version_id == ref.version_id
                    result[row.person_id] = (row.id if resumable else None, False)
            if inserted:
                common = {
                    "sequence_id": ref.sequence_id,
                    "sequence_version_id": ref.version_id,
                }
                await session.execute(
                    insert(Event).on_conflict_do_nothing(index_elements=["dedup_key"]),
                    [
                        {
                            **common,
                            "type": EventType.ENROLLED,
                            "person_id": pid,
                            "enrollment_id": eid,
                            "step_id": None,
                            "dedup_key": f"{eid}:{EventType.ENROLLED}",
                            "data": {"workflow_id": workflow_ids[pid]},
                        }
                        for pid, eid in inserted.items()
                    ]
                    + [
                        {
                            **common,
                            "type": EventType.STEP_STARTED,
                            "person_id": pid,
                            "enrollment_id": eid,
                            "step_id": first.id,
                            "dedup_key": f"{eid}:{EventType.STEP_STARTED}:{first.id}:1",
                            "data": {"action": str(first.action), "visit": 1},
                        }
                        for pid, eid in inserted.items()
                    ],
                )
        return result

    async def _start(
        self,
        person: Person,
        enrollment_id: int,
        ref: SequenceRef,
        defn: SequenceDefinition,
    ) -> str:
        """Start the workflow; an existing one (a repeated page) counts as already.

        No search attributes go on the start request: the workflow writes all of them
        in its first task (it must write NextActionAt there anyway). On the dev
        server's SQLite visibility, attributes on the start request cost about 11%
        more server time per enrollment than the same attributes written by that first
        task (bench/RESULTS.md, 2026-11-25). Until the first task runs, visibility does
        not know the enrollment's sequence, so whole-sequence control also reads the
        `enrollments` rows claimed here (services/control.py).
        """
        try:
            await self.client.start_workflow(
                EnrollmentWorkflow.run,
                EnrollmentInput(
                    enrollment_id=enrollment_id,
                    person_id=person.id,
                    person_timezone=person_timezone(person, defn.timezone_field),
                    sequence=ref,
                    definition=defn,
                    first_step_recorded=True,
                    patch_baseline=BASELINE,
                ),
                id=workflow_id_for(ref.sequence_name, person.id),
                task_queue=self.target.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            return "already"
        return "started"

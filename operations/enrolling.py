"""Starting audiences and dry runs: what `starter.py enroll` does.

A real enrollment starts the durable audience workflow and (optionally) follows its
progress query, topped up with the heartbeat of the batch in flight; a dry run renders
every first message and reports problems without starting anything or sending anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import or_, select
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import WorkflowAlreadyStartedError

from db.session import SessionFactory
from db.tables import Enrollment, Identity, Suppression
from models.activities import EnrollPageOutput
from models.enrollment import AudienceInput, AudienceProgress
from models.outcomes import LIVE_ENROLLMENT
from models.schedule import choose_variant
from models.sequence import ACTION_CHANNEL, MESSAGE_ACTIONS, Channel, SequenceDefinition, Step
from services.segments import segment_page
from services.sequence_store import get_version
from services.templating import TemplateError, TemplateProblem, check_audience, person_context, render_step
from settings import Settings
from temporal_client import connect
from workflows.audience import AudienceWorkflow, audience_workflow_id

TARGET = {
    Channel.EMAIL: "email",
    Channel.X: "x",
    Channel.LINKEDIN: "linkedin",
    Channel.XMTP: "xmtp",
}
#: Identity channels that can receive a step on each channel, as the delivery activity
#: picks them (X: the numeric user id, else the handle, which delivery resolves to the id).
TARGETS: dict[Channel, tuple[str, ...]] = {
    Channel.EMAIL: ("email",),
    Channel.X: ("x", "x_handle"),
    Channel.LINKEDIN: ("linkedin",),
    Channel.XMTP: ("xmtp",),
}


async def start_audience(
    session_factory: SessionFactory,
    settings: Settings,
    sequence: str,
    segment: str,
    *,
    page_size: int = 500,
    pages_per_run: int = 40,
    pages_per_activity: int = 8,
    wait: bool = True,
    on_progress: Callable[[AudienceProgress], None] | None = None,
) -> AudienceProgress | None:
    """Start (or attach to) the audience workflow for (sequence, segment)."""
    await get_version(session_factory, sequence)  # fail fast on an unknown sequence
    await segment_page(session_factory, segment, 0, 1)  # and on an unknown segment
    client = await connect(settings)
    wid = audience_workflow_id(sequence, segment)
    try:
        handle = await client.start_workflow(
            AudienceWorkflow.run,
            AudienceInput(
                sequence_name=sequence,
                segment_name=segment,
                page_size=page_size,
                pages_per_run=pages_per_run,
                pages_per_activity=pages_per_activity,
            ),
            id=wid,
            task_queue=settings.temporal_task_queue,
        )
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle_for(AudienceWorkflow.run, wid)
    if not wait:
        return None
    result = asyncio.create_task(handle.result())
    while not result.done():
        try:
            progress = await live_progress(client, handle)
            if on_progress:
                on_progress(progress)
        except Exception:  # between runs (continue-as-new) a query can miss; try again
            pass
        await asyncio.wait({result}, timeout=0.5)
    final = result.result()
    if on_progress:
        on_progress(final)
    return final


async def live_progress(client: Client, handle: WorkflowHandle[AudienceWorkflow, AudienceProgress]) -> AudienceProgress:
    """The audience's progress, including the pages its running batch has heartbeated.

    The workflow only learns a batch's counts when the batch activity returns (several
    pages); its heartbeat says how far it got. The query is read first, so a batch that
    finishes in between is at worst missed for one poll, never counted twice.
    """
    progress = await handle.query(AudienceWorkflow.progress)
    description = await handle.describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name != "enroll_page" or not pending.heartbeat_details.payloads:
            continue
        [batch] = await client.data_converter.decode(pending.heartbeat_details.payloads, [EnrollPageOutput])
        progress = progress.model_copy(
            update={
                "total": progress.total if progress.total is not None else batch.total,
                "started": progress.started + batch.started,
                "already": progress.already + batch.already,
                "refused": progress.refused + batch.refused,
            }
        )
    return progress


def first_message_steps(defn: SequenceDefinition) -> list[Step]:
    """The first message step along every path from the start (what a dry run renders)."""
    found: list[Step] = []
    seen: set[str] = set()
    stack = [defn.first_step.id]
    while stack:
        sid = stack.pop()
        if sid in seen:
            continue
        seen.add(sid)
        step = defn.step(sid)
        if step.action in MESSAGE_ACTIONS:
            found.append(step)
            continue
        stack.extend(e.to for e in step.edges if e.to)
    return found


@dataclass
class Preview:
    """One rendered first message."""

    person_id: int
    step: str
    variant: str | None
    to: str | None
    preview: str


@dataclass
class DryRunProblem:
    """Something that would refuse this person at enroll (or, as a warning, skip them)."""

    person_id: int
    step: str | None
    message: str

    def __str__(self) -> str:
        where = f", step {self.step!r}" if self.step else ""
        return f"person {self.person_id}{where}: {self.message}"


@dataclass
class DryRunReport:
    """What a dry run found.

    `problems` are what `enroll` would refuse the person for (a template that does not
    render for them on any message step and variant, an active enrollment elsewhere);
    `warnings` do not stop an enrollment but change what it does (a suppressed person
    is never contacted; a step on a channel the person has no identity for is skipped).
    """

    people: int = 0
    previews: list[Preview] = field(default_factory=list)
    issues: list[DryRunProblem] = field(default_factory=list)
    warning_issues: list[DryRunProblem] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Each problem as one line naming the person and the step."""
        return [str(p) for p in self.issues]

    @property
    def warnings(self) -> list[str]:
        """Each warning as one line naming the person and the step."""
        return [str(w) for w in self.warning_issues]


async def dry_run(session_factory: SessionFactory, sequence: str, segment: str) -> DryRunReport:
    """Render every first message of the audience; report each problem; send nothing.

    Reads only: no enrollment row, delivery, event or workflow is created. Templates are
    checked exactly as `enroll` checks them (every message step, every variant), so a
    clean dry run means no person is refused for a template.
    """
    version = await get_version(session_factory, sequence)
    defn = version.definition
    steps = first_message_steps(defn)
    report = DryRunReport()
    after = 0
    while True:
        people, _ = await segment_page(session_factory, segment, after, 1000)
        if not people:
            break
        after = people[-1].id
        ids = [p.id for p in people]
        async with session_factory() as session:
            identities = list((await session.execute(select(Identity).where(Identity.person_id.in_(ids)))).scalars())
            suppressions = list(
                (
                    await session.execute(
                        select(Suppression.person_id, Suppression.identity_id, Suppression.reason).where(
                            or_(
                                Suppression.person_id.in_(ids),
                                Suppression.identity_id.in_(select(Identity.id).where(Identity.person_id.in_(ids))),
                            )
                        )
                    )
                ).all()
            )
            busy = dict(
                (
                    await session.execute(
                        select(Enrollment.person_id, Enrollment.workflow_id).where(
                            Enrollment.person_id.in_(ids),
                            Enrollment.status.in_(LIVE_ENROLLMENT),
                            Enrollment.sequence_id != version.sequence_id,
                        )
                    )
                ).all()
            )
        by_person: dict[int, list[Identity]] = {}
        for ident in identities:
            by_person.setdefault(ident.person_id, []).append(ident)
        suppressed_people = {pid: reason for pid, iid, reason in suppressions if pid is not None and iid is None}
        suppressed_identities = {iid for _, iid, _ in suppressions if iid is not None}
        template_problems: dict[int, list[TemplateProblem]] = {}
        for problem in await check_audience(session_factory, defn, ids):
            if problem.person_id is not None:
                template_problems.setdefault(problem.person_id, []).append(problem)
        for person in people:
            report.people += 1
            mine = by_person.get(person.id, [])
            if person.id in suppressed_people:
                report.warning_issues.append(
                    DryRunProblem(person.id, None, f"suppressed ({suppressed_people[person.id]}): never contacted")
                )
                continue
            if person.id in busy and not defn.allow_concurrent:
                report.issues.append(
                    DryRunProblem(
                        person.id,
                        None,
                        f"already in an active enrollment ({busy[person.id]}); enroll would refuse this person",
                    )
                )
            for tp in template_problems.get(person.id, []):
                report.issues.append(DryRunProblem(person.id, tp.step, _strip_step(tp.message, tp.step)))
            failed_steps = {tp.step for tp in template_problems.get(person.id, [])}
            ctx = person_context(person, mine)
            for step in steps:
                channel = ACTION_CHANNEL[step.action]
                wanted = TARGETS[channel] if channel else ()
                target_ident = next((i for c in wanted for i in mine if i.channel == c), None)
                if target_ident is None:
                    report.warning_issues.append(
                        DryRunProblem(
                            person.id, step.id, f"no {' or '.join(wanted)} identity: this step would be skipped"
                        )
                    )
                elif target_ident.id in suppressed_identities:
                    report.warning_issues.append(
                        DryRunProblem(person.id, step.id, f"{target_ident.channel} {target_ident.value} is suppressed")
                    )
                if step.id in failed_steps:
                    continue
                variant = choose_variant(step.variants, key=f"{person.id}:{step.id}")
                try:
                    content = render_step(step, variant.name if variant else None, ctx)
                except TemplateError as exc:  # check_audience renders the same; kept as a guard
                    report.issues.append(DryRunProblem(person.id, step.id, _strip_step(str(exc), step.id)))
                    continue
                text = content.subject or content.text or ""
                report.previews.append(
                    Preview(
                        person.id,
                        step.id,
                        variant.name if variant else None,
                        target_ident.value if target_ident else None,
                        " ".join(text.split())[:80],
                    )
                )
        if len(people) < 1000:
            break
    return report


def _strip_step(message: str, step: str) -> str:
    """A template message without its leading "step 'x'" (the problem names the step)."""
    prefix = f"step {step!r} "
    return message[len(prefix) :] if message.startswith(prefix) else message

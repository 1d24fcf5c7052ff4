"""Starting audiences and dry runs: what `starter.py enroll` does.

A real enrollment starts the durable audience workflow and (optionally) follows its
progress query; a dry run renders every first message and reports problems without
starting anything or sending anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.enroll import segment_page
from db.session import SessionFactory
from db.tables import Enrollment, Identity, Suppression
from models.enrollment import AudienceInput, AudienceProgress
from models.schedule import choose_variant
from models.sequence import ACTION_CHANNEL, MESSAGE_ACTIONS, Channel, SequenceDefinition, Step
from services.sequence_store import get_version
from services.templating import person_context, render_step
from settings import Settings
from temporal_client import connect
from workflows.audience import AudienceWorkflow, audience_workflow_id

TARGET = {
    Channel.EMAIL: "email",
    Channel.X: "x",
    Channel.LINKEDIN: "linkedin",
    Channel.XMTP: "xmtp",
}


async def start_audience(
    session_factory: SessionFactory,
    settings: Settings,
    sequence: str,
    segment: str,
    *,
    page_size: int = 500,
    pages_per_run: int = 40,
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
                sequence_name=sequence, segment_name=segment, page_size=page_size, pages_per_run=pages_per_run
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
            progress = await handle.query(AudienceWorkflow.progress)
            if on_progress:
                on_progress(progress)
        except Exception:  # between runs (continue-as-new) a query can miss; try again
            pass
        await asyncio.wait({result}, timeout=0.5)
    final = result.result()
    if on_progress:
        on_progress(final)
    return final


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
class DryRunReport:
    """What a dry run found."""

    people: int = 0
    previews: list[Preview] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def dry_run(session_factory: SessionFactory, sequence: str, segment: str) -> DryRunReport:
    """Render every first message of the audience; report each problem; send nothing."""
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
            suppressed = {
                row
                for row in (
                    await session.execute(select(Suppression.person_id).where(Suppression.person_id.in_(ids)))
                ).scalars()
            }
            busy = dict(
                (
                    await session.execute(
                        select(Enrollment.person_id, Enrollment.workflow_id).where(
                            Enrollment.person_id.in_(ids),
                            Enrollment.status.in_(["active", "paused"]),
                            Enrollment.sequence_id != version.sequence_id,
                        )
                    )
                ).all()
            )
        by_person: dict[int, list[Identity]] = {}
        for ident in identities:
            by_person.setdefault(ident.person_id, []).append(ident)
        for person in people:
            report.people += 1
            mine = by_person.get(person.id, [])
            if person.id in suppressed:
                report.problems.append(f"person {person.id}: suppressed (would not be contacted)")
                continue
            if person.id in busy and not defn.allow_concurrent:
                report.problems.append(f"person {person.id}: already active in {busy[person.id]}")
            ctx = person_context(person, mine)
            for step in steps:
                channel = ACTION_CHANNEL[step.action]
                target = next((i.value for i in mine if channel and i.channel == TARGET[channel]), None)
                if target is None:
                    report.problems.append(
                        f"person {person.id}, step {step.id!r}: no {TARGET[channel] if channel else ''} identity"
                    )
                variant = choose_variant(step.variants, key=f"{person.id}:{step.id}")
                try:
                    content = render_step(step, variant.name if variant else None, ctx)
                except Exception as exc:
                    report.problems.append(f"person {person.id}, step {step.id!r}: {exc}")
                    continue
                text = content.subject or content.text or ""
                report.previews.append(
                    Preview(person.id, step.id, variant.name if variant else None, target, text[:80])
                )
        if len(people) < 1000:
            break
    return report

"""Audiences on the dev server: durable paged enrollment, visibility-wide control, status.

These run on the Temporal dev server (real visibility and search attributes), because
pausing a whole sequence finds its running enrollments through visibility.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from activities.enroll import EnrollActivities, EnrollTarget
from db.session import SessionFactory
from db.tables import Enrollment, Event, Person
from models.activities import EnrollPageInput, EnrollPageOutput
from models.enrollment import AudienceInput, EnrollmentStatus
from operations.control import person_status, running_workflow_ids, signal_enrollments
from operations.enrolling import dry_run, start_audience
from services.sequence_store import create_version
from settings import Settings
from tests.engine_harness import Wired, all_senders, seed_people
from tests.eventually import eventually
from worker import Workers
from workflows.audience import audience_workflow_id
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for
from workflows.search_attributes import SEQUENCE_NAME

pytestmark = pytest.mark.devserver


async def seed(sf: SessionFactory, n: int, segment: str, *, company_field: bool = True) -> list[int]:
    """n people with an email each, in a static segment (bulk SQL), with a `role` field unless told not."""
    return await seed_people(sf, n, segment, fields={"role": "CTO"} if company_field else None)


def seq_file(tmp_path: Path, name: str, body: str = "Hi {{ first_name }}, as {{ role }}...") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""
name: {name}
steps:
  - id: wait
    action: WAIT
    edges: [{{trigger: NORMAL_EDGE, after: 10d, to: mail}}]
  - id: mail
    action: SEND_EMAIL
    subject: "Hello {{{{ first_name }}}}"
    body: "{body}"
    edges: [{{trigger: END}}]
"""
    )
    return path


@pytest.fixture
def temporal_client(dev_env: Any) -> Client:
    """This module's worker runs on the dev server (visibility, search attributes)."""
    return dev_env.client


@pytest.fixture
def worker_on(wired: Wired) -> Callable[[str], AbstractAsyncContextManager[Workers]]:
    """Run the production worker on a task queue of the dev server."""
    return lambda task_queue: wired(task_queue=task_queue)


@pytest.fixture
async def stack(
    dev_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    worker_on: Callable[[str], AbstractAsyncContextManager[Workers]],
) -> AsyncIterator[Settings]:
    await all_senders(session_factory)
    async with worker_on(task_queue):
        yield Settings(
            temporal_address=dev_env.client.service_client.config.target_host, temporal_task_queue=task_queue
        )


async def _eventually(check: Any, attempts: int = 200) -> Any:
    """Visibility is eventually consistent: poll a condition (bounded)."""
    return await eventually(check, "visibility to catch up", tries=attempts, interval=0.05)


async def test_audience_enrolls_every_member_in_pages_and_repeats_as_noop(
    stack: Settings, session_factory: SessionFactory, dev_env: Any, tmp_path: Path
) -> None:
    name = f"aud-{uuid.uuid4().hex[:6]}"
    ids = await seed(session_factory, 600, name)
    await create_version(session_factory, seq_file(tmp_path, name))
    seen: list[Any] = []
    progress = await start_audience(
        session_factory,
        stack,
        name,
        name,
        page_size=100,
        pages_per_activity=2,
        pages_per_run=1,
        on_progress=seen.append,
    )
    assert progress is not None and progress.done
    assert (progress.total, progress.started, progress.already, progress.refused) == (600, 600, 0, 0)
    assert seen and seen[-1].done
    async with session_factory() as s:
        assert (await s.execute(select(func.count()).select_from(Enrollment))).scalar_one() == 600
        enrolled = (await s.execute(select(func.count()).where(Event.type == "enrolled"))).scalar_one()
        assert enrolled == 600
    again = await start_audience(session_factory, stack, name, name, page_size=500)
    assert again is not None and (again.started, again.already) == (0, 600)
    desc = await dev_env.client.get_workflow_handle(workflow_id_for(name, ids[0])).describe()
    assert desc.typed_search_attributes.get(SEQUENCE_NAME) == name
    audience = dev_env.client.get_workflow_handle(audience_workflow_id(name, name))
    query = f'WorkflowId = "{audience.id}"'

    async def runs() -> int:
        return len([w async for w in dev_env.client.list_workflows(query)])

    assert await _eventually(lambda: _at_least(runs, 3)), "600 people / 100 per page / 2 pages per batch, 1 per run"


async def test_a_batch_heartbeats_every_page_in_order_and_a_retry_resumes_after_the_last(
    stack: Settings, session_factory: SessionFactory, dev_env: Any, tmp_path: Path
) -> None:
    name = f"batch-{uuid.uuid4().hex[:6]}"
    ids = await seed(session_factory, 250, name)
    await create_version(session_factory, seq_file(tmp_path, name))
    acts = EnrollActivities(session_factory, dev_env.client, EnrollTarget(stack.temporal_task_queue))
    env = ActivityEnvironment()
    beats: list[EnrollPageOutput] = []
    env.on_heartbeat = lambda *details: beats.append(details[0].model_copy(deep=True))
    page = EnrollPageInput(sequence_name=name, segment_name=name, after_person_id=0, limit=100, count_total=True)

    first = await env.run(acts.enroll_page, page.model_copy(update={"pages": 2}))
    assert (first.started, first.already, first.pages_done, first.next_after, first.total) == (200, 0, 2, ids[199], 250)
    assert [(b.next_after, b.started, b.pages_done) for b in beats] == [(ids[99], 100, 1), (ids[199], 200, 2)]

    # A retry of a 3-page batch whose last heartbeat was after page 1: page 1 is not
    # redone, page 2 (started by the first run) counts as already, page 3 starts.
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[beats[0].model_dump(mode="json")])
    retried = await env.run(acts.enroll_page, page.model_copy(update={"pages": 3}))
    assert (retried.started, retried.already, retried.pages_done, retried.next_after) == (150, 100, 3, None)
    async with session_factory() as s:
        count = select(func.count()).select_from(Enrollment).join(Person).where(Person.id.in_(ids))
        assert (await s.execute(count)).scalar_one() == 250


async def test_a_failing_start_fails_the_batch_with_its_own_error_and_keeps_the_claims(
    stack: Settings, session_factory: SessionFactory, dev_env: Any, tmp_path: Path
) -> None:
    name = f"fail-{uuid.uuid4().hex[:6]}"
    ids = await seed(session_factory, 30, name)
    await create_version(session_factory, seq_file(tmp_path, name))
    nowhere = Client(
        dev_env.client.service_client, namespace="no-such-namespace", data_converter=pydantic_data_converter
    )
    acts = EnrollActivities(session_factory, nowhere, EnrollTarget(stack.temporal_task_queue))
    page = EnrollPageInput(sequence_name=name, segment_name=name, after_person_id=0, limit=10, pages=3)
    with pytest.raises(RPCError, match="no-such-namespace"):
        await ActivityEnvironment().run(acts.enroll_page, page)
    async with session_factory() as s:
        claimed = (await s.execute(select(Enrollment.status).join(Person).where(Person.id.in_(ids)))).scalars().all()
    # Claimed rows stay active, so the retry (with a working client) starts them.
    assert claimed and set(claimed) == {"active"}
    progress = await start_audience(session_factory, stack, name, name, page_size=10)
    assert progress is not None and (progress.started, progress.already) == (30, 0)


async def test_enroll_refuses_people_whose_templates_do_not_render(
    stack: Settings, session_factory: SessionFactory, tmp_path: Path
) -> None:
    name = f"tpl-{uuid.uuid4().hex[:6]}"
    await seed(session_factory, 5, name, company_field=False)  # no `role` custom field
    await create_version(session_factory, seq_file(tmp_path, name))
    report = await dry_run(session_factory, name, name)
    assert report.people == 5 and report.previews == []
    assert any("role" in p for p in report.problems)
    progress = await start_audience(session_factory, stack, name, name)
    assert progress is not None and (progress.started, progress.refused) == (0, 5)
    assert "role" in progress.refusals[0]


async def test_pause_resume_stop_a_whole_sequence_and_status(
    stack: Settings, session_factory: SessionFactory, dev_env: Any, tmp_path: Path
) -> None:
    name = f"ctl-{uuid.uuid4().hex[:6]}"
    ids = await seed(session_factory, 20, name)
    await create_version(session_factory, seq_file(tmp_path, name))
    await start_audience(session_factory, stack, name, name)
    client = dev_env.client
    await _eventually(lambda: _count(client, name, 20))
    assert await signal_enrollments(stack, "pause", name, None, client=client) == 20

    async def all_paused() -> bool:
        views = [
            await client.get_workflow_handle(workflow_id_for(name, i)).query(EnrollmentWorkflow.status) for i in ids
        ]
        return all(v.status == EnrollmentStatus.PAUSED for v in views)

    await _eventually(all_paused)
    rows = await person_status(session_factory, stack, ids[0], client=client)
    assert [(r.sequence, r.status, r.current_step) for r in rows] == [(name, "paused", "wait")]
    assert await signal_enrollments(stack, "resume", name, ids[0], client=client) == 1
    resumed = await client.get_workflow_handle(workflow_id_for(name, ids[0])).query(EnrollmentWorkflow.status)
    assert resumed.status == EnrollmentStatus.ACTIVE and resumed.waiting_for == ["NORMAL_EDGE"]
    # Visibility and the database rows name the same 20: each is signalled once.
    assert await signal_enrollments(stack, "stop", name, None, session_factory=session_factory, client=client) == 20
    results = [
        await client.get_workflow_handle_for(EnrollmentWorkflow.run, workflow_id_for(name, i)).result() for i in ids
    ]
    assert {r.status for r in results} == {EnrollmentStatus.STOPPED}
    with pytest.raises(LookupError):
        await signal_enrollments(stack, "pause", name, ids[0], client=client)


async def test_pausing_a_sequence_reaches_enrollments_whose_first_task_has_not_run(
    stack: Settings,
    session_factory: SessionFactory,
    dev_env: Any,
    tmp_path: Path,
    worker_on: Callable[[str], AbstractAsyncContextManager[Workers]],
) -> None:
    name = f"idle-{uuid.uuid4().hex[:6]}"
    ids = await seed(session_factory, 12, name)
    await create_version(session_factory, seq_file(tmp_path, name))
    idle_queue = f"idle-{uuid.uuid4().hex[:6]}"  # no worker polls it yet: think of a worker that is down
    acts = EnrollActivities(session_factory, dev_env.client, EnrollTarget(idle_queue))
    page = EnrollPageInput(sequence_name=name, segment_name=name, after_person_id=0, limit=100)
    assert (await ActivityEnvironment().run(acts.enroll_page, page)).started == 12
    client = dev_env.client
    # The workflows write their search attributes in their first task, so visibility
    # cannot know their sequence yet; the database rows do.
    assert await running_workflow_ids(client, name) == []
    paused = await signal_enrollments(stack, "pause", name, None, session_factory=session_factory, client=client)
    assert paused == 12

    async with worker_on(idle_queue):

        async def all_paused_on_the_first_step() -> bool:
            views = [
                await client.get_workflow_handle(workflow_id_for(name, i)).query(EnrollmentWorkflow.status) for i in ids
            ]
            return all(v.status == EnrollmentStatus.PAUSED and v.current_step == "wait" for v in views)

        await _eventually(all_paused_on_the_first_step)
        await _eventually(lambda: _count(client, name, 12))  # and now visibility knows them


async def _at_least(fn: Any, n: int) -> bool:
    return await fn() >= n


async def _count(client: Any, name: str, n: int) -> bool:
    return len(await running_workflow_ids(client, name)) == n


def test_a_batch_of_no_pages_or_empty_pages_is_refused_up_front() -> None:
    # A batch of 0 pages would return its own cursor and the audience would loop forever.
    with pytest.raises(ValidationError, match="pages_per_activity"):
        AudienceInput(sequence_name="s", segment_name="g", pages_per_activity=0)
    with pytest.raises(ValidationError, match="pages"):
        EnrollPageInput(sequence_name="s", segment_name="g", after_person_id=0, limit=10, pages=0)
    with pytest.raises(ValidationError, match="page_size"):
        AudienceInput(sequence_name="s", segment_name="g", page_size=0)

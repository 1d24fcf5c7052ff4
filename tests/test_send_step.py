"""The send path since patch `send-step`: a slot due now and its send are one activity.

What the server sees (the activities each enrollment scheduled, from its history) and what
the database holds (the ledger, the slots, every event exactly once), on the time-skipping
server with real PostgreSQL and SMTP.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, time, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, SendSlot
from models.enrollment import ControlSignal, EnrollmentStatus
from models.outcomes import EventType
from services.senders import CHANNEL_DEFAULTS
from tests.engine_harness import (
    Wired,
    events_of,
    make_person,
    make_sender,
    start_enrollment,
    store_version,
    wait_for_status,
)
from tests.eventually import eventually
from tests.history_text import local_activities
from workflows.activity_calls import LOCAL_SEND_PATCH
from workflows.enrollment import EnrollmentWorkflow
from workflows.patches import BASELINE, PATCHES, PENDING


@pytest.fixture
async def worker(wired: Wired, temporal_env: WorkflowEnvironment) -> AsyncIterator[None]:
    """The production worker, with no sender: each test adds its own."""
    async with wired(client=temporal_env.client):
        yield


def _emails(*after: str) -> dict[str, Any]:
    """One email per step; `after[k]` is the wait between step k and k+1."""
    steps: list[dict[str, Any]] = []
    for k in range(len(after) + 1):
        edges = [{"trigger": "NORMAL_EDGE", "after": after[k], "to": f"m{k + 1}"}] if k < len(after) else []
        steps.append(
            {
                "id": f"m{k}",
                "action": "SEND_EMAIL",
                "subject": f"Hi {{{{ first_name }}}} ({k})",
                "body": "Quick question",
                "edges": edges or [{"trigger": "END"}],
            }
        )
    return {"name": f"send-step-{uuid.uuid4().hex[:6]}", "steps": steps}


WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]


async def _start(env: WorkflowEnvironment, sf: SessionFactory, task_queue: str, raw: dict[str, Any]) -> Any:
    ref, defn = await store_version(sf, raw)
    pid = await make_person(sf, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    return await start_enrollment(env.client, task_queue, sf, ref, defn, pid)


async def _activities(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The sends and slots the enrollment ran, in order: activities scheduled on the server by
    name, local ones (a marker each) as "local <name>" (the events and the end left out)."""
    history = await handle.fetch_history()
    local = iter(local_activities(history))
    names = []
    for e in history.events:
        if e.HasField("activity_task_scheduled_event_attributes"):
            names.append(e.activity_task_scheduled_event_attributes.activity_type.name)
        if e.HasField("marker_recorded_event_attributes") and e.marker_recorded_event_attributes.marker_name == (
            "core_local_activity"
        ):
            names.append(f"local {next(local)}")
    return [n for n in names if n not in ("local record_event", "local finish_enrollment")]


async def _workflow_tasks(handle: WorkflowHandle[Any, Any]) -> int:
    """How many workflow tasks the run took (each a poll and a response at the server)."""
    events = (await handle.fetch_history()).events
    return sum(e.HasField("workflow_task_completed_event_attributes") for e in events)


async def _event_counts(sf: SessionFactory, enrollment_id: int) -> Counter[str]:
    return Counter(e.type for e in await events_of(sf) if e.enrollment_id == enrollment_id)


async def _enrollment(sf: SessionFactory) -> Enrollment:
    async with sf() as s:
        [row] = list((await s.execute(select(Enrollment))).scalars())
    return row


async def test_a_one_step_email_is_one_workflow_task_with_its_events_once(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    await make_sender(session_factory, "email", "sales@acme.test")
    handle = await _start(temporal_env, session_factory, task_queue, _emails())
    assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    # the slot, the send, the step's start and the end: one local activity inside the first
    # workflow task, no activity task and no other workflow task (patch send-step-local)
    assert await _activities(handle) == ["local send_step"]
    assert await _workflow_tasks(handle) == 1
    assert len(smtp_server.messages) == 1
    row = await _enrollment(session_factory)
    assert row.status == "completed" and row.finished_at is not None
    counts = await _event_counts(session_factory, row.id)
    assert counts == Counter({"step_started": 1, "sent": 1, "completed": 1})
    async with session_factory() as s:
        [delivery] = list((await s.execute(select(Delivery))).scalars())
        [slot] = list((await s.execute(select(SendSlot))).scalars())
    assert delivery.status == "sent" and delivery.attempts_made == 1
    assert delivery.sent_at is not None and delivery.sent_at >= slot.slot_at  # never before its slot


async def _patch_history(handle: WorkflowHandle[Any, Any]) -> tuple[list[str], int]:
    """The patch ids whose markers the run recorded, and its TemporalChangeVersion upserts."""
    patches, upserts = [], 0
    for e in (await handle.fetch_history()).events:
        if e.HasField("marker_recorded_event_attributes"):
            marker = e.marker_recorded_event_attributes
            if marker.marker_name == "core_patch":
                patches.append(json.loads(marker.details["patch-data"].payloads[0].data)["id"])
        if e.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            upserts += "TemporalChangeVersion" in fields
    return patches, upserts


async def test_a_new_enrollment_records_no_patch_markers_an_old_style_run_does(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    """Started with this code's patch baseline (as `enroll_page` starts leads), the send path's
    patches cost no marker and no visibility write; a run started without it (as every run
    before the baseline) takes the same path through `workflow.patched`'s markers."""
    await make_sender(session_factory, "email", "sales@acme.test")
    ref, defn = await store_version(session_factory, _emails())
    new, old = [
        await start_enrollment(
            temporal_env.client,
            task_queue,
            session_factory,
            ref,
            defn,
            await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test"),
            patch_baseline=baseline,
        )
        for baseline in (BASELINE, 0)
    ]
    for handle in (new, old):
        assert (await handle.result()).status == EnrollmentStatus.COMPLETED
        assert await _activities(handle) == ["local send_step"]
    # only this release's new patch (send-step-local) is not part of the baseline yet
    assert LOCAL_SEND_PATCH in PENDING and LOCAL_SEND_PATCH not in PATCHES
    assert await _patch_history(new) == ([LOCAL_SEND_PATCH], 1)
    patches, upserts = await _patch_history(old)
    # (deliver-channel-queue is asked only when an email send is scheduled as an activity)
    assert set(patches) == {"send-step", "send-gate-reschedule", "ooo-replans-send", LOCAL_SEND_PATCH}
    assert set(patches) <= set(PATCHES) | set(PENDING) and upserts == len(patches)
    assert len(smtp_server.messages) == 2


async def test_an_old_style_run_continues_as_new_on_this_code_without_markers(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    """A run from before the baseline (0) that continues as new starts its next run on this code:
    that run takes every patch without a marker (workflows/enrollment.py's continue-as-new)."""
    await make_sender(session_factory, "email", "sales@acme.test")
    ref, defn = await store_version(session_factory, _emails("1h"))
    pid = await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    handle = await start_enrollment(
        temporal_env.client, task_queue, session_factory, ref, defn, pid, max_steps_per_run=1, patch_baseline=0
    )
    assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    first = temporal_env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
    last = temporal_env.client.get_workflow_handle(handle.id)
    started = (await last.fetch_history()).events[0].workflow_execution_started_event_attributes
    assert started.continued_execution_run_id == handle.first_execution_run_id  # it did continue as new
    first_patches, _ = await _patch_history(first)
    assert "send-step" in first_patches
    assert await _patch_history(last) == ([LOCAL_SEND_PATCH], 1)  # only the patch not in the baseline yet
    assert len(smtp_server.messages) == 2


async def test_two_steps_each_send_in_one_activity_and_log_each_start(
    wired: Wired, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    await make_sender(session_factory, "email", "sales@acme.test")
    # touch cap off: two emails to one person an hour apart (with the cap of 1 the second waits
    # a day and is booked, then delivered: test_a_later_slot_is_waited_for_on_a_timer_then_delivered's path)
    async with wired(client=temporal_env.client, touch_cap=0):
        handle = await _start(temporal_env, session_factory, task_queue, _emails("1h"))
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED and [p.step for p in result.path] == ["m0", "m1"]
    assert await _activities(handle) == ["local send_step", "local send_step"]
    assert len(smtp_server.messages) == 2 and smtp_server.messages[0][1] == smtp_server.messages[1][1]
    row = await _enrollment(session_factory)
    counts = await _event_counts(session_factory, row.id)
    assert counts == Counter({"step_started": 2, "sent": 2, "completed": 1})
    started = [e for e in await events_of(session_factory, EventType.STEP_STARTED) if e.enrollment_id == row.id]
    assert [e.step_id for e in started] == ["m0", "m1"]
    # the second step started when the hour was over, not when its send was recorded
    assert started[1].occurred_at - started[0].occurred_at >= timedelta(hours=1)


async def test_a_later_slot_is_waited_for_on_a_timer_then_delivered(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    """Two leads, one sender spaced an hour: the second slot is later, so `send_step` only books it."""
    await make_sender(session_factory, "email", "sales@acme.test", spacing=3600)
    # both started before time may skip: they ask for their slots at the same moment
    handles = [await _start(temporal_env, session_factory, task_queue, _emails()) for _ in range(2)]
    for handle in handles:
        assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    ways = sorted([await _activities(h) for h in handles])
    # one at once; one booked, a durable wait, the send
    assert ways == [["local send_step"], ["local send_step", "deliver"]]
    assert len(smtp_server.messages) == 2
    async with session_factory() as s:
        slots = sorted((await s.execute(select(SendSlot.slot_at))).scalars())
        sent = [t for t in (await s.execute(select(Delivery.sent_at))).scalars() if t is not None]
    assert slots[1] - slots[0] >= timedelta(hours=1)
    assert len(sent) == 2 and max(sent) >= slots[1]  # not before its slot
    ids = {e.enrollment_id for e in await events_of(session_factory, EventType.COMPLETED)}
    assert len(ids) == 2  # each end recorded once, the second by the finish activity
    assert len(await events_of(session_factory, EventType.DEFERRED_UNTIL)) == 1


async def test_two_steps_with_the_limits_users_get_send_once_each_inside_the_window(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    """The two-step sequence with the defaults: touch cap 1, a send window, `senders add`'s caps.

    The second email is held by the person cap for 24 hours, then waits for the window: it is
    booked, waited for on a timer and delivered (not sent at once), each event written once.
    """
    d = CHANNEL_DEFAULTS["email"]
    await make_sender(
        session_factory,
        "email",
        "sales@acme.test",
        per_hour=d.per_hour,
        per_day=d.per_day,
        spacing=d.spacing,
        jitter=d.jitter,
    )
    raw = _emails("1h") | {"timezone": "UTC", "send_window": {"days": WEEKDAYS, "start": "09:00", "end": "17:30"}}
    handle = await _start(temporal_env, session_factory, task_queue, raw)
    result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED and [p.step for p in result.path] == ["m0", "m1"]
    activities = await _activities(handle)
    assert activities[0] == "local send_step" and activities[-1] == "deliver"  # the second one booked, then delivered
    assert len(smtp_server.messages) == 2
    async with session_factory() as s:
        sent = sorted(t for t in (await s.execute(select(Delivery.sent_at))).scalars() if t is not None)
    assert len(sent) == 2
    assert sent[1] - sent[0] >= timedelta(hours=24)  # the person cap: one touch in any 24 hours
    for at in sent:  # both inside the window, in the sequence's zone (UTC)
        local = at.astimezone(UTC)
        assert local.weekday() < 5 and time(9, 0) <= local.time() <= time(17, 30), local
    row = await _enrollment(session_factory)
    counts = await _event_counts(session_factory, row.id)
    assert counts[EventType.STEP_STARTED] == 2 and counts[EventType.SENT] == 2 and counts[EventType.COMPLETED] == 1


async def test_a_run_started_by_newer_code_is_left_to_a_newer_worker(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    """A baseline above this code's (a newer release started it during a rolling deploy) fails
    the workflow task, not the run: nothing is sent, and the server retries the task until a
    worker that knows those patches takes it."""
    await make_sender(session_factory, "email", "sales@acme.test")
    ref, defn = await store_version(session_factory, _emails())
    pid = await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    handle = await start_enrollment(
        temporal_env.client, task_queue, session_factory, ref, defn, pid, patch_baseline=BASELINE + 1
    )

    async def task_failed() -> str:
        """The first failed workflow task's message ("" while there is none)."""
        for e in (await handle.fetch_history()).events:
            if e.HasField("workflow_task_failed_event_attributes"):
                return str(e.workflow_task_failed_event_attributes.failure.message)
        return ""

    message = await eventually(task_failed, "the workflow task failed")
    assert f"patch baseline {BASELINE + 1}" in message and f"knows {BASELINE}" in message
    events = (await handle.fetch_history()).events
    assert not any(e.HasField("workflow_execution_failed_event_attributes") for e in events)  # the run goes on
    assert smtp_server.messages == []
    await handle.terminate("test over")


async def test_an_enrollment_stopped_while_waiting_for_its_slot_gives_the_slot_back(
    worker: None, temporal_env: WorkflowEnvironment, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    """With the defaults (person touch cap 1) a second sequence's email for the same person is
    booked a day later. Stopped while it waits, that lead never sends: its slot is released, so
    it no longer holds the person's cap or the sender's, while the slot the first one used stays."""
    await make_sender(session_factory, "email", "sales@acme.test")
    pid = await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    first_ref, first_defn = await store_version(session_factory, _emails())
    first = await start_enrollment(temporal_env.client, task_queue, session_factory, first_ref, first_defn, pid)
    assert (await first.result()).status == EnrollmentStatus.COMPLETED
    held_ref, held_defn = await store_version(session_factory, _emails())
    held = await start_enrollment(temporal_env.client, task_queue, session_factory, held_ref, held_defn, pid)
    await wait_for_status(held, lambda v: v.phase == "waiting for send slot")
    await held.signal(EnrollmentWorkflow.stop, ControlSignal(reason="test"))
    assert (await held.result()).status == EnrollmentStatus.STOPPED
    assert len(smtp_server.messages) == 1
    async with session_factory() as s:
        slots = list((await s.execute(select(SendSlot).order_by(SendSlot.slot_at))).scalars())
    used, given_back = slots
    assert given_back.slot_at - used.slot_at >= timedelta(hours=24)  # the person cap had held it
    assert used.released_at is None
    assert given_back.released_at is not None

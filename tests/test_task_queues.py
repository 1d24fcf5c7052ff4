"""Per-channel task queues: a slow provider on one channel does not hold back another's sends.

Real servers: the time-skipping Temporal server, PostgreSQL, an aiosmtpd sink and the fake
X API (a local HTTP server that can leave requests hanging). The workers are the ones
`worker.py` builds, with small activity limits so the separation is what lets email out.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import WorkflowHandle

from activities.channels.x import XChannel, make_x_client
from db.session import SessionFactory
from db.tables import Delivery
from models.enrollment import EnrollmentStatus
from models.task_queues import ALL_ROLES, channel_queue, parse_roles, role_queue
from settings import Settings
from tests.engine_harness import Sequencer, make_person
from tests.eventually import eventually
from tests.fakes import X_TOKEN, FakeX
from tests.history_text import local_activities
from worker import main

HISTORY = Path(__file__).parent / "histories" / "enrollment_channel_queues.json"


def test_queue_names_derive_from_the_base_queue() -> None:
    assert channel_queue("sequencer", "email") == "sequencer-email"
    assert [role_queue("sequencer", r) for r in ALL_ROLES] == [
        "sequencer",
        "sequencer-email",
        "sequencer-x",
        "sequencer-linkedin",
        "sequencer-xmtp",
    ]
    assert parse_roles(" X, workflows ") == ("workflows", "x")
    assert parse_roles("all") == ALL_ROLES


def test_unknown_queue_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="unknown worker queue 'sms'.*workflows, email, x, linkedin, xmtp"):
        parse_roles("email,sms")
    with pytest.raises(ValidationError, match="WORKER_QUEUES: unknown worker queue 'sms'"):
        Settings(worker_queues="sms")
    assert Settings(worker_queues="email,x").worker_queues == ["email", "x"]
    assert Settings().worker_queues == list(ALL_ROLES)


async def test_worker_cli_names_an_unknown_queue() -> None:
    with pytest.raises(SystemExit, match="--queues: unknown worker queue 'sms'"):
        await main(["--queues", "sms"])


def test_saved_history_schedules_each_send_on_its_channel_queue() -> None:
    """The history recorded since patch `deliver-channel-queue` (tests/histories/generate.py)."""
    events = json.loads(HISTORY.read_text())["events"]
    scheduled = [
        (a["activityType"]["name"], a["taskQueue"]["name"])
        for e in events
        if (a := e.get("activityTaskScheduledEventAttributes"))
    ]
    assert ("deliver", "replay-x") in scheduled
    assert ("deliver", "replay-email") in scheduled
    assert all(queue == "replay" for name, queue in scheduled if name != "deliver")


def _one_step(action: str, **content: Any) -> dict[str, Any]:
    return {
        "name": f"tq-{action.lower()}-{uuid.uuid4().hex[:6]}",
        "steps": [{"id": "act", "action": action, **content, "edges": [{"trigger": "END"}]}],
    }


@pytest.fixture
def slow_x(x_server: FakeX) -> XChannel:
    """An X client that waits long for a hanging X API (the harness closes it with the worker)."""
    return XChannel(make_x_client(x_server.base_url, X_TOKEN, timeout=300))


async def _ledger(sf: SessionFactory, channel: str) -> list[str]:
    async with sf() as s:
        return list((await s.execute(select(Delivery.status).where(Delivery.channel == channel))).scalars())


async def test_a_hanging_x_api_does_not_hold_back_email(sequencer_stack: Sequencer, slow_x: XChannel) -> None:
    stack = sequencer_stack
    sf = stack.sf
    # Two activity slots per worker: on one shared queue the two stuck X follows would take
    # both, and no email could go out until the X API answers.
    stack.x.hang_next(times=3)
    x_people = [await make_person(sf, x=str(1000 + i)) for i in range(3)]
    email_people = [await make_person(sf, email=f"lead{i}-{uuid.uuid4().hex[:6]}@lead.test") for i in range(4)]
    async with stack.worker(channels={"x": slow_x}, touch_cap=1, max_concurrent_activities=2):
        x_handles = await stack.start_many(_one_step("FOLLOW_ON_TWITTER"), x_people)
        await eventually(lambda: len(stack.x.requests) >= 2, "two X follows to hang at the X API")
        emails = _one_step("SEND_EMAIL", subject="Hi {{ first_name }}", body="Hello")
        email_handles = await stack.start_many(emails, email_people)

        def all_mail_in() -> bool:
            return len(stack.smtp.messages) >= len(email_people)

        await eventually(all_mail_in, "every email lead's message at the SMTP server while X hangs")
        # X is still stuck: its follows are in flight or waiting for a slot, none answered
        assert "sent" not in await _ledger(sf, "x")
        assert len(stack.x.requests) == 2  # the X queue's two slots, both held
        # (the results are awaited once X is released: waiting on a result lets the test
        # server skip time, which would time out the hung follows)
        recipients = sorted(r for _, rcpts, _ in stack.smtp.messages for r in rcpts)
        addresses = []
        for p in email_people:
            addresses += await _identity_values(sf, p)
        assert recipients == sorted(addresses)  # each lead once, nobody twice

        stack.x.release()  # the hung follows answer 429 (not performed); their retries go through
        for h in [*email_handles, *x_handles]:
            assert (await h.result()).status == EnrollmentStatus.COMPLETED
    assert sorted(await _ledger(sf, "x")) == ["sent"] * 3
    assert sorted(await _ledger(sf, "email")) == ["sent"] * 4


async def _scheduled_queues(handle: WorkflowHandle[Any, Any]) -> list[tuple[str, str]]:
    history = await handle.fetch_history()
    return [
        (
            e.activity_task_scheduled_event_attributes.activity_type.name,
            e.activity_task_scheduled_event_attributes.task_queue.name,
        )
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


async def test_email_sends_run_beside_their_workflow_x_on_its_own_queue(sequencer_stack: Sequencer) -> None:
    """Email beside its workflow (models/task_queues.py), X on `<queue>-x`."""
    stack = sequencer_stack
    email_lead = await make_person(stack.sf, email=f"beside-{uuid.uuid4().hex[:6]}@lead.test")
    x_lead = await make_person(stack.sf, x="5151")
    async with stack.worker(touch_cap=1):
        (email_handle,) = await stack.start_many(_one_step("SEND_EMAIL", subject="Hi", body="Hello"), [email_lead])
        (x_handle,) = await stack.start_many(_one_step("FOLLOW_ON_TWITTER"), [x_lead])
        for handle in (email_handle, x_handle):
            assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    # email: a local activity inside its workflow's task (patch send-step-local), no activity task
    assert await _scheduled_queues(email_handle) == []
    assert "send_step" in local_activities(await email_handle.fetch_history())
    assert await _scheduled_queues(x_handle) == [("send_step", channel_queue(stack.task_queue, "x"))]
    assert len(stack.smtp.messages) == 1 and len(stack.x.requests) == 1


async def _identity_values(sf: SessionFactory, person_id: int) -> list[str]:
    from db.tables import Identity

    async with sf() as s:
        q = select(Identity.value).where(Identity.person_id == person_id, Identity.channel == "email")
        return list((await s.execute(q)).scalars())


async def _pending_deliver(handle: WorkflowHandle[Any, Any]) -> Any:
    desc = await handle.describe()
    sends = ("deliver", "send_step")  # `send_step`: the slot and the send in one activity (patch send-step)
    pending = [a for a in desc.raw_description.pending_activities if a.activity_type.name in sends]
    return pending[0] if pending else None


async def test_a_worker_serves_only_its_queues(
    sequencer_stack: Sequencer,
) -> None:
    stack = sequencer_stack
    sf = stack.sf
    x_lead = await make_person(sf, x="4242")
    email_lead = await make_person(sf, email=f"only-{uuid.uuid4().hex[:6]}@lead.test")
    async with stack.worker(touch_cap=1, roles=("workflows", "email")):
        (x_handle,) = await stack.start_many(_one_step("FOLLOW_ON_TWITTER"), [x_lead])
        emails = _one_step("SEND_EMAIL", subject="Hi", body="Hello")
        (email_handle,) = await stack.start_many(emails, [email_lead])
        assert (await email_handle.result()).status == EnrollmentStatus.COMPLETED
        pending = await eventually(lambda: _pending_deliver(x_handle), "the X follow to be scheduled")
        # scheduled on the X queue, which nobody here polls: never picked up
        assert pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
        assert stack.x.requests == []
        assert len(stack.smtp.messages) == 1
        async with stack.worker(roles=("x",)):
            assert (await x_handle.result()).status == EnrollmentStatus.COMPLETED
    assert [r.path for r in stack.x.requests] == ["/2/users/900/following"]
    assert await _ledger(sf, "x") == ["sent"]

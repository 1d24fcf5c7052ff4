"""Sending through the engine: exactly once, paced, gated, threaded, classified.

Real aiosmtpd, real local X/relay HTTP servers, real PostgreSQL, the time-skipping
Temporal server, and the production worker.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from temporalio.client import WorkflowHandle

from db.session import SessionFactory
from db.tables import Identity, SendSlot, Suppression
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from tests.engine_harness import (
    Crash,
    Sequencer,
    deliveries_of,
    events_of,
    make_person,
    make_sender,
    start_enrollment,
    store_version,
    wait_for_status,
)
from workflows.enrollment import EnrollmentWorkflow


def email_sequence(n: int, gap: str = "1d", name: str | None = None) -> dict[str, Any]:
    steps = []
    for i in range(n):
        nxt = [{"trigger": "NOT_REPLIED", "after": gap, "to": f"m{i + 1}"}] if i + 1 < n else [{"trigger": "END"}]
        if i + 1 < n:
            nxt.insert(0, {"trigger": "REPLIED", "to": "done"})
        steps.append(
            {
                "id": f"m{i}",
                "action": "SEND_EMAIL",
                "subject": f"Mail {i} for {{{{ first_name }}}}",
                "body": f"Body {i}",
                "edges": nxt,
            }
        )
    if n > 1:
        steps.append({"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]})
    return {"name": name or f"mail-{uuid.uuid4().hex[:8]}", "steps": steps}


async def _enroll(stack: Sequencer, raw: dict[str, Any], **person: Any) -> WorkflowHandle[Any, Any]:
    """`raw` stored as a new version and a new person (a fresh email unless given) enrolled in it."""
    return await stack.start(raw, await stack.person(**person))


async def _slots(sf: SessionFactory) -> list[Any]:
    async with sf() as s:
        return sorted((await s.execute(select(SendSlot.slot_at))).scalars())


async def test_crash_between_claim_and_provider_call_sends_once(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    crash = Crash("after_claim")
    async with stack.worker(fault=crash):
        handle = await _enroll(stack, email_sequence(1))
        result = await handle.result()
    assert crash.fired == 1
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(stack.smtp.messages) == 1
    [delivery] = await deliveries_of(stack.sf)
    assert delivery.status == "sent" and delivery.attempts_made == 1


async def test_crash_after_provider_accepted_is_uncertain_never_resent(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    crash = Crash("after_send")
    async with stack.worker(fault=crash):
        handle = await _enroll(stack, email_sequence(1))
        result = await handle.result()
    assert crash.fired == 1
    assert len(stack.smtp.messages) == 1, "the retry must not send again"
    [delivery] = await deliveries_of(stack.sf)
    assert delivery.status == "uncertain"
    assert [e.type for e in await events_of(stack.sf, EventType.UNCERTAIN)] == ["uncertain"]
    assert result.path[0].outcome == "uncertain"


@pytest.mark.parametrize("code", ["421 4.3.2 Service not available, try later", "451 4.7.1 Greylisted"])
async def test_smtp_transient_then_accept_sends_once(code: str, sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    stack.smtp.fail_codes.append(code)
    async with stack.worker():
        result = await (await _enroll(stack, email_sequence(1))).result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(stack.smtp.messages) == 1
    [delivery] = await deliveries_of(stack.sf)
    assert delivery.status == "sent" and delivery.attempts_made == 2


async def test_smtp_550_bounces_suppresses_and_dead_letters(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    stack.smtp.reject_rcpt["gone@lead.test"] = "550 5.1.1 No such user"
    async with stack.worker():
        handle = await _enroll(stack, email_sequence(2), email="gone@lead.test")
        result = await handle.result()
    assert result.status == EnrollmentStatus.FAILED
    assert stack.smtp.messages == []
    [delivery] = await deliveries_of(stack.sf)
    assert delivery.status == "bounced"
    async with stack.sf() as s:
        sup = (await s.execute(select(Suppression))).scalars().all()
    assert [x.reason for x in sup] == ["bounce"] and sup[0].identity_id is not None
    assert (await events_of(stack.sf, EventType.ENDED))[0].data["status"] == "failed"


async def test_x_429_honours_the_reset_header(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    stack.x.fail_next(429, {"x-rate-limit-reset": str(int(time.time()) + 900)}, {"title": "Too Many Requests"})
    raw = {
        "name": f"x-{uuid.uuid4().hex[:6]}",
        "steps": [
            {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi {{ first_name }}", "edges": [{"trigger": "END"}]}
        ],
    }
    async with stack.worker():
        handle = await _enroll(stack, raw, x="424242")
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(stack.x.dms) == 1
    history = await handle.fetch_history()
    scheduled = [e for e in history.events if e.HasField("activity_task_started_event_attributes")]
    attempts = max(e.activity_task_started_event_attributes.attempt for e in scheduled)
    assert attempts == 2
    started = [e for e in history.events if e.HasField("activity_task_completed_event_attributes")]
    assert started  # the DM activity completed after waiting for the reset
    [delivery] = [d for d in await deliveries_of(stack.sf) if d.step_id == "dm"]
    assert delivery.status == "sent"


async def test_suppression_added_mid_sequence_stops_the_next_send(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    async with stack.worker():
        handle = await _enroll(stack, email_sequence(2))
        view = await wait_for_status(handle, lambda v: v.phase == "waiting")
        async with stack.sf() as s, s.begin():
            s.add(Suppression(person_id=view.person_id, reason="dnd", source="test"))
        result = await handle.result()
    assert result.status == EnrollmentStatus.SUPPRESSED
    assert len(stack.smtp.messages) == 1
    statuses = [d.status for d in await deliveries_of(stack.sf)]
    assert statuses == ["sent", "suppressed"]
    assert (await events_of(stack.sf, EventType.SUPPRESSED))[0].data["error"].startswith("suppressed (person)")


async def test_three_emails_thread_under_the_first(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    async with stack.worker():
        result = await (await _enroll(stack, email_sequence(3))).result()
    assert result.status == EnrollmentStatus.COMPLETED
    m1, m2, m3 = stack.smtp.parsed()
    ids = [m["Message-ID"] for m in (m1, m2, m3)]
    assert len(set(ids)) == 3
    assert m1["In-Reply-To"] is None
    assert m2["In-Reply-To"] == ids[0] and m2["References"].split() == [ids[0]]
    assert m3["In-Reply-To"] == ids[1] and m3["References"].split() == ids[:2]
    for m in (m1, m2, m3):
        assert m["List-Unsubscribe"].strip().startswith("<https://links.acme.test/u/")
        assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        kinds = sorted(part.get_content_type() for part in m.walk() if not part.is_multipart())
        assert kinds == ["text/html", "text/plain"]
        plain = next(p for p in m.walk() if p.get_content_type() == "text/plain").get_content()
        assert "Acme Inc, 1 Test Street, Springfield" in plain and "https://links.acme.test/u/" in plain
    ledger = await deliveries_of(stack.sf)
    assert [d.message_id for d in ledger] == ids


async def test_governor_paces_sends_with_a_durable_timer(
    wired: Any, temporal_env: Any, session_factory: SessionFactory, task_queue: str, smtp_server: Any
) -> None:
    await make_sender(session_factory, "email", "paced@acme.test", spacing=3600)
    raw = email_sequence(1)
    ref, defn = await store_version(session_factory, raw)
    async with wired():
        handles = []
        for i in range(3):
            pid = await make_person(session_factory, email=f"p{i}-{uuid.uuid4().hex[:6]}@lead.test")
            handles.append(await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid))
        deferred = await wait_for_status(handles[2], lambda v: v.phase == "waiting for send slot")
        assert deferred.until is not None
        for h in handles:
            await h.result()
    sent = sorted(e.occurred_at for e in await events_of(session_factory, EventType.SENT))
    assert len(sent) == 3 and len(smtp_server.messages) == 3
    slots = await _slots(session_factory)
    assert all(b - a >= timedelta(hours=1) for a, b in zip(slots, slots[1:], strict=False))
    assert all(b - a >= timedelta(minutes=59) for a, b in zip(sent, sent[1:], strict=False))
    assert len(await events_of(session_factory, EventType.DEFERRED_UNTIL)) == 2


async def test_one_touch_per_person_per_day_across_sequences(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    pid = await make_person(stack.sf, email="busy@lead.test")
    handles = []
    async with stack.worker(touch_cap=1):
        for _ in range(2):
            raw = dict(email_sequence(1), allow_concurrent=True)
            ref, defn = await store_version(stack.sf, raw)
            handles.append(await start_enrollment(stack.env.client, stack.task_queue, stack.sf, ref, defn, pid))
        for h in handles:
            await h.result()
    sent = sorted(e.occurred_at for e in await events_of(stack.sf, EventType.SENT))
    assert len(sent) == 2
    slots = await _slots(stack.sf)
    assert slots[1] - slots[0] >= timedelta(hours=24)
    assert sent[1] - sent[0] >= timedelta(hours=23, minutes=59)
    reasons = [e.data["reason"] for e in await events_of(stack.sf, EventType.DEFERRED_UNTIL)]
    assert reasons == ["person frequency cap"]


async def test_missing_identity_skips_to_the_timed_edge(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    raw = {
        "name": f"skip-{uuid.uuid4().hex[:6]}",
        "steps": [
            {"id": "follow", "action": "FOLLOW_ON_TWITTER", "edges": [
                {"trigger": "FOLLOWED_BACK", "to": "done"},
                {"trigger": "NOT_FOLLOWED_BACK", "after": "3d", "to": "mail"}]},
            {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]},
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip
    async with stack.worker():
        result = await (await _enroll(stack, raw)).result()
    assert [p.step for p in result.path] == ["follow", "mail"]
    assert result.path[0].outcome == "skipped"
    assert result.path[1].started_at - result.path[0].started_at < timedelta(days=1)
    assert stack.x.requests == [] and len(stack.smtp.messages) == 1


async def test_status_query_shows_the_wait(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    async with stack.worker():
        handle = await _enroll(stack, email_sequence(2, gap="2d"))
        view = await wait_for_status(handle, lambda v: v.phase == "waiting")
        assert view.current_step == "m0"
        assert view.waiting_for == ["REPLIED", "NOT_REPLIED"]
        assert view.until is not None and view.until - view.path[0].started_at >= timedelta(days=2)
        assert view.last_delivery_status == "sent"
        await handle.signal(EnrollmentWorkflow.stop, _stop())
        await handle.result()


def _stop() -> Any:
    from models.enrollment import ControlSignal

    return ControlSignal(reason="test over")


async def test_text_only_email_with_open_tracking_carries_the_pixel_and_the_ledger_names_the_address(
    sequencer_stack: Sequencer,
) -> None:
    stack = sequencer_stack
    raw = {**email_sequence(1), "track_opens": True}
    async with stack.worker():
        result = await (await _enroll(stack, raw, email="pixel@lead.test")).result()
    assert result.status == EnrollmentStatus.COMPLETED
    [message] = stack.smtp.parsed()
    html = next(p for p in message.walk() if p.get_content_type() == "text/html").get_content()
    assert "<p>Body 0</p>" in html
    assert '<img src="https://links.acme.test/o/' in html
    plain = next(p for p in message.walk() if p.get_content_type() == "text/plain").get_content()
    assert "/o/" not in plain
    [delivery] = await deliveries_of(stack.sf)
    async with stack.sf() as s:
        address = (await s.execute(select(Identity.value).where(Identity.id == delivery.identity_id))).scalar_one()
    assert address == "pixel@lead.test"


async def test_x_dm_answered_503_is_uncertain_and_never_sent_again(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    stack.x.fail_next(503, {}, {"title": "Service Unavailable"})
    raw = {
        "name": f"x5-{uuid.uuid4().hex[:6]}",
        "steps": [{"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi", "edges": [{"trigger": "END"}]}],
    }
    async with stack.worker():
        result = await (await _enroll(stack, raw, x="424242")).result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert [r.method for r in stack.x.requests] == ["POST"], "the DM is never posted a second time"
    [delivery] = await deliveries_of(stack.sf)
    assert delivery.status == "uncertain" and "503" in (delivery.error or "")


async def test_deliver_heartbeats_and_retries_connection_errors_within_seconds(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    stack.smtp.fail_codes.append("451 4.3.0 Try again")
    async with stack.worker():
        handle = await _enroll(stack, email_sequence(1))
        assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    history = await handle.fetch_history()
    [scheduled] = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name in ("deliver", "send_step")
    ]
    # a dead worker's send moves after seconds, and a refused connection is retried after one
    assert scheduled.heartbeat_timeout.ToTimedelta() == timedelta(seconds=10)
    assert scheduled.retry_policy.initial_interval.ToTimedelta() == timedelta(seconds=1)
    assert scheduled.retry_policy.maximum_interval.ToTimedelta() == timedelta(minutes=10)
    assert len(stack.smtp.messages) == 1

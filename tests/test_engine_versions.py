"""Engine gaps on the time-skipping server, with real PostgreSQL, SMTP and HTTP fakes.

- A new sequence version created while enrollments of the old one run does not touch
  them: they finish on their version while new enrollments take the new one.
- Days of timers are skipped: the workflow history shows the multi-day timers that ran.
- A signal that arrives while an action's activity is still running is not lost.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Enrollment, Identity, Segment, SegmentMember
from models.enrollment import (
    AudienceInput,
    AudienceProgress,
    ControlSignal,
    EnrollmentResult,
    EnrollmentStatus,
    InboundSignal,
)
from models.outcomes import EventType
from services.sequence_store import create_version
from tests.engine_harness import (
    Sequencer,
    events_of,
    make_person,
    start_enrollment,
    store_version,
    wait_for_status,
)
from tests.eventually import eventually
from workflows.audience import AudienceWorkflow, audience_workflow_id
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for


def subjects_to(smtp: Any, address: str) -> list[str]:
    """Subjects of the messages the SMTP server accepted for `address`, in order."""
    return [
        str(m["Subject"]) for m, (_, rcpts, _) in zip(smtp.parsed(), smtp.messages, strict=True) if address in rcpts
    ]


# --------------------------------------------------------------------------- versions

V1 = """
name: {name}
steps:
  - id: wait
    action: WAIT
    edges: [{{trigger: NORMAL_EDGE, after: 3d, to: mail}}]
  - id: mail
    action: SEND_EMAIL
    subject: "v1 hello {{{{ first_name }}}}"
    body: "version one"
    edges: [{{trigger: END}}]
"""

V2 = """
name: {name}
steps:
  - id: intro
    action: SEND_EMAIL
    subject: "v2 intro {{{{ first_name }}}}"
    body: "version two"
    edges: [{{trigger: NORMAL_EDGE, after: 1d, to: nudge}}]
  - id: nudge
    action: SEND_EMAIL
    subject: "v2 nudge {{{{ first_name }}}}"
    body: "version two, again"
    edges: [{{trigger: END}}]
"""


async def static_segment(sf: SessionFactory, name: str, people: list[int]) -> None:
    async with sf() as s, s.begin():
        seg = Segment(name=name, kind="static")
        s.add(seg)
        await s.flush()
        s.add_all([SegmentMember(segment_id=seg.id, person_id=p) for p in people])


async def enroll_audience(w: Sequencer, sequence: str, segment: str) -> AudienceProgress:
    """The production path (audience workflow → enroll_page), without skipping time meanwhile."""
    with w.env.auto_time_skipping_disabled():
        handle = await w.env.client.start_workflow(
            AudienceWorkflow.run,
            AudienceInput(sequence_name=sequence, segment_name=segment),
            id=audience_workflow_id(sequence, segment) + uuid.uuid4().hex[:4],
            task_queue=w.task_queue,
        )
        return await handle.result()


async def test_new_version_does_not_touch_running_enrollments(sequencer: Sequencer, tmp_path: Path) -> None:
    w = sequencer
    name = f"versioned-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "seq.yaml"
    path.write_text(V1.format(name=name))
    v1 = await create_version(w.sf, path)
    assert v1.version == 1
    old = {await make_person(w.sf, email=f"old{i}-{uuid.uuid4().hex[:4]}@lead.test", first_name=f"Old{i}"): i
           for i in range(2)}  # fmt: skip
    await static_segment(w.sf, "old-leads", list(old))
    progress = await enroll_audience(w, name, "old-leads")
    assert progress.started == 2
    old_handles = [w.env.client.get_workflow_handle(workflow_id_for(name, p)) for p in old]
    for h in old_handles:
        view = await wait_for_status(h, lambda v: v.phase == "waiting" and v.current_step == "wait")
        assert view.sequence.version == 1

    # The file changes while those two wait: a new immutable version.
    path.write_text(V2.format(name=name))
    v2 = await create_version(w.sf, path)
    assert (v2.version, v2.created) == (2, True)
    new = [await make_person(w.sf, email=f"new{i}-{uuid.uuid4().hex[:4]}@lead.test", first_name=f"New{i}")
           for i in range(2)]  # fmt: skip
    await static_segment(w.sf, "new-leads", new)
    assert (await enroll_audience(w, name, "new-leads")).started == 2
    # Enrolling the old audience again under the new version restarts nobody.
    again = await enroll_audience(w, name, "old-leads")
    assert (again.started, again.already) == (0, 2)
    for h in old_handles:  # still on version 1, still where they were
        view = await h.query(EnrollmentWorkflow.status)
        assert (view.sequence.version, view.current_step) == (1, "wait")

    await w.env.sleep(timedelta(days=5))  # skip past every timer of both versions
    results = {}
    for p in [*old, *new]:
        handle = w.env.client.get_workflow_handle(workflow_id_for(name, p), result_type=EnrollmentResult)
        results[p] = await handle.result()
    async with w.sf() as s:
        rows = {r.person_id: r for r in (await s.execute(select(Enrollment))).scalars()}
    for p in old:
        assert results[p].status == EnrollmentStatus.COMPLETED
        assert [e.step for e in results[p].path] == ["wait", "mail"]
        assert rows[p].sequence_version_id == v1.version_id
    for p in new:
        assert results[p].status == EnrollmentStatus.COMPLETED
        assert [e.step for e in results[p].path] == ["intro", "nudge"]
        assert rows[p].sequence_version_id == v2.version_id

    sent = await events_of(w.sf, EventType.SENT)
    by_person: dict[int, list[tuple[str | None, int | None]]] = {}
    for e in sent:
        assert e.person_id is not None
        by_person.setdefault(e.person_id, []).append((e.step_id, e.sequence_version_id))
    for p in old:
        assert by_person[p] == [("mail", v1.version_id)]
    for p in new:
        assert by_person[p] == [("intro", v2.version_id), ("nudge", v2.version_id)]

    async with w.sf() as s:
        address = {
            i.person_id: i.value
            for i in (await s.execute(select(Identity).where(Identity.channel == "email"))).scalars()
        }
    for p, i in old.items():
        assert subjects_to(w.smtp, address[p]) == [f"v1 hello Old{i}"]
    for i, p in enumerate(new):
        assert subjects_to(w.smtp, address[p]) == [f"v2 intro New{i}", f"v2 nudge New{i}"]
    assert len(w.smtp.messages) == 6


# --------------------------------------------------------------------------- days of timers


async def test_days_of_timers_are_skipped(sequencer: Sequencer) -> None:
    w = sequencer
    raw = {
        "name": f"long-{uuid.uuid4().hex[:6]}",
        "stop_on_reply": False,
        "steps": [
            {"id": "w1", "action": "WAIT", "edges": [{"trigger": "NORMAL_EDGE", "after": "3d", "to": "m1"}]},
            {"id": "m1", "action": "SEND_EMAIL", "subject": "One", "body": "1", "edges": [
                {"trigger": "REPLIED", "to": "done"},
                {"trigger": "NOT_REPLIED", "after": "4d", "to": "c1"}]},
            {"id": "c1", "action": "CHECK_FOR_REPLY", "edges": [
                {"trigger": "REPLIED", "to": "done"},
                {"trigger": "NOT_REPLIED", "after": "5d", "to": "m2"}]},
            {"id": "m2", "action": "SEND_EMAIL", "subject": "Two", "body": "2", "edges": [{"trigger": "END"}]},
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip
    ref, defn = await store_version(w.sf, raw)
    pid = await make_person(w.sf, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    began = await w.env.get_current_time()
    handle = await start_enrollment(w.env.client, w.task_queue, w.sf, ref, defn, pid)
    result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert [p.step for p in result.path] == ["w1", "m1", "c1", "m2"]
    assert [p.left_by for p in result.path[:3]] == ["NORMAL_EDGE", "NOT_REPLIED", "NOT_REPLIED"]

    history = await handle.fetch_history()
    started = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for e in history.events
        if e.HasField("timer_started_event_attributes")
    ]
    fired = [e for e in history.events if e.HasField("timer_fired_event_attributes")]
    long_timers = [t for t in started if t >= timedelta(days=1)]
    assert len(long_timers) == 3 and len(fired) >= 3
    for timer, days in zip(long_timers, (3, 4, 5), strict=True):
        assert timedelta(days=days) - timedelta(minutes=1) <= timer <= timedelta(days=days)
    # the test server's clock moved the twelve days the history says, and the sends follow it
    assert await w.env.get_current_time() - began >= timedelta(days=12)
    sent = [e.occurred_at for e in await events_of(w.sf, EventType.SENT)]
    assert len(sent) == 2 and len(w.smtp.messages) == 2
    assert sent[1] - sent[0] >= timedelta(days=9)


# --------------------------------------------------------------------------- signal during an action


async def _hanging_dm(w: Sequencer, raw: dict[str, Any]) -> Any:
    """Start the sequence with the X API holding its first request; return once it is held."""
    w.x.hang_next()
    ref, defn = await store_version(w.sf, raw)
    pid = await make_person(w.sf, email=f"{uuid.uuid4().hex[:8]}@lead.test", x=str(uuid.uuid4().int % 10**12))
    handle = await start_enrollment(w.env.client, w.task_queue, w.sf, ref, defn, pid)
    await eventually(lambda: w.x.requests, "the provider to hold the request", tries=1500, interval=0.01)
    assert len(w.x.requests) == 1
    view = await handle.query(EnrollmentWorkflow.status)
    assert view.phase == "sending" and view.current_step == "dm"
    return handle


async def test_reply_during_a_running_send_takes_the_reply_branch(sequencer: Sequencer) -> None:
    w = sequencer
    raw = {
        "name": f"midsend-{uuid.uuid4().hex[:6]}",
        "steps": [
            {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi {{ first_name }}", "edges": [
                {"trigger": "REPLIED", "to": "yes"},
                {"trigger": "NOT_REPLIED", "after": "2d", "to": "no"}]},
            {"id": "yes", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {"id": "no", "action": "SEND_EMAIL", "subject": "S", "body": "B", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip
    handle = await _hanging_dm(w, raw)
    await handle.signal(EnrollmentWorkflow.replied, InboundSignal(event_id="mid-1", channel="x"))
    w.x.release()  # the held request now fails (429, not performed): the activity retries and sends
    result = await handle.result()
    assert [p.step for p in result.path] == ["dm", "yes"]
    assert result.path[0].left_by == "REPLIED" and result.path[0].outcome == "sent"
    assert len(w.x.dms) == 1 and w.smtp.messages == []


@pytest.mark.parametrize("signal", ["replied", "stop"])
async def test_signal_during_a_running_send_ends_before_the_next_send(sequencer: Sequencer, signal: str) -> None:
    w = sequencer
    raw = {
        "name": f"midstop-{uuid.uuid4().hex[:6]}",
        "steps": [
            {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi", "edges": [
                {"trigger": "NORMAL_EDGE", "after": "1d", "to": "mail"}]},
            {"id": "mail", "action": "SEND_EMAIL", "subject": "S", "body": "B", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip
    handle = await _hanging_dm(w, raw)
    if signal == "replied":  # stop_on_reply (the default): the step does not branch on REPLIED
        await handle.signal(EnrollmentWorkflow.replied, InboundSignal(event_id="mid-2", channel="x"))
    else:
        await handle.signal(EnrollmentWorkflow.stop, ControlSignal(reason="manual"))
    w.x.release()
    result = await handle.result()
    expected = EnrollmentStatus.REPLIED if signal == "replied" else EnrollmentStatus.STOPPED
    assert result.status == expected
    assert [p.step for p in result.path] == ["dm"]
    assert len(w.x.dms) == 1  # the action in flight completed once
    assert w.smtp.messages == []  # and nothing after it was sent

"""The enrollment workflow on the time-skipping server, with real PostgreSQL and channels.

Covers every trigger on every action it fits (both branches of every wait), pause and
resume across a timer, stop, signals before start, duplicate signals, send windows
across a weekend in a non-UTC zone, absolute times, continue-as-new, re-enrollment and
versions.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from temporalio.exceptions import WorkflowAlreadyStartedError

from db.tables import SenderAccount
from models.enrollment import ControlSignal, EnrollmentResult, EnrollmentStatus, InboundSignal
from models.outcomes import EventType
from models.sequence import ALLOWED_TRIGGERS, NEGATIVE_OF, Action, Trigger
from services.senders import CHANNEL_DEFAULTS
from tests.engine_harness import (
    Sequencer,
    deliveries_of,
    events_of,
    start_enrollment,
    store_version,
    wait_for_status,
)
from workflows.enrollment import EnrollmentWorkflow

CONTENT = {
    Action.SEND_EMAIL: {
        "subject": "Hi {{ first_name }}",
        "body": "Hello {{ first_name }} at {{ company }}",
    },
    Action.SEND_TWITTER_DM: {"text": "Hey {{ first_name }}"},
    Action.SEND_LINKEDIN_DM: {"text": "Hey {{ first_name }}"},
    Action.SEND_XMTP_DM: {"text": "gm {{ first_name }}"},
    Action.SEND_CONNECTION_REQUEST: {"text": "Let's connect, {{ first_name }}"},
}
SIGNAL_NAME = {
    Trigger.REPLIED: "replied",
    Trigger.CONNECTION_ACCEPTED: "connection_accepted",
    Trigger.FOLLOWED_BACK: "followed_back",
    Trigger.REPLIED_TO_NOTE: "replied_to_note",
}


def _seq(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "steps": steps, **extra}


def _branch_sequence(action: Action, event: Trigger) -> dict[str, Any]:
    negative = next(n for n, e in NEGATIVE_OF.items() if e == event) if event in NEGATIVE_OF.values() else None
    edges: list[dict[str, Any]] = [{"trigger": str(event), "to": "yes"}]
    if negative is not None:
        edges.append({"trigger": str(negative), "after": "2d", "to": "no"})
    else:  # REPLIED_TO_NOTE has no negative twin: a NORMAL_EDGE timeout is the other branch
        edges.append({"trigger": "NOT_REPLIED", "after": "2d", "to": "no"})
    return _seq(
        f"branch-{action.lower()}-{event.lower()}-{uuid.uuid4().hex[:6]}",
        [
            {"id": "act", "action": str(action), **CONTENT.get(action, {}), "edges": edges},
            {"id": "yes", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {"id": "no", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
        stop_on_reply=False,
    )


PAIRS = sorted(
    (action, trigger) for action, triggers in ALLOWED_TRIGGERS.items() for trigger in triggers if trigger in SIGNAL_NAME
)


def _steps(result: EnrollmentResult) -> list[str]:
    return [p.step for p in result.path]


@pytest.mark.parametrize(("action", "event"), PAIRS, ids=[f"{a}-{t}" for a, t in PAIRS])
async def test_event_branch_and_timeout_branch(sequencer: Sequencer, action: Action, event: Trigger) -> None:
    raw = _branch_sequence(action, event)
    # Event branch: the signal arrives while the step waits.
    handle = await sequencer.start(raw)
    await wait_for_status(handle, lambda v: v.phase == "waiting")
    await handle.signal(SIGNAL_NAME[event], InboundSignal(event_id=f"e-{uuid.uuid4()}", channel="email"))
    result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert _steps(result) == ["act", "yes"]
    assert result.path[0].left_by == str(event)
    # Timeout branch: nothing arrives, two days are skipped.
    raw2 = dict(raw, name=raw["name"] + "-t")
    handle2 = await sequencer.start(raw2)
    result2 = await handle2.result()
    assert _steps(result2) == ["act", "no"]
    assert result2.path[0].left_at is not None
    assert result2.path[0].left_at - result2.path[0].started_at >= timedelta(days=2)


ACTIONS = sorted(Action)


def _channel_calls(sequencer: Sequencer, action: Action) -> int:
    """How many times the action's provider (SMTP, X, relay) was asked to act."""
    if action == Action.SEND_EMAIL:
        return len(sequencer.smtp.messages)
    if action in (Action.SEND_TWITTER_DM, Action.FOLLOW_ON_TWITTER, Action.UNFOLLOW_ON_TWITTER):
        return len(sequencer.x.requests)
    if action in (Action.SEND_CONNECTION_REQUEST, Action.SEND_LINKEDIN_DM, Action.SEND_XMTP_DM):
        return len(sequencer.relay.actions)
    return 0


@pytest.mark.parametrize("action", ACTIONS, ids=[str(a) for a in ACTIONS])
async def test_normal_edge_and_end_on_every_action(sequencer: Sequencer, action: Action) -> None:
    """NORMAL_EDGE (after its delay) leaves the action, END finishes on it."""
    raw = _seq(
        f"normal-{action.lower()}-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "act",
                "action": str(action),
                **CONTENT.get(action, {}),
                "edges": [{"trigger": "NORMAL_EDGE", "after": "1d", "to": "fin"}],
            },
            {"id": "fin", "action": str(action), **CONTENT.get(action, {}), "edges": [{"trigger": "END"}]},
        ],
    )
    result = await (await sequencer.start(raw)).result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert _steps(result) == ["act", "fin"]
    assert [p.left_by for p in result.path] == ["NORMAL_EDGE", "END"]
    first = result.path[0]
    assert first.left_at is not None and first.left_at - first.started_at >= timedelta(days=1)
    sends = action not in (Action.WAIT, Action.CHECK_FOR_REPLY)
    assert [p.outcome for p in result.path] == (["sent", "sent"] if sends else [None, None])
    assert _channel_calls(sequencer, action) == (2 if sends else 0)


def test_every_allowed_trigger_is_exercised() -> None:
    """The parametrisations above cover every (action, trigger) the validator allows."""
    covered = set(PAIRS)
    for action, event in PAIRS:  # the timeout branch of each event test
        negative = next((n for n, e in NEGATIVE_OF.items() if e == event), Trigger.NOT_REPLIED)
        covered.add((action, negative))
    covered |= {(action, t) for action in ACTIONS for t in (Trigger.NORMAL_EDGE, Trigger.END)}
    allowed = {(action, t) for action, triggers in ALLOWED_TRIGGERS.items() for t in triggers}
    assert allowed - covered == set()
    assert {a for a, _ in PAIRS} >= {
        Action.SEND_EMAIL,
        Action.SEND_TWITTER_DM,
        Action.SEND_LINKEDIN_DM,
        Action.SEND_XMTP_DM,
        Action.CHECK_FOR_REPLY,
        Action.SEND_CONNECTION_REQUEST,
        Action.FOLLOW_ON_TWITTER,
    }


async def test_actions_reach_their_channels(sequencer: Sequencer) -> None:
    raw = _seq(
        f"all-channels-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "follow",
                "action": "FOLLOW_ON_TWITTER",
                "edges": [{"trigger": "NORMAL_EDGE", "to": "dm"}],
            },
            {
                "id": "dm",
                "action": "SEND_TWITTER_DM",
                "text": "Hi {{ first_name }}",
                "edges": [{"trigger": "NORMAL_EDGE", "to": "li"}],
            },
            {
                "id": "li",
                "action": "SEND_CONNECTION_REQUEST",
                "text": "Hi",
                "edges": [{"trigger": "NORMAL_EDGE", "to": "xm"}],
            },
            {
                "id": "xm",
                "action": "SEND_XMTP_DM",
                "text": "gm",
                "edges": [{"trigger": "NORMAL_EDGE", "to": "mail"}],
            },
            {
                "id": "mail",
                "action": "SEND_EMAIL",
                "subject": "S",
                "body": "B",
                "edges": [{"trigger": "NORMAL_EDGE", "to": "unf"}],
            },
            {"id": "unf", "action": "UNFOLLOW_ON_TWITTER", "edges": [{"trigger": "END"}]},
        ],
    )
    result = await (await sequencer.start(raw)).result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert [p.outcome for p in result.path] == ["sent"] * 6
    assert len(sequencer.x.dms) == 1 and sequencer.x.dms[0]["text"] == "Hi Ada"
    assert len(sequencer.relay.actions) == 2
    assert len(sequencer.smtp.messages) == 1
    sent = await events_of(sequencer.sf, EventType.SENT)
    assert [e.step_id for e in sent] == ["follow", "dm", "li", "xm", "mail", "unf"]


async def test_pause_and_resume_across_a_timer(sequencer: Sequencer) -> None:
    raw = _seq(
        f"pause-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "ask",
                "action": "CHECK_FOR_REPLY",
                "edges": [
                    {"trigger": "REPLIED", "to": "yes"},
                    {"trigger": "NOT_REPLIED", "after": "2d", "to": "no"},
                ],
            },
            {"id": "yes", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {
                "id": "no",
                "action": "SEND_EMAIL",
                "subject": "Nudge",
                "body": "Still there?",
                "edges": [{"trigger": "END"}],
            },
        ],
    )
    handle = await sequencer.start(raw)
    waiting = await wait_for_status(handle, lambda v: v.phase == "waiting")
    assert waiting.until is not None
    await handle.signal(EnrollmentWorkflow.pause, ControlSignal(reason="holiday"))
    paused = await wait_for_status(handle, lambda v: v.paused and v.phase == "paused")
    assert paused.status == EnrollmentStatus.PAUSED
    await sequencer.env.sleep(timedelta(days=5))  # far past the 2-day timer
    still = await handle.query(EnrollmentWorkflow.status)
    assert still.current_step == "ask" and still.paused
    assert sequencer.smtp.messages == []  # nothing skipped ahead while paused
    await handle.signal(EnrollmentWorkflow.resume, ControlSignal())
    result = await handle.result()
    assert _steps(result) == ["ask", "no"]
    assert result.path[0].left_at is not None
    held = result.path[0].left_at - result.path[0].started_at
    assert held >= timedelta(days=7), "the clock stopped while paused: 2 days still had to run"
    assert len(sequencer.smtp.messages) == 1


async def test_stop_ends_without_further_sends(sequencer: Sequencer) -> None:
    raw = _seq(
        f"stop-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "wait",
                "action": "WAIT",
                "edges": [{"trigger": "NORMAL_EDGE", "after": "1d", "to": "mail"}],
            },
            {
                "id": "mail",
                "action": "SEND_EMAIL",
                "subject": "S",
                "body": "B",
                "edges": [{"trigger": "END"}],
            },
        ],
    )
    handle = await sequencer.start(raw)
    await wait_for_status(handle, lambda v: v.phase == "waiting")
    await handle.signal(EnrollmentWorkflow.stop, ControlSignal(reason="manual"))
    result = await handle.result()
    assert result.status == EnrollmentStatus.STOPPED
    assert sequencer.smtp.messages == []
    ended = await events_of(sequencer.sf, EventType.ENDED)
    assert ended[-1].data["status"] == "stopped"


async def test_signal_before_start_is_not_lost(sequencer: Sequencer) -> None:
    raw = _seq(
        f"early-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "ask",
                "action": "CHECK_FOR_REPLY",
                "edges": [
                    {"trigger": "REPLIED", "to": "yes"},
                    {"trigger": "NOT_REPLIED", "after": "3d", "to": "no"},
                ],
            },
            {"id": "yes", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {"id": "no", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    )
    handle = await sequencer.start(
        raw,
        start_signal="replied",
        start_signal_args=[InboundSignal(event_id="before-start", channel="x")],
    )
    result = await handle.result()
    assert _steps(result) == ["ask", "yes"]


async def test_duplicate_event_id_is_ignored(sequencer: Sequencer) -> None:
    raw = _seq(
        f"dup-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "a",
                "action": "CHECK_FOR_REPLY",
                "edges": [
                    {"trigger": "REPLIED", "to": "b"},
                    {"trigger": "NOT_REPLIED", "after": "1d", "to": "end_a"},
                ],
            },
            {
                "id": "b",
                "action": "CHECK_FOR_REPLY",
                "edges": [
                    {"trigger": "REPLIED", "to": "end_b_replied"},
                    {"trigger": "NOT_REPLIED", "after": "1d", "to": "end_b_quiet"},
                ],
            },
            {"id": "end_a", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {"id": "end_b_replied", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {"id": "end_b_quiet", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    )
    handle = await sequencer.start(raw)
    await wait_for_status(handle, lambda v: v.phase == "waiting" and v.current_step == "a")
    sig = InboundSignal(event_id="same-event", channel="email")
    await handle.signal(EnrollmentWorkflow.replied, sig)
    await wait_for_status(handle, lambda v: v.phase == "waiting" and v.current_step == "b")
    await handle.signal(EnrollmentWorkflow.replied, sig)  # the provider retried its webhook
    result = await handle.result()
    assert _steps(result) == ["a", "b", "end_b_quiet"]


async def test_send_window_skips_the_weekend_in_the_persons_zone(sequencer: Sequencer) -> None:
    tz = ZoneInfo("America/New_York")
    now = (await sequencer.env.get_current_time()).astimezone(tz)
    days_to_saturday = (5 - now.weekday()) % 7 or 7
    saturday_noon = (now + timedelta(days=days_to_saturday)).replace(hour=12, minute=0, second=0, microsecond=0)
    raw = _seq(
        f"window-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "mail",
                "action": "SEND_EMAIL",
                "subject": "S",
                "body": "B",
                "at": saturday_noon.isoformat(),
                "edges": [{"trigger": "END"}],
            },
        ],
        send_window={"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:30"},
        timezone="UTC",
    )
    pid = await sequencer.lead(timezone="America/New_York")
    handle = await sequencer.start(raw, person=pid, timezone="America/New_York")
    result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    sent = (await events_of(sequencer.sf, EventType.SENT))[0].occurred_at.astimezone(tz)
    monday_nine = (saturday_noon + timedelta(days=2)).replace(hour=9, minute=0)
    assert sent.weekday() == 0
    assert monday_nine <= sent < monday_nine + timedelta(minutes=1)


async def test_absolute_time_step(sequencer: Sequencer) -> None:
    start = await sequencer.env.get_current_time()
    at = (start + timedelta(days=10)).replace(microsecond=0)
    raw = _seq(
        f"absolute-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "mail",
                "action": "SEND_EMAIL",
                "subject": "Launch",
                "body": "Today!",
                "at": at.isoformat(),
                "edges": [{"trigger": "END"}],
            }
        ],
    )
    result = await (await sequencer.start(raw)).result()
    assert result.status == EnrollmentStatus.COMPLETED
    sent = (await events_of(sequencer.sf, EventType.SENT))[0].occurred_at
    assert at <= sent < at + timedelta(minutes=1)


async def test_continue_as_new_keeps_state(sequencer: Sequencer) -> None:
    steps = [
        {
            "id": f"s{i}",
            "action": "WAIT",
            "edges": [{"trigger": "NORMAL_EDGE", "after": "3d", "to": f"s{i + 1}"}],
        }
        for i in range(5)
    ]
    steps.append(
        {
            "id": "s5",
            "action": "SEND_EMAIL",
            "variants": [
                {"name": "A", "subject": "A", "body": "a"},
                {"name": "B", "subject": "B", "body": "b"},
            ],
            "edges": [{"trigger": "END"}],
        }
    )
    raw = _seq(f"can-{uuid.uuid4().hex[:6]}", steps)
    handle = await sequencer.start(raw, max_steps_per_run=2)
    result = await handle.result()
    assert _steps(result) == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert result.status == EnrollmentStatus.COMPLETED
    first_run = sequencer.env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
    history = await first_run.fetch_history()
    assert history.events[-1].HasField("workflow_execution_continued_as_new_event_attributes")
    assert len(sequencer.smtp.messages) == 1


async def test_reenrollment_is_refused(sequencer: Sequencer) -> None:
    raw = _seq(
        f"once-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "w",
                "action": "WAIT",
                "edges": [{"trigger": "NORMAL_EDGE", "after": "1d", "to": "e"}],
            },
            {"id": "e", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    )
    ref, defn = await store_version(sequencer.sf, raw)
    pid = await sequencer.lead()
    handle = await start_enrollment(sequencer.env.client, sequencer.task_queue, sequencer.sf, ref, defn, pid)
    with pytest.raises(IntegrityError, match="uq_enrollments_sequence_person"):
        await start_enrollment(sequencer.env.client, sequencer.task_queue, sequencer.sf, ref, defn, pid)
    with pytest.raises(WorkflowAlreadyStartedError):  # and the workflow id refuses too
        await sequencer.env.client.start_workflow(
            "Enrollment", {"ignored": True}, id=handle.id, task_queue=sequencer.task_queue
        )
    await handle.result()


async def test_stop_on_reply_ends_before_the_next_send(sequencer: Sequencer) -> None:
    raw = _seq(
        f"sor-{uuid.uuid4().hex[:6]}",
        [
            {
                "id": "mail1",
                "action": "SEND_EMAIL",
                "subject": "One",
                "body": "1",
                "edges": [{"trigger": "NORMAL_EDGE", "after": "2d", "to": "mail2"}],
            },
            {
                "id": "mail2",
                "action": "SEND_EMAIL",
                "subject": "Two",
                "body": "2",
                "edges": [{"trigger": "END"}],
            },
        ],
    )
    handle = await sequencer.start(raw)
    await wait_for_status(handle, lambda v: v.phase == "waiting")
    await handle.signal(EnrollmentWorkflow.replied, InboundSignal(event_id="r1", channel="email"))
    result = await handle.result()
    assert result.status == EnrollmentStatus.REPLIED
    assert len(sequencer.smtp.messages) == 1


async def test_a_reply_branch_and_a_follow_up_with_the_sender_caps_users_get(sequencer_stack: Sequencer) -> None:
    """Three leads, the email sender at `senders add`'s default caps, the default touch cap."""
    async with sequencer_stack.sf() as s, s.begin():
        d = CHANNEL_DEFAULTS["email"]
        await s.execute(
            update(SenderAccount)
            .where(SenderAccount.channel == "email")
            .values(per_hour=d.per_hour, per_day=d.per_day, min_spacing_seconds=d.spacing, jitter_seconds=d.jitter)
        )
    edges = [{"trigger": "REPLIED", "to": "yes"}, {"trigger": "NOT_REPLIED", "after": "2d", "to": "m1"}]
    raw = _seq(
        f"defaults-{uuid.uuid4().hex[:6]}",
        [
            {"id": "m0", "action": "SEND_EMAIL", **CONTENT[Action.SEND_EMAIL], "edges": edges},
            {"id": "yes", "action": "WAIT", "edges": [{"trigger": "END"}]},
            {"id": "m1", "action": "SEND_EMAIL", "subject": "Again", "body": "B", "edges": [{"trigger": "END"}]},
        ],
        stop_on_reply=False,
    )
    async with sequencer_stack.worker():
        handles = await sequencer_stack.start_many(raw, [await sequencer_stack.lead() for _ in range(3)])
        await wait_for_status(handles[0], lambda v: v.phase == "waiting")
        await handles[0].signal("replied", InboundSignal(event_id=f"e-{uuid.uuid4()}", channel="email"))
        results = [await h.result() for h in handles]
    assert [_steps(r) for r in results] == [["m0", "yes"], ["m0", "m1"], ["m0", "m1"]]
    assert len(sequencer_stack.smtp.messages) == 5
    sent = sorted(d.sent_at for d in await deliveries_of(sequencer_stack.sf) if d.sent_at is not None)
    assert len(sent) == 5
    # the sender's spacing held between every two sends
    assert all(b - a >= timedelta(seconds=CHANNEL_DEFAULTS["email"].spacing) for a, b in pairwise(sent))

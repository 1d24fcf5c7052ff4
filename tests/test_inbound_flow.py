"""Inbound events changing a lead's course: classification, out-of-office, company holds, retries.

Served app + production worker + time-skipping Temporal server (harness in
tests/test_webhooks.py). Time is skipped with the test server, never slept.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from db.tables import InboundEvent, Suppression
from models.enrollment import ControlSignal, EnrollmentStatus
from models.outcomes import EventType
from tests.engine_harness import events_of, wait_for_status
from tests.webhook_harness import Hook, email_sequence, signals_in_history
from workflows.enrollment import EnrollmentWorkflow
from workflows.search_attributes import NEXT_ACTION_AT


async def inbound_row(h: Hook, event_id: str) -> InboundEvent:
    async with h.sf() as s:
        return (await s.execute(select(InboundEvent).where(InboundEvent.provider_event_id == event_id))).scalar_one()


# --------------------------------------------------------------------------- out of office


async def test_out_of_office_is_not_a_reply_and_moves_the_next_action_after_the_return_date(
    hook: Hook,
) -> None:
    pid = await hook.person(email="away@lead.test", timezone="Europe/Berlin")
    handle = await hook.enroll(email_sequence(gap="2d"), pid)
    await hook.waiting_at(handle)
    now = await hook.env.get_current_time()
    back = (now + timedelta(days=10)).date()
    text = f"I am out of office until {back.day} {back.strftime('%B')}. For urgent matters call Bob.\n\n> Hello Ada"
    resp = await hook.post(
        "email",
        {"event_id": "ooo-1", "type": "reply", "from": "away@lead.test", "text": text, "occurred_at": now.isoformat()},
    )
    assert resp.status_code == 202
    assert resp.json()["status"] == "rescheduled" and resp.json()["classification"] == "out_of_office"
    expected = datetime.combine(back, time(9, 0), tzinfo=ZoneInfo("Europe/Berlin")).astimezone(UTC)

    # Not a reply: still waiting on m0's edges, nothing branched.
    view = await hook.waiting_at(handle)
    assert view.waiting_for == ["REPLIED", "NOT_REPLIED"] and view.path[-1].left_by is None

    # The NOT_REPLIED timer runs out after two days; the next mail waits for the return date.
    await hook.env.sleep(timedelta(days=2, hours=1))
    view = await wait_for_status(handle, lambda v: v.current_step == "m1" and v.phase == "scheduled")
    assert view.path[0].left_by == "NOT_REPLIED"
    assert view.until == expected
    desc = await handle.describe()
    assert desc.typed_search_attributes.get(NEXT_ACTION_AT) == expected
    assert len(hook.smtp.messages) == 1

    result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert [m["Subject"] for m in hook.smtp.parsed()] == ["Hello Ada", "Again"]
    second = [e for e in await events_of(hook.sf, EventType.SENT) if e.step_id == "m1"]
    assert len(second) == 1 and second[0].occurred_at >= expected
    assert await events_of(hook.sf, EventType.REPLIED) == []
    [ooo] = await events_of(hook.sf, EventType.OUT_OF_OFFICE)
    assert ooo.data["until"] == expected.isoformat()
    row = await inbound_row(hook, "ooo-1")
    assert (row.status, row.classification, row.person_id) == ("rescheduled", "out_of_office", pid)


async def test_out_of_office_without_a_date_holds_for_the_default_delay(hook: Hook) -> None:
    pid = await hook.person(email="vague@lead.test")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    before = await hook.env.get_current_time()
    text = "Automatic reply: I am on vacation with limited access to email."
    resp = await hook.post("email", {"event_id": "ooo-2", "type": "reply", "from": "vague@lead.test", "text": text})
    assert resp.json()["status"] == "rescheduled"
    await wait_for_status(handle, lambda v: v.phase == "waiting")
    after = await hook.env.get_current_time()
    await hook.env.sleep(timedelta(days=1, hours=1))
    view = await wait_for_status(handle, lambda v: v.current_step == "m1" and v.phase == "scheduled")
    assert view.until is not None
    assert before + timedelta(days=7) - timedelta(seconds=1) <= view.until <= after + timedelta(days=7)
    assert len(hook.smtp.messages) == 1
    await handle.terminate("test over")


# --------------------------------------------------------------------------- classification


async def test_unsubscribe_intent_reply_suppresses_and_stops(hook: Hook) -> None:
    pid = await hook.person(email="done@lead.test")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    text = "Please remove me from your list.\n\nOn Mon, Sales wrote:\n> Hello Ada"
    resp = await hook.post("email", {"event_id": "un-1", "type": "reply", "from": "done@lead.test", "text": text})
    assert resp.json() == {
        "status": "unsubscribed",
        "person_id": pid,
        "enrollments": 1,
        "classification": "unsubscribe",
    }
    result = await handle.result()
    assert result.status == EnrollmentStatus.UNSUBSCRIBED
    assert len(hook.smtp.messages) == 1
    async with hook.sf() as s:
        [sup] = (await s.execute(select(Suppression))).scalars().all()
    assert (sup.person_id, sup.reason) == (pid, "unsubscribe reply")
    assert await events_of(hook.sf, EventType.REPLIED) == []  # not counted as a reply
    assert len(await events_of(hook.sf, EventType.UNSUBSCRIBED)) == 1
    assert await signals_in_history(handle, "replied") == 0
    assert await signals_in_history(handle, "unsubscribe") == 1


@pytest.mark.parametrize(
    ("text", "label", "positive_events"),
    [
        ("Not interested, thanks.", "negative", 0),
        ("Klingt gut, lass uns nächste Woche sprechen.", "positive", 1),
        ("Who is this?", "neutral", 0),
    ],
)
async def test_replies_are_classified_and_still_branch(
    hook: Hook,
    text: str,
    label: str,
    positive_events: int,
) -> None:
    pid = await hook.person(email=f"{label}@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    resp = await hook.post(
        "email", {"event_id": f"c-{label}", "type": "reply", "from": f"{label}@lead.test", "text": text}
    )
    assert resp.json()["classification"] == label
    assert (await handle.result()).path[0].left_by == "REPLIED"
    [replied] = await events_of(hook.sf, EventType.REPLIED)
    assert replied.data["classification"] == label
    assert len(await events_of(hook.sf, EventType.POSITIVE_REPLY)) == positive_events
    assert (await inbound_row(hook, f"c-{label}")).classification == label


# --------------------------------------------------------------------------- other event types


async def test_followed_back_on_x_takes_the_followed_back_edge(hook: Hook) -> None:
    raw = {
        "name": f"follow-{uuid.uuid4().hex[:6]}",
        "steps": [
            {"id": "follow", "action": "FOLLOW_ON_TWITTER", "edges": [
                {"trigger": "FOLLOWED_BACK", "to": "dm"},
                {"trigger": "NOT_FOLLOWED_BACK", "after": "3d", "to": "mail"}]},
            {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Thanks {{ first_name }}", "edges": [{"trigger": "END"}]},
            {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip
    pid = await hook.person(email="fb@lead.test", x="1234567")
    handle = await hook.enroll(raw, pid)
    await hook.waiting_at(handle, "follow")
    resp = await hook.post("x", {"event_id": "fb-1", "type": "followed_back", "from": "1234567"})
    assert resp.json()["status"] == "signalled"
    result = await handle.result()
    assert [(p.step, p.left_by) for p in result.path] == [("follow", "FOLLOWED_BACK"), ("dm", "END")]
    assert hook.smtp.messages == []
    assert len(await events_of(hook.sf, EventType.FOLLOWED_BACK)) == 1


async def test_connection_accepted_on_linkedin_by_profile_url(hook: Hook) -> None:
    raw = {
        "name": f"li-{uuid.uuid4().hex[:6]}",
        "steps": [
            {"id": "invite", "action": "SEND_CONNECTION_REQUEST", "text": "Hi {{ first_name }}", "edges": [
                {"trigger": "CONNECTION_ACCEPTED", "to": "done"},
                {"trigger": "CONNECTION_NOT_ACCEPTED", "after": "7d", "to": "mail"}]},
            {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]},
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip
    pid = await hook.person(email="li@lead.test", linkedin="https://www.linkedin.com/in/ada-l")
    handle = await hook.enroll(raw, pid)
    await hook.waiting_at(handle, "invite")
    resp = await hook.post(
        "linkedin",
        {"event_id": "li-1", "type": "connection_accepted", "from": "linkedin.com/in/Ada-L/?utm_source=share"},
    )
    assert resp.json()["person_id"] == pid
    result = await handle.result()
    assert [p.left_by for p in result.path] == ["CONNECTION_ACCEPTED", "END"]
    assert hook.smtp.messages == []


# --------------------------------------------------------------------------- robustness


async def test_an_event_whose_processing_did_not_finish_is_completed_by_the_retry(hook: Hook) -> None:
    """A row left `received` (the app died, Temporal was down) is not a duplicate: the retry finishes it."""
    pid = await hook.person(email="retry@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    async with hook.sf() as s, s.begin():
        s.add(
            InboundEvent(
                channel="email", provider_event_id="r-1", type="reply", from_value="retry@lead.test", status="received"
            )
        )
    payload = {"event_id": "r-1", "type": "reply", "from": "retry@lead.test", "text": "yes"}
    first = await hook.post("email", payload)
    assert first.json()["status"] == "signalled"
    second = await hook.post("email", payload)
    assert second.json()["status"] == "duplicate"
    assert (await handle.result()).path[0].left_by == "REPLIED"
    assert await signals_in_history(handle, "replied") == 1
    assert (await inbound_row(hook, "r-1")).status == "signalled"


async def test_a_reply_for_a_finished_workflow_is_accepted(hook: Hook) -> None:
    """The row still says active but the workflow is gone: 202, nothing to signal, no error."""
    pid = await hook.person(email="late@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    await handle.terminate("gone")
    resp = await hook.post("email", {"event_id": "late-1", "type": "reply", "from": "late@lead.test", "text": "hi"})
    assert resp.status_code == 202 and resp.json()["status"] == "signalled"
    assert len(await events_of(hook.sf, EventType.REPLIED)) == 1


# --------------------------------------------------------------------------- company hold


async def test_a_reply_holds_colleagues_in_sequences_that_ask_for_it(hook: Hook) -> None:
    """One person at Globex replies: the Globex colleague in the same (holding) sequence is paused.

    A paused workflow has no timer, so the test never waits on a result while it is the only
    thing left on the time-skipping server (which would skip straight to its execution timeout):
    time is moved with `env.sleep`, and the hold is released with `resume` before the end.
    """
    holding = email_sequence(gap="2d", hold_company_on_reply=True)
    plain = email_sequence(gap="2d")
    replier = await hook.person(email="a@globex.test", company="Globex")
    colleague = await hook.person(email="b@globex.test", company="Globex")
    elsewhere = await hook.person(email="c@initech.test", company="Initech")
    other_seq = await hook.person(email="d@globex.test", company="Globex")
    h_replier, h_colleague, h_elsewhere = await hook.enroll_many(holding, [replier, colleague, elsewhere])
    h_other = await hook.enroll(plain, other_seq)
    for h in (h_replier, h_colleague, h_elsewhere, h_other):
        await hook.waiting_at(h)

    reply = {"event_id": "co-1", "type": "reply", "from": "a@globex.test", "text": "Let's talk"}
    resp = await hook.post("email", reply)
    assert resp.json()["status"] == "signalled"
    held = await wait_for_status(h_colleague, lambda v: v.paused)
    assert held.status == EnrollmentStatus.PAUSED and held.current_step == "m0"
    assert await signals_in_history(h_colleague, "pause") == 1
    for h in (h_elsewhere, h_other):  # another company / a sequence without the rule: untouched
        assert not (await h.query(EnrollmentWorkflow.status)).paused
    paused_at = await hook.env.get_current_time()

    await hook.env.sleep(timedelta(days=3))  # well past the 2-day NOT_REPLIED timers
    for h in (h_replier, h_elsewhere, h_other):
        await wait_for_status(h, lambda v: v.phase == "finished")
    assert [p.left_by for p in (await h_replier.query(EnrollmentWorkflow.status)).path] == ["REPLIED", "END"]
    for h in (h_elsewhere, h_other):
        assert [p.left_by for p in (await h.query(EnrollmentWorkflow.status)).path] == ["NOT_REPLIED", "END"]
    view = await h_colleague.query(EnrollmentWorkflow.status)
    assert view.phase == "paused" and view.current_step == "m0"
    recipients = sorted(m["To"] for m in hook.smtp.parsed())
    expected = ["a@globex.test", "b@globex.test"] + ["c@initech.test", "d@globex.test"] * 2
    assert recipients == sorted(expected)

    # The hold is a pause: resuming picks up where it stopped, with the timer's time left.
    await h_colleague.signal(EnrollmentWorkflow.resume, ControlSignal(reason="sales said go on", source="test"))
    result = await h_colleague.result()
    assert [(p.step, p.left_by) for p in result.path] == [("m0", "NOT_REPLIED"), ("m1", "END")]
    # The clock stopped while held: m1 came two days after the resume, not at once.
    assert result.path[1].started_at >= paused_at + timedelta(days=4)
    assert [m["To"] for m in hook.smtp.parsed()].count("b@globex.test") == 2

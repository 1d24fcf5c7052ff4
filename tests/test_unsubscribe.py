"""Unsubscribe links, one-click POST (RFC 8058), bounces and complaints, against running enrollments.

The tokens are the ones the worker put into the mail the `smtp_server` received; the app is
served by uvicorn (see tests/test_webhooks.py for the harness). "Before the next send" is
checked by counting what the SMTP server accepted after the enrollment has ended.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from db.tables import Enrollment, Identity, Suppression
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from services.tokens import make_legacy_token, make_token
from tests.engine_harness import LINK_SECRET, events_of, wait_for_status
from tests.webhook_harness import TOUCH_CAP_OFF, Hook, email_sequence
from workflows.enrollment import EnrollmentWorkflow

ONE_CLICK = {"Content-Type": "application/x-www-form-urlencoded"}


def unsubscribe_token(mail: Any) -> str:
    """The token of the https List-Unsubscribe link of a received mail."""
    [token] = re.findall(r"<https://links\.acme\.test/u/([^>]+)>", mail["List-Unsubscribe"])
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    return token


async def suppressions(h: Hook) -> list[Suppression]:
    async with h.sf() as s:
        return list((await s.execute(select(Suppression).order_by(Suppression.id))).scalars())


async def test_get_shows_a_page_and_changes_nothing(hook: Hook) -> None:
    pid = await hook.person(email="scanner@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    token = unsubscribe_token(hook.smtp.parsed()[0])
    for _ in range(2):  # mail scanners follow every link, sometimes twice
        page = await hook.http.get(f"/u/{token}")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<form method="post"' in page.text and 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert await suppressions(hook) == []
    assert await events_of(hook.sf, EventType.UNSUBSCRIBED) == []
    view = await handle.query(EnrollmentWorkflow.status)
    assert view.status == EnrollmentStatus.ACTIVE
    result = await handle.result()  # the lead goes on as if nothing happened
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(hook.smtp.messages) == 2


async def test_one_click_post_suppresses_and_stops_before_the_next_send(hook: Hook) -> None:
    pid = await hook.person(email="leaver@lead.test", x="5150")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    assert len(hook.smtp.messages) == 1
    token = unsubscribe_token(hook.smtp.parsed()[0])
    resp = await hook.http.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    assert resp.status_code == 200
    assert "You are unsubscribed" in resp.text
    [sup] = await suppressions(hook)
    assert (sup.person_id, sup.identity_id, sup.reason, sup.source) == (pid, None, "unsubscribe", "link")
    result = await handle.result()
    assert result.status == EnrollmentStatus.UNSUBSCRIBED
    assert [p.step for p in result.path] == ["m0"]
    assert len(hook.smtp.messages) == 1  # exactly the one sent before
    [event] = await events_of(hook.sf, EventType.UNSUBSCRIBED)
    assert (event.person_id, event.step_id, event.data["via"]) == (pid, "m0", "link")
    # Pressing the button again is harmless: still one suppression, one event.
    again = await hook.http.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    assert again.status_code == 200
    assert len(await suppressions(hook)) == 1
    assert len(await events_of(hook.sf, EventType.UNSUBSCRIBED)) == 1


async def test_unsubscribe_holds_even_when_the_signal_cannot_stop_the_workflow(hook: Hook) -> None:
    """The suppression, not the signal, guards the next send: here the app finds no active row to signal."""
    pid = await hook.person(email="paused@lead.test")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    token = unsubscribe_token(hook.smtp.parsed()[0])
    async with hook.sf() as s, s.begin():  # the row says finished, so the app will not signal it
        row = (await s.execute(select(Enrollment).where(Enrollment.person_id == pid))).scalar_one()
        row.status = "completed"
    resp = await hook.http.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    assert resp.status_code == 200
    await hook.env.sleep(timedelta(days=1, hours=1))
    result = await handle.result()
    assert result.status == EnrollmentStatus.SUPPRESSED  # the gate refused the second mail
    assert len(hook.smtp.messages) == 1
    [event] = await events_of(hook.sf, EventType.UNSUBSCRIBED)
    assert event.person_id == pid and event.enrollment_id is None


async def test_forged_or_tampered_tokens_are_refused_with_a_page_and_write_nothing(hook: Hook) -> None:
    pid = await hook.person(email="target@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    token = unsubscribe_token(hook.smtp.parsed()[0])
    assert "." not in token  # opaque: nothing readable to edit
    other_person = make_token(LINK_SECRET, "unsubscribe", {"p": pid + 1, "i": 1, "e": 1})
    legacy_body = make_legacy_token(LINK_SECRET, "unsubscribe", {"p": pid}).split(".")[0]

    def flip(text: str, at: int) -> str:
        return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]

    forged = [
        flip(token, len(token) // 2),  # ciphertext changed
        flip(token, len(token) - 2),  # tag changed
        token[:20] + other_person[20:],  # nonce of one, ciphertext of another
        token[:-4],  # truncated
        make_token("someone-elses-secret", "unsubscribe", {"p": pid}),
        make_token(LINK_SECRET, "open", {"p": pid}),  # a pixel token cannot unsubscribe
        make_legacy_token("someone-elses-secret", "unsubscribe", {"p": pid}),  # old format, wrong key
        legacy_body + ".AAAAAAAAAAAAAAAAAAAAAA",  # old format, forged MAC
        "not-a-token",
        "a.b",
    ]
    for bad in forged:
        page = await hook.http.get(f"/u/{bad}")
        assert page.status_code == 400, bad
        assert "This link is not valid" in page.text and "<form" not in page.text
        post = await hook.http.post(f"/u/{bad}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
        assert post.status_code == 400, bad
        assert "This link is not valid" in post.text
    assert await suppressions(hook) == []
    assert await events_of(hook.sf, EventType.UNSUBSCRIBED) == []
    assert (await handle.query(EnrollmentWorkflow.status)).status == EnrollmentStatus.ACTIVE
    await handle.terminate("test over")


async def test_a_valid_link_for_a_deleted_person_writes_nothing(hook: Hook) -> None:
    token = make_token(LINK_SECRET, "unsubscribe", {"p": 987654, "i": 1, "e": 1})
    resp = await hook.http.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    assert resp.status_code == 200  # nothing will ever be sent to them: that is what they asked
    assert await suppressions(hook) == []
    assert await events_of(hook.sf) == []


async def test_a_bounce_suppresses_the_identity_and_the_next_email_is_not_sent(hook: Hook) -> None:
    pid = await hook.person(email="bouncy@lead.test", x="4242")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    resp = await hook.post("email", {"event_id": "dsn-1", "type": "bounce", "from": "bouncy@lead.test"})
    assert resp.status_code == 202 and resp.json()["status"] == "suppressed_identity"
    again = await hook.post("email", {"event_id": "dsn-2", "type": "bounce", "from": "bouncy@lead.test"})
    assert again.json()["status"] == "suppressed_identity"
    [sup] = await suppressions(hook)
    assert (sup.person_id, sup.reason) == (None, "bounce")
    async with hook.sf() as s:
        ident = await s.get(Identity, sup.identity_id)
    assert ident is not None and (ident.channel, ident.value) == ("email", "bouncy@lead.test")
    result = await handle.result()
    assert result.status == EnrollmentStatus.SUPPRESSED
    assert [(p.step, p.outcome) for p in result.path] == [("m0", "sent"), ("m1", "suppressed")]
    assert len(hook.smtp.messages) == 1
    assert len(await events_of(hook.sf, EventType.BOUNCED)) == 2


async def test_a_bounce_report_from_the_mailer_daemon_matches_by_message_id(hook: Hook) -> None:
    pid = await hook.person(email="gone@lead.test")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    [mail] = hook.smtp.parsed()
    resp = await hook.post(
        "email",
        {
            "event_id": "dsn-md",
            "type": "bounce",
            "from": "MAILER-DAEMON@mx.lead.test",
            "in_reply_to": mail["Message-ID"],
        },
    )
    assert resp.json() == {"status": "suppressed_identity", "person_id": pid, "enrollments": 1, "classification": None}
    [sup] = await suppressions(hook)
    assert sup.identity_id is not None and sup.person_id is None  # the address that bounced, not the person
    assert (await handle.result()).status == EnrollmentStatus.SUPPRESSED
    assert len(hook.smtp.messages) == 1


# touch cap off: one person in two sequences, both first emails at once
@pytest.mark.parametrize("hook", [TOUCH_CAP_OFF], indirect=True, ids=["touch-cap-off"])
async def test_a_complaint_suppresses_the_person_and_stops_every_sequence(hook: Hook) -> None:
    pid = await hook.person(email="angry@lead.test", x="777")
    first = await hook.enroll(email_sequence(gap="1d", allow_concurrent=True), pid)
    second = await hook.enroll(email_sequence(gap="1d", allow_concurrent=True), pid)
    await hook.waiting_at(first)
    await hook.waiting_at(second)
    resp = await hook.post("email", {"event_id": "fbl-1", "type": "complaint", "from": "angry@lead.test"})
    assert resp.json() == {"status": "unsubscribed", "person_id": pid, "enrollments": 2, "classification": None}
    [sup] = await suppressions(hook)
    assert (sup.person_id, sup.identity_id, sup.reason) == (pid, None, "complaint")
    for h in (first, second):
        assert (await h.result()).status == EnrollmentStatus.UNSUBSCRIBED
    assert len(hook.smtp.messages) == 2  # the two first mails, nothing after the complaint
    assert len(await events_of(hook.sf, EventType.UNSUBSCRIBED)) == 2


async def test_a_complaint_stops_the_sequence_the_touch_cap_holds_too(hook: Hook) -> None:
    """The twin above with the defaults: the second sequence's m0 waits a day for the person's
    cap; the complaint ends it as well, and its held mail never goes."""
    pid = await hook.person(email="furious@lead.test", x="778")
    first, held = await hook.enroll_held_by_the_touch_cap(
        email_sequence(gap="1d", allow_concurrent=True),
        email_sequence(gap="1d", allow_concurrent=True, subject="Held for the cap"),
        pid,
    )
    resp = await hook.post("email", {"event_id": "fbl-cap", "type": "complaint", "from": "furious@lead.test"})
    assert resp.json() == {"status": "unsubscribed", "person_id": pid, "enrollments": 2, "classification": None}
    [sup] = await suppressions(hook)
    assert (sup.person_id, sup.identity_id, sup.reason) == (pid, None, "complaint")
    for h in (first, held):  # the held one's result would skip time to its slot, had it not ended
        assert (await h.result()).status == EnrollmentStatus.UNSUBSCRIBED
    await hook.env.sleep(timedelta(days=2))  # well past the held slot and the NOT_REPLIED timers
    # one mail, not two: the cap held the second sequence's, and the complaint stopped it
    [(_, rcpt, raw)] = hook.smtp.messages
    assert rcpt == ["furious@lead.test"]
    assert b"Subject: Hello Ada" in raw and b"Held for the cap" not in raw
    assert len(await events_of(hook.sf, EventType.UNSUBSCRIBED)) == 2


async def test_unsubscribe_on_one_channel_stops_the_others(hook: Hook) -> None:
    """An unsubscribe-intent DM on X ends the email sequence too (documented: the whole person)."""
    pid = await hook.person(email="quiet@lead.test", x="8080")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    resp = await hook.post("x", {"event_id": "x-stop", "type": "reply", "from": "8080", "text": "Stop messaging me."})
    assert resp.json()["status"] == "unsubscribed" and resp.json()["classification"] == "unsubscribe"
    view = await wait_for_status(handle, lambda v: v.status != EnrollmentStatus.ACTIVE)
    assert view.status == EnrollmentStatus.UNSUBSCRIBED
    assert (await handle.result()).status == EnrollmentStatus.UNSUBSCRIBED
    assert len(hook.smtp.messages) == 1

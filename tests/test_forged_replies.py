"""Forged replies and personal data in histories (issue 12 items 4 and 5).

A reply matched to a person only through In-Reply-To/References, whose From is none of
that person's identities, is recorded and shown but never unsubscribes, complains, holds
a company or ends a sequence (unless INBOUND_TRUST_THREAD_ONLY). A reply's text never
reaches the workflow's history: the signal carries ids and the classification.
"""

from __future__ import annotations

import httpx
from sqlalchemy import select, update
from temporalio.testing import WorkflowEnvironment

from db.tables import Delivery, Identity, InboundEvent, Suppression
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from services.redact import redact
from tests.engine_harness import events_of, wait_for_status
from tests.history_text import history_bytes
from tests.webhook_harness import Hook, app_settings, email_sequence, serve, signals_in_history, signed
from webhooks.app import create_app


async def _suppressions(h: Hook) -> list[Suppression]:
    async with h.sf() as s:
        return list((await s.execute(select(Suppression))).scalars())


async def test_a_forged_unsubscribe_reply_is_recorded_but_changes_nothing(hook: Hook) -> None:
    victim = await hook.person(email="victim@lead.test")
    handle = await hook.enroll(email_sequence(gap="1d"), victim)
    await hook.waiting_at(handle)
    [sent] = hook.smtp.parsed()
    forged = {
        "type": "reply",
        "from": "attacker@evil.test",
        "text": "Please unsubscribe me from all your emails.",
        "in_reply_to": sent["Message-ID"],
    }
    resp = await hook.post("email", {"event_id": "forged-1", **forged})
    assert resp.json() == {
        "status": "unverified",
        "person_id": victim,
        "enrollments": 1,
        "classification": "unsubscribe",
    }
    complaint = await hook.post(
        "email", {"event_id": "forged-2", "type": "complaint", "from": "x@evil.test", "references": sent["Message-ID"]}
    )
    assert complaint.json()["status"] == "unverified"
    ooo = await hook.post(
        "email",
        {**forged, "event_id": "forged-3", "text": "I am out of the office until 2 January with no access to email."},
    )
    assert ooo.json()["status"] == "unverified"
    assert await _suppressions(hook) == []
    for name in ("unsubscribe", "replied", "out_of_office"):
        assert await signals_in_history(handle, name) == 0, name
    shown = await events_of(hook.sf, EventType.REPLY_UNVERIFIED)
    assert [(e.person_id, e.data["type"]) for e in shown] == [
        (victim, "reply"),
        (victim, "complaint"),
        (victim, "reply"),
    ]
    assert await events_of(hook.sf, EventType.UNSUBSCRIBED) == []
    async with hook.sf() as s:
        statuses = set((await s.execute(select(InboundEvent.status))).scalars())
    assert statuses == {"unverified"}
    result = await handle.result()  # the sequence goes on: the follow-up is sent
    assert result.status == EnrollmentStatus.COMPLETED
    assert [p.step for p in result.path] == ["m0", "m1"]
    assert len(hook.smtp.messages) == 2


async def test_a_forged_reply_does_not_hold_the_company(hook: Hook) -> None:
    replier = await hook.person(email="a@initech.test", company="Initech")
    colleague = await hook.person(email="b@initech.test", company="Initech")
    holding = email_sequence(gap="1d", hold_company_on_reply=True)
    h_replier, h_colleague = await hook.enroll_many(holding, [replier, colleague])
    for h in (h_replier, h_colleague):
        await hook.waiting_at(h)
    mail = next(m for m in hook.smtp.parsed() if m["To"] == "a@initech.test")
    resp = await hook.post(
        "email",
        {
            "event_id": "forged-hold",
            "type": "reply",
            "from": "mallory@evil.test",
            "text": "Yes, interested, let's talk",
            "in_reply_to": mail["Message-ID"],
        },
    )
    assert resp.json()["status"] == "unverified"
    assert await signals_in_history(h_colleague, "pause") == 0
    assert await signals_in_history(h_replier, "replied") == 0
    assert not (await wait_for_status(h_colleague, lambda v: v.phase == "waiting")).paused
    for h in (h_replier, h_colleague):
        await h.terminate("test over")


async def test_the_setting_lets_thread_only_replies_act(
    hook: Hook,
    temporal_env: WorkflowEnvironment,
    database_url: str,
) -> None:
    pid = await hook.person(email="trusting@lead.test")
    handle = await hook.enroll(email_sequence(gap="1d"), pid)
    await hook.waiting_at(handle)
    [sent] = hook.smtp.parsed()
    trusting = create_app(app_settings(temporal_env, database_url, inbound_trust_thread_only=True))
    body = (
        b'{"event_id": "assistant-1", "type": "reply", "from": "assistant@lead-corp.test", '
        b'"text": "Please remove us from your list", "in_reply_to": "' + sent["Message-ID"].encode() + b'"}'
    )
    async with serve(trusting) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await http.post("/webhooks/email", content=body, headers=signed(body))
    assert resp.json()["status"] == "unsubscribed"
    [sup] = await _suppressions(hook)
    assert sup.person_id == pid
    assert (await handle.result()).status == EnrollmentStatus.UNSUBSCRIBED


async def test_no_reply_text_in_the_workflow_history(hook: Hook) -> None:
    pid = await hook.person(email="private@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    secret_text = "Call me on +1 555 0100, my wife Ada handles the budget: yes please"
    resp = await hook.post(
        "email", {"event_id": "txt-1", "type": "reply", "from": "private@lead.test", "text": secret_text}
    )
    assert resp.json()["status"] == "signalled"
    result = await handle.result()
    assert [p.step for p in result.path] == ["m0", "done"]  # the reply did branch the sequence
    raw = history_bytes(await handle.fetch_history())
    assert await signals_in_history(handle, "replied") == 1
    assert b'"classification":"positive"' in raw  # what the workflow needs is there, in the signal
    for fragment in (b"555 0100", b"my wife", b"handles the budget"):
        assert fragment not in raw, fragment
    async with hook.sf() as s:  # the text stays in PostgreSQL
        [stored] = (await s.execute(select(InboundEvent.payload))).scalars().all()
    assert stored["text"] == secret_text


async def test_a_provider_error_reaches_the_history_without_the_address(hook: Hook) -> None:
    pid = await hook.person(email="quoted.lead@lead.test")
    hook.smtp.reject_rcpt["quoted.lead@lead.test"] = "550 5.1.1 <quoted.lead@lead.test>: Recipient address rejected"
    handle = await hook.enroll(email_sequence(), pid)
    result = await handle.result()
    assert result.path[0].outcome == "bounced"
    raw = history_bytes(await handle.fetch_history())
    assert b"quoted.lead" not in raw
    assert b"Recipient address rejected" in raw  # the reason is kept, with the address taken out
    async with hook.sf() as s:  # the ledger keeps the provider's full answer
        [error] = (await s.execute(select(Delivery.error))).scalars().all()
    assert error is not None and "quoted.lead@lead.test" in error


def test_redact_takes_out_addresses_handles_urls_and_wallets() -> None:
    text = (
        "550 <ada.l+x@mail.example.co.uk> unknown; @ada_l blocked; "
        "https://www.linkedin.com/in/ada-lovelace gone; 0x" + "ab" * 20 + " bad; seat-7 busy"
    )
    out = redact(text, "seat-7")
    assert out is not None
    for gone in ("ada.l", "@ada_l", "linkedin.com/in", "ab" * 20, "seat-7"):
        assert gone not in out, gone
    assert out.startswith("550 <<address>> unknown")
    assert redact(None) is None


async def test_a_refusal_naming_the_identity_reaches_the_history_without_it(hook: Hook) -> None:
    pid = await hook.person(email="dm-only@lead.test", x="987654321987")
    async with hook.sf() as s, s.begin():
        await s.execute(update(Identity).where(Identity.value == "987654321987").values(consent="denied"))
    raw_seq = {
        "name": "dm-denied",
        "steps": [{"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi", "edges": [{"trigger": "END"}]}],
    }
    handle = await hook.enroll(raw_seq, pid)
    result = await handle.result()
    assert result.status == EnrollmentStatus.SUPPRESSED
    assert b"987654321987" not in history_bytes(await handle.fetch_history())
    async with hook.sf() as s:  # the ledger says which identity
        [error] = (await s.execute(select(Delivery.error))).scalars().all()
    assert error is not None and "987654321987" in error

"""Issue 12 item 6: the smaller holes.

`sent` events carry the time the provider accepted (not the planned time a retry left
behind); an unsubscribe whose suppression committed before a crash still gets its event;
suppressions outlive the person rows; TRUNCATE on events is refused; an out-of-office
reply that arrives while a lead waits for its send slot is honoured.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, text
from sqlalchemy.exc import DBAPIError

from db.events import append_event
from db.session import SessionFactory
from db.tables import Delivery, Identity, Person, SendSlot, SuppressedIdentity, Suppression
from devstack.postgres import free_port
from models.enrollment import EnrollmentStatus, OutOfOfficeSignal
from models.outcomes import EventType
from services.inbound_pipeline import suppress_person
from services.people_import import import_people
from services.tokens import make_token
from settings import Settings
from tests.engine_harness import (
    LINK_SECRET,
    Wired,
    all_senders,
    events_of,
    make_person,
    make_sender,
    start_enrollment,
    store_version,
    wait_for_status,
)
from webhooks.app import create_app
from workflows.enrollment import EnrollmentWorkflow


async def test_a_sent_event_carries_the_acceptance_time_not_the_planned_time(
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    relay_server: Any,
    wired: Wired,
) -> None:
    """The relay answers 429 Retry-After one hour first: the DM goes out an hour after it was planned."""
    await all_senders(session_factory)
    pid = await make_person(session_factory, linkedin="https://www.linkedin.com/in/patient-lead")
    ref, defn = await store_version(
        session_factory,
        {
            "name": "late-dm",
            "steps": [{"id": "dm", "action": "SEND_LINKEDIN_DM", "text": "Hi", "edges": [{"trigger": "END"}]}],
        },
    )
    relay_server.fail_next(429, {"retry-after": "3600"}, {"error": "slow down"})
    async with wired():
        handle = await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid)
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(relay_server.actions) == 1
    # the run's start, from its first history event (the test server's describe() cannot decode
    # an unset datetime search attribute)
    started = (await handle.fetch_history()).events[0].event_time.ToDatetime(tzinfo=UTC)
    [sent] = await events_of(session_factory, EventType.SENT)
    assert sent.occurred_at - started >= timedelta(minutes=59), (started, sent.occurred_at)
    async with session_factory() as s:
        [delivery] = (await s.execute(select(Delivery))).scalars().all()
    assert delivery.sent_at == sent.occurred_at


async def test_a_suppression_outlives_the_person_and_returns_at_reimport(
    session_factory: SessionFactory, tmp_path: Path
) -> None:
    csv = tmp_path / "people.csv"
    csv.write_text("email,x_handle,first_name\nAda@Analytical.example,ada_l,Ada\ngrace@cobol.example,,Grace\n")
    first = await import_people(session_factory, csv, "wave-1")
    assert (first.created, first.suppressed) == (2, 0)
    async with session_factory() as s:
        ada = (
            await s.execute(select(Identity.person_id).where(Identity.value == "ada@analytical.example"))
        ).scalar_one()
    assert await suppress_person(session_factory, ada, "unsubscribe", "link")
    async with session_factory() as s, s.begin():  # a GDPR deletion, or a clean-up of the person table
        await s.execute(delete(Person).where(Person.id == ada))
    async with session_factory() as s:
        assert (await s.execute(select(Suppression))).scalars().all() == []  # cascaded with the person
        remembered = (await s.execute(select(SuppressedIdentity))).scalars().all()
    assert {(r.channel, r.reason) for r in remembered} == {("email", "unsubscribe"), ("x_handle", "unsubscribe")}
    assert all("ada" not in r.hash for r in remembered)  # a hash, not the address

    again = await import_people(session_factory, csv, "wave-2")
    assert (again.created, again.members, again.suppressed) == (1, 2, 1)  # Ada is back, and suppressed
    async with session_factory() as s:
        rows = (
            await s.execute(
                select(Identity.channel, Suppression.reason, Suppression.source).join(
                    Suppression, Suppression.identity_id == Identity.id
                )
            )
        ).all()
    assert sorted((c, r) for c, r, _ in rows) == [("email", "unsubscribe"), ("x_handle", "unsubscribe")]
    assert all(src.startswith("suppressed before") for _, _, src in rows)


async def test_an_identity_added_to_a_suppressed_person_is_remembered(session_factory: SessionFactory) -> None:
    pid = await make_person(session_factory, email="whole@lead.test")
    await suppress_person(session_factory, pid, "complaint", "email:fbl-1")
    async with session_factory() as s, s.begin():
        s.add(Identity(person_id=pid, channel="linkedin", value="https://www.linkedin.com/in/whole"))
    async with session_factory() as s, s.begin():
        await s.execute(delete(Person).where(Person.id == pid))
    again = await make_person(session_factory, linkedin="https://www.linkedin.com/in/whole")
    async with session_factory() as s:
        [sup] = (await s.execute(select(Suppression))).scalars().all()
        ident = await s.get(Identity, sup.identity_id)
    assert ident is not None and ident.person_id == again and sup.reason == "complaint"


async def test_events_cannot_be_truncated_updated_or_deleted(session_factory: SessionFactory) -> None:
    pid = await make_person(session_factory, email="log@lead.test")
    async with session_factory() as s, s.begin():
        await append_event(s, type_=EventType.OPENED, person_id=pid, data={"x": 1})
    for statement in (
        "TRUNCATE events",
        "TRUNCATE events CASCADE",
        "UPDATE events SET type = 'x'",
        "DELETE FROM events",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with session_factory() as s, s.begin():
                await s.execute(text(statement))
    assert len(await events_of(session_factory)) == 1


async def test_an_unsubscribe_committed_before_a_crash_still_gets_its_event(session_factory: SessionFactory) -> None:
    pid = await make_person(session_factory, email="crashed@lead.test")
    async with session_factory() as s, s.begin():  # the suppression committed; the process died before the event
        s.add(Suppression(person_id=pid, reason="unsubscribe", source="link"))
    settings = Settings(link_secret=LINK_SECRET, temporal_address=f"127.0.0.1:{free_port()}")
    app = create_app(settings, session_factory=session_factory)
    token = make_token(LINK_SECRET, "unsubscribe", {"p": pid})
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        for _ in range(2):  # the person (or their mail client) uses the link again
            resp = await http.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click")
            assert resp.status_code == 200
    [event] = await events_of(session_factory, EventType.UNSUBSCRIBED)
    assert event.person_id == pid and event.data["via"] == "link"
    async with session_factory() as s:
        assert len((await s.execute(select(Suppression))).scalars().all()) == 1


async def test_an_out_of_office_while_waiting_for_the_send_slot_moves_the_send(
    wired: Wired,
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
) -> None:
    """The sender sends once an hour: the second lead waits for a slot, then is away for three days."""
    await make_sender(session_factory, "email", "paced@acme.test", spacing=3600)
    ref, defn = await store_version(
        session_factory,
        {
            "name": "ooo-slot",
            "steps": [{"id": "m0", "action": "SEND_EMAIL", "subject": "S", "body": "B", "edges": [{"trigger": "END"}]}],
        },
    )
    first = await make_person(session_factory, email="first@lead.test")
    away = await make_person(session_factory, email="away@lead.test")
    async with wired():
        h_first = await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, first)
        await wait_for_status(h_first, lambda v: v.phase == "sending" or v.status != EnrollmentStatus.ACTIVE)
        h_away = await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, away)
        waiting = await wait_for_status(h_away, lambda v: v.phase == "waiting for send slot")
        assert waiting.until is not None
        back = waiting.until + timedelta(days=3)
        await h_away.signal(EnrollmentWorkflow.out_of_office, OutOfOfficeSignal(event_id="email:ooo-1", until=back))
        moved = await wait_for_status(h_away, lambda v: v.until is not None and v.until >= back)
        assert moved.phase in ("scheduled", "waiting for send slot")
        await h_first.result()
        result = await h_away.result()
    assert result.status == EnrollmentStatus.COMPLETED
    sent = {e.person_id: e.occurred_at for e in await events_of(session_factory, EventType.SENT)}
    assert sent[away] >= back, (sent[away], back)  # not during the absence
    async with session_factory() as s:
        query = select(SendSlot.slot_at, SendSlot.released_at).where(SendSlot.person_id == away)
        rounds = sorted((await s.execute(query)).all())
    # the slot before the absence was given back to the sender; the send used a new one after it
    assert [released is not None for _, released in rounds] == [True, False]
    assert rounds[1].slot_at >= back
    assert len(smtp_server.messages) == 2


async def test_status_shows_unverified_replies(session_factory: SessionFactory, database_url: str) -> None:
    from tests.cli_harness import cli

    pid = await make_person(session_factory, email="shown@lead.test")
    async with session_factory() as s, s.begin():
        await append_event(s, type_=EventType.REPLY_UNVERIFIED, person_id=pid, dedup_key="ru-1", data={"type": "reply"})
    result = await cli(database_url, "status", "--person", str(pid))
    assert result.code == 0, result
    assert f"1 reply matched to person {pid} only by thread headers" in result.out
    assert "recorded, not acted on" in result.out

"""The sender circuit breaker: our own account's problems pause the sender, leads wait.

A real aiosmtpd server that refuses our login (535), real PostgreSQL, the time-skipping
Temporal server and the production worker: the lead must not end failed, the sender is
paused with the reason, and `senders resume` (or a successful probe after the cool-down)
lets the lead go on, with exactly one message at the server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from temporalio.client import Client, WorkflowHandle

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, SenderAccount
from models.enrollment import EnrollmentStatus, SequenceRef
from models.outcomes import EventType
from models.sequence import SequenceDefinition
from services import sender_breaker
from services.sender_breaker import BreakerConfig
from tests.engine_harness import (
    Wired,
    events_of,
    make_person,
    make_sender,
    start_enrollment,
    store_version,
)
from tests.eventually import eventually
from tests.mail_servers import AuthSmtp
from tests.mail_servers import auth_smtp as smtp_with_auth
from worker import Workers
from workflows.enrollment import EnrollmentWorkflow

StaleLogin = Callable[[], AbstractAsyncContextManager[Workers]]
#: The AUTH-requiring server is plain SMTP on loopback (the breaker is about the login, not TLS).
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@pytest.fixture
def auth_smtp() -> Iterator[AuthSmtp]:
    """An SMTP server that demands AUTH; `sales` logs in only once `accept`ed with the worker's password."""
    with smtp_with_auth(passwords={b"sales": b"fresh"}) as server:
        yield server


@pytest.fixture
def stale_login(wired: Wired, auth_smtp: AuthSmtp) -> StaleLogin:
    """The production worker sending email through `auth_smtp` as `sales` with the password `stale`."""
    return lambda: wired(settings=auth_smtp.settings("sales", "stale"))


def one_email() -> dict[str, Any]:
    return {
        "name": f"brk-{uuid.uuid4().hex[:6]}",
        "steps": [{"id": "m0", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]}],
    }


async def until_paused(sf: SessionFactory, sender_id: int) -> SenderAccount:
    """The sender's row once the breaker has paused it (the activity writes it: `eventually`)."""

    async def paused() -> SenderAccount | None:
        row = await sender_row(sf, sender_id)
        return row if row.paused_at is not None else None

    row = await eventually(paused, f"sender {sender_id} to be paused")
    assert row is not None  # eventually() returns only a truthy value
    return row


async def enroll_lead(
    client: Client, task_queue: str, sf: SessionFactory, ref: SequenceRef, defn: SequenceDefinition, prefix: str
) -> WorkflowHandle[Any, Any]:
    """A new lead with a fresh address starting `<prefix>-`, enrolled in the version."""
    pid = await make_person(sf, email=f"{prefix}-{uuid.uuid4().hex[:6]}@lead.test")
    return await start_enrollment(client, task_queue, sf, ref, defn, pid)


async def sender_row(sf: SessionFactory, sender_id: int) -> SenderAccount:
    async with sf() as s:
        acct = await s.get(SenderAccount, sender_id)
        assert acct is not None
        return acct


async def test_smtp_535_pauses_the_sender_leads_wait_and_resume_lets_them_go_on(
    temporal_env: Any, session_factory: SessionFactory, task_queue: str, auth_smtp: AuthSmtp, stale_login: StaleLogin
) -> None:
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    ref, defn = await store_version(session_factory, one_email())
    async with stale_login():
        handles = []
        for i in range(2):
            pid = await make_person(session_factory, email=f"l{i}-{uuid.uuid4().hex[:6]}@lead.test")
            handles.append(await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid))

        await until_paused(session_factory, sender_id)
        acct = await sender_row(session_factory, sender_id)
        assert acct.paused_kind == "auth" and "535" in (acct.paused_reason or "")
        views = [await h.query(EnrollmentWorkflow.status) for h in handles]
        assert all(v.status == EnrollmentStatus.ACTIVE for v in views), "the leads wait, they do not fail"
        async with session_factory() as s:
            statuses = set((await s.execute(select(Delivery.status))).scalars())
        assert statuses <= {"claimed"}, statuses
        # The credentials are fixed and the sender resumed: the leads go on, once each.
        auth_smtp.accept("sales", "stale")
        await sender_breaker.resume(session_factory, sender_id, datetime.now(UTC))
        results = [await h.result() for h in handles]
    assert [r.status for r in results] == [EnrollmentStatus.COMPLETED] * 2
    assert len(auth_smtp.messages) == 2
    assert (await sender_row(session_factory, sender_id)).paused_at is None
    [event, *_] = await events_of(session_factory, EventType.SENDER_PAUSED)
    assert event.data["kind"] == "auth" and event.data["sender_id"] == sender_id


async def test_after_the_cool_down_a_successful_probe_closes_the_breaker(
    temporal_env: Any, session_factory: SessionFactory, task_queue: str, auth_smtp: AuthSmtp, stale_login: StaleLogin
) -> None:
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    ref, defn = await store_version(session_factory, one_email())
    async with stale_login():
        handle = await enroll_lead(temporal_env.client, task_queue, session_factory, ref, defn, "p")

        await until_paused(session_factory, sender_id)
        auth_smtp.accept("sales", "stale")  # fixed, nobody resumed: the cool-down's probe finds out
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(auth_smtp.messages) == 1
    assert (await sender_row(session_factory, sender_id)).paused_at is None


async def test_the_governor_grants_no_slot_to_a_paused_sender(
    temporal_env: Any, session_factory: SessionFactory, task_queue: str, auth_smtp: AuthSmtp, stale_login: StaleLogin
) -> None:
    auth_smtp.accept("sales", "stale")
    held = await make_sender(session_factory, "email", "held@acme.test")
    other = await make_sender(session_factory, "email", "other@acme.test")
    await sender_breaker.set_paused(session_factory, held, "warming DNS", datetime.now(UTC))
    ref, defn = await store_version(session_factory, one_email())
    async with stale_login():
        handles = []
        for i in range(3):
            pid = await make_person(session_factory, email=f"g{i}-{uuid.uuid4().hex[:6]}@lead.test")
            handles.append(await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid))
        for h in handles:
            await h.result()
    async with session_factory() as s:
        used = list((await s.execute(select(Delivery.sender_id))).scalars())
    assert used == [other] * 3


async def test_every_sender_paused_the_lead_waits_for_resume(
    temporal_env: Any, session_factory: SessionFactory, task_queue: str, auth_smtp: AuthSmtp, stale_login: StaleLogin
) -> None:
    auth_smtp.accept("sales", "stale")
    held = await make_sender(session_factory, "email", "held@acme.test")
    await sender_breaker.set_paused(session_factory, held, "by hand", datetime.now(UTC))
    ref, defn = await store_version(session_factory, one_email())
    async with stale_login():
        handle = await enroll_lead(temporal_env.client, task_queue, session_factory, ref, defn, "w")

        async def asked() -> bool:
            described = await handle.describe()
            raw = described.raw_description
            return any(
                p.activity_type.name == "reserve_send_slot" and "paused" in p.last_failure.message
                for p in raw.pending_activities
            )

        await eventually(asked, "the reservation waits for the paused sender")
        assert auth_smtp.messages == []
        await sender_breaker.resume(session_factory, held, datetime.now(UTC))
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED and len(auth_smtp.messages) == 1


async def _ledger_rows(sf: SessionFactory, sender_id: int, statuses: list[str]) -> None:
    ref, _ = await store_version(sf, one_email())
    pid = await make_person(sf, email=f"b-{uuid.uuid4().hex[:6]}@lead.test")
    async with sf() as s, s.begin():
        row = Enrollment(
            sequence_id=ref.sequence_id, sequence_version_id=ref.version_id, person_id=pid, workflow_id="w"
        )
        s.add(row)
        await s.flush()
        for i, status in enumerate(statuses):
            s.add(
                Delivery(
                    idempotency_key=f"k{i}",
                    enrollment_id=row.id,
                    step_id="m0",
                    channel="email",
                    action="SEND_EMAIL",
                    sender_id=sender_id,
                    status=status,
                )
            )


@pytest.mark.parametrize(("bounced", "paused"), [(5, False), (6, True)])
async def test_bounce_rate_over_the_threshold_pauses_the_sender(
    session_factory: SessionFactory, bounced: int, paused: bool
) -> None:
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    # 100 recent sends, 5% bounced is the threshold itself (not over it); older rows fall outside the window
    await _ledger_rows(
        session_factory, sender_id, ["bounced"] * 30 + ["sent"] * (100 - bounced) + ["bounced"] * bounced
    )
    now = datetime.now(UTC)
    async with session_factory() as s, s.begin():
        tripped = await sender_breaker.check_bounce_rate(s, sender_id, BreakerConfig(), now)
    assert tripped is paused
    acct = await sender_row(session_factory, sender_id)
    assert (acct.paused_kind == "bounce_rate") is paused
    if paused:
        assert acct.paused_until is None, "only `senders resume` closes a bounce-rate pause"
        assert "6 of the last 100" in (acct.paused_reason or "")


async def test_repeated_throttling_pauses_the_sender_then_the_probe_sends_once(
    temporal_env: Any, session_factory: SessionFactory, task_queue: str, smtp_server: Any, wired: Wired
) -> None:
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    smtp_server.fail_codes.extend(["421 4.7.0 Too many messages, slow down"] * 5)
    ref, defn = await store_version(session_factory, one_email())
    async with wired():
        handle = await enroll_lead(temporal_env.client, task_queue, session_factory, ref, defn, "t")
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert len(smtp_server.messages) == 1
    [event] = await events_of(session_factory, EventType.SENDER_PAUSED)
    assert event.data["kind"] == "throttle" and event.data["sender_id"] == sender_id
    acct = await sender_row(session_factory, sender_id)
    assert acct.paused_at is None and acct.throttle_strikes == 0, "the probe closed the breaker"
    sched = [e for e in (await handle.fetch_history()).events if e.HasField("activity_task_started_event_attributes")]
    assert max(e.activity_task_started_event_attributes.attempt for e in sched) >= 6
    assert timedelta(0) < BreakerConfig().cooldown


async def test_a_lead_waits_past_deliver_retries_while_its_sender_stays_paused(
    temporal_env: Any, session_factory: SessionFactory, task_queue: str, auth_smtp: AuthSmtp, stale_login: StaleLogin
) -> None:
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    ref, defn = await store_version(session_factory, one_email())
    async with stale_login():
        handle = await enroll_lead(temporal_env.client, task_queue, session_factory, ref, defn, "s")

        await until_paused(session_factory, sender_id)
        # Far longer than deliver's 30 attempts at the 10-minute cool-down: the login stays refused.
        await temporal_env.sleep(timedelta(hours=8))
        view = await handle.query(EnrollmentWorkflow.status)
        assert view.status == EnrollmentStatus.ACTIVE, "the lead still waits for its sender"
        auth_smtp.accept("sales", "stale")
        await sender_breaker.resume(session_factory, sender_id, datetime.now(UTC))
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED and len(auth_smtp.messages) == 1
    history = await handle.fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    sends = scheduled.count("deliver") + scheduled.count("send_step")  # send_step: slot and send in one
    assert sends >= 2 and "give_up_delivery" not in scheduled
    async with session_factory() as s:
        [status] = list((await s.execute(select(Delivery.status))).scalars())
    assert status == "sent"

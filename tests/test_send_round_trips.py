"""What one happy-path email costs the database: PostgreSQL round trips of `send_step`.

Counted where they cost (bench/RESULTS.md: socket writes were a fifth of the worker's main
thread): every message batch asyncpg writes to PostgreSQL's socket is one round trip (BEGIN,
a statement, COMMIT, a checkout's check). The count is pinned so that it cannot grow back
unnoticed; the send itself is checked on the SMTP server and in the ledger.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.channels.email import EmailChannel, SmtpPool
from activities.delivery import DeliveryActivities, DeliveryConfig
from activities.governor import SendGovernor
from db.session import SessionFactory, make_engine, make_session_factory
from db.tables import Delivery, Enrollment, Event, SenderAccount, SendSlot
from models.activities import (
    DeliverInput,
    DeliverOutput,
    FinishInput,
    RecordEventInput,
    ReserveSlotInput,
    SendStepInput,
)
from models.enrollment import SequenceRef
from models.outcomes import EnrollmentStatus, EventType
from models.sequence import SequenceDefinition
from services import sender_breaker
from tests.engine_harness import enrollment_ref, make_person, make_sender, store_version
from tests.pg_round_trips import pg_writes

#: The pinned cost of one happy-path email's `deliver` part: the claim (with the step's start
#: and the reads), `sending`, the outcome (with its event, the enrollment's end, the breaker).
DELIVER_ROUND_TRIPS = 3
#: ... and of the governor's reservation before it in `send_step` (a batch of one).
GOVERNOR_ROUND_TRIPS = 8


async def _new_lead(sf: SessionFactory, seq: Any) -> SendStepInput:
    """A new person and enrollment, and `send_step`'s input for its one step, as the workflow asks it."""
    ref, defn = seq
    pid = await make_person(sf, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    eref = await enrollment_ref(sf, ref, pid)
    enrollment_id = eref.enrollment_id
    now = datetime.now(UTC)
    step = defn.first_step
    inp = SendStepInput(
        reserve=ReserveSlotInput(
            ref=eref,
            step_id=step.id,
            attempt=1,
            action=str(step.action),
            channel="email",
            now=now,
            not_before=now,
        ),
        deliver=DeliverInput(ref=eref, step=step, attempt=1, sender_id=None, now=now),
        started=RecordEventInput(
            ref=eref,
            type=EventType.STEP_STARTED,
            step_id=step.id,
            channel="email",
            occurred_at=now,
            dedup_key=f"{enrollment_id}:step_started:{step.id}:1",
            current_step=step.id,
        ),
        finish=FinishInput(ref=eref, status=EnrollmentStatus.COMPLETED, last_step=step.id, reason="reached END"),
    )
    return inp


async def _send(acts: DeliveryActivities, inp: Any, activity: Any = None) -> Any:
    """`send_step` (or `activity`) for `inp`, as a worker runs it."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        activity_id="1",
        workflow_run_id=f"run-{inp.ref.person_id if isinstance(inp, DeliverInput) else inp.deliver.ref.person_id}",
    )
    return await env.run(activity or acts.send_step, inp)


@dataclass
class Rig:
    """The production activity class on one pooled connection, a sender, a one-step sequence."""

    sf: SessionFactory
    acts: DeliveryActivities
    seq: tuple[SequenceRef, SequenceDefinition]
    sender_id: int


@asynccontextmanager
async def rig(database_url: str, smtp: Any, fault: Any = None) -> AsyncIterator[Rig]:
    # one connection (the pool's first), so that a statement prepared by the warm-up is
    # prepared for the counted email too
    engine: AsyncEngine = make_engine(database_url, pool_size=1)
    sf = make_session_factory(engine)
    channel = EmailChannel(SmtpPool(smtp.host, smtp.port, size=1, timeout=10), default_footer="1 Test St")
    try:
        sender_id = await make_sender(sf, "email", "sales@acme.test")
        seq = await store_version(
            sf,
            {
                "name": f"rt-{uuid.uuid4().hex[:6]}",
                "steps": [
                    {"id": "m0", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]}
                ],
            },
        )
        acts = DeliveryActivities(
            sf,
            SendGovernor(sf),
            {"email": channel},
            DeliveryConfig(public_base_url="https://links.acme.test", link_secret="s", postal_address="1 Test St"),
            fault=fault,
        )
        yield Rig(sf, acts, seq, sender_id)
    finally:
        await channel.aclose()
        await engine.dispose()


async def _written(sf: SessionFactory, enrollment_id: int) -> tuple[list[Delivery], Counter[str], Enrollment | None]:
    async with sf() as s:
        deliveries = list((await s.execute(select(Delivery).where(Delivery.enrollment_id == enrollment_id))).scalars())
        events = Counter((await s.execute(select(Event.type).where(Event.enrollment_id == enrollment_id))).scalars())
        return deliveries, events, await s.get(Enrollment, enrollment_id)


async def test_one_email_costs_few_round_trips(database_url: str, smtp_server: Any) -> None:
    async with rig(database_url, smtp_server) as r:
        for _ in range(2):  # warm-up: the connection, its prepared statements, the caches
            await _send(r.acts, await _new_lead(r.sf, r.seq))
        inp = await _new_lead(r.sf, r.seq)
        with pg_writes() as writes:
            out = await _send(r.acts, inp)
        # `deliver` alone (a slot booked earlier): the claim with the reads, `sending`, the outcome
        for _ in range(3):  # warm-up twice, then counted
            alone = (await _new_lead(r.sf, r.seq)).deliver.model_copy(update={"sender_id": r.sender_id})
            with pg_writes() as deliver_writes:
                delivered = await _send(r.acts, alone, r.acts.deliver)
    assert out.delivered is not None and out.delivered.status == "sent" and out.finished
    assert isinstance(delivered, DeliverOutput) and delivered.status == "sent"
    assert len(smtp_server.messages) == 6
    [delivery], events, enrollment = await _written(r.sf, inp.deliver.ref.enrollment_id)
    assert delivery.status == "sent" and delivery.attempts_made == 1 and delivery.sent_at is not None
    assert events == Counter({"step_started": 1, "sent": 1, "completed": 1})
    assert enrollment is not None and enrollment.status == "completed" and enrollment.finished_at is not None
    async with r.sf() as s:  # the governor's booking: the slots and the sender's latest, with the slots
        slots = list((await s.execute(select(SendSlot.slot_at))).scalars())
        sender = await s.get(SenderAccount, r.sender_id)
    assert len(slots) == 3 and sender is not None and sender.last_slot_at == max(slots)
    # the pins: every round trip more is a choice to make here, not a drift
    assert len(deliver_writes) == DELIVER_ROUND_TRIPS, deliver_writes
    assert "Q" not in deliver_writes, "no BEGIN/COMMIT: each of the three is one statement"
    assert len(writes) == GOVERNOR_ROUND_TRIPS + DELIVER_ROUND_TRIPS, writes


async def test_an_outcome_whose_compare_and_set_loses_writes_nothing(database_url: str, smtp_server: Any) -> None:
    """The outcome is one statement: the row taken from the attempt after its send leaves no
    `sent`, no enrollment end, no breaker change; the attempt stands down."""
    taken: list[int] = []

    async def take_the_row(point: str) -> None:
        if point != "after_send":
            return
        async with r.sf() as s, s.begin():  # a newer attempt (or the give-up) took it meanwhile
            [row] = (
                await s.execute(
                    update(Delivery)
                    .where(Delivery.status == "sending")
                    .values(owner="someone-else")
                    .returning(Delivery.id)
                )
            ).scalars()
            await s.execute(update(SenderAccount).values(throttle_strikes=2))  # a success would reset them
        taken.append(row)

    async with rig(database_url, smtp_server, fault=take_the_row) as r:
        inp = await _new_lead(r.sf, r.seq)
        with pytest.raises(ApplicationError) as lost:
            await _send(r.acts, inp)
        async with r.sf() as s:
            sender = await s.get(SenderAccount, r.sender_id)
    assert lost.value.type == "DeliverySuperseded"
    assert taken and len(smtp_server.messages) == 1
    [delivery], events, enrollment = await _written(r.sf, inp.deliver.ref.enrollment_id)
    assert delivery.status == "sending" and delivery.owner == "someone-else" and delivery.sent_at is None
    assert events == Counter({"step_started": 1}), "no `sent`, no `completed`"
    assert enrollment is not None and enrollment.status == "active" and enrollment.finished_at is None
    assert sender is not None and sender.throttle_strikes == 2


async def _breaker_after_success(
    sf: SessionFactory, sender_id: int, now: datetime, **state: Any
) -> tuple[bool, SenderAccount]:
    async with sf() as s, s.begin():
        await s.execute(update(SenderAccount).where(SenderAccount.id == sender_id).values(**state))
    async with sf() as s, s.begin():
        closed = await sender_breaker.record_success(s, sender_id, now)
    async with sf() as s:
        acct = await s.get(SenderAccount, sender_id)
    assert acct is not None
    return closed, acct


async def test_a_success_resets_the_throttle_count_and_a_due_probe_closes_the_breaker(
    session_factory: SessionFactory,
) -> None:
    """`record_success` in one statement keeps what its two did: the reset and the close, never more."""
    sf, now = session_factory, datetime.now(UTC)
    sid = await make_sender(sf, "email", "sales@acme.test")
    other = await make_sender(sf, "email", "other@acme.test", throttle_strikes=3)
    closed, acct = await _breaker_after_success(sf, sid, now, throttle_strikes=3)
    assert not closed and acct.throttle_strikes == 0 and acct.paused_at is None
    paused = {"paused_at": now - timedelta(minutes=20), "paused_kind": "throttle", "paused_reason": "421s"}
    closed, acct = await _breaker_after_success(
        sf, sid, now, throttle_strikes=1, paused_until=now + timedelta(minutes=5), **paused
    )
    assert not closed and acct.paused_at is not None and acct.paused_kind == "throttle"
    assert acct.throttle_strikes == 0, "a paused sender's count is reset too"
    closed, acct = await _breaker_after_success(
        sf, sid, now, throttle_strikes=2, paused_until=now - timedelta(minutes=1), **paused
    )
    assert closed and acct.paused_at is None and acct.paused_kind is None and acct.paused_until is None
    assert acct.throttle_strikes == 0 and acct.breaker_since == now
    manual = {"paused_at": now, "paused_kind": "manual", "paused_reason": "by hand", "paused_until": None}
    closed, acct = await _breaker_after_success(sf, sid, now, **manual)
    assert not closed and acct.paused_kind == "manual", "only `senders resume` ends a manual pause"
    async with sf() as s:
        untouched = await s.get(SenderAccount, other)
    assert untouched is not None and untouched.throttle_strikes == 3

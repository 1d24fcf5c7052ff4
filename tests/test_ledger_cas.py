"""The deliveries ledger as compare-and-set: concurrent or stalled attempts never send twice.

Two `deliver` attempts for one delivery are run for real (the production activity class,
PostgreSQL, aiosmtpd) with `ActivityEnvironment`, each held at a chosen point by the
activity's fault hook and released in the order that used to send twice. What the SMTP
server received is the verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.channels.email import EmailChannel, SmtpPool
from activities.delivery import DeliveryActivities, DeliveryConfig
from activities.governor import SendGovernor
from db.session import SessionFactory
from db.tables import Delivery, Event
from models.activities import DeliverInput, DeliverOutput
from tests.engine_harness import enrollment_ref, make_person, make_sender, store_version


class Gates:
    """A fault hook that holds each attempt at a point until the test releases it."""

    def __init__(self) -> None:
        self.holds: dict[tuple[int, str], asyncio.Event] = {}
        self.reached: dict[tuple[int, str], asyncio.Event] = {}

    def hold(self, attempt: int, point: str) -> None:
        self.holds[(attempt, point)] = asyncio.Event()
        self.reached[(attempt, point)] = asyncio.Event()

    def __call__(self, point: str) -> Awaitable[Any] | None:
        from temporalio import activity

        key = (activity.info().attempt, point)
        if key not in self.holds:
            return None
        self.reached[key].set()
        return self.holds[key].wait()

    async def wait_reached(self, attempt: int, point: str) -> None:
        await asyncio.wait_for(self.reached[(attempt, point)].wait(), timeout=30)

    def release(self, attempt: int, point: str) -> None:
        self.holds[(attempt, point)].set()


@asynccontextmanager
async def delivery_setup(sf: SessionFactory, smtp: Any, gates: Gates) -> AsyncIterator[tuple[Any, DeliverInput]]:
    sender_id = await make_sender(sf, "email", "sales@acme.test")
    ref, defn = await store_version(
        sf,
        {
            "name": f"cas-{uuid.uuid4().hex[:6]}",
            "steps": [
                {"id": "m0", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]}
            ],
        },
    )
    pid = await make_person(sf, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    inp = DeliverInput(
        ref=await enrollment_ref(sf, ref, pid),
        step=defn.first_step,
        attempt=1,
        sender_id=sender_id,
        now=datetime.now(UTC),
    )
    channel = EmailChannel(SmtpPool(smtp.host, smtp.port, size=2, timeout=10), default_footer="1 Test St")
    acts = DeliveryActivities(
        sf,
        SendGovernor(sf),
        {"email": channel},
        DeliveryConfig(
            public_base_url="https://links.acme.test", link_secret="s", postal_address="Acme Inc, 1 Test Street"
        ),
        fault=gates,
    )
    try:
        yield acts, inp
    finally:
        await channel.aclose()


def attempt_env(attempt: int) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt, activity_id="deliver-1", workflow_run_id="run-1")
    return env


async def outcome(task: asyncio.Task[DeliverOutput]) -> DeliverOutput | BaseException:
    try:
        return await asyncio.wait_for(task, timeout=60)
    except (ApplicationError, Exception) as err:  # the loser may be told it was superseded
        return err


async def ledger(sf: SessionFactory) -> list[Delivery]:
    async with sf() as s:
        return list((await s.execute(select(Delivery))).scalars())


async def test_two_concurrent_attempts_released_after_the_claim_send_once(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    gates = Gates()
    gates.hold(1, "after_claim")
    gates.hold(2, "after_claim")
    async with delivery_setup(session_factory, smtp_server, gates) as (acts, inp):
        first = asyncio.create_task(attempt_env(1).run(acts.deliver, inp))
        await gates.wait_reached(1, "after_claim")
        second = asyncio.create_task(attempt_env(2).run(acts.deliver, inp))
        await gates.wait_reached(2, "after_claim")
        gates.release(1, "after_claim")
        gates.release(2, "after_claim")
        results = [await outcome(first), await outcome(second)]
    assert len(smtp_server.messages) == 1, results
    [row] = await ledger(session_factory)
    assert row.status == "sent"
    async with session_factory() as s:
        types = list((await s.execute(select(Event.type).where(Event.delivery_id == row.id))).scalars())
    assert types == ["sent"], "the loser records nothing"
    assert isinstance(results[1], DeliverOutput) and results[1].status == "sent"


async def test_a_stalled_attempt_resuming_after_its_retry_sent_does_not_send_again(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    gates = Gates()
    gates.hold(1, "after_claim")
    async with delivery_setup(session_factory, smtp_server, gates) as (acts, inp):
        stalled = asyncio.create_task(attempt_env(1).run(acts.deliver, inp))
        await gates.wait_reached(1, "after_claim")
        retry = await attempt_env(2).run(acts.deliver, inp)
        assert retry.status == "sent"
        gates.release(1, "after_claim")
        late = await outcome(stalled)
    assert len(smtp_server.messages) == 1, late
    [row] = await ledger(session_factory)
    assert row.status == "sent" and row.attempts_made == 1


async def test_a_stale_attempt_cannot_take_the_row_from_a_newer_one(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    gates = Gates()
    gates.hold(2, "after_claim")
    gates.hold(1, "after_claim")
    async with delivery_setup(session_factory, smtp_server, gates) as (acts, inp):
        newer = asyncio.create_task(attempt_env(2).run(acts.deliver, inp))
        await gates.wait_reached(2, "after_claim")
        older = asyncio.create_task(attempt_env(1).run(acts.deliver, inp))
        await asyncio.sleep(0)  # the stale attempt reaches its claim (or its hold) first
        gates.release(1, "after_claim")
        stale = await outcome(older)
        gates.release(2, "after_claim")
        fresh = await outcome(newer)
    assert len(smtp_server.messages) == 1, (stale, fresh)
    assert isinstance(fresh, DeliverOutput) and fresh.status == "sent"


async def test_give_up_racing_a_running_attempt_never_contacts_the_lead_after_failed(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    gates = Gates()
    gates.hold(3, "after_claim")
    async with delivery_setup(session_factory, smtp_server, gates) as (acts, inp):
        running = asyncio.create_task(attempt_env(3).run(acts.deliver, inp))
        await gates.wait_reached(3, "after_claim")
        gave_up = await attempt_env(1).run(acts.give_up_delivery, inp)
        assert gave_up.status == "failed"
        gates.release(3, "after_claim")
        late = await outcome(running)
    assert smtp_server.messages == [], late
    [row] = await ledger(session_factory)
    assert row.status == "failed"

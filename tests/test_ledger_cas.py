"""The deliveries ledger as compare-and-set: concurrent or stalled attempts never send twice.

Two `deliver` attempts for one delivery are run for real (the production activity class,
PostgreSQL, aiosmtpd) with `ActivityEnvironment`, each held at a chosen point by the
activity's fault hook and released in the order that used to send twice. What the SMTP
server received is the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
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
from tests.eventually import eventually


class Gates:
    """A fault hook that holds each attempt at a point until the test releases it."""

    def __init__(self) -> None:
        self.holds: dict[tuple[int, str], asyncio.Event] = {}
        self.reached: dict[tuple[int, str], asyncio.Event] = {}

    def hold(self, attempt: int, point: str) -> None:
        self.holds[(attempt, point)] = asyncio.Event()
        self.reached[(attempt, point)] = asyncio.Event()

    def __call__(self, point: str) -> Awaitable[Any] | None:
        key = self._key(point)
        if key not in self.holds:
            return None
        self.reached[key].set()
        return self.holds[key].wait()

    def _key(self, point: str) -> tuple[int, str]:
        from temporalio import activity

        return activity.info().attempt, point

    async def wait_reached(self, attempt: int, point: str) -> None:
        await asyncio.wait_for(self.reached[(attempt, point)].wait(), timeout=30)

    def release(self, attempt: int, point: str) -> None:
        self.holds[(attempt, point)].set()


@asynccontextmanager
async def delivery_setup(
    sf: SessionFactory, smtp: Any, gates: Callable[[str], Awaitable[Any] | None]
) -> AsyncIterator[tuple[Any, DeliverInput]]:
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


class Arrivals(Gates):
    """`Gates` by order of arrival at a point (the executions of a local activity share an attempt):
    `hold(n, point)` holds the n-th execution to reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()

    def _key(self, point: str) -> tuple[int, str]:
        self.count[point] += 1
        return self.count[point], point


def local_env() -> ActivityEnvironment:
    """`send_step` as the workflow runs it since patch send-step-local: a local activity.

    A workflow task that fails or times out after starting it (a dead or cut-off worker)
    is replayed and runs it again with the same activity id and attempt number."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=1, activity_id="1", workflow_run_id="run-1", is_local=True)
    return env


@pytest.mark.parametrize("point", ["after_claim", "before_write"])
async def test_a_local_send_run_again_by_a_replay_while_the_first_still_runs_sends_once(
    session_factory: SessionFactory, smtp_server: Any, point: str
) -> None:
    """The first execution (a worker cut off from the server) is held before its write; the
    replay's execution (same id, same attempt) takes the claimed row over and sends; the first,
    released, finds it no longer owns the row and writes nothing to the SMTP server."""
    hooks = Arrivals()
    hooks.hold(1, point)
    async with delivery_setup(session_factory, smtp_server, hooks) as (acts, inp):
        first = asyncio.create_task(local_env().run(acts.deliver, inp))
        await hooks.wait_reached(1, point)
        again = await local_env().run(acts.deliver, inp)
        assert again.status == "sent"
        hooks.release(1, point)
        late = await outcome(first)
    assert len(smtp_server.messages) == 1, late
    [row] = await ledger(session_factory)
    assert row.status == "sent" and row.attempts_made == 1
    assert isinstance(late, DeliverOutput) and late.status == "sent" and late.duplicate


async def test_a_local_send_released_while_its_replay_is_sending_does_not_send_again(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    """The two executions of one local attempt are different owners: the first, held after its
    claim, must not pass the `sending` compare-and-set that the replay's execution holds (the
    same token would: `sending` is accepted again for the SMTP pool's one reconnect)."""
    hooks = Arrivals()
    hooks.hold(1, "after_claim")
    hooks.hold(1, "after_send")  # the replay's execution: its message is written, not yet recorded
    async with delivery_setup(session_factory, smtp_server, hooks) as (acts, inp):
        first = asyncio.create_task(local_env().run(acts.deliver, inp))
        await hooks.wait_reached(1, "after_claim")
        again = asyncio.create_task(local_env().run(acts.deliver, inp))
        await hooks.wait_reached(1, "after_send")
        hooks.release(1, "after_claim")
        late = await outcome(first)
        hooks.release(1, "after_send")
        done = await outcome(again)
    assert len(smtp_server.messages) == 1, (late, done)
    assert isinstance(done, DeliverOutput) and done.status == "sent"
    [row] = await ledger(session_factory)
    assert row.status == "sent"


async def test_a_local_send_run_again_after_the_provider_accepted_is_uncertain_never_resent(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    """The first execution wrote the message and stopped before recording it (its worker died);
    the replay's execution finds the row `sending` and records it as uncertain: no second send."""
    hooks = Arrivals()
    hooks.hold(1, "after_send")
    async with delivery_setup(session_factory, smtp_server, hooks) as (acts, inp):
        first = asyncio.create_task(local_env().run(acts.deliver, inp))
        await hooks.wait_reached(1, "after_send")
        again = await local_env().run(acts.deliver, inp)
        first.cancel()  # the dead worker never comes back
        with contextlib.suppress(asyncio.CancelledError):
            await first
    assert again.status == "uncertain"
    assert len(smtp_server.messages) == 1
    [row] = await ledger(session_factory)
    assert row.status == "uncertain"


async def test_a_send_cancelled_at_its_write_goes_through_and_is_recorded(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    """A cancelled attempt (a local send whose workflow was evicted, a worker shutting down) does
    not cut its provider call: the message is written once and the row ends `sent`, not left
    `sending` for the next attempt to record as uncertain."""
    hooks = Arrivals()
    hooks.hold(1, "before_write")
    async with delivery_setup(session_factory, smtp_server, hooks) as (acts, inp):
        env = local_env()
        attempt = asyncio.create_task(env.run(acts.deliver, inp))
        await hooks.wait_reached(1, "before_write")
        env.cancel()
        hooks.release(1, "before_write")
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(attempt, timeout=30)

        async def recorded() -> str:
            [row] = await ledger(session_factory)
            return row.status if row.status == "sent" else ""

        assert await eventually(recorded, "the cancelled send recorded") == "sent"
    assert len(smtp_server.messages) == 1


async def test_a_send_keeps_its_database_connection_from_sending_to_its_outcome(
    session_factory: SessionFactory, smtp_server: Any
) -> None:
    """The time a row spends `sending` (what a crash turns into an uncertain delivery) is the
    provider's answer, not a wait for the database pool behind other sends: the connection that
    marked it `sending` is still checked out when the provider has answered, for the outcome."""
    pool = session_factory.kw["bind"].pool
    held: list[int] = []

    def at(point: str) -> None:
        if point == "after_send":
            held.append(pool.checkedout())

    async with delivery_setup(session_factory, smtp_server, at) as (acts, inp):
        out = await local_env().run(acts.deliver, inp)
    assert out.status == "sent" and len(smtp_server.messages) == 1
    assert held == [1]
    assert pool.checkedout() == 0  # and given back after the outcome

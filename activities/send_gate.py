"""The moment-of-send gate: caps and windows hold when the send really happens.

A slot is granted inside the send window and the sender's caps, but the send can run
later than its slot: a lead paused before its slot and resumed at 23:00, a retry backlog
after a provider outage, a worker that was down. Sent then, it would go out off-window,
or bunched with the sends that keep their own slots, over the sender's hourly cap. So
right before the provider call `deliver` checks the time (the pure rule is
`models.schedule.send_gate`); a send that is outside the window or more than the grace
late returns `reschedule` without sending (a row an earlier attempt left `claimed` stays
`claimed`, its owner cleared so that attempt can no longer send), and the workflow asks the
governor for a new slot (a new round, which releases this one).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from temporalio import activity

from db.events import append_event
from db.session import SessionFactory
from db.tables import Delivery
from models.activities import DeliverInput, DeliverOutput
from models.outcomes import DeliveryStatus, EventType
from models.schedule import send_gate
from models.sequence import zone


def activity_now(floor: datetime) -> datetime:
    """Now, for an activity: the later of `floor` and the Temporal server's time of this attempt.

    A retry's attempt is scheduled on the server's clock (the time-skipping test server's
    too), and `started_time` is when a worker took it: a backlog shows in them. The worker's
    wall clock is left out on purpose: a worker clock running ahead of the server would
    make every send look late and ask for a new slot again and again.
    """
    moments = [floor]
    if activity.in_activity():
        info = activity.info()
        moments += [info.current_attempt_scheduled_time, info.started_time]
    return max(m for m in moments if m is not None and m.tzinfo is not None)


async def check_send_gate(
    session_factory: SessionFactory, inp: DeliverInput, key: str, grace: timedelta
) -> DeliverOutput | None:
    """`reschedule` when this send must not go out now; None to go on with the send.

    A delivery that already has an outcome in the ledger (or was in flight) is left to
    `deliver`, which reports it and never sends again.
    """
    if inp.slot_at is None:  # a workflow from before the gate: it cannot ask again
        return None
    now = activity_now(inp.now)
    why = send_gate(now, inp.slot_at, inp.send_window, inp.timeline, zone(inp.timezone), grace)
    if why is None:
        return None
    async with session_factory() as session, session.begin():
        status = (
            await session.execute(select(Delivery.status).where(Delivery.idempotency_key == key).with_for_update())
        ).scalar_one_or_none()
        if status not in (None, DeliveryStatus.CLAIMED):
            return None
        if status == DeliveryStatus.CLAIMED:
            # Left by an earlier attempt (a transient error, or one that stalled and may still
            # wake up): fence it off. The row stays `claimed` with no owner, so that attempt's
            # compare-and-set to `sending` fails and the next round's `deliver` takes the row.
            await session.execute(
                update(Delivery)
                .where(Delivery.idempotency_key == key, Delivery.status == DeliveryStatus.CLAIMED)
                .values(owner=None, owner_attempt=0)
            )
        await append_event(
            session,
            type_=EventType.RESCHEDULED,
            ref=inp.ref,
            step_id=inp.step.id,
            channel=str(inp.step.channel) if inp.step.channel else None,
            occurred_at=now,
            dedup_key=f"{key}:r{inp.round}:rescheduled",
            data={
                "slot_at": inp.slot_at.isoformat(),
                "reason": why,
                "sender_id": inp.sender_id,
                "failed_attempts": max(activity.info().attempt - 1, 0) if activity.in_activity() else 0,
            },
        )
    failed = activity.info().attempt - 1 if activity.in_activity() else 0
    activity.logger.info("delivery %s round %s: not sent now, %s: asking for a new slot", key, inp.round, why)
    return DeliverOutput(status=DeliveryStatus.RESCHEDULE, error=why, failed_attempts=max(failed, 0))

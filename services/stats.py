"""Funnels and campaign counters, computed from the event log and the ledger.

Everything a user sees in `starter.py stats` is a query over append-only events (and,
for the seed-004 counters, the deliveries ledger and enrollments), so the numbers can
always be re-derived and audited.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Event, Sequence, SequenceVersion
from models.outcomes import DELIVERY_IN_FLIGHT, LIVE_ENROLLMENT, DeliveryStatus, EventType

#: Funnel columns, in display order, and the event types that feed them.
FUNNEL: dict[str, tuple[EventType, ...]] = {
    "enrolled": (EventType.ENROLLED,),
    "sent": (EventType.SENT,),
    # Provider delivery reports when there are any; otherwise sent minus the bounces
    # reported after acceptance (see below).
    "delivered": (EventType.DELIVERED,),
    "opened": (EventType.OPENED,),
    "clicked": (EventType.CLICKED,),
    "replied": (EventType.REPLIED,),
    "positive": (EventType.POSITIVE_REPLY,),
    "bounced": (EventType.BOUNCED,),
    "unsubscribed": (EventType.UNSUBSCRIBED,),
    "failed": (EventType.FAILED,),
    "uncertain": (EventType.UNCERTAIN,),
    "suppressed": (EventType.SUPPRESSED,),
    "completed": (EventType.COMPLETED,),
}
#: Columns that count events (a step sent twice counts twice); the others count enrollments.
EVENT_COUNTED = frozenset({"sent", "delivered", "opened", "bounced", "failed", "uncertain"})


class FunnelRow(BaseModel):
    """One (version, step, variant) line of the funnel."""

    version: int
    step: str | None
    variant: str | None
    counts: dict[str, int]


class CampaignCounters(BaseModel):
    """The counters users know from queue-based senders (seed 004)."""

    total: int = 0
    pending: int = 0
    queued: int = 0
    sent: int = 0
    failed: int = 0
    bounced: int = 0
    uncertain: int = 0
    by_status: dict[str, int] = Field(default_factory=dict)


class SequenceStats(BaseModel):
    """The whole answer of `stats --sequence`."""

    sequence: str
    rows: list[FunnelRow]
    totals: dict[str, int]
    campaign: CampaignCounters


async def sequence_stats(session_factory: SessionFactory, name: str) -> SequenceStats:
    """Funnel per version, step and variant, plus campaign counters, for one sequence."""
    async with session_factory() as session:
        seq = (await session.execute(select(Sequence).where(Sequence.name == name))).scalar_one_or_none()
        if seq is None:
            known = (await session.execute(select(Sequence.name).order_by(Sequence.name))).scalars()
            raise LookupError(f"unknown sequence {name!r} (known: {', '.join(known) or 'none'})")
        versions = dict(
            (
                await session.execute(
                    select(SequenceVersion.id, SequenceVersion.version).where(SequenceVersion.sequence_id == seq.id)
                )
            ).all()
        )
        late = Event.delivery_id.is_(None).label("late")
        event_rows = await session.execute(
            select(
                Event.sequence_version_id,
                Event.step_id,
                Event.variant,
                Event.type,
                late,
                func.count(func.distinct(Event.enrollment_id)),
                func.count(),
            )
            .where(Event.sequence_id == seq.id)
            .group_by(Event.sequence_version_id, Event.step_id, Event.variant, Event.type, late)
        )
        type_to_col: dict[str, str] = {t.value: col for col, types in FUNNEL.items() for t in types}
        cells: dict[tuple[int, str | None, str | None], dict[str, int]] = defaultdict(lambda: dict.fromkeys(FUNNEL, 0))
        totals = dict.fromkeys(FUNNEL, 0)
        # A bounce with a delivery id is the provider refusing the send itself (never counted as
        # sent); one without (a bounce notification by webhook) came after the send was accepted,
        # so only those are taken off `sent` to give `delivered`.
        late_bounces: dict[tuple[int, str | None, str | None], int] = defaultdict(int)
        for version_id, step, variant, type_, is_late, enrollments, count in event_rows:
            col = type_to_col.get(type_)
            if col is None:
                continue
            key = (versions.get(version_id or 0, 0), None if col == "enrolled" else step, variant)
            value = count if col in EVENT_COUNTED else enrollments
            cells[key][col] += value
            totals[col] += value
            if col == "bounced" and is_late:
                late_bounces[key] += count
        for key, counts in cells.items():
            if not counts["delivered"]:  # no provider reports delivery: infer it
                counts["delivered"] = max(0, counts["sent"] - late_bounces[key])
        totals["delivered"] = sum(counts["delivered"] for counts in cells.values())
        rows = [
            FunnelRow(version=v, step=s, variant=var, counts=c)
            for (v, s, var), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2] or ""))
        ]

        statuses = dict(
            (
                await session.execute(
                    select(Enrollment.status, func.count())
                    .where(Enrollment.sequence_id == seq.id)
                    .group_by(Enrollment.status)
                )
            ).all()
        )
        delivery_counts: dict[str, int] = dict(
            (
                await session.execute(
                    select(Delivery.status, func.count())
                    .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
                    .where(Enrollment.sequence_id == seq.id)
                    .group_by(Delivery.status)
                )
            ).all()
        )
    campaign = CampaignCounters(
        total=sum(statuses.values()),
        pending=sum(statuses.get(s, 0) for s in LIVE_ENROLLMENT),
        queued=sum(delivery_counts.get(s, 0) for s in DELIVERY_IN_FLIGHT),
        sent=delivery_counts.get(DeliveryStatus.SENT, 0),
        failed=delivery_counts.get(DeliveryStatus.FAILED, 0),
        bounced=delivery_counts.get(DeliveryStatus.BOUNCED, 0),
        uncertain=delivery_counts.get(DeliveryStatus.UNCERTAIN, 0),
        by_status=statuses,
    )
    return SequenceStats(sequence=name, rows=rows, totals=totals, campaign=campaign)


def as_json(stats: SequenceStats) -> dict[str, Any]:
    """The `--json` shape."""
    return stats.model_dump(mode="json")

"""The send governor: per-sender slots kept in PostgreSQL, shared by every worker.

v1 had coarse per-hour/per-day caps that gave bursts or needless throttling. Here a
send asks for a slot and gets a time; the workflow waits for it with a durable timer.
A slot satisfies, for its sender account:

* a minimum spacing to its neighbours plus random jitter (seed 000's
  SendDelayVariability and +60 s spacing),
* at most `per_hour` slots in any rolling 60 minutes (no bursts at hour boundaries),
* at most `per_day` slots per local calendar day of the sender (the day resets at the
  sender's local midnight), or the warm-up allowance while the account is new,

and, for the person, at most `person_daily_cap` touches in any rolling 24 hours across
every sequence and channel. Reservations are serialized per sender with a row lock
(`SELECT … FOR UPDATE`), so the caps hold for any number of workers, and they are
idempotent per delivery key so that activity retries never take a second slot. Times
come from the caller (the workflow's clock), never from the wall clock. A slot that
ends up unused (the lead was stopped) simply stays taken: wasting capacity is safe.
"""

from __future__ import annotations

import asyncio
import random
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from db.session import SessionFactory
from db.tables import SenderAccount, SendSlot

MAX_ITERATIONS = 10_000
HORIZON = timedelta(days=366)


@dataclass
class Reservation:
    """The granted sender and time; `sender_id` None when the channel has no sender."""

    sender_id: int | None
    slot_at: datetime
    reason: str | None = None


class NoSlotError(RuntimeError):
    """No time within a year satisfies the caps (a misconfigured sender)."""


class SendGovernor:
    """Allocates send slots for sender accounts."""

    def __init__(self, session_factory: SessionFactory, rng: random.Random | None = None) -> None:
        self.session_factory = session_factory
        self.rng = rng or random.Random()
        # Reservations of one channel queue here, in the process, instead of each holding a
        # database connection while it waits for the sender rows' lock.
        self._locks: dict[str, asyncio.Lock] = {}

    async def reserve(
        self,
        *,
        delivery_key: str,
        channel: str,
        person_id: int | None,
        now: datetime,
        not_before: datetime,
        preferred_sender_id: int | None = None,
        allowed_senders: list[str] | None = None,
        counts_as_touch: bool = True,
        person_daily_cap: int = 1,
    ) -> Reservation:
        """Reserve (or return the existing) slot for `delivery_key`."""
        lock = self._locks.setdefault(channel, asyncio.Lock())
        async with lock, self.session_factory() as session, session.begin():
            existing = (
                await session.execute(select(SendSlot).where(SendSlot.delivery_key == delivery_key))
            ).scalar_one_or_none()
            if existing is not None:
                return Reservation(existing.sender_id, existing.slot_at, None)
            query = select(SenderAccount).where(SenderAccount.channel == channel, SenderAccount.active.is_(True))
            if allowed_senders:
                query = query.where(SenderAccount.address.in_(allowed_senders))
            candidates = list((await session.execute(query.order_by(SenderAccount.id))).scalars())
            if not candidates:
                return Reservation(None, max(now, not_before), "no sender account")
            if preferred_sender_id is not None and any(c.id == preferred_sender_id for c in candidates):
                candidates = [c for c in candidates if c.id == preferred_sender_id]
            # Lock candidates in id order (no deadlocks), and the person (touch cap).
            locked = list(
                (
                    await session.execute(
                        select(SenderAccount)
                        .where(SenderAccount.id.in_([c.id for c in candidates]))
                        .order_by(SenderAccount.id)
                        .with_for_update()
                    )
                ).scalars()
            )
            if person_id is not None and counts_as_touch and person_daily_cap > 0:
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": 7_000_000_000 + person_id})
            # A concurrent retry of the same key may have won while we waited for locks.
            existing = (
                await session.execute(select(SendSlot).where(SendSlot.delivery_key == delivery_key))
            ).scalar_one_or_none()
            if existing is not None:
                return Reservation(existing.sender_id, existing.slot_at, None)

            start = max(now, not_before)
            reason: str | None = None
            person_capped = person_id is not None and counts_as_touch and person_daily_cap > 0
            jitters = {acct.id: self.rng.uniform(0, acct.jitter_seconds or 0) for acct in locked}
            for _ in range(MAX_ITERATIONS):
                if person_capped:
                    assert person_id is not None
                    start, why_person = await self._person_cap(session, person_id, start, person_daily_cap)
                    reason = why_person or reason
                best = await self._best_sender(session, locked, start, jitters)
                if not person_capped or best[0] == start:
                    break
                # The sender pushed the slot past `start`: the person's cap must hold there too.
                assert person_id is not None
                again, _ = await self._person_cap(session, person_id, best[0], person_daily_cap)
                if again == best[0]:
                    break
                start, reason = again, "person frequency cap"
            else:
                raise NoSlotError(f"no slot for person {person_id}")
            slot_at, _, acct, why = best
            session.add(
                SendSlot(
                    sender_id=acct.id,
                    person_id=person_id,
                    delivery_key=delivery_key,
                    slot_at=slot_at,
                    counts_as_touch=counts_as_touch,
                )
            )
            if acct.last_slot_at is None or slot_at > acct.last_slot_at:
                acct.last_slot_at = slot_at
            if slot_at > start:
                reason = why or reason
            return Reservation(acct.id, slot_at, reason if slot_at > max(now, not_before) else None)

    async def _best_sender(
        self, session: AsyncSession, locked: list[SenderAccount], start: datetime, jitters: dict[int, float]
    ) -> tuple[datetime, int, SenderAccount, str | None]:
        """Rotation: the sender whose earliest free slot is soonest (then fewest today, then id)."""
        best: tuple[datetime, int, SenderAccount, str | None] | None = None
        for acct in locked:
            slot, why = await self._earliest(session, acct, start, jitters[acct.id])
            today = await self._count_day(session, acct, slot)
            if best is None or (slot, today, acct.id) < (best[0], best[1], best[2].id):
                best = (slot, today, acct, why)
        assert best is not None
        return best

    # ------------------------------------------------------------------ rules
    async def _person_cap(
        self, session: AsyncSession, person_id: int, start: datetime, cap: int
    ) -> tuple[datetime, str | None]:
        reason = None
        for _ in range(MAX_ITERATIONS):
            rows = list(
                (
                    await session.execute(
                        select(SendSlot.slot_at)
                        .where(
                            SendSlot.person_id == person_id,
                            SendSlot.counts_as_touch.is_(True),
                            SendSlot.slot_at > start - timedelta(hours=24),
                            SendSlot.slot_at < start + timedelta(hours=24),
                        )
                        .order_by(SendSlot.slot_at)
                    )
                ).scalars()
            )
            # every rolling 24 h window containing `start` must hold fewer than cap touches
            window = [t for t in rows if start - timedelta(hours=24) < t <= start]
            after = [t for t in rows if start < t < start + timedelta(hours=24)]
            if len(window) + len(after) < cap or (len(window) < cap and not after):
                return start, reason
            if len(window) >= cap:
                start = window[len(window) - cap] + timedelta(hours=24)
            else:
                start = after[-1] + timedelta(hours=24) if after else start
            reason = "person frequency cap"
        raise NoSlotError(f"no slot for person {person_id}")

    def _day_cap(self, acct: SenderAccount, day_start: datetime) -> int:
        if not acct.warmup_start_per_day or acct.warmup_days <= 0:
            return acct.per_day
        tz = ZoneInfo(acct.timezone or "UTC")
        created = acct.created_at.astimezone(tz).date() if acct.created_at else day_start.date()
        age = (day_start.astimezone(tz).date() - created).days
        if age >= acct.warmup_days:
            return acct.per_day
        step = (acct.per_day - acct.warmup_start_per_day) / max(acct.warmup_days, 1)
        return max(1, min(acct.per_day, int(acct.warmup_start_per_day + step * max(age, 0))))

    async def _count_day(self, session: AsyncSession, acct: SenderAccount, at: datetime) -> int:
        day_start, day_end = _local_day(at, acct.timezone)
        return int(
            (
                await session.execute(
                    select(func.count()).where(
                        SendSlot.sender_id == acct.id,
                        SendSlot.slot_at >= day_start,
                        SendSlot.slot_at < day_end,
                    )
                )
            ).scalar_one()
        )

    async def _earliest(
        self, session: AsyncSession, acct: SenderAccount, start: datetime, jitter: float
    ) -> tuple[datetime, str | None]:
        """The sender's earliest slot at or after `start` that keeps its caps and spacing.

        One count per local day visited and, for the first day with room, one read of
        that day's slots (with margins for the hour and spacing around it); the search
        inside the day runs in memory.
        """
        spacing = timedelta(seconds=(acct.min_spacing_seconds or 0) + jitter)
        hour = timedelta(hours=1)
        margin = max(hour, spacing)
        slot = start
        reason: str | None = None
        for _ in range(MAX_ITERATIONS):
            if slot - start > HORIZON:
                break
            # daily cap (or warm-up) in the sender's local day
            day_start, day_end = _local_day(slot, acct.timezone)
            day_cap = self._day_cap(acct, day_start)
            if await self._count_day(session, acct, slot) >= day_cap:
                slot = day_end
                reason = "warm-up" if day_cap < acct.per_day else "daily cap"
                continue
            times = list(
                (
                    await session.execute(
                        select(SendSlot.slot_at)
                        .where(
                            SendSlot.sender_id == acct.id,
                            SendSlot.slot_at > day_start - margin,
                            SendSlot.slot_at < day_end + margin,
                        )
                        .order_by(SendSlot.slot_at)
                    )
                ).scalars()
            )
            found, why = _search_day(times, slot, day_end, acct.per_hour, spacing)
            if why == "hourly cap" or (why == "spacing" and reason is None):
                reason = why
            if found is not None:
                return found, reason
            slot = max(day_end, slot)  # no room left in this day: the next one
        raise NoSlotError(f"sender {acct.channel}:{acct.address} has no free slot within {HORIZON.days} days")


def _search_day(
    times: list[datetime], slot: datetime, day_end: datetime, per_hour: int, spacing: timedelta
) -> tuple[datetime | None, str | None]:
    """The earliest time in [slot, day_end) within the rolling-hour cap and spacing.

    `times` (sorted) must hold every slot within max(1 h, spacing) of the day.
    """
    hour = timedelta(hours=1)
    reason: str | None = None
    for _ in range(MAX_ITERATIONS):
        if slot >= day_end:
            return None, reason
        # rolling hourly cap: any 60-minute window containing the slot
        near = times[bisect_right(times, slot - hour) : bisect_left(times, slot + hour)]
        if not _hour_ok(near, slot, per_hour):
            boundaries = [t + hour for t in near if t + hour > slot]
            boundaries += [t + timedelta(microseconds=1) for t in near if t > slot]
            slot = min(boundaries)
            reason = "hourly cap"
            continue
        # spacing to both neighbours: walk from just before the candidate to the first gap wide enough
        if spacing > timedelta(0):
            candidate = slot
            for existing in times[bisect_right(times, slot - spacing) :]:
                if existing >= candidate + spacing:
                    break
                candidate = max(candidate, existing + spacing)
            if candidate != slot:
                slot = candidate
                reason = reason or "spacing"
                continue
        return slot, reason
    return None, reason


def _hour_ok(times: list[datetime], slot: datetime, cap: int) -> bool:
    """True when adding `slot` keeps every rolling hour containing it within `cap`.

    `times` must be sorted. A window [w, w + 1h) holds the slot when w is in
    (slot - 1h, slot]; the fullest of them starts at an existing slot in that range or at
    `slot` itself (the window ahead of it, which matters when slots are granted out of
    time order), so those are checked.
    """
    if len(times) < cap:
        return True
    hour = timedelta(hours=1)
    starts = [slot]
    starts += times[bisect_right(times, slot - hour) : bisect_right(times, slot)]
    return all(bisect_left(times, w + hour) - bisect_left(times, w) + 1 <= cap for w in starts)


def _local_day(at: datetime, tz_name: str | None) -> tuple[datetime, datetime]:
    tz = ZoneInfo(tz_name or "UTC")
    local = at.astimezone(tz)
    start = datetime.combine(local.date(), datetime.min.time(), tzinfo=tz)
    end = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    return start.astimezone(at.tzinfo), end.astimezone(at.tzinfo)

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
every sequence and channel (a response to the person's own event is not held by it, but
still counts as a touch). When the request brings its step's send window, campaign
timeline and the person's zone, the slot is inside them too: a full day moves the slot to
the next window opening, never to an off-window time that would eat the next day's cap.
A timeline that ends first is reported (`TimelineEndedError`), with nothing booked. The
rules themselves are pure functions in `activities/slot_rules.py`.

A new round for the same delivery (the send came too late or off-window at the moment of
sending and asks again) releases the slots of the earlier rounds in the same transaction:
they no longer count toward the sender's or the person's caps.

Concurrency: reservations are serialized per sender with a row lock (`SELECT … FOR
UPDATE`) and per person with an advisory lock, so the caps hold for any number of
workers. Within one worker, reservations of a channel that arrive together are decided
as one batch in one transaction (group commit): one lock, one read of the senders' slots,
every decision in memory, one insert. A thousand leads asking at once cost a handful of
transactions instead of a thousand queued behind one lock. Reservations are idempotent per
delivery key, so activity retries never take a second slot. A slot is never earlier than
the later of the caller's time (the workflow's clock) and the governor's own clock, so a
reservation that ran late never books a time already past. A slot that ends up unused
(the lead was stopped) simply stays taken: wasting capacity is safe.
"""

from __future__ import annotations

import asyncio
import random
from bisect import insort
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from activities.slot_rules import Align, NoSlotError, SenderBook, TimelineEndedError, choose_slot
from db.session import SessionFactory
from db.tables import SenderAccount, SendSlot
from models.schedule import earliest_action_time
from models.sequence import SendWindow, Timeline, zone
from services.sender_breaker import is_paused

__all__ = ["NoSlotError", "Reservation", "SendGovernor", "TimelineEndedError"]

MAX_BATCH = 200
# How far before the earliest requested start a granted slot can still matter: the start
# of the sender's local day (up to 24 h, 25 h across a DST change) and the person's
# rolling 24 hours.
LOOKBACK = timedelta(hours=26)
DAY = timedelta(hours=24)


@dataclass
class Reservation:
    """The granted sender and time; `sender_id` None when the channel has no sender."""

    sender_id: int | None
    slot_at: datetime
    reason: str | None = None


@dataclass
class _Request:
    delivery_key: str
    channel: str
    person_id: int | None
    now: datetime
    not_before: datetime
    preferred_sender_id: int | None
    allowed_senders: list[str] | None
    counts_as_touch: bool
    person_daily_cap: int
    future: asyncio.Future[Reservation] = field(repr=False)
    align: Align | None = None
    response: bool = False
    releases: list[str] = field(default_factory=list)

    @property
    def start(self) -> datetime:
        return max(self.now, self.not_before)

    @property
    def person_capped(self) -> bool:
        return self.person_id is not None and self.counts_as_touch and not self.response and self.person_daily_cap > 0


class SendGovernor:
    """Allocates send slots for sender accounts."""

    def __init__(
        self,
        session_factory: SessionFactory,
        rng: random.Random | None = None,
        max_batch: int = MAX_BATCH,
        clock: Callable[[], datetime] | None = None,
        margin: timedelta = timedelta(0),
    ) -> None:
        """`margin`: how late a send may go out after its slot (the send gate's grace); the
        caps are kept with that much room so they hold at the real send times too."""
        self.session_factory = session_factory
        self.margin = margin
        self.rng = rng or random.Random()
        self.max_batch = max_batch
        self.clock = clock or (lambda: datetime.now(UTC))
        self._pending: dict[str, list[_Request]] = defaultdict(list)
        self._flushers: dict[str, asyncio.Task[None]] = {}

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
        send_window: SendWindow | None = None,
        timeline: Timeline | None = None,
        timezone: str | None = None,
        response: bool = False,
        releases: list[str] | None = None,
    ) -> Reservation:
        """Reserve (or return the existing) slot for `delivery_key`.

        `send_window` and `timeline` are read in the person's `timezone`; `response` marks
        a send answering the person's own event (not held by the person's cap);
        `releases` are the delivery keys of earlier rounds this one replaces.
        """
        align: Align | None = None
        if send_window is not None or timeline is not None:
            align = partial(earliest_action_time, window=send_window, timeline=timeline, tz=zone(timezone))
        request = _Request(
            delivery_key=delivery_key,
            channel=channel,
            person_id=person_id,
            now=max(now, self.clock()),
            not_before=not_before,
            preferred_sender_id=preferred_sender_id,
            allowed_senders=list(allowed_senders) if allowed_senders else None,
            counts_as_touch=counts_as_touch,
            person_daily_cap=person_daily_cap,
            future=asyncio.get_running_loop().create_future(),
            align=align,
            response=response,
            releases=list(releases or []),
        )
        self._pending[channel].append(request)
        flusher = self._flushers.get(channel)
        if flusher is None or flusher.done():
            self._flushers[channel] = asyncio.create_task(self._flush(channel), name=f"governor-{channel}")
        return await request.future

    async def _flush(self, channel: str) -> None:
        """Decide the channel's pending reservations, a batch per transaction, until none is left."""
        queue = self._pending[channel]
        while queue:
            batch = [r for r in queue[: self.max_batch] if not r.future.done()]
            del queue[: self.max_batch]
            if not batch:
                continue
            try:
                outcomes = await self._reserve_batch(channel, batch)
            except Exception as err:  # noqa: BLE001 - handed to every caller of the batch
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(err)
                continue
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.future.done():
                    continue
                if isinstance(outcome, Exception):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)

    async def _reserve_batch(self, channel: str, batch: list[_Request]) -> list[Reservation | Exception]:
        async with self.session_factory() as session, session.begin():
            active = list(
                (
                    await session.execute(
                        select(SenderAccount)
                        .where(SenderAccount.channel == channel, SenderAccount.active.is_(True))
                        .order_by(SenderAccount.id)
                    )
                ).scalars()
            )
            candidates = {id(r): _candidates(r, active) for r in batch}
            wanted = sorted({a.id for accts in candidates.values() for a in accts})
            locked: dict[int, SenderAccount] = {}
            if wanted:
                # Lock the senders in id order (no deadlocks), then the people (touch cap).
                rows = await session.execute(
                    select(SenderAccount)
                    .where(SenderAccount.id.in_(wanted))
                    .order_by(SenderAccount.id)
                    .with_for_update()
                )
                locked = {a.id: a for a in rows.scalars()}
            # Every send that adds a touch locks its person, responses too (they count for later touches).
            people = sorted(
                {r.person_id for r in batch if r.person_id is not None and r.counts_as_touch and r.person_daily_cap > 0}
            )
            if people:
                await session.execute(
                    text(
                        "SELECT pg_advisory_xact_lock(7000000000 + k) "
                        "FROM (SELECT k FROM unnest(CAST(:ks AS bigint[])) AS k ORDER BY k) AS ordered"
                    ),
                    {"ks": people},
                )
            # Which keys hold a slot already (retries, or a concurrent retry in another worker that
            # won meanwhile): read once, under the locks (a read before them too would cost every
            # new reservation a round trip).
            done = await self._existing(session, sorted({r.delivery_key for r in batch}))
            released = sorted({k for r in batch if r.delivery_key not in done for k in r.releases})
            if released:  # earlier rounds of these deliveries: free their capacity before deciding
                await session.execute(
                    update(SendSlot)
                    .where(SendSlot.delivery_key.in_(released), SendSlot.released_at.is_(None))
                    .values(released_at=func.now())
                )

            earliest = min(r.start for r in batch)
            books, touches = await self._read_slots(session, list(locked.values()), people, earliest, self.margin)

            outcomes: list[Reservation | Exception] = []
            granted: dict[str, Reservation] = {}
            booked: list[tuple[int, int | None, str, datetime, bool]] = []  # the new slots' rows
            latest: dict[int, datetime] = {}  # the senders' new `last_slot_at`
            for request in batch:
                key = request.delivery_key
                if key in done:
                    outcomes.append(done[key])
                    continue
                if key in granted:
                    outcomes.append(granted[key])
                    continue
                accts = [locked[a.id] for a in candidates.get(id(request), []) if a.id in locked]
                if not accts:
                    outcomes.append(Reservation(None, request.start, "no sender account"))
                    continue
                person_times = touches[request.person_id] if request.person_capped and request.person_id else None
                jitters = {a.id: timedelta(seconds=self.rng.uniform(0, a.jitter_seconds or 0)) for a in accts}
                try:
                    slot_at, book, why = choose_slot(
                        [books[a.id] for a in accts],
                        person_times,
                        request.start,
                        request.person_daily_cap,
                        jitters,
                        request.align,
                        DAY + self.margin,
                    )
                except TimelineEndedError as err:
                    outcomes.append(err)
                    continue
                except NoSlotError as err:
                    outcomes.append(NoSlotError(f"no slot for person {request.person_id} on {channel}: {err}"))
                    continue
                book.add(slot_at)
                if request.person_id is not None and request.counts_as_touch:
                    insort(touches[request.person_id], slot_at)
                acct = locked[book.sender_id]
                booked.append((acct.id, request.person_id, key, slot_at, request.counts_as_touch))
                last = latest.get(acct.id, acct.last_slot_at)
                if last is None or slot_at > last:
                    latest[acct.id] = slot_at
                reservation = Reservation(acct.id, slot_at, why if slot_at > request.start else None)
                granted[key] = reservation
                outcomes.append(reservation)
            if booked:
                senders, persons, keys, times, touch = (list(column) for column in zip(*booked, strict=True))
                await session.execute(
                    _BOOK,
                    {
                        "senders": senders,
                        "people": persons,
                        "keys": keys,
                        "times": times,
                        "touch": touch,
                        "latest_ids": list(latest),
                        "latest_at": list(latest.values()),
                    },
                )
            return outcomes

    @staticmethod
    async def _existing(session: AsyncSession, keys: list[str]) -> dict[str, Reservation]:
        if not keys:
            return {}
        rows = await session.execute(
            select(SendSlot.delivery_key, SendSlot.sender_id, SendSlot.slot_at).where(SendSlot.delivery_key.in_(keys))
        )
        return {key: Reservation(sender_id, slot_at, None) for key, sender_id, slot_at in rows}

    @staticmethod
    async def _read_slots(
        session: AsyncSession, accounts: list[SenderAccount], people: list[int], earliest: datetime, margin: timedelta
    ) -> tuple[dict[int, SenderBook], dict[int, list[datetime]]]:
        """The senders' books and the people's touches: their live slots that can still matter, one read."""
        books = {
            a.id: SenderBook(
                sender_id=a.id,
                per_hour=a.per_hour,
                per_day=a.per_day,
                min_spacing=timedelta(seconds=a.min_spacing_seconds or 0),
                tz=ZoneInfo(a.timezone or "UTC"),
                day_cap=_warmup(a),
                margin=margin,
            )
            for a in accounts
        }
        touches: dict[int, list[datetime]] = defaultdict(list)
        if not books and not people:
            return books, touches
        # a sender's book looks back at least as far as a person's touches (LOOKBACK)
        lookback = max(
            [LOOKBACK] + [timedelta(seconds=(a.min_spacing_seconds or 0) + (a.jitter_seconds or 0)) for a in accounts]
        )
        touch_since = earliest - LOOKBACK
        rows = await session.execute(
            select(SendSlot.sender_id, SendSlot.person_id, SendSlot.counts_as_touch, SendSlot.slot_at)
            .where(
                SendSlot.slot_at > earliest - lookback,
                SendSlot.released_at.is_(None),
                or_(
                    SendSlot.sender_id.in_(list(books)),
                    and_(SendSlot.person_id.in_(people), SendSlot.counts_as_touch.is_(True)),
                ),
            )
            .order_by(SendSlot.slot_at)
        )
        wanted = set(people)
        for sender_id, person_id, counts_as_touch, slot_at in rows:
            if sender_id in books:
                books[sender_id].times.append(slot_at)
            if person_id in wanted and counts_as_touch and slot_at > touch_since:
                touches[person_id].append(slot_at)
        return books, touches


#: The batch's new slots and the senders' latest slot, one statement (the slots' column arrays).
_BOOK = text(
    "WITH slots AS ("
    " INSERT INTO send_slots (sender_id, person_id, delivery_key, slot_at, counts_as_touch)"
    " SELECT * FROM unnest(CAST(:senders AS bigint[]), CAST(:people AS bigint[]), CAST(:keys AS varchar[]),"
    " CAST(:times AS timestamptz[]), CAST(:touch AS boolean[])))"
    " UPDATE sender_accounts AS s SET last_slot_at = latest.at"
    " FROM unnest(CAST(:latest_ids AS bigint[]), CAST(:latest_at AS timestamptz[])) AS latest(id, at)"
    " WHERE s.id = latest.id"
)


def _candidates(request: _Request, active: list[SenderAccount]) -> list[SenderAccount]:
    """The sender accounts this request may use: its sequence's, or its thread's mailbox.

    A sender held by the circuit breaker gets no slot (h2, issue 11.6); a thread whose
    mailbox is paused waits for it rather than moving to another mailbox.
    """
    accts = [a for a in active if not request.allowed_senders or a.address in request.allowed_senders]
    if request.preferred_sender_id is not None and any(a.id == request.preferred_sender_id for a in accts):
        accts = [a for a in accts if a.id == request.preferred_sender_id]
    now = max(datetime.now(UTC), request.now)
    return [a for a in accts if not is_paused(a, now)]


def _warmup(acct: SenderAccount) -> Callable[[datetime], int] | None:
    """The warm-up day cap of a new account, or None when it has none."""
    if not acct.warmup_start_per_day or acct.warmup_days <= 0:
        return None
    tz = ZoneInfo(acct.timezone or "UTC")
    per_day, start_per_day, days = acct.per_day, acct.warmup_start_per_day, acct.warmup_days
    created = acct.created_at.astimezone(tz).date() if acct.created_at else None

    def cap(day_start: datetime) -> int:
        day = day_start.astimezone(tz).date()
        age = (day - (created or day)).days
        if age >= days:
            return per_day
        step = (per_day - start_per_day) / max(days, 1)
        return max(1, min(per_day, int(start_per_day + step * max(age, 0))))

    return cap

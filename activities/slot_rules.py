"""The governor's rules as pure functions over sorted slot times.

The governor (activities/governor.py) loads a sender's granted slots once per batch of
reservations, under the sender rows' lock, and decides every slot here in memory. Keeping
the rules free of I/O makes them cheap (no query per candidate time, so a long queue of
slots costs one read, not one read per slot) and lets them be tested exhaustively without
a database.

A slot for a sender satisfies:

* at most `per_day` slots in the sender's local calendar day (the warm-up allowance
  while the account is new),
* at most `per_hour` slots in any rolling 60 minutes that contains it,
* at least `spacing` (minimum spacing plus this slot's jitter) to both neighbours;

and for the person, at most `cap` touches in any rolling 24 hours. When the request
brings its step's send window and campaign timeline (`align`: the first allowed time at or
after a given one, None once the timeline has ended), a slot is also inside them: a full
day moves the search to the next window opening, never to an off-window time.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

HOUR = timedelta(hours=1)
DAY = timedelta(hours=24)
HORIZON = timedelta(days=366)
MAX_ITERATIONS = 100_000


Align = Callable[[datetime], datetime | None]
"""The first time at or after the argument inside the send window and timeline; None: none."""


class NoSlotError(RuntimeError):
    """No time within a year satisfies the caps (a misconfigured sender)."""


class TimelineEndedError(NoSlotError):
    """The campaign timeline ends before any time that satisfies the caps."""


def local_day(at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The start and end of `at`'s calendar day in `tz`, in `at`'s zone."""
    local = at.astimezone(tz)
    start = datetime.combine(local.date(), datetime.min.time(), tzinfo=tz)
    end = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    return start.astimezone(at.tzinfo), end.astimezone(at.tzinfo)


def hour_ok(times: list[datetime], slot: datetime, cap: int, width: timedelta = HOUR) -> bool:
    """True when adding `slot` keeps every rolling hour (`width`) containing it within `cap`."""
    return hour_violation_end(times, slot, cap, width) is None


def hour_violation_end(times: list[datetime], slot: datetime, cap: int, width: timedelta = HOUR) -> datetime | None:
    """Where the latest full rolling hour containing `slot` ends, or None when there is room.

    `width` is the hour, widened by the sender's margin (see SenderBook.margin).
    `times` must be sorted. A window [w, w + width) holds the slot when w is in
    (slot - width, slot]; the fullest of them starts at an existing slot in that range or at
    `slot` itself (the window ahead of it, which matters when slots are granted out of
    time order), so those are checked. Every time from `slot` up to the returned end lies in
    a full window too, so the search may jump there without passing over a free time.
    """
    if len(times) < cap:
        return None
    starts = [slot]
    starts += times[bisect_right(times, slot - width) : bisect_right(times, slot)]
    end: datetime | None = None
    for w in starts:
        if bisect_left(times, w + width) - bisect_left(times, w) + 1 > cap and (end is None or w + width > end):
            end = w + width
    return end


@dataclass
class SenderBook:
    """One sender account's caps and the slots it has granted (sorted)."""

    sender_id: int
    per_hour: int
    per_day: int
    min_spacing: timedelta
    tz: ZoneInfo
    times: list[datetime] = field(default_factory=list)
    day_cap: Callable[[datetime], int] | None = None
    """Cap for the local day starting at the argument (warm-up); `per_day` when None."""
    margin: timedelta = timedelta(0)
    """How late a send may still go out after its slot (the moment-of-send gate's grace).
    Rolling hours are checked `1 h + margin` wide and no slot is booked within `margin` of
    the end of a local day, so the caps hold at the times the sends really happen."""

    def cap_for(self, day_start: datetime) -> int:
        """The day cap that applies to the local day starting at `day_start`."""
        return self.day_cap(day_start) if self.day_cap is not None else self.per_day

    def count_day(self, at: datetime) -> int:
        """Slots granted in `at`'s local day."""
        start, end = local_day(at, self.tz)
        return bisect_left(self.times, end) - bisect_left(self.times, start)

    def add(self, at: datetime) -> None:
        """Record a granted slot."""
        insort(self.times, at)

    def earliest(
        self, start: datetime, jitter: timedelta = timedelta(0), align: Align | None = None
    ) -> tuple[datetime, str | None]:
        """The first time at or after `start` that satisfies the sender's caps (and `align`)."""
        spacing = self.min_spacing + jitter
        slot = start
        reason: str | None = None
        times = self.times
        for _ in range(MAX_ITERATIONS):
            if slot - start > HORIZON:
                break
            if align is not None:
                allowed = align(slot)
                if allowed is None:
                    raise TimelineEndedError(f"the campaign timeline ends before sender {self.sender_id} has a slot")
                if allowed != slot:
                    slot = allowed
                    reason = reason or "send window"
                    continue
            day_start, day_end = local_day(slot, self.tz)
            cap = self.cap_for(day_start)
            if bisect_left(times, day_end) - bisect_left(times, day_start) >= cap:
                slot = day_end
                reason = "warm-up" if cap < self.per_day else "daily cap"
                continue
            if self.margin > timedelta(0) and day_end - slot <= self.margin:
                slot = day_end  # a late send would count in the next day
                reason = reason or "end of day"
                continue
            full_until = hour_violation_end(times, slot, self.per_hour, HOUR + self.margin)
            if full_until is not None:
                slot = full_until
                reason = "hourly cap"
                continue
            if spacing > timedelta(0):
                candidate = slot
                i = bisect_right(times, slot - spacing)
                while i < len(times) and times[i] < candidate + spacing:
                    candidate = max(candidate, times[i] + spacing)
                    i += 1
                if candidate != slot:
                    slot = candidate
                    reason = reason or "spacing"
                    continue
            return slot, reason
        raise NoSlotError(f"sender {self.sender_id} has no free slot within {HORIZON.days} days")


def person_earliest(
    times: list[datetime], start: datetime, cap: int, width: timedelta = DAY
) -> tuple[datetime, str | None]:
    """The first time at or after `start` when one more touch keeps every rolling 24 h within `cap`.

    `times` are the person's touches, sorted; `width` is the 24 hours, widened by a margin.
    """
    if cap <= 0:
        return start, None
    reason = None
    for _ in range(MAX_ITERATIONS):
        lo = bisect_right(times, start - width)
        mid = bisect_right(times, start)
        hi = bisect_left(times, start + width)
        window = times[lo:mid]
        after = times[mid:hi]
        if len(window) + len(after) < cap or (len(window) < cap and not after):
            return start, reason
        if len(window) >= cap:
            start = window[len(window) - cap] + width
        else:
            start = after[-1] + width
        reason = "person frequency cap"
    raise NoSlotError("no slot within the person's frequency cap")


def best_sender(
    books: list[SenderBook], start: datetime, jitters: dict[int, timedelta], align: Align | None = None
) -> tuple[datetime, SenderBook, str | None]:
    """Rotation: the sender whose earliest free slot is soonest (then fewest that day, then id)."""
    best: tuple[datetime, int, int, SenderBook, str | None] | None = None
    ended: TimelineEndedError | None = None
    for book in books:
        try:
            slot, why = book.earliest(start, jitters.get(book.sender_id, timedelta(0)), align)
        except TimelineEndedError as err:
            ended = err
            continue
        key = (slot, book.count_day(slot), book.sender_id)
        if best is None or key < best[:3]:
            best = (*key, book, why)
    if best is None:
        raise ended or NoSlotError("no sender account to choose from")
    return best[0], best[3], best[4]


def choose_slot(
    books: list[SenderBook],
    person_times: list[datetime] | None,
    start: datetime,
    person_cap: int,
    jitters: dict[int, timedelta],
    align: Align | None = None,
    person_width: timedelta = DAY,
) -> tuple[datetime, SenderBook, str | None]:
    """The slot for one send: the soonest sender slot that the person's cap allows too.

    `person_times` is None when the person's cap does not hold this send (follows and
    unfollows, or a response to the person's own event). With `align`, the slot is inside
    the send window and timeline as well.
    """
    reason: str | None = None
    for _ in range(MAX_ITERATIONS):
        if person_times is not None:
            start, why_person = person_earliest(person_times, start, person_cap, person_width)
            reason = why_person or reason
        slot, book, why = best_sender(books, start, jitters, align)
        if person_times is None or slot == start:
            return slot, book, (why or reason) if slot > start else reason
        again, _ = person_earliest(person_times, slot, person_cap, person_width)
        if again == slot:
            return slot, book, why or reason
        start, reason = again, "person frequency cap"
    raise NoSlotError("no slot that both the sender's and the person's caps allow")

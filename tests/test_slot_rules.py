"""The governor's in-memory rules, checked by brute force over many random reservations."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

import pytest

from activities.slot_rules import (
    HOUR,
    Align,
    NoSlotError,
    SenderBook,
    TimelineEndedError,
    choose_slot,
    hour_ok,
    local_day,
    person_earliest,
)
from models.schedule import earliest_action_time
from models.sequence import SendWindow, Timeline

T0 = datetime(2026, 3, 6, 20, 0, tzinfo=UTC)  # a Friday evening, before a DST change in New York


def _max_in_any_hour(times: list[datetime]) -> int:
    ordered = sorted(times)
    return max((sum(1 for u in ordered if t <= u < t + HOUR) for t in ordered), default=0)


def _max_in_any_day(times: list[datetime], cap_window: timedelta = timedelta(hours=24)) -> int:
    ordered = sorted(times)
    return max((sum(1 for u in ordered if t <= u < t + cap_window) for t in ordered), default=0)


@pytest.mark.parametrize("seed", range(6))
def test_random_reservations_never_break_a_cap(seed: int) -> None:
    rng = random.Random(seed)
    tz = ZoneInfo(rng.choice(["UTC", "America/New_York", "Asia/Kolkata"]))
    books = [
        SenderBook(
            sender_id=i,
            per_hour=rng.randint(2, 8),
            per_day=rng.randint(10, 30),
            min_spacing=timedelta(seconds=rng.choice([0, 60, 300])),
            tz=tz,
        )
        for i in range(1, rng.randint(1, 3) + 1)
    ]
    person_touches: dict[int, list[datetime]] = {p: [] for p in range(15)}
    jitter_max = rng.choice([0, 30, 120])
    granted: list[tuple[int, int, datetime, float]] = []
    for _ in range(150):
        person = rng.randrange(15)
        start = T0 + timedelta(minutes=rng.randint(0, 60 * 24 * 3))
        jitter = rng.uniform(0, jitter_max)
        jitters = {b.sender_id: timedelta(seconds=jitter) for b in books}
        slot, book, _ = choose_slot(books, person_touches[person], start, 2, jitters)
        assert slot >= start
        book.add(slot)
        person_touches[person].append(slot)
        person_touches[person].sort()
        granted.append((book.sender_id, person, slot, jitter))

    for book in books:
        times = sorted(t for s, _, t, _ in granted if s == book.sender_id)
        assert _max_in_any_hour(times) <= book.per_hour
        per_day = Counter(local_day(t, book.tz)[0] for t in times)
        assert max(per_day.values(), default=0) <= book.per_day
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(g >= book.min_spacing for g in gaps), (book.min_spacing, min(gaps))
    for person, touches in person_touches.items():
        assert _max_in_any_day(touches) <= 2, person


def test_daily_cap_resets_at_the_senders_local_midnight() -> None:
    tz = ZoneInfo("America/New_York")
    book = SenderBook(1, per_hour=100, per_day=3, min_spacing=timedelta(0), tz=tz)
    start = datetime(2026, 3, 6, 22, 0, tzinfo=tz).astimezone(UTC)  # 22:00 local
    slots = []
    for _ in range(5):
        slot, _, why = choose_slot([book], None, start, 0, {})
        book.add(slot)
        slots.append((slot, why))
    assert [s for s, _ in slots[:3]] == [start] * 3
    midnight = datetime(2026, 3, 7, 0, 0, tzinfo=tz).astimezone(UTC)
    assert slots[3] == (midnight, "daily cap")
    assert slots[4][0] == midnight


def test_hourly_cap_is_rolling_not_clock_aligned() -> None:
    book = SenderBook(1, per_hour=2, per_day=100, min_spacing=timedelta(0), tz=ZoneInfo("UTC"))
    a = T0 + timedelta(minutes=50)
    book.add(a)
    book.add(a + timedelta(minutes=5))
    slot, why = book.earliest(T0 + timedelta(minutes=70))  # 20:70 is a new clock hour, same rolling hour
    assert slot == a + HOUR and why == "hourly cap"


def test_spacing_finds_the_first_wide_enough_gap() -> None:
    book = SenderBook(1, per_hour=100, per_day=100, min_spacing=timedelta(seconds=60), tz=ZoneInfo("UTC"))
    for minutes in (0, 1, 2, 5):
        book.add(T0 + timedelta(minutes=minutes))
    slot, why = book.earliest(T0)
    assert slot == T0 + timedelta(minutes=3) and why == "spacing"
    slot, _ = book.earliest(T0, jitter=timedelta(seconds=90))  # needs 150 s either side
    assert slot == T0 + timedelta(minutes=7, seconds=30)


def test_warm_up_caps_the_early_days() -> None:
    book = SenderBook(
        1,
        per_hour=100,
        per_day=100,
        min_spacing=timedelta(0),
        tz=ZoneInfo("UTC"),
        day_cap=lambda day: 1 if day.date() == T0.date() else 100,
    )
    first, _ = book.earliest(T0)
    book.add(first)
    second, why = book.earliest(T0)
    assert first == T0 and why == "warm-up"
    assert second == datetime.combine(T0.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def test_rotation_takes_the_earliest_free_sender_then_the_least_used() -> None:
    tz = ZoneInfo("UTC")
    busy = SenderBook(1, per_hour=1, per_day=10, min_spacing=timedelta(0), tz=tz, times=[T0])
    idle = SenderBook(2, per_hour=1, per_day=10, min_spacing=timedelta(0), tz=tz)
    slot, book, _ = choose_slot([busy, idle], None, T0, 0, {})
    assert (slot, book.sender_id) == (T0, 2)
    idle.add(slot)
    slot, book, why = choose_slot([busy, idle], None, T0, 0, {})
    assert slot == T0 + HOUR and book.sender_id == 1 and why == "hourly cap"


def test_person_cap_pushes_past_the_last_touch() -> None:
    touches = [T0, T0 + timedelta(hours=5)]
    assert person_earliest(touches, T0 + timedelta(hours=6), 2) == (T0 + timedelta(hours=24), "person frequency cap")
    assert person_earliest(touches, T0 + timedelta(hours=6), 3) == (T0 + timedelta(hours=6), None)
    assert person_earliest(touches, T0, 0) == (T0, None)
    # a touch already booked later counts for the windows that contain it too
    assert person_earliest([T0 + timedelta(hours=10)], T0, 1) == (T0 + timedelta(hours=34), "person frequency cap")


def test_hour_ok_sees_windows_ahead_of_the_slot() -> None:
    times = [T0 + timedelta(minutes=10), T0 + timedelta(minutes=20)]
    assert hour_ok(times, T0, 3)
    assert not hour_ok(times, T0, 2)
    assert hour_ok(times, T0 - HOUR, 2)


def test_a_sender_that_can_never_send_is_an_error() -> None:
    book = SenderBook(1, per_hour=1, per_day=0, min_spacing=timedelta(0), tz=ZoneInfo("UTC"))
    with pytest.raises(NoSlotError):
        book.earliest(T0)


# --------------------------------------------------------------------------- windows and margin


def _aligner(window: SendWindow, tz: ZoneInfo, timeline: Timeline | None = None) -> Align:
    return partial(earliest_action_time, window=window, timeline=timeline, tz=tz)


def test_a_full_day_moves_to_the_next_window_opening_not_to_midnight() -> None:
    """Issue 11: the slot after a full day was the sender's midnight, outside the window."""
    ny = ZoneInfo("America/New_York")
    window = SendWindow(days=["mon", "tue", "wed", "thu", "fri"], start="09:00", end="17:30")
    book = SenderBook(1, per_hour=100, per_day=3, min_spacing=timedelta(0), tz=ZoneInfo("UTC"))
    friday_nine = datetime(2026, 3, 6, 9, 0, tzinfo=ny).astimezone(UTC)
    slots = []
    for _ in range(7):
        slot, _, why = choose_slot([book], None, friday_nine, 0, {}, _aligner(window, ny))
        book.add(slot)
        slots.append((slot.astimezone(ny), why))
    assert [s for s, _ in slots[:3]] == [friday_nine.astimezone(ny)] * 3
    monday_nine = datetime(2026, 3, 9, 9, 0, tzinfo=ny)  # after the weekend and the DST change
    assert slots[3] == (monday_nine, "daily cap")
    assert [s for s, _ in slots[3:6]] == [monday_nine] * 3
    assert slots[6][0] == datetime(2026, 3, 10, 9, 0, tzinfo=ny)


def test_the_window_holds_with_the_person_cap_and_every_rule() -> None:
    rng = random.Random(3)
    tz = ZoneInfo("Asia/Kolkata")
    window = SendWindow(days=["mon", "wed", "fri"], start="10:00", end="12:00")
    align = _aligner(window, tz)
    book = SenderBook(1, per_hour=3, per_day=5, min_spacing=timedelta(minutes=7), tz=ZoneInfo("UTC"))
    touches: dict[int, list[datetime]] = {p: [] for p in range(6)}
    for _ in range(60):
        person = rng.randrange(6)
        start = T0 + timedelta(minutes=rng.randint(0, 60 * 24 * 5))
        slot, _, _ = choose_slot([book], touches[person], start, 1, {}, align)
        assert slot >= start and align(slot) == slot, slot.astimezone(tz)
        book.add(slot)
        touches[person] = sorted([*touches[person], slot])
    assert _max_in_any_hour(book.times) <= 3
    assert max(Counter(local_day(t, book.tz)[0] for t in book.times).values()) <= 5
    assert all(_max_in_any_day(t) <= 1 for t in touches.values())


def test_a_timeline_that_ends_first_is_reported() -> None:
    window = SendWindow(days=["mon"], start="09:00", end="10:00")
    timeline = Timeline(end=datetime(2026, 3, 10, 0, 0, tzinfo=UTC))
    book = SenderBook(1, per_hour=100, per_day=1, min_spacing=timedelta(0), tz=ZoneInfo("UTC"))
    monday = datetime(2026, 3, 9, 9, 0, tzinfo=UTC)
    align = _aligner(window, ZoneInfo("UTC"), timeline)
    slot, _, _ = choose_slot([book], None, monday, 0, {}, align)
    book.add(slot)
    with pytest.raises(TimelineEndedError):
        choose_slot([book], None, monday, 0, {}, align)


def test_margin_widens_the_hour_and_keeps_off_the_end_of_the_day() -> None:
    """A send may go out up to `margin` after its slot: the caps must hold at that time too."""
    margin = timedelta(minutes=2)
    book = SenderBook(1, per_hour=2, per_day=10, min_spacing=timedelta(0), tz=ZoneInfo("UTC"), margin=margin)
    book.add(T0)
    book.add(T0 + timedelta(minutes=10))
    slot, why = book.earliest(T0 + HOUR)
    assert slot == T0 + HOUR + margin and why == "hourly cap"
    late_first = T0 + margin  # the first send ran as late as allowed: still two in any hour
    assert _max_in_any_hour([late_first, T0 + timedelta(minutes=10), slot]) == 2
    day_end = datetime.combine(T0.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    slot, why = book.earliest(day_end - timedelta(minutes=1))
    assert slot == day_end and why == "end of day"
    assert person_earliest([T0], T0 + timedelta(hours=24), 1, timedelta(hours=24) + margin)[0] == (
        T0 + timedelta(hours=24) + margin
    )

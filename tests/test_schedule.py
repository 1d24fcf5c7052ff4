"""Pure time arithmetic of models/schedule.py: windows, timelines and the moment-of-send gate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from models.schedule import allowed_at, earliest_action_time, next_window_open, send_gate
from models.sequence import SendWindow, Timeline

NY = ZoneInfo("America/New_York")
WEEKDAYS = SendWindow(days=["mon", "tue", "wed", "thu", "fri"], start="09:00", end="17:30")
GRACE = timedelta(minutes=2)


def ny(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=NY)


def test_window_opening_is_in_the_persons_zone_across_the_weekend_and_dst() -> None:
    friday_evening = ny(2026, 3, 6, 18, 0)  # DST starts Sunday 8 March in New York
    opens = next_window_open(friday_evening.astimezone(UTC), WEEKDAYS, NY)
    assert opens == ny(2026, 3, 9, 9, 0)
    assert opens.astimezone(UTC).hour == 13  # 09:00 EDT, not 14:00 UTC as in EST
    assert next_window_open(ny(2026, 3, 9, 17, 29), WEEKDAYS, NY) == ny(2026, 3, 9, 17, 29)
    assert next_window_open(ny(2026, 3, 9, 17, 30), WEEKDAYS, NY) == ny(2026, 3, 10, 9, 0)  # end is exclusive


def test_allowed_at_window_and_timeline() -> None:
    timeline = Timeline(start=datetime(2026, 3, 10, 0, 0), end=datetime(2026, 3, 12, 12, 0))  # naive: person's zone
    assert allowed_at(ny(2026, 3, 9, 10, 0), WEEKDAYS, None, NY)
    assert not allowed_at(ny(2026, 3, 9, 10, 0), WEEKDAYS, timeline, NY)  # before the campaign starts
    assert allowed_at(ny(2026, 3, 11, 10, 0), WEEKDAYS, timeline, NY)
    assert not allowed_at(ny(2026, 3, 12, 12, 0), WEEKDAYS, timeline, NY)  # the campaign has ended
    assert earliest_action_time(ny(2026, 3, 12, 12, 0), WEEKDAYS, timeline, NY) is None
    assert not allowed_at(ny(2026, 3, 14, 10, 0), WEEKDAYS, None, NY)  # Saturday
    assert allowed_at(ny(2026, 3, 14, 3, 0), None, None, NY)  # no window: any time


@pytest.mark.parametrize(
    ("now", "slot", "expected"),
    [
        (ny(2026, 3, 9, 10, 0), ny(2026, 3, 9, 10, 0), None),  # on time
        (ny(2026, 3, 9, 10, 2), ny(2026, 3, 9, 10, 0), None),  # within the grace
        (ny(2026, 3, 9, 10, 2, 1), ny(2026, 3, 9, 10, 0), "121 s past its slot"),  # a retry backlog
        (ny(2026, 3, 9, 23, 0), ny(2026, 3, 9, 16, 0), "outside the send window"),  # resumed at 23:00
        (ny(2026, 3, 9, 17, 31), ny(2026, 3, 9, 17, 30), "outside the send window"),  # within grace, past the end
        (ny(2026, 3, 14, 10, 0), ny(2026, 3, 14, 10, 0), "outside the send window"),  # Saturday
    ],
)
def test_send_gate(now: datetime, slot: datetime, expected: str | None) -> None:
    why = send_gate(now, slot, WEEKDAYS, None, NY, GRACE)
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why


def test_send_gate_after_the_timeline_and_without_a_window() -> None:
    timeline = Timeline(end=datetime(2026, 3, 9, 12, 0, tzinfo=UTC))
    assert send_gate(ny(2026, 3, 9, 8, 0), ny(2026, 3, 9, 8, 0), None, timeline, NY, GRACE) == (
        "the campaign timeline has ended"
    )
    assert send_gate(ny(2026, 3, 7, 3, 0), ny(2026, 3, 7, 3, 0), None, None, NY, GRACE) is None
    late = send_gate(ny(2026, 3, 7, 5, 0), ny(2026, 3, 7, 3, 0), None, None, NY, GRACE)
    assert late is not None and "7200 s past its slot" in late

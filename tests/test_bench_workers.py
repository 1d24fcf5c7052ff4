"""The workers benchmark's own cap check: it must see a window over the cap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bench.workers import _busiest

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def test_busiest_window_counts_the_most_slots_in_any_rolling_hour() -> None:
    slots = [T0 + timedelta(minutes=m) for m in (0, 10, 50, 59, 61, 130)]
    assert _busiest(slots, timedelta(hours=1)) == 4  # minutes 0-59, or 10-61
    assert _busiest(slots, timedelta(minutes=5)) == 2  # 00:59 and 01:01
    assert _busiest([], timedelta(hours=1)) == 0

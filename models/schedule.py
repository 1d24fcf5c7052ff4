"""Deterministic time arithmetic: send windows, campaign timelines, A/B variant choice.

Pure functions of their arguments, so workflows can call them and replay gets the same
answers: the current time always comes in as an argument (`workflow.now()`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from models.sequence import SendWindow, Timeline, Variant


def as_aware(value: datetime, tz: ZoneInfo) -> datetime:
    """Interpret a naive datetime in `tz`; leave aware ones alone."""
    return value if value.tzinfo else value.replace(tzinfo=tz)


def next_window_open(moment: datetime, window: SendWindow | None, tz: ZoneInfo) -> datetime:
    """The earliest instant at or after `moment` that lies inside the send window.

    The window is read in the person's zone `tz`, so "09:00" means nine in the
    morning where the person is, across DST changes and weekends.
    """
    if window is None:
        return moment
    days = window.weekday_numbers()
    start, end = window.start_time(), window.end_time()
    local = moment.astimezone(tz)
    for offset in range(0, 8):
        day = (local + timedelta(days=offset)).date()
        if day.weekday() not in days:
            continue
        open_at = datetime.combine(day, start, tzinfo=tz)
        close_at = datetime.combine(day, end, tzinfo=tz)
        if offset == 0:
            if local < open_at:
                return open_at.astimezone(moment.tzinfo)
            if local < close_at:
                return moment
            continue
        return open_at.astimezone(moment.tzinfo)
    return moment  # unreachable for a validated window (at least one day)


def earliest_action_time(
    moment: datetime,
    window: SendWindow | None,
    timeline: Timeline | None,
    tz: ZoneInfo,
) -> datetime | None:
    """When an action wanted at `moment` may run; None once the timeline has ended."""
    candidate = moment
    if timeline and timeline.start:
        candidate = max(candidate, as_aware(timeline.start, tz))
    candidate = next_window_open(candidate, window, tz)
    if timeline and timeline.end and candidate >= as_aware(timeline.end, tz):
        return None
    return candidate


def allowed_at(
    moment: datetime,
    window: SendWindow | None,
    timeline: Timeline | None,
    tz: ZoneInfo,
) -> bool:
    """True when an action may run at `moment`: inside the window and the campaign timeline."""
    return earliest_action_time(moment, window, timeline, tz) == moment


def send_gate(
    now: datetime,
    slot_at: datetime,
    window: SendWindow | None,
    timeline: Timeline | None,
    tz: ZoneInfo,
    grace: timedelta,
) -> str | None:
    """Why a send booked for `slot_at` must not go out at `now` (it asks for a new slot), or None.

    Checked right before the provider call. A send that runs late (held by a pause, a
    retry backlog, an outage) would go out off-window, or bunched with the sends that keep
    their own slots, over the sender's hourly cap: past `grace` after its slot, it goes
    back to the governor instead, which books a time that holds every cap and window.
    """
    if timeline and timeline.end and now >= as_aware(timeline.end, tz):
        return "the campaign timeline has ended"
    if not allowed_at(now, window, timeline, tz):
        return f"{now.astimezone(tz):%a %H:%M} ({tz.key}) is outside the send window"
    late = now - slot_at
    if late > grace:
        return f"{int(late.total_seconds())} s past its slot (more than {int(grace.total_seconds())} s)"
    return None


def choose_variant(variants: Seq[Variant], *, key: str) -> Variant | None:
    """Pick a variant by weight, the same one every time for the same key (person)."""
    if not variants:
        return None
    digest = hashlib.sha256(key.encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(v.weight for v in variants)
    acc = 0.0
    for variant in variants:
        acc += variant.weight
        if point < acc:
            return variant
    return variants[-1]

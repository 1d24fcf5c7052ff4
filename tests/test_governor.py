"""The send governor against real PostgreSQL, with several workers at once.

Each "worker" is its own SendGovernor with its own engine and connection pool, so the
governor's in-process lock does not serialise them: whatever holds the caps across
workers must come from PostgreSQL. Every test passes fixed `now` values (no wall clock)
and checks the granted slot times themselves: rolling 60-minute windows, the sender's
local days (including a DST change), spacing, jitter bounds, idempotency per delivery
key, rotation across accounts, the warm-up ramp and the per-person touch cap.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from activities.governor import Reservation, SendGovernor
from db.session import SessionFactory, make_engine, make_session_factory
from db.tables import SenderAccount, SendSlot
from devstack.factories import make_sender_row
from tests.engine_harness import make_person

T0 = datetime(2024, 3, 4, 12, 0, tzinfo=UTC)  # a Monday
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # the governors' own clock: the callers' times rule here
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WORKERS = 4


@pytest.fixture
async def workers(database_url: str) -> AsyncIterator[list[SendGovernor]]:
    """Four governors, each with its own engine (its own connections), seeded RNGs."""
    engines = [make_engine(database_url, pool_size=2) for _ in range(WORKERS)]
    try:
        yield [
            SendGovernor(make_session_factory(e), rng=random.Random(i), clock=lambda: EPOCH)
            for i, e in enumerate(engines)
        ]
    finally:
        for e in engines:
            await e.dispose()


async def add_account(
    sf: SessionFactory,
    address: str,
    *,
    channel: str = "email",
    per_hour: int = 1000,
    per_day: int = 10000,
    spacing: float = 0.0,
    jitter: float = 0.0,
    timezone: str = "UTC",
    warmup_start: int | None = None,
    warmup_days: int = 0,
    created_at: datetime = T0 - timedelta(days=365),
    active: bool = True,
) -> SenderAccount:
    """Insert a sender account with every governor setting explicit."""
    return await make_sender_row(
        sf,
        channel,
        address,
        per_hour=per_hour,
        per_day=per_day,
        spacing=spacing,
        jitter=jitter,
        timezone=timezone,
        warmup_start_per_day=warmup_start,
        warmup_days=warmup_days,
        created_at=created_at,
        active=active,
    )


async def slots(sf: SessionFactory, sender_id: int | None = None) -> list[SendSlot]:
    """Granted slots (of one sender), in time order."""
    async with sf() as s:
        q = select(SendSlot).order_by(SendSlot.slot_at, SendSlot.id)
        if sender_id is not None:
            q = q.where(SendSlot.sender_id == sender_id)
        return list((await s.execute(q)).scalars())


def max_in_window(times: list[datetime], width: timedelta) -> int:
    """The most slots in any half-open window [w, w + width) (the worst one starts at a slot)."""
    ordered = sorted(times)
    return max((sum(1 for t in ordered if w <= t < w + width) for w in ordered), default=0)


def per_local_day(times: list[datetime], tz: str) -> Counter[object]:
    zone = ZoneInfo(tz)
    return Counter(t.astimezone(zone).date() for t in times)


def gaps(times: list[datetime]) -> list[float]:
    ordered = sorted(times)
    return [(b - a).total_seconds() for a, b in zip(ordered, ordered[1:], strict=False)]


async def reserve_concurrently(
    workers: list[SendGovernor],
    jobs: list[dict[str, object]],
) -> dict[str, Reservation]:
    """Run `jobs` (reserve kwargs) split over the workers, all workers at once."""
    results: dict[str, Reservation] = {}

    async def worker(gov: SendGovernor, mine: list[dict[str, object]]) -> None:
        for job in mine:
            results[str(job["delivery_key"])] = await gov.reserve(**job)  # type: ignore[arg-type]

    await asyncio.gather(*(worker(g, jobs[i :: len(workers)]) for i, g in enumerate(workers)))
    return results


# --------------------------------------------------------------------------- caps


async def test_four_workers_never_exceed_hourly_daily_caps_or_spacing(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    """200 slots, 4 workers at once, two capped senders in non-UTC zones."""
    ny = await add_account(
        session_factory, "ny@acme.test", per_hour=12, per_day=40, spacing=60, jitter=30, timezone="America/New_York"
    )
    tokyo = await add_account(
        session_factory, "tokyo@acme.test", per_hour=8, per_day=30, spacing=120, jitter=60, timezone="Asia/Tokyo"
    )
    rng = random.Random(42)
    jobs: list[dict[str, object]] = []
    for i in range(200):
        # Some deliveries may only go later (a step's own delay): slots are not always
        # asked for in time order, so windows ahead of a slot matter too.
        later = timedelta(minutes=rng.choice([0, 0, 0, 7, 25, 90, 600, 1500]))
        jobs.append(
            {
                "delivery_key": f"k{i}",
                "channel": "email",
                "person_id": None,
                "now": T0,
                "not_before": T0 + later,
            }
        )
    granted = await reserve_concurrently(workers, jobs)

    assert len(granted) == 200
    rows = await slots(session_factory)
    assert len(rows) == 200 and len({r.delivery_key for r in rows}) == 200
    by_key = {r.delivery_key: r for r in rows}
    for job in jobs:
        key = str(job["delivery_key"])
        res = granted[key]
        assert (res.sender_id, res.slot_at) == (by_key[key].sender_id, by_key[key].slot_at)
        assert res.slot_at >= job["not_before"]  # type: ignore[operator]
    for acct in (ny, tokyo):
        times = [r.slot_at for r in rows if r.sender_id == acct.id]
        assert max_in_window(times, HOUR) <= acct.per_hour, acct.address
        days = per_local_day(times, acct.timezone)
        assert max(days.values()) <= acct.per_day, (acct.address, days)
        assert min(gaps(times)) >= acct.min_spacing_seconds, acct.address
        # the caps really were reached (the test exercised them, it did not pass vacuously)
        assert max_in_window(times, HOUR) == acct.per_hour
        assert max(days.values()) == acct.per_day
    assert {r.sender_id for r in rows} == {ny.id, tokyo.id}


async def test_jitter_stays_within_its_bounds_and_varies(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    acct = await add_account(session_factory, "jitter@acme.test", spacing=60, jitter=30)
    jobs: list[dict[str, object]] = [
        {"delivery_key": f"j{i}", "channel": "email", "person_id": None, "now": T0, "not_before": T0}
        for i in range(200)
    ]
    await reserve_concurrently(workers, jobs)
    times = [r.slot_at for r in await slots(session_factory, acct.id)]
    assert len(times) == 200 and min(times) == T0
    extra = [g - 60 for g in gaps(times)]
    assert all(0 <= x <= 30 for x in extra), (min(extra), max(extra))
    # jitter is random, not a constant offset: spread over its range
    assert len({round(x) for x in extra}) > 20
    assert 10 < statistics.mean(extra) < 20


async def test_hourly_window_ahead_of_the_slot_counts_too(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    """Slots granted out of time order: a window starting at the new slot must be checked."""
    acct = await add_account(session_factory, "ahead@acme.test", per_hour=2)
    gov = workers[0]
    base: dict[str, object] = {"channel": "email", "person_id": None, "now": T0}
    await gov.reserve(delivery_key="a", not_before=T0 + timedelta(minutes=10), **base)  # type: ignore[arg-type]
    await gov.reserve(delivery_key="b", not_before=T0 + timedelta(minutes=20), **base)  # type: ignore[arg-type]
    res = await gov.reserve(delivery_key="c", not_before=T0, **base)  # type: ignore[arg-type]
    times = [r.slot_at for r in await slots(session_factory, acct.id)]
    assert max_in_window(times, HOUR) <= 2
    assert res.slot_at == T0 + timedelta(minutes=70)  # the earliest time no hour holds three
    assert res.reason == "hourly cap"


# --------------------------------------------------------------------------- local days


async def test_day_resets_at_the_senders_local_midnight_across_dst(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    """New York: 5 a day. The day boundary is local midnight (05:00Z in EST, 04:00Z in EDT)."""
    await add_account(session_factory, "dst@acme.test", per_day=5, timezone="America/New_York")
    now = datetime(2024, 3, 10, 1, 0, tzinfo=UTC)  # Sat 9 March, 20:00 EST; DST starts Sunday 10 March
    jobs: list[dict[str, object]] = [
        {"delivery_key": f"d{i}", "channel": "email", "person_id": None, "now": now, "not_before": now}
        for i in range(15)
    ]
    granted = await reserve_concurrently(workers, jobs)
    times = sorted(r.slot_at for r in granted.values())
    sunday_midnight = datetime(2024, 3, 10, 5, 0, tzinfo=UTC)  # 00:00 EST
    monday_midnight = datetime(2024, 3, 11, 4, 0, tzinfo=UTC)  # 00:00 EDT (a 23-hour day)
    assert times == [now] * 5 + [sunday_midnight] * 5 + [monday_midnight] * 5
    days = per_local_day(times, "America/New_York")
    assert sorted(days.values()) == [5, 5, 5]
    # not UTC days: 01:00Z and 05:00Z are the same UTC day and hold ten slots
    assert Counter(t.date() for t in times)[now.date()] == 10
    reasons = {r.reason for r in granted.values() if r.slot_at > now}
    assert reasons == {"daily cap"}


async def test_warmup_ramp_caps_the_first_days(workers: list[SendGovernor], session_factory: SessionFactory) -> None:
    """Warm-up from 2 a day to 10 over 3 days, counted in the sender's (Tokyo) days."""
    created = datetime(2024, 3, 4, 10, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    acct = await add_account(
        session_factory,
        "warm@acme.test",
        per_day=10,
        warmup_start=2,
        warmup_days=3,
        timezone="Asia/Tokyo",
        created_at=created,
    )
    now = created.astimezone(UTC)
    jobs: list[dict[str, object]] = [
        {"delivery_key": f"w{i}", "channel": "email", "person_id": None, "now": now, "not_before": now}
        for i in range(2 + 4 + 7 + 10 + 3)
    ]
    granted = await reserve_concurrently(workers, jobs)
    days = per_local_day([r.slot_at for r in await slots(session_factory, acct.id)], "Asia/Tokyo")
    first = created.date()
    assert [days[first + timedelta(days=d)] for d in range(5)] == [2, 4, 7, 10, 3]
    reasons = Counter(r.reason for r in granted.values())
    assert reasons["warm-up"] > 0 and reasons[None] == 2


# --------------------------------------------------------------------------- idempotency


async def test_same_delivery_key_returns_the_same_slot(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    await add_account(session_factory, "idem@acme.test", spacing=600)
    base: dict[str, object] = {"channel": "email", "person_id": None, "not_before": T0}
    await workers[0].reserve(delivery_key="other", now=T0, **base)  # type: ignore[arg-type]
    first = await workers[1].reserve(delivery_key="same", now=T0, **base)  # type: ignore[arg-type]
    # a retry (later clock, another worker) and a burst of concurrent retries
    again = await workers[2].reserve(delivery_key="same", now=T0 + DAY, **base)  # type: ignore[arg-type]
    burst = await asyncio.gather(
        *(g.reserve(delivery_key="same", now=T0 + HOUR, **base) for g in workers)  # type: ignore[arg-type]
    )
    fresh = await asyncio.gather(
        *(g.reserve(delivery_key="new", now=T0, **base) for g in workers)  # type: ignore[arg-type]
    )
    assert first.slot_at == T0 + timedelta(minutes=10)
    assert {(r.sender_id, r.slot_at) for r in [again, *burst]} == {(first.sender_id, first.slot_at)}
    assert len({(r.sender_id, r.slot_at) for r in fresh}) == 1  # four racing first calls, one slot
    rows = await slots(session_factory)
    assert sorted(r.delivery_key for r in rows) == ["new", "other", "same"]


# --------------------------------------------------------------------------- rotation


async def test_rotation_picks_the_earliest_free_sender(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    a = await add_account(session_factory, "a", channel="x", spacing=600)
    b = await add_account(session_factory, "b", channel="x", spacing=900)
    await add_account(session_factory, "off", channel="x", active=False)  # never chosen
    await add_account(session_factory, "mail@acme.test", channel="email")  # another channel
    gov = workers[0]
    got = []
    for i in range(6):
        r = await gov.reserve(delivery_key=f"r{i}", channel="x", person_id=None, now=T0, not_before=T0)
        got.append((r.sender_id, (r.slot_at - T0).total_seconds()))
    # next free: a every 600 s, b every 900 s; a tie goes to the sender with fewer sends today
    assert got == [(a.id, 0), (b.id, 0), (a.id, 600), (b.id, 900), (a.id, 1200), (b.id, 1800)]

    only_b = await gov.reserve(
        delivery_key="ob", channel="x", person_id=None, now=T0, not_before=T0, allowed_senders=["b"]
    )
    assert (only_b.sender_id, only_b.slot_at) == (b.id, T0 + timedelta(seconds=2700))
    sticky = await gov.reserve(
        delivery_key="st", channel="x", person_id=None, now=T0, not_before=T0, preferred_sender_id=a.id
    )
    assert (sticky.sender_id, sticky.slot_at) == (a.id, T0 + timedelta(seconds=1800))
    none = await gov.reserve(delivery_key="none", channel="xmtp", person_id=None, now=T0, not_before=T0)
    assert none.sender_id is None and none.reason == "no sender account"


async def test_rotation_moves_to_the_sender_with_room_when_one_is_full(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    small = await add_account(session_factory, "small@acme.test", per_day=3)
    big = await add_account(session_factory, "big@acme.test", per_day=20, spacing=60)
    jobs: list[dict[str, object]] = [
        {"delivery_key": f"f{i}", "channel": "email", "person_id": None, "now": T0, "not_before": T0} for i in range(23)
    ]
    granted = await reserve_concurrently(workers, jobs)
    used = Counter(r.sender_id for r in granted.values())
    assert used == {small.id: 3, big.id: 20}  # both full for the day, nobody pushed to tomorrow
    assert all(r.slot_at.date() == T0.date() for r in granted.values())


# --------------------------------------------------------------------------- person cap


async def test_person_touch_cap_across_sequences_and_channels(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    email = await add_account(session_factory, "cap@acme.test", channel="email")
    await add_account(session_factory, "700", channel="x")
    pid = await make_person(session_factory, email="p@lead.test")
    gov = workers[0]
    base: dict[str, object] = {"person_id": pid, "now": T0, "not_before": T0, "person_daily_cap": 1}
    mail = await gov.reserve(delivery_key="seqA:mail", channel="email", **base)  # type: ignore[arg-type]
    dm = await gov.reserve(delivery_key="seqB:dm", channel="x", **base)  # type: ignore[arg-type]
    follow = await gov.reserve(
        delivery_key="seqB:follow",
        channel="x",
        counts_as_touch=False,
        **base,  # type: ignore[arg-type]
    )
    assert mail.slot_at == T0 and mail.sender_id == email.id
    assert dm.slot_at == T0 + DAY and dm.reason == "person frequency cap"
    assert follow.slot_at == T0  # a follow is not a touch


async def test_person_cap_holds_when_the_sender_pushes_the_slot(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    """The person's cap must hold at the slot finally granted, not only where the search began."""
    await add_account(session_factory, "roomy@acme.test", channel="email")
    x = await add_account(session_factory, "701", channel="x", per_day=1)
    p = await make_person(session_factory, email="p@lead.test")
    q = await make_person(session_factory, email="q@lead.test")
    gov = workers[0]
    t = datetime(2024, 3, 4, 6, 0, tzinfo=UTC)
    # p has an email touch in 30 hours; q takes x's only slot of today
    await gov.reserve(delivery_key="p:mail", channel="email", person_id=p, now=t, not_before=t + timedelta(hours=30))
    await gov.reserve(delivery_key="q:dm", channel="x", person_id=q, now=t, not_before=t)
    # x is full until midnight (18 h from now): 18 h is 12 h before p's email touch
    dm = await gov.reserve(delivery_key="p:dm", channel="x", person_id=p, now=t, not_before=t)
    assert dm.sender_id == x.id
    touches = sorted(s.slot_at for s in await slots(session_factory) if s.person_id == p)
    assert all(g >= 24 * 3600 for g in gaps(touches)), touches
    assert dm.slot_at == t + timedelta(hours=54)


async def test_person_cap_with_four_workers(workers: list[SendGovernor], session_factory: SessionFactory) -> None:
    await add_account(session_factory, "e1@acme.test", spacing=30)
    await add_account(session_factory, "e2@acme.test", spacing=30)
    await add_account(session_factory, "702", channel="x", spacing=120)
    people = [await make_person(session_factory, email=f"p{i}@lead.test") for i in range(3)]
    rng = random.Random(7)
    jobs: list[dict[str, object]] = []
    for i in range(60):
        jobs.append(
            {
                "delivery_key": f"t{i}",
                "channel": rng.choice(["email", "x"]),
                "person_id": people[i % 3],
                "now": T0,
                "not_before": T0 + timedelta(hours=rng.choice([0, 0, 5, 30])),
                "counts_as_touch": i % 10 != 0,
                "person_daily_cap": 2,
            }
        )
    await reserve_concurrently(workers, jobs)
    rows = await slots(session_factory)
    assert len(rows) == 60
    touch_key = {str(j["delivery_key"]) for j in jobs if j["counts_as_touch"]}
    for pid in people:
        touches = sorted(r.slot_at for r in rows if r.person_id == pid and r.delivery_key in touch_key)
        # every rolling 24 hours (t - 24h, t] holds at most two touches
        worst = max(sum(1 for u in touches if t - DAY < u <= t) for t in touches)
        assert worst <= 2, (pid, touches)
        assert worst == 2  # the cap was reached, not avoided


# --------------------------------------------------------------------------- per-channel defaults


async def test_channel_defaults_are_lowest_for_x_and_linkedin_and_are_enforced(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    from services.senders import CHANNEL_DEFAULTS, add_sender

    email = await add_sender(session_factory, channel="email", address="Sales@Example.com")
    x = await add_sender(session_factory, channel="x", address="900", timezone="Europe/Berlin")
    li = await add_sender(session_factory, channel="linkedin", address="https://www.linkedin.com/in/seller")
    assert email.address == "sales@example.com"
    for low in (x, li):
        assert low.per_hour < email.per_hour and low.per_day < email.per_day
        assert low.min_spacing_seconds >= email.min_spacing_seconds
    # re-adding updates the caps in place (same account)
    again = await add_sender(session_factory, channel="x", address="900", per_hour=6, timezone="Europe/Berlin")
    assert again.id == x.id and again.per_hour == 6 and again.per_day == CHANNEL_DEFAULTS["x"].per_day
    for bad in ({"per_hour": 0}, {"per_hour": 500, "per_day": 100}, {"timezone": "Mars/Olympus"}):
        with pytest.raises(ValueError):
            await add_sender(session_factory, channel="x", address="901", **bad)

    jobs: list[dict[str, object]] = [
        {"delivery_key": f"x{i}", "channel": "x", "person_id": None, "now": T0, "not_before": T0} for i in range(60)
    ]
    await reserve_concurrently(workers, jobs)
    times = [r.slot_at for r in await slots(session_factory, x.id)]
    d = CHANNEL_DEFAULTS["x"]
    assert len(times) == 60
    assert max_in_window(times, HOUR) == 6  # the updated cap, reached and never exceeded
    assert max(per_local_day(times, "Europe/Berlin").values()) <= d.per_day
    assert min(gaps(times)) >= d.spacing


async def test_a_sender_that_can_never_send_is_a_classified_hourly_retry(session_factory: SessionFactory) -> None:
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.delivery import DeliveryActivities, DeliveryConfig
    from models.activities import EnrollmentRef, ReserveSlotInput
    from models.enrollment import SequenceRef

    await add_account(session_factory, "closed@acme.test", per_day=0)
    pid = await make_person(session_factory, email="lead@lead.test")
    activities = DeliveryActivities(
        session_factory,
        SendGovernor(session_factory, clock=lambda: EPOCH),
        {},
        DeliveryConfig(public_base_url="https://links.acme.test", link_secret="s", postal_address="1 Test St"),
    )
    inp = ReserveSlotInput(
        ref=EnrollmentRef(
            enrollment_id=1,
            person_id=pid,
            sequence=SequenceRef(sequence_id=1, sequence_name="s", version_id=1, version=1),
        ),
        step_id="m0",
        attempt=1,
        action="SEND_EMAIL",
        channel="email",
        now=T0,
        not_before=T0,
    )
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.reserve_send_slot, inp)
    assert caught.value.type == "NoSendSlot" and not caught.value.non_retryable
    assert caught.value.next_retry_delay == HOUR
    assert "no free slot within 366 days" in str(caught.value)
    async with session_factory() as s:
        assert (await s.execute(select(SendSlot))).scalars().all() == []


# --------------------------------------------------------------------------- windows, rounds, responses


async def test_slots_stay_inside_the_persons_window_and_rounds_release_their_slot(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    """Issue 11: a full day moved the slot to the sender's midnight, off-window, and a later
    round of the same delivery left it booked, eating the next day's cap and the person's."""
    from models.sequence import SendWindow

    ny = ZoneInfo("America/New_York")
    window = SendWindow(days=["mon", "tue", "wed", "thu", "fri"], start="09:00", end="17:30")
    acct = await add_account(session_factory, "win@acme.test", per_day=3, timezone="UTC")
    people = [await make_person(session_factory, email=f"w{i}@lead.test") for i in range(8)]
    friday_nine = datetime(2024, 3, 8, 9, 0, tzinfo=ny).astimezone(UTC)
    base: dict[str, object] = {
        "channel": "email",
        "now": friday_nine,
        "not_before": friday_nine,
        "send_window": window,
        "timezone": "America/New_York",
        "person_daily_cap": 1,
    }
    jobs = [{"delivery_key": f"e{i}:first:1:r0", "person_id": pid, **base} for i, pid in enumerate(people)]
    granted = await reserve_concurrently(workers, jobs)
    local = sorted(r.slot_at.astimezone(ny) for r in granted.values())
    assert [(t.strftime("%a %H:%M"), n) for t, n in sorted(Counter(local).items())] == [
        ("Fri 09:00", 3),
        ("Mon 09:00", 3),
        ("Tue 09:00", 2),
    ]
    assert {r.reason for r in granted.values() if r.slot_at > friday_nine} == {"daily cap"}

    # one Friday lead was paused past its slot: its next round, asked on Friday at 23:00,
    # releases the Friday slot (nothing went out at it) and gets Tuesday's last place
    first = next(k for k, r in granted.items() if r.slot_at == friday_nine)
    person = next(j["person_id"] for j in jobs if j["delivery_key"] == first)
    late = friday_nine + timedelta(hours=14)
    again = await workers[1].reserve(
        **{**base, "delivery_key": first.replace(":r0", ":r1"), "person_id": person, "now": late, "not_before": late},  # type: ignore[arg-type]
        releases=[first],
    )
    assert again.slot_at.astimezone(ny) == datetime(2024, 3, 12, 9, 0, tzinfo=ny)
    rows = await slots(session_factory, acct.id)
    released = [r for r in rows if r.released_at is not None]
    assert [r.delivery_key for r in released] == [first]
    # the released slot no longer counts: Friday has room again for another lead
    extra = await make_person(session_factory, email="extra@lead.test")
    fri = await workers[2].reserve(**{**base, "delivery_key": "x:first:1:r0", "person_id": extra})  # type: ignore[arg-type]
    assert fri.slot_at == friday_nine
    # nor does it hold the person's cap: a DM to them on Friday morning is not pushed past it
    await add_account(session_factory, "704", channel="x")
    ten = friday_nine + HOUR
    dm = await workers[3].reserve(
        **{**base, "channel": "x", "delivery_key": "p:dm:1:r0", "person_id": person, "not_before": ten}  # type: ignore[arg-type]
    )
    assert dm.slot_at == ten and dm.reason is None


async def test_a_response_is_not_held_by_the_person_cap_but_counts_as_a_touch(
    workers: list[SendGovernor], session_factory: SessionFactory
) -> None:
    await add_account(session_factory, "resp@acme.test", channel="email")
    await add_account(session_factory, "703", channel="x")
    pid = await make_person(session_factory, email="r@lead.test")
    gov = workers[0]
    base: dict[str, object] = {"person_id": pid, "now": T0, "person_daily_cap": 1}
    request = await gov.reserve(delivery_key="req", channel="x", not_before=T0, **base)  # type: ignore[arg-type]
    # the person accepted two hours later: the DM answers them and goes at once
    dm = await gov.reserve(
        delivery_key="dm",
        channel="x",
        not_before=T0 + 2 * HOUR,
        response=True,
        **base,  # type: ignore[arg-type]
    )
    cold = await gov.reserve(delivery_key="cold", channel="email", not_before=T0 + 3 * HOUR, **base)  # type: ignore[arg-type]
    assert request.slot_at == T0
    assert dm.slot_at == T0 + 2 * HOUR and dm.reason is None
    assert cold.slot_at == T0 + 2 * HOUR + DAY and cold.reason == "person frequency cap"  # after the DM


async def test_the_governor_never_books_before_its_own_clock(session_factory: SessionFactory) -> None:
    """A request whose time is stale (a retry backlog) gets a slot from the governor's now."""
    await add_account(session_factory, "clock@acme.test")
    gov = SendGovernor(session_factory, clock=lambda: T0 + DAY)
    res = await gov.reserve(delivery_key="k", channel="email", person_id=None, now=T0, not_before=T0)
    assert res.slot_at == T0 + DAY
    later = await gov.reserve(delivery_key="k2", channel="email", person_id=None, now=T0, not_before=T0 + 2 * DAY)
    assert later.slot_at == T0 + 2 * DAY

"""Campaigns over simulated weeks: send windows, sender caps and the person cap together.

Every test here runs the production worker on the time-skipping server with real
PostgreSQL and a real SMTP server, and judges what the SMTP server received: each message
is stamped with the Temporal server's (skipped) time the moment it arrives. A campaign is
a two-email sequence (the second one a day after the first unless the lead replies) for
8-12 leads in America/New_York, one email sender with per_day 3, per_hour 2 and 10 minutes
of spacing, and a timeline that ends 14 days after the campaign starts on a Monday.

Issue 11, item 1, measured on main before the fix: a full day moved the slot to the
sender's local midnight, outside the window; the workflow asked again with a new round
but the off-window slot stayed booked and ate the next day's cap (mail per day Mon 3,
Tue-Sun 0, next Mon 3), and with the person cap it counted as the person's touch too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from tests.engine_harness import Wired, make_person, make_sender, start_enrollment, store_version
from tests.mail_servers import SmtpRecorder

NY = ZoneInfo("America/New_York")
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]
EVERY_DAY = [*WEEKDAYS, "sat", "sun"]  # also datetime.weekday() order
OPEN, CLOSE = time(9, 0), time(17, 30)
PER_DAY, PER_HOUR, SPACING = 3, 2, 600.0
GRACE = 120.0  # the default SEND_LATE_GRACE_SECONDS
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


class _StampedMessages(list[tuple[str, list[str], bytes]]):
    """The SMTP recorder's message list, stamping each arrival with the Temporal server's time."""

    def __init__(self, stamp: Callable[[], datetime]) -> None:
        super().__init__()
        self.stamp = stamp
        self.times: list[datetime] = []

    def append(self, item: tuple[str, list[str], bytes]) -> None:
        self.times.append(self.stamp())
        super().append(item)


@dataclass
class Sent:
    """One message as the SMTP server saw it: to whom and when (server time)."""

    to: str
    at: datetime


@dataclass
class Campaign:
    env: WorkflowEnvironment
    sf: SessionFactory
    task_queue: str
    smtp: SmtpRecorder
    wired: Wired
    handles: list[WorkflowHandle[Any, Any]] = field(default_factory=list)
    emails: dict[int, str] = field(default_factory=dict)

    async def sender(self, timezone: str = "UTC", per_day: int = PER_DAY, per_hour: int = PER_HOUR) -> int:
        return await make_sender(
            self.sf, "email", "sales@acme.test", per_hour=per_hour, per_day=per_day, spacing=SPACING, timezone=timezone
        )

    async def monday(self, at: time = time(6, 0)) -> datetime:
        """Skip the server's clock to the next Monday at `at` in New York; return that instant."""
        now = (await self.env.get_current_time()).astimezone(NY)
        day = now.date() + timedelta(days=(7 - now.weekday()) % 7 or 7)
        target = datetime.combine(day, at, tzinfo=NY)
        await self.env.sleep(target - now)
        return target

    async def enroll(self, raw: dict[str, Any], leads: int) -> None:
        ref, defn = await store_version(self.sf, raw)
        for i in range(leads):
            email = f"lead{i}-{uuid.uuid4().hex[:6]}@lead.test"
            pid = await make_person(self.sf, email=email, timezone="America/New_York")
            self.emails[pid] = email
            handle = await start_enrollment(
                self.env.client, self.task_queue, self.sf, ref, defn, pid, timezone="America/New_York"
            )
            self.handles.append(handle)

    async def results(self) -> list[EnrollmentStatus]:
        # one at a time: each wait unlocks time skipping, and the test server counts the unlocks
        return [(await h.result()).status for h in self.handles]

    def sent(self) -> list[Sent]:
        messages = self.smtp.messages
        assert isinstance(messages, _StampedMessages)
        return [Sent(rcpts[0], at) for (_, rcpts, _), at in zip(messages, messages.times, strict=True)]


@pytest.fixture
async def campaign(
    temporal_env: WorkflowEnvironment,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: SmtpRecorder,
    wired: Wired,
    x_server: Any,
    relay_server: Any,
) -> AsyncIterator[Campaign]:
    loop = asyncio.get_running_loop()

    def stamp() -> datetime:  # called on the SMTP server's thread
        return asyncio.run_coroutine_threadsafe(temporal_env.get_current_time(), loop).result(timeout=30)

    smtp_server.messages = _StampedMessages(stamp)
    yield Campaign(temporal_env, session_factory, task_queue, smtp_server, wired)


def two_emails(days: list[str], start: datetime) -> dict[str, Any]:
    """Email, then a second email a day later unless the lead replies; 14 days of campaign."""
    return {
        "name": f"window-{uuid.uuid4().hex[:6]}",
        "send_window": {"days": days, "start": OPEN.strftime("%H:%M"), "end": CLOSE.strftime("%H:%M")},
        "timeline": {"start": start.isoformat(), "end": (start + 14 * DAY).isoformat()},
        "steps": [
            {
                "id": "first",
                "action": "SEND_EMAIL",
                "subject": "Hello {{ first_name }}",
                "body": "First note",
                "edges": [
                    {"trigger": "REPLIED", "to": "done"},
                    {"trigger": "NOT_REPLIED", "after": "1d", "to": "second"},
                ],
            },
            {
                "id": "second",
                "action": "SEND_EMAIL",
                "subject": "Following up",
                "body": "Second note",
                "edges": [{"trigger": "END"}],
            },
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }


def in_window(at: datetime, days: list[str]) -> bool:
    local = at.astimezone(NY)
    return EVERY_DAY[local.weekday()] in days and OPEN <= local.time() < CLOSE


def max_in_rolling(times: list[datetime], width: timedelta) -> int:
    ordered = sorted(times)
    return max((sum(1 for t in ordered if w <= t < w + width) for w in ordered), default=0)


def window_days(first: date, last: date, days: list[str]) -> list[date]:
    out, d = [], first
    while d <= last:
        if EVERY_DAY[d.weekday()] in days:
            out.append(d)
        d += timedelta(days=1)
    return out


def assert_campaign(sent: list[Sent], leads: int, days: list[str], sender_tz: str, touch_cap: int) -> None:
    """Every lead sent inside its window; caps held; every window day full while leads waited."""
    off = [s for s in sent if not in_window(s.at, days)]
    assert not off, f"{len(off)} sends outside the window: {[s.at.astimezone(NY).isoformat() for s in off]}"
    per_day = Counter(s.at.astimezone(NY).date() for s in sent)
    assert len(sent) == 2 * leads, f"{len(sent)} of {2 * leads} emails sent; per day {sorted(per_day.items())}"
    sender_days = Counter(s.at.astimezone(ZoneInfo(sender_tz)).date() for s in sent)
    assert max(sender_days.values()) <= PER_DAY, sender_days
    assert max_in_rolling([s.at for s in sent], HOUR) <= PER_HOUR
    ordered = sorted(s.at for s in sent)  # pacing: slots are spaced, a send may go out up to the grace late
    assert all((b - a).total_seconds() >= SPACING - GRACE for a, b in zip(ordered, ordered[1:], strict=False))
    first, last = min(per_day), max(per_day)
    counts = [per_day[d] for d in window_days(first, last, days)]
    assert counts[:-1] == [PER_DAY] * (len(counts) - 1), f"window days not full while leads waited: {counts}"
    assert 1 <= counts[-1] <= PER_DAY
    by_person: dict[str, list[datetime]] = {}
    for s in sent:
        by_person.setdefault(s.to, []).append(s.at)
    assert all(len(times) == 2 for times in by_person.values())
    if touch_cap:
        assert all(abs(times[1] - times[0]) >= DAY for times in by_person.values())


@pytest.mark.parametrize(
    ("touch_cap", "days", "sender_zone", "leads"),
    [
        pytest.param(1, WEEKDAYS, "UTC", 8, id="cap1-mon-fri-sender-utc-8-leads"),
        pytest.param(1, EVERY_DAY, "America/New_York", 10, id="cap1-every-day-sender-ny-10-leads"),
        pytest.param(0, WEEKDAYS, "America/New_York", 12, id="cap0-mon-fri-sender-ny-12-leads"),
        pytest.param(0, EVERY_DAY, "UTC", 9, id="cap0-every-day-sender-utc-9-leads"),
    ],
)
async def test_campaign_fills_every_window_day_and_never_sends_off_window(
    campaign: Campaign, touch_cap: int, days: list[str], sender_zone: str, leads: int
) -> None:
    await campaign.sender(timezone=sender_zone)
    start = await campaign.monday()
    async with campaign.wired(touch_cap=touch_cap):
        await campaign.enroll(two_emails(days, start), leads)
        statuses = await campaign.results()
    sent = campaign.sent()
    assert_campaign(sent, leads, days, sender_zone, touch_cap)
    assert statuses == [EnrollmentStatus.COMPLETED] * leads


# --------------------------------------------------------------------------- item 2: responses


async def test_a_response_to_the_persons_event_is_not_held_by_the_touch_cap(campaign: Campaign) -> None:
    """Touch cap 1 (the default): the DM after an accepted connection goes at once; a cold
    step after the same request still waits 24 hours after it."""
    from sqlalchemy import select

    from db.tables import Event
    from models.enrollment import InboundSignal
    from tests.engine_harness import all_senders
    from workflows.enrollment import EnrollmentWorkflow

    await all_senders(campaign.sf)
    raw = {
        "name": f"respond-{uuid.uuid4().hex[:6]}",
        "send_window": {"days": WEEKDAYS, "start": "09:00", "end": "17:30"},
        "steps": [
            {
                "id": "connect",
                "action": "SEND_CONNECTION_REQUEST",
                "text": "Let's connect",
                "edges": [
                    {"trigger": "CONNECTION_ACCEPTED", "to": "dm"},
                    {"trigger": "CONNECTION_NOT_ACCEPTED", "after": "2h", "to": "mail"},
                ],
            },
            {"id": "dm", "action": "SEND_LINKEDIN_DM", "text": "Thanks for connecting", "edges": [{"trigger": "END"}]},
            {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "Hello", "edges": [{"trigger": "END"}]},
        ],
    }
    start = await campaign.monday()
    async with campaign.wired(touch_cap=1):
        ref, defn = await store_version(campaign.sf, raw)
        leads = []
        for name in ("accepts", "silent"):
            pid = await make_person(
                campaign.sf,
                email=f"{name}-{uuid.uuid4().hex[:6]}@lead.test",
                linkedin=f"https://www.linkedin.com/in/{name}-{uuid.uuid4().hex[:6]}",
                timezone="America/New_York",
            )
            leads.append(pid)
            campaign.handles.append(
                await start_enrollment(
                    campaign.env.client, campaign.task_queue, campaign.sf, ref, defn, pid, timezone="America/New_York"
                )
            )
        await campaign.env.sleep(start.replace(hour=10) - start)  # the requests went at 09:00
        await campaign.handles[0].signal(
            EnrollmentWorkflow.connection_accepted, InboundSignal(event_id="acc-1", channel="linkedin")
        )
        statuses = await campaign.results()
    assert statuses == [EnrollmentStatus.COMPLETED] * 2
    async with campaign.sf() as s:
        rows = (await s.execute(select(Event).where(Event.type == "sent").order_by(Event.id))).scalars().all()
    sent = {(e.person_id, e.step_id): e.occurred_at.astimezone(NY) for e in rows}
    nine = start.replace(hour=9)
    minute = timedelta(minutes=1)
    assert all(nine <= sent[(pid, "connect")] < nine + minute for pid in leads)
    # the response: right after the acceptance, an hour after the request (not 24 h later)
    assert nine + HOUR <= sent[(leads[0], "dm")] < nine + HOUR + minute
    # the cold step: the person's cap holds it a day (and the send grace) after the request
    assert nine + DAY <= sent[(leads[1], "mail")] < nine + DAY + timedelta(seconds=GRACE) + minute
    deferred = {e.person_id: e.data["reason"] for e in await _events(campaign.sf, EventType.DEFERRED_UNTIL)}
    assert deferred == {leads[1]: "person frequency cap"}


async def _events(sf: SessionFactory, type_: EventType) -> list[Any]:
    from tests.engine_harness import events_of

    return await events_of(sf, type_)


# --------------------------------------------------------------------------- item 3: the moment of sending


def one_email(days: list[str], start: datetime) -> dict[str, Any]:
    raw = two_emails(days, start)
    raw["steps"] = [{**raw["steps"][0], "edges": [{"trigger": "END"}]}]
    return raw


def assert_paced(sent: list[Sent], days: list[str], per_hour: int) -> None:
    off = [s.at.astimezone(NY).isoformat() for s in sent if not in_window(s.at, days)]
    assert not off, f"sent outside the window: {off}"
    assert max_in_rolling([s.at for s in sent], HOUR) <= per_hour, sorted(
        s.at.astimezone(NY).strftime("%a %H:%M:%S") for s in sent
    )


async def test_resume_after_the_window_closed_waits_for_the_next_window_and_the_hourly_cap(
    campaign: Campaign,
) -> None:
    """Leads paused before their slots and resumed at 23:00 do not go out in a burst at 23:00."""
    from models.enrollment import ControlSignal
    from tests.engine_harness import events_of
    from workflows.enrollment import EnrollmentWorkflow

    await campaign.sender(timezone="America/New_York", per_day=10)
    start = await campaign.monday()
    async with campaign.wired(touch_cap=1):
        await campaign.enroll(one_email(EVERY_DAY, start), 8)
        await campaign.env.sleep(start.replace(hour=10, minute=30) - start)
        sent_before = len(campaign.smtp.messages)
        done = {m[1][0] for m in campaign.smtp.messages}
        waiting = [
            h for h, pid in zip(campaign.handles, campaign.emails, strict=True) if campaign.emails[pid] not in done
        ]
        assert len(waiting) == 4
        for h in waiting:
            await h.signal(EnrollmentWorkflow.pause, ControlSignal(reason="test"))
        await campaign.env.sleep(start.replace(hour=23) - start.replace(hour=10, minute=30))
        for h in waiting:
            await h.signal(EnrollmentWorkflow.resume, ControlSignal(reason="test"))
        statuses = await campaign.results()
    assert statuses == [EnrollmentStatus.COMPLETED] * 8
    sent = campaign.sent()
    assert len(sent) == 8 and sent_before == 4  # two hours of the window at 2 an hour, then the pause
    assert_paced(sent, EVERY_DAY, PER_HOUR)
    tuesday = [s.at.astimezone(NY) for s in sent[4:]]
    assert all(t.date() == (start + DAY).date() for t in tuesday), tuesday
    rescheduled = await events_of(campaign.sf, EventType.RESCHEDULED)
    assert len(rescheduled) == 4 and all("outside the send window" in e.data["reason"] for e in rescheduled)


async def test_a_backlog_after_an_smtp_outage_keeps_the_hourly_cap_and_the_window(campaign: Campaign) -> None:
    """The SMTP server answers 451 for a while: the retries that come due together do not
    go out together; past the grace they take new slots, inside the window and the caps."""
    from tests.engine_harness import events_of

    await campaign.sender(per_day=20)
    start = await campaign.monday()
    campaign.smtp.fail_codes = ["451 4.3.0 Try again later"] * 40
    async with campaign.wired(touch_cap=1):
        await campaign.enroll(one_email(EVERY_DAY, start), 6)
        statuses = await campaign.results()
    assert statuses == [EnrollmentStatus.COMPLETED] * 6
    assert campaign.smtp.fail_codes == []  # the outage really happened and ended
    sent = campaign.sent()
    assert len(sent) == 6 and len({s.to for s in sent}) == 6  # one message each, none twice
    assert_paced(sent, EVERY_DAY, PER_HOUR)
    rescheduled = await events_of(campaign.sf, EventType.RESCHEDULED)
    assert rescheduled and all("past its slot" in e.data["reason"] for e in rescheduled)


async def test_an_outage_that_does_not_end_fails_the_lead_instead_of_rescheduling_forever(
    campaign: Campaign,
) -> None:
    """Rescheduled rounds whose attempts keep failing end as failed after a bounded time."""
    from sqlalchemy import select

    from db.tables import Delivery
    from tests.engine_harness import events_of

    await campaign.sender()
    start = await campaign.monday()
    campaign.smtp.fail_codes = ["451 4.3.0 Try again later"] * 100_000
    async with campaign.wired(touch_cap=1):
        await campaign.enroll(one_email(EVERY_DAY, start), 1)
        statuses = await campaign.results()
    assert statuses == [EnrollmentStatus.FAILED]
    assert campaign.smtp.messages == []
    rounds = await events_of(campaign.sf, EventType.RESCHEDULED)
    assert len(rounds) >= 2 and all(e.data["failed_attempts"] > 0 for e in rounds)
    failed = (await events_of(campaign.sf, EventType.FAILED))[0]
    assert timedelta(hours=4) <= failed.occurred_at - start.replace(hour=9) < timedelta(hours=6)
    async with campaign.sf() as s:
        ledger = (await s.execute(select(Delivery))).scalars().all()
    assert [(d.status, "451" in (d.error or "")) for d in ledger] == [("failed", True)]

"""Mailbox watchers against a real IMAP server (pymap): mail appended to the sender's mailbox changes leads.

Served app + production worker + time-skipping Temporal server (the `hook` harness of
tests/test_webhooks.py), a pymap folder per test (tests/imap_harness.py) and the watcher
workflow on its own worker (tests/mailbox_harness.py). The enrollments' timers are never
waited for: the watcher tests look at queries and rows, and skip time only on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError

from db.tables import Delivery, Identity, InboundEvent, MailboxState, Suppression
from models.enrollment import ControlSignal, EnrollmentStatus
from models.mailbox import mailbox_workflow_id
from models.outcomes import EventType
from operations.mailbox_watchers import start_watcher, stop_watcher
from services.reply_mail import append_reply
from tests import mail_samples as m
from tests.engine_harness import Wired, events_of, wait_for_status
from tests.eventually import eventually
from tests.imap_harness import Mailbox, TcpProxy
from tests.mailbox_harness import FAST, KEY, SETTINGS, connect_mailbox, connection_status, wait_state
from tests.webhook_harness import Hook, StartHook, email_sequence, signals_in_history, temporal_address
from workflows.mailbox import MailboxWatcherWorkflow

SENDER = "sales@acme.test"  # the email sender `hook` creates; its mailbox is the test's folder
_ids = itertools.count()
ROOT = Path(__file__).resolve().parent.parent


def mid(tag: str) -> str:
    return f"<{tag}.{uuid.uuid4().hex[:12]}@lead.test>"


class Watch:
    """One test's mailbox, the sender watching it, and the leads that were mailed from it."""

    def __init__(self, hook: Hook, mailbox: Mailbox, queue: str) -> None:
        self.hook = hook
        self.mailbox = mailbox
        self.queue = queue
        self.sender_id = 0

    async def connect(self, *, port: int | None = None, password: str | None = None) -> int:
        self.sender_id = await connect_mailbox(
            self.hook.sf,
            SENDER,
            host=self.mailbox.host,
            port=port or self.mailbox.port,
            user=self.mailbox.user,
            password=password or self.mailbox.password,
            folder=self.mailbox.folder,
        )
        return self.sender_id

    async def start(self, **options: Any) -> WorkflowHandle[Any, Any]:
        handle, new = await start_watcher(self.hook.env.client, self.sender_id, self.queue, **{**FAST, **options})
        assert new
        return handle

    async def watching(self) -> None:
        await wait_state(self.hook.sf, self.sender_id, lambda s: s.status == "watching")

    async def lead(self, email: str, gap: str = "30d") -> tuple[int, WorkflowHandle[Any, Any], str]:
        """A person mailed by the sequence's first step: (person id, enrollment, our Message-ID)."""
        pid = await self.hook.person(email=email)
        handle = await self.hook.enroll(email_sequence(gap=gap), pid)
        await self.hook.waiting_at(handle)
        [ours] = [msg["Message-ID"] for msg in self.hook.smtp.parsed() if msg["To"] == email]
        return pid, handle, str(ours)

    async def inbound(self, event_id: str) -> InboundEvent:
        async def handled() -> InboundEvent | None:
            async with self.hook.sf() as s:
                row = (
                    await s.execute(select(InboundEvent).where(InboundEvent.provider_event_id == event_id))
                ).scalar_one_or_none()
            return row if row is not None and row.status != "received" else None

        row = await eventually(handled, f"{event_id} to be handled", tries=1500)
        assert row is not None  # eventually() returns only a truthy value
        return row

    async def status_once(self, handle: WorkflowHandle[Any, Any], predicate: Any, what: str) -> Any:
        """The watcher's status (its query) once `predicate` holds."""

        async def matched() -> Any:
            status = await handle.query(MailboxWatcherWorkflow.status)
            return status if predicate(status) else None

        return await eventually(matched, what, tries=1500)

    async def inbound_rows(self) -> list[InboundEvent]:
        async with self.hook.sf() as s:
            return list((await s.execute(select(InboundEvent).order_by(InboundEvent.id))).scalars())


@pytest.fixture
async def watch(hook: Hook, mailbox: Mailbox, task_queue: str, wired: Wired) -> Any:
    queue = f"{task_queue}-mail"
    w = Watch(hook, mailbox, queue)
    async with wired(task_queue=queue):  # the watchers' own worker; the enrollments run on the hook's
        try:
            yield w
        finally:
            await end_watcher(hook, w.sender_id)


async def end_watcher(hook: Hook, sender_id: int) -> None:
    """Terminate the test's watcher (ids repeat across tests: every test database starts at sender 1)."""
    if sender_id:
        try:
            await hook.env.client.get_workflow_handle(mailbox_workflow_id(sender_id)).terminate("test over")
        except RPCError:
            pass


async def test_a_reply_appended_to_the_mailbox_branches_the_lead_and_stays_unread(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("ada@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()

    reply_id = mid("reply")
    [uid] = await watch.mailbox.append(
        m.reply(
            sender="ada@lead.test", to=SENDER, in_reply_to=ours, text="Yes, let's talk Tuesday.", message_id=reply_id
        )
    )
    view = await wait_for_status(handle, lambda v: bool(v.path) and v.path[0].left_by == "REPLIED")
    assert [p.step for p in view.path][:2] == ["m0", "done"]
    row = await watch.inbound(reply_id)
    assert (row.channel, row.type, row.status, row.person_id) == ("email", "reply", "signalled", pid)
    assert row.payload["mailbox"]["uid"] == uid
    assert await signals_in_history(handle, "replied") == 1
    # Never marked read, never moved: the message is still there, without \Seen.
    assert "\\Seen" not in (await watch.mailbox.flags())[uid]
    state = await wait_state(watch.hook.sf, watch.sender_id, lambda s: s.last_uid >= uid)
    assert state.last_uid == uid
    assert await connection_status(watch.hook.sf, watch.sender_id) == ("watching", f"IDLE on {watch.mailbox.folder}")


async def test_a_hard_bounce_marks_the_delivery_bounced_and_suppresses_that_address(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("gone@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()
    dsn_id = mid("dsn")
    await watch.mailbox.append(m.dsn(to=SENDER, recipient="gone@lead.test", original_id=ours, message_id=dsn_id))

    row = await watch.inbound(dsn_id)
    assert (row.type, row.status, row.person_id) == ("bounce", "suppressed_identity", pid)
    async with watch.hook.sf() as s:
        identity = (await s.execute(select(Identity).where(Identity.value == "gone@lead.test"))).scalar_one()
        [sup] = (await s.execute(select(Suppression))).scalars().all()
        delivery = (await s.execute(select(Delivery).where(Delivery.message_id == ours))).scalar_one()
    assert (sup.identity_id, sup.person_id, sup.reason) == (identity.id, None, "bounce")
    assert (delivery.status, delivery.error) == (
        "bounced",
        "bounce: 5.1.1 smtp; 550 5.1.1 <gone@lead.test>: Recipient address rejected: User unknown",
    )
    [bounced] = await events_of(watch.hook.sf, EventType.BOUNCED)
    assert bounced.data["status"] == "5.1.1" and bounced.data["via"] == "imap"


async def test_a_soft_bounce_is_recorded_and_suppresses_nothing(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("busy@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()
    dsn_id = mid("delay")
    await watch.mailbox.append(
        m.dsn(to=SENDER, recipient="busy@lead.test", original_id=ours, message_id=dsn_id, permanent=False)
    )
    row = await watch.inbound(dsn_id)
    assert (row.type, row.status, row.person_id) == ("bounce", "soft_bounce", pid)
    async with watch.hook.sf() as s:
        assert (await s.execute(select(Suppression))).scalars().all() == []
        delivery = (await s.execute(select(Delivery).where(Delivery.message_id == ours))).scalar_one()
    assert delivery.status == "sent"
    [soft] = await events_of(watch.hook.sf, EventType.SOFT_BOUNCED)
    assert soft.data["status"] == "4.4.1"
    assert await events_of(watch.hook.sf, EventType.BOUNCED) == []
    view = await watch.hook.waiting_at(handle)
    assert view.status == EnrollmentStatus.ACTIVE


async def test_an_arf_complaint_suppresses_the_person_and_stops_the_lead(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("angry@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()
    fbl_id = mid("fbl")
    await watch.mailbox.append(m.arf(to=SENDER, recipient="angry@lead.test", original_id=ours, message_id=fbl_id))
    row = await watch.inbound(fbl_id)
    assert (row.type, row.status, row.person_id) == ("complaint", "unsubscribed", pid)
    view = await wait_for_status(handle, lambda v: v.status == EnrollmentStatus.UNSUBSCRIBED)
    assert view.status == EnrollmentStatus.UNSUBSCRIBED
    async with watch.hook.sf() as s:
        [sup] = (await s.execute(select(Suppression))).scalars().all()
    assert (sup.person_id, sup.reason) == (pid, "complaint")


async def test_mail_to_the_unsubscribe_mailto_unsubscribes_the_person_it_was_sent_to(
    start_hook: StartHook,
    mailbox: Mailbox,
    task_queue: str,
    wired: Wired,
) -> None:
    """The List-Unsubscribe mailto of our mail, used by a mail client, stops that person through the pipeline."""
    async with start_hook(worker={"unsubscribe_mailto": "unsubscribe@acme.test"}) as hook:
        watch = Watch(hook, mailbox, f"{task_queue}-mail")
        async with wired(task_queue=watch.queue):
            try:
                pid, handle, _ = await watch.lead("leaving@lead.test")
                [sent] = hook.mails_to("leaving@lead.test")
                mailto = re.search(r"<mailto:([^>?]+)\?subject=([^>]+)>", str(sent["List-Unsubscribe"]))
                assert mailto is not None, sent["List-Unsubscribe"]
                to, subject = mailto.group(1), mailto.group(2)
                assert to == "unsubscribe@acme.test" and subject.startswith("unsubscribe-")
                await watch.connect()
                await watch.start()
                await watch.watching()

                # A token that is not ours, from nobody we know: recorded, nobody unsubscribed.
                forged = mid("forged")
                await watch.mailbox.append(
                    m.reply(
                        sender="prank@else.test",
                        to=to,
                        in_reply_to=None,
                        text="",
                        message_id=forged,
                        subject="unsubscribe-" + "A" * 60,
                    )
                )
                assert (await watch.inbound(forged)).status == "unknown_sender"

                # What Gmail's unsubscribe button sends: the subject as given, from another of the person's addresses.
                request = mid("unsubscribe")
                await watch.mailbox.append(
                    m.reply(
                        sender="leaving.alias@lead.test",
                        to=to,
                        in_reply_to=None,
                        text="This message was automatically generated by Gmail.",
                        message_id=request,
                        subject=subject,
                    )
                )
                row = await watch.inbound(request)
                assert (row.type, row.status, row.person_id) == ("reply", "unsubscribed", pid)
                view = await wait_for_status(handle, lambda v: v.status == EnrollmentStatus.UNSUBSCRIBED)
                assert view.status == EnrollmentStatus.UNSUBSCRIBED
                async with hook.sf() as s:
                    [sup] = (await s.execute(select(Suppression))).scalars().all()
                assert (sup.person_id, sup.reason) == (pid, "unsubscribe")
                [event] = await events_of(hook.sf, EventType.UNSUBSCRIBED)
                assert event.data == {"via": "mailto"}
                assert await signals_in_history(handle, "unsubscribe") == 1
            finally:
                await end_watcher(hook, watch.sender_id)


async def test_an_auto_reply_by_header_is_not_a_reply(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("away@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()
    auto_id = mid("auto")
    await watch.mailbox.append(
        m.auto_reply(
            sender="away@lead.test",
            to=SENDER,
            in_reply_to=ours,
            message_id=auto_id,
            text="Yes, interested! (this text alone would read as a reply)",
        )
    )
    row = await watch.inbound(auto_id)
    assert (row.type, row.status, row.classification) == ("auto_reply", "rescheduled", "out_of_office")
    view = await watch.hook.waiting_at(handle)
    assert view.path[-1].left_by is None and view.waiting_for == ["REPLIED", "NOT_REPLIED"]
    assert await signals_in_history(handle, "replied") == 0
    assert await signals_in_history(handle, "out_of_office") == 1
    assert await events_of(watch.hook.sf, EventType.REPLIED) == []


async def test_a_reply_in_a_thread_that_is_not_ours_is_recorded_as_unknown(watch: Watch) -> None:
    await watch.lead("ada@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()
    stranger = mid("stranger")
    broken = m.broken_multipart(sender="ada@lead.test", message_id=mid("broken"))
    await watch.mailbox.append(
        [
            m.reply(
                sender="someone@else.test",
                to=SENDER,
                in_reply_to="<not-ours@else.test>",
                text="Hi",
                message_id=stranger,
            ),
            broken,
        ]
    )
    row = await watch.inbound(stranger)
    assert (row.type, row.status, row.person_id) == ("reply", "unknown_sender", None)
    # Malformed MIME is recorded with the reason (keyed by the bytes' digest), and the watcher goes on.
    bad = await watch.inbound(f"sha256:{hashlib.sha256(broken).hexdigest()}")
    assert (bad.type, bad.status) == ("unknown", "malformed")
    assert "malformed MIME" in bad.payload["detail"]["reason"]
    later = mid("later")
    await watch.mailbox.append(m.reply(sender="x@else.test", to=SENDER, in_reply_to=None, text="Hi", message_id=later))
    assert (await watch.inbound(later)).status == "unknown_sender"
    assert await events_of(watch.hook.sf, EventType.REPLIED) == []


async def test_a_connection_dropped_mid_idle_loses_nothing_and_doubles_nothing(
    watch: Watch,
    tcp_proxy: TcpProxy,
) -> None:
    leads = [await watch.lead(f"lead{i}@lead.test") for i in range(3)]
    await watch.connect(port=tcp_proxy.port)
    await watch.start()
    await watch.watching()
    first = mid("before")
    await watch.mailbox.append(
        m.reply(sender="lead0@lead.test", to=SENDER, in_reply_to=leads[0][2], text="Sure", message_id=first)
    )
    await watch.inbound(first)

    tcp_proxy.cut()  # the watcher's connection drops in the middle of IDLE; new ones are refused
    await wait_state(watch.hook.sf, watch.sender_id, lambda s: s.status == "reconnecting")
    during = [mid(f"during{i}") for i in (1, 2)]
    for i, message_id in zip((1, 2), during, strict=True):
        await watch.mailbox.append(  # straight to the server while the watcher cannot reach it
            m.reply(sender=f"lead{i}@lead.test", to=SENDER, in_reply_to=leads[i][2], text="Yes", message_id=message_id)
        )
    tcp_proxy.restore()
    for message_id in during:
        assert (await watch.inbound(message_id)).status == "signalled"
    for _, handle, _ in leads:
        await wait_for_status(handle, lambda v: bool(v.path) and v.path[0].left_by == "REPLIED")
        assert await signals_in_history(handle, "replied") == 1
    rows = await watch.inbound_rows()
    assert sorted(r.provider_event_id for r in rows) == sorted([first, *during])
    assert tcp_proxy.connections >= 2


async def test_mail_that_arrives_while_the_watcher_handles_a_message_is_read_without_waiting_for_more(
    watch: Watch,
) -> None:
    """The reply appended while the watcher is busy with an earlier one is not left for the next mail.

    A server need not repeat at IDLE what it announced while the client was busy (pymap
    does not): a watcher that goes back to IDLE after a round without looking again would
    leave that reply unread until some other mail arrived, or until the session ends.
    """
    (_, first_lead, ours_a), (_, second_lead, ours_b) = [await watch.lead(f"{n}@lead.test") for n in ("busy", "next")]
    await watch.connect()
    await watch.start()
    await watch.watching()
    first, second = mid("first"), mid("second")
    async with watch.hook.sf() as lock, lock.begin():
        # The pipeline's first write (its Message-ID claim) waits on this lock: the watcher
        # has fetched the first reply and is busy with it when the second one arrives.
        await lock.execute(text("LOCK TABLE inbound_events IN EXCLUSIVE MODE"))
        await watch.mailbox.append(
            m.reply(sender="busy@lead.test", to=SENDER, in_reply_to=ours_a, text="Yes", message_id=first)
        )
        await wait_blocked_on(watch, "INSERT INTO inbound_events")
        [last] = await watch.mailbox.append(
            m.reply(sender="next@lead.test", to=SENDER, in_reply_to=ours_b, text="Sure", message_id=second)
        )
    # Nothing else arrives: the second reply must be read all the same.
    assert (await watch.inbound(second)).status == "signalled"
    assert (await watch.inbound(first)).status == "signalled"
    for handle in (first_lead, second_lead):
        await wait_for_status(handle, lambda v: bool(v.path) and v.path[0].left_by == "REPLIED")
        assert await signals_in_history(handle, "replied") == 1
    state = await wait_state(watch.hook.sf, watch.sender_id, lambda s: s.last_uid >= last)
    assert state.last_uid == last


async def test_a_message_the_pipeline_fails_on_holds_the_mark_and_is_read_again_the_others_once(
    watch: Watch,
) -> None:
    """The mark never passes a message that did not go through; the ones after it count once."""
    (_, failing_lead, ours_a), (_, other_lead, ours_b) = [await watch.lead(f"{n}@lead.test") for n in ("fail", "fine")]
    await watch.connect()
    await watch.start()
    await watch.watching()
    failing, fine = mid("failing"), mid("fine")
    # PostgreSQL refuses the first message's claim until the trigger goes (a database fault).
    async with watch.hook.sf() as s, s.begin():
        await s.execute(
            text(
                "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.provider_event_id = '{failing}' THEN RAISE EXCEPTION 'refused for the test'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        await s.execute(
            text("CREATE TRIGGER refuse_one BEFORE INSERT ON inbound_events FOR EACH ROW EXECUTE FUNCTION refuse_one()")
        )
    uid_a, uid_b = await watch.mailbox.append(
        [
            m.reply(sender="fail@lead.test", to=SENDER, in_reply_to=ours_a, text="Yes", message_id=failing),
            m.reply(sender="fine@lead.test", to=SENDER, in_reply_to=ours_b, text="Sure", message_id=fine),
        ]
    )
    assert (await watch.inbound(fine)).status == "signalled"
    # Handled after the failing one, but the stored mark stays before it.
    state = await wait_state(watch.hook.sf, watch.sender_id, lambda s: s.messages >= 1)
    assert state.last_uid == uid_a - 1
    async with watch.hook.sf() as s, s.begin():
        await s.execute(text("DROP TRIGGER refuse_one ON inbound_events"))
    assert (await watch.inbound(failing)).status == "signalled"
    state = await wait_state(watch.hook.sf, watch.sender_id, lambda s: s.last_uid >= uid_b)
    assert state.last_uid == uid_b
    for handle in (failing_lead, other_lead):
        await wait_for_status(handle, lambda v: bool(v.path) and v.path[0].left_by == "REPLIED")
        assert await signals_in_history(handle, "replied") == 1
    assert sorted(r.provider_event_id for r in await watch.inbound_rows()) == sorted([failing, fine])


async def wait_blocked_on(watch: Watch, statement: str) -> None:
    """Until a session of the test database waits for a lock in `statement` (bounded polling)."""

    async def waiting() -> int:
        async with watch.hook.sf() as s:
            return int(
                (
                    await s.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND query LIKE :q"
                        ),
                        {"q": statement + "%"},
                    )
                ).scalar_one()
            )

    await eventually(waiting, f"a session waiting on a lock in {statement!r}", tries=1500)


async def test_the_watchers_worker_killed_another_takes_over_nothing_lost_or_doubled(
    hook: Hook,
    mailbox: Mailbox,
    task_queue: str,
    wired: Wired,
    database_url: str,
) -> None:
    queue = f"{task_queue}-mail"
    w = Watch(hook, mailbox, queue)
    leads = [await w.lead(f"k{i}@lead.test") for i in range(3)]
    await w.connect()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": temporal_address(hook.env),
        "SECRETS_KEY": KEY,
        "PYTHONPATH": str(ROOT),
    }
    await end_watcher(hook, w.sender_id)  # a watcher left over by an earlier test of this session
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.watcher_worker", queue, env=env, cwd=str(ROOT)
    )
    try:
        handle = await w.start()
        await w.watching()
        first = mid("k0")
        await mailbox.append(
            m.reply(sender="k0@lead.test", to=SENDER, in_reply_to=leads[0][2], text="Sure", message_id=first)
        )
        assert (await w.inbound(first)).status == "signalled"
    finally:
        proc.send_signal(signal.SIGKILL)  # no graceful shutdown: the activity just stops heartbeating
        await proc.wait()
    later = [mid(f"k{i}") for i in (1, 2)]
    for i, message_id in zip((1, 2), later, strict=True):
        await mailbox.append(
            m.reply(sender=f"k{i}@lead.test", to=SENDER, in_reply_to=leads[i][2], text="Yes", message_id=message_id)
        )
    async with wired(task_queue=queue):
        await hook.env.sleep(FAST["heartbeat_timeout_seconds"] + 1)  # the server notices the silence
        for message_id in later:
            assert (await w.inbound(message_id)).status == "signalled"
        for _, lead, _ in leads:
            await wait_for_status(lead, lambda v: bool(v.path) and v.path[0].left_by == "REPLIED")
            assert await signals_in_history(lead, "replied") == 1
        assert sorted(r.provider_event_id for r in await w.inbound_rows()) == sorted([first, *later])
        state = await wait_state(hook.sf, w.sender_id, lambda s: s.status == "watching")
        assert state.last_uid == max(await mailbox.flags())
        history = await handle.fetch_history()
        assert not [e for e in history.events if e.event_type == HistoryEventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT]
        await end_watcher(hook, w.sender_id)


async def test_a_wrong_password_shows_why_and_backs_off_instead_of_looping(watch: Watch) -> None:
    await watch.connect(password="not-the-password")
    handle = await watch.start(login_backoff_seconds=60)
    status = await watch.status_once(handle, lambda st: st.state == "login_failed", "the login to fail")
    assert status.state == "login_failed" and status.login_failures == 1
    assert "refused the LOGIN" in (status.reason or "") and "AUTHENTICATIONFAILED" in (status.reason or "")
    assert "not-the-password" not in (status.reason or "")
    listed, reason = await connection_status(watch.hook.sf, watch.sender_id)
    assert listed == "login_failed" and "refused the LOGIN" in (reason or "")
    desc = await handle.describe()
    assert desc.status is not None and desc.status.name == "RUNNING"

    def counts(events: Any) -> tuple[int, int]:
        scheduled = sum(1 for e in events if e.event_type == HistoryEventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
        timers = [e for e in events if e.event_type == HistoryEventType.EVENT_TYPE_TIMER_STARTED]
        return scheduled, len(timers)

    history = await handle.fetch_history()
    assert counts(history.events) == (1, 1)  # one login attempt, then a timer: no crash loop
    [timer] = [e for e in history.events if e.event_type == HistoryEventType.EVENT_TYPE_TIMER_STARTED]
    assert timer.timer_started_event_attributes.start_to_fire_timeout.ToSeconds() == 60

    # Fixed the password? `retry_now` ends the wait early: one more attempt, then a longer wait.
    await handle.signal(MailboxWatcherWorkflow.retry_now, ControlSignal(reason="test", source="test"))
    status = await watch.status_once(handle, lambda st: st.login_failures == 2, "a second login attempt")
    assert status.login_failures == 2
    history = await handle.fetch_history()
    timers = [e for e in history.events if e.event_type == HistoryEventType.EVENT_TYPE_TIMER_STARTED]
    assert [t.timer_started_event_attributes.start_to_fire_timeout.ToSeconds() for t in timers] == [60, 120]


async def test_mail_that_predates_the_first_connect_is_ignored(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("old@lead.test")
    old = [
        m.reply(sender="old@lead.test", to=SENDER, in_reply_to=ours, text=f"old {i}", message_id=mid(f"old{i}"))
        for i in range(500)
    ]
    await watch.mailbox.append(old)
    await watch.connect()
    await watch.start()
    await watch.watching()
    new = mid("new")
    await watch.mailbox.append(m.reply(sender="old@lead.test", to=SENDER, in_reply_to=ours, text="Yes", message_id=new))
    assert (await watch.inbound(new)).status == "signalled"
    rows = await watch.inbound_rows()
    assert [r.provider_event_id for r in rows] == [new]
    assert await signals_in_history(handle, "replied") == 1


async def test_one_watcher_per_mailbox(watch: Watch) -> None:
    await watch.connect()
    first = await watch.start()
    again, new = await start_watcher(watch.hook.env.client, watch.sender_id, watch.queue)
    assert new is False and again.id == first.id == mailbox_workflow_id(watch.sender_id)


async def test_stop_ends_the_watcher_and_closes_the_session(watch: Watch) -> None:
    await watch.connect()
    handle = await watch.start()
    await watch.watching()
    assert await stop_watcher(watch.hook.env.client, watch.sender_id) is True
    status = await watch.status_once(handle, lambda st: st.state == "stopped", "the watcher to stop")
    assert status.state == "stopped"


async def test_starter_reply_appends_a_threaded_rfc5322_reply_that_the_watcher_hears(watch: Watch) -> None:
    pid, handle, ours = await watch.lead("cli@lead.test")
    await watch.connect()
    await watch.start()
    await watch.watching()
    appended = await append_reply(watch.hook.sf, SETTINGS, pid, "Yes, let's talk")
    assert appended.in_reply_to == ours and appended.sender_id == watch.sender_id
    await wait_for_status(handle, lambda v: bool(v.path) and v.path[0].left_by == "REPLIED")
    row = await watch.inbound(appended.message_id)
    assert (row.type, row.status, row.person_id) == ("reply", "signalled", pid)
    # What the server stores is a plain RFC 5322 reply from the person, threaded under our mail.
    stored = await watch.mailbox.raw(max(await watch.mailbox.flags()))
    assert b"\r\nIn-Reply-To: " + ours.encode() + b"\r\n" in stored
    assert stored.startswith(b"From: cli@lead.test\r\n")


async def test_a_uidvalidity_change_resyncs_without_double_effects(watch: Watch) -> None:
    leads = [await watch.lead(f"uv{i}@lead.test") for i in range(2)]
    await watch.connect()
    await watch.start()
    await watch.watching()
    first = mid("uv0")
    await watch.mailbox.append(
        m.reply(sender="uv0@lead.test", to=SENDER, in_reply_to=leads[0][2], text="Sure", message_id=first)
    )
    assert (await watch.inbound(first)).status == "signalled"
    await end_watcher(watch.hook, watch.sender_id)
    # The server renumbers the folder while nobody watches (as after a mailbox migration).
    async with watch.hook.sf() as s, s.begin():
        await s.execute(update(MailboxState).where(MailboxState.sender_id == watch.sender_id).values(uidvalidity=1))
    second = mid("uv1")
    await watch.mailbox.append(
        m.reply(sender="uv1@lead.test", to=SENDER, in_reply_to=leads[1][2], text="Yes", message_id=second)
    )
    await watch.start()
    assert (await watch.inbound(second)).status == "signalled"
    state = await wait_state(watch.hook.sf, watch.sender_id, lambda s: s.status == "watching" and s.resyncs == 1)
    assert state.uidvalidity != 1
    # The first reply was read again from the first connect on, and counted once.
    for _, handle, _ in leads:
        assert await signals_in_history(handle, "replied") == 1
    assert sorted(r.provider_event_id for r in await watch.inbound_rows()) == sorted([first, second])

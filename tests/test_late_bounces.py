"""Bounces that arrive after the send count for the sender's circuit breaker.

Most bad addresses are not refused during the SMTP session: the receiving system accepts
the mail and returns a DSN later, or the provider reports the hard bounce on its signed
webhook. Both mark our delivery bounced; the sender's bounce rate must then be checked as
for a refusal during the send, so a sender whose list is bad stops before it hurts its
reputation further. Real PostgreSQL, the real inbound pipeline fed raw DSNs (as the mailbox
watcher feeds it; once end to end: sent by the worker, read from a pymap mailbox by the
watcher), the real webhook app fed signed SendGrid batches, the time-skipping
Temporal server for the signals (the seeded enrollments have no workflow: signals to them
are skipped as for finished ones).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update
from temporalio.testing import WorkflowEnvironment

from bench.provider_batch import seed_sent
from db.session import SessionFactory
from db.tables import Delivery
from models.outcomes import EventType, InboundStatus
from services import sender_breaker
from services.inbound_mail import read_mail
from services.inbound_pipeline import InboundPipeline
from services.sender_breaker import BreakerConfig, record_late_bounce
from tests import mail_samples as m
from tests.engine_harness import events_of, make_sender
from tests.eventually import eventually
from tests.provider_samples import SendGridSigner, sendgrid_event
from tests.test_mailbox_watcher import Watch, mid
from tests.test_mailbox_watcher import watch as connected_mailbox
from tests.test_sender_breaker import sender_row
from tests.webhook_harness import app_settings, serve
from webhooks.app import create_app
from webhooks.deps import build_pipeline

SENDER = "sales@acme.test"
#: The mailbox watcher tests' fixture: a pymap folder, the webhook app, the worker, the watcher's worker.
watch = connected_mailbox
#: A while before the test: when the seeded mail was sent.
EARLIER = timedelta(hours=1)


async def sent_mail(sf: SessionFactory, sender_id: int, n: int, *, sent_at: datetime) -> list[str]:
    """n deliveries `sender_id` sent at `sent_at`, each to its own lead; their Message-IDs."""
    ids = await seed_sent(sf, n, uuid.uuid4().hex[:10])
    async with sf() as s, s.begin():
        await s.execute(
            update(Delivery).where(Delivery.message_id.in_(ids)).values(sender_id=sender_id, sent_at=sent_at)
        )
    return ids


async def status_of(sf: SessionFactory, message_id: str) -> str:
    async with sf() as s:
        return str((await s.execute(select(Delivery.status).where(Delivery.message_id == message_id))).scalar_one())


@dataclass
class Sent:
    sender_id: int
    #: the Message-IDs of its mail, one lead each
    mail: list[str]


@pytest.fixture
async def sent(session_factory: SessionFactory) -> Sent:
    """A sender with 20 sends an hour ago: the window the defaults need before the rate counts."""
    sender_id = await make_sender(session_factory, "email", SENDER)
    return Sent(sender_id, await sent_mail(session_factory, sender_id, 20, sent_at=datetime.now(UTC) - EARLIER))


@pytest.fixture
def pipeline(temporal_env: WorkflowEnvironment, database_url: str, session_factory: SessionFactory) -> InboundPipeline:
    """The pipeline as the app builds it from the settings users get (SENDER_* defaults)."""
    return build_pipeline(app_settings(temporal_env, database_url), session_factory, temporal_env.client)


async def dsn(pipeline: InboundPipeline, original_id: str, *, permanent: bool = True, dsn_id: str = "") -> str:
    """A Postfix DSN about our mail `original_id`, read as the mailbox watcher reads it; the outcome."""
    raw = m.dsn(
        to=SENDER,
        recipient=f"gone-{uuid.uuid4().hex[:6]}@lead.test",
        original_id=original_id,
        message_id=dsn_id or f"<dsn-{uuid.uuid4().hex}@mx.lead.test>",
        permanent=permanent,
    )
    return (await pipeline.process(read_mail(raw))).status


async def test_later_dsns_over_the_threshold_pause_the_sender_and_resume_starts_the_window_again(
    session_factory: SessionFactory, pipeline: InboundPipeline, sent: Sent
) -> None:
    sf, sender_id, before = session_factory, sent.sender_id, sent.mail

    # 1 of 20 is the 5% threshold itself, not over it: the sender goes on
    assert await dsn(pipeline, before[0]) == InboundStatus.SUPPRESSED_IDENTITY
    assert await status_of(sf, before[0]) == "bounced"
    assert (await sender_row(sf, sender_id)).paused_at is None
    # 2 of 20: paused as a refusal during the send would pause it, until `senders resume`
    await dsn(pipeline, before[1])
    acct = await sender_row(sf, sender_id)
    assert (acct.paused_kind, acct.paused_until) == ("bounce_rate", None)
    assert "2 of the last 20 sends bounced (10%, over 5%)" in (acct.paused_reason or "")
    [event] = await events_of(sf, EventType.SENDER_PAUSED)
    assert (event.data["kind"], event.data["sender_id"]) == ("bounce_rate", sender_id)

    resumed = await sender_breaker.resume(sf, sender_id, datetime.now(UTC))
    assert resumed.paused_at is None
    after = await sent_mail(sf, sender_id, 20, sent_at=datetime.now(UTC))
    # Late DSNs of mail sent before the resume do not count against the list checked since
    for mail in before[2:4]:
        assert await dsn(pipeline, mail) == InboundStatus.SUPPRESSED_IDENTITY
        assert await status_of(sf, mail) == "bounced"
    assert (await sender_row(sf, sender_id)).paused_at is None
    # the new window: 20 sends since the resume, 2 of them bounce later
    await dsn(pipeline, after[0])
    assert (await sender_row(sf, sender_id)).paused_at is None
    await dsn(pipeline, after[1])
    assert (await sender_row(sf, sender_id)).paused_kind == "bounce_rate"
    assert len(await events_of(sf, EventType.SENDER_PAUSED)) == 2


async def test_the_same_bounce_reported_again_counts_once(
    session_factory: SessionFactory, pipeline: InboundPipeline, sent: Sent
) -> None:
    sf, sender_id, mail = session_factory, sent.sender_id, sent.mail
    report = f"<dsn-{uuid.uuid4().hex}@mx.lead.test>"
    assert await dsn(pipeline, mail[0], dsn_id=report) == InboundStatus.SUPPRESSED_IDENTITY
    # the same DSN read again (a second mailbox, a re-sync), and a second MTA's report of it
    assert await dsn(pipeline, mail[0], dsn_id=report) == InboundStatus.DUPLICATE
    assert await dsn(pipeline, mail[0]) == InboundStatus.SUPPRESSED_IDENTITY
    assert (await sender_row(sf, sender_id)).paused_at is None, "one bounce of 20, however often reported"
    await dsn(pipeline, mail[1])
    acct = await sender_row(sf, sender_id)
    assert acct.paused_kind == "bounce_rate" and "2 of the last 20" in (acct.paused_reason or "")


async def test_a_temporary_dsn_does_not_count(
    session_factory: SessionFactory, pipeline: InboundPipeline, sent: Sent
) -> None:
    sf, sender_id, mail = session_factory, sent.sender_id, sent.mail
    await dsn(pipeline, mail[0])
    assert await dsn(pipeline, mail[1], permanent=False) == InboundStatus.SOFT_BOUNCE
    assert await status_of(sf, mail[1]) == "sent"
    assert (await sender_row(sf, sender_id)).paused_at is None
    await dsn(pipeline, mail[1])  # the mail system gave up after all
    assert (await sender_row(sf, sender_id)).paused_kind == "bounce_rate"


async def test_a_sender_already_paused_keeps_its_pause(
    session_factory: SessionFactory, pipeline: InboundPipeline, sent: Sent
) -> None:
    sf, sender_id, mail = session_factory, sent.sender_id, sent.mail
    await sender_breaker.set_paused(sf, sender_id, "holiday", datetime.now(UTC))
    for one in mail[:4]:
        await dsn(pipeline, one)
    acct = await sender_row(sf, sender_id)
    assert (acct.paused_kind, acct.paused_reason) == ("manual", "holiday")
    assert [e.data["kind"] for e in await events_of(sf, EventType.SENDER_PAUSED)] == ["manual"]


async def test_the_thresholds_are_the_settings(
    temporal_env: WorkflowEnvironment, database_url: str, session_factory: SessionFactory
) -> None:
    """SENDER_BOUNCE_MIN_SENDS=5, SENDER_BOUNCE_RATE_THRESHOLD=0.25: 2 of 5 pause (the defaults would wait for 20)."""
    sf = session_factory
    cfg = app_settings(temporal_env, database_url, sender_bounce_min_sends=5, sender_bounce_rate_threshold=0.25)
    pipeline = build_pipeline(cfg, sf, temporal_env.client)
    sender_id = await make_sender(sf, "email", SENDER)
    mail = await sent_mail(sf, sender_id, 5, sent_at=datetime.now(UTC) - EARLIER)
    await dsn(pipeline, mail[0])
    assert (await sender_row(sf, sender_id)).paused_at is None  # 20%
    await dsn(pipeline, mail[1])
    acct = await sender_row(sf, sender_id)
    assert acct.paused_kind == "bounce_rate" and "2 of the last 5 sends bounced (40%, over 25%)" in (
        acct.paused_reason or ""
    )


async def test_bounces_recorded_at_the_same_time_are_counted_one_after_the_other(
    session_factory: SessionFactory, sent: Sent
) -> None:
    """Two bounces whose transactions overlap (a provider batch, a DSN while a send is refused):
    the second waits for the first's check and then sees its bounce, so the one that crosses
    the threshold is never missed by both."""
    sf, sender_id, mail = session_factory, sent.sender_id, sent.mail
    async with sf() as s:
        query = select(Delivery.message_id, Delivery.id).where(Delivery.sender_id == sender_id)
        rows = {r.message_id: r.id for r in await s.execute(query)}
    first_id, second_id = rows[mail[0]], rows[mail[1]]

    async def record(delivery_id: int) -> bool:
        async with sf() as s, s.begin():
            return await record_late_bounce(s, delivery_id, "bounce: 5.1.1", BreakerConfig(), datetime.now(UTC))

    async def waiting_for_a_lock() -> int:
        async with sf() as s:
            query = select(func.count()).select_from(text("pg_stat_activity"))
            where = text("wait_event_type = 'Lock' AND datname = current_database()")
            return int((await s.execute(query.where(where))).scalar_one())

    async with sf() as s, s.begin():
        assert await record_late_bounce(s, first_id, "bounce: 5.1.1", BreakerConfig(), datetime.now(UTC))  # 1 of 20
        second = asyncio.create_task(record(second_id))
        await eventually(lambda: second.done() or waiting_for_a_lock(), "the second bounce done or waiting")
        assert not second.done(), "the second bounce was counted without the first (uncommitted) one"
    assert await second
    acct = await sender_row(sf, sender_id)
    assert acct.paused_kind == "bounce_rate" and "2 of the last 20" in (acct.paused_reason or "")


async def test_dsns_read_from_the_connected_mailbox_pause_the_sender(watch: Watch) -> None:
    """End to end: our mail sent by the production worker, the DSNs read by the sender's mailbox watcher."""
    pid, handle, ours = await watch.lead("gone@lead.test")
    sender_id = await watch.connect()
    others = await sent_mail(watch.hook.sf, sender_id, 19, sent_at=datetime.now(UTC) - EARLIER)
    await watch.start()
    await watch.watching()
    for n, original in enumerate([ours, others[0]], start=1):
        report = mid("dsn")
        await watch.mailbox.append(
            m.dsn(to=SENDER, recipient=f"gone{n}@lead.test", original_id=original, message_id=report)
        )
        assert (await watch.inbound(report)).status == "suppressed_identity"
        acct = await sender_row(watch.hook.sf, sender_id)
        assert acct.paused_kind == (None if n == 1 else "bounce_rate"), f"after {n} of 20 bounced"
    assert "2 of the last 20 sends bounced" in (acct.paused_reason or "")


# --------------------------------------------------------------------------- provider webhooks


@dataclass
class SendGrid:
    """The webhook app with SendGrid's signed event webhook on (the defaults otherwise)."""

    http: httpx.AsyncClient
    signer: SendGridSigner

    async def post(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        body = json.dumps(events).encode()
        resp = await self.http.post("/webhooks/providers/sendgrid", content=body, headers=self.signer.headers(body))
        assert resp.status_code == 200, resp.text
        answer: dict[str, Any] = resp.json()
        return answer


@pytest.fixture
async def sendgrid(temporal_env: WorkflowEnvironment, database_url: str) -> AsyncIterator[SendGrid]:
    signer = SendGridSigner()
    web = create_app(app_settings(temporal_env, database_url, sendgrid_webhook_public_keys=[signer.public_key]))
    async with serve(web) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        yield SendGrid(http, signer)


async def by_message_id(sf: SessionFactory, ids: list[str]) -> Callable[[int], dict[str, str]]:
    """SendGrid names our mail by the Message-ID we gave it (`smtp-id`)."""
    return lambda i: {"smtp-id": ids[i], "sg_message_id": f"sg{uuid.uuid4().hex}.filter0001"}


async def by_provider_id(sf: SessionFactory, ids: list[str]) -> Callable[[int], dict[str, str]]:
    """Only by the provider's own message id (our Message-ID not stored): the ingest marks the row."""
    provider_ids = [f"pm{uuid.uuid4().hex}" for _ in ids]
    async with sf() as s, s.begin():
        for mid, pid in zip(ids, provider_ids, strict=True):
            await s.execute(
                update(Delivery).where(Delivery.message_id == mid).values(message_id=None, provider_message_id=pid)
            )
    return lambda i: {"smtp-id": "", "sg_message_id": f"{provider_ids[i]}.filter0001.1"}


@pytest.mark.parametrize("named", [by_message_id, by_provider_id])
async def test_signed_provider_hard_bounces_pause_the_sender_soft_ones_do_not(
    session_factory: SessionFactory, sendgrid: SendGrid, sent: Sent, named: Any
) -> None:
    sf, sender_id, ids = session_factory, sent.sender_id, sent.mail
    mail = await named(sf, ids)

    def bounce(i: int, n: int, kind: str = "bounce") -> dict[str, Any]:
        return sendgrid_event("bounce", f"p{i}@lead.test", n, type=kind, reason="550 5.1.1 no such user", **mail(i))

    # one hard bounce (1 of 20 is not over 5%) and one soft (`blocked`: never counted)
    first = [bounce(0, 1000 + sender_id), bounce(1, 2000 + sender_id, kind="blocked")]
    answer = await sendgrid.post(first)
    assert answer["recorded"] == 1, answer  # the soft bounce is a record, the hard one a consequence
    async with sf() as s:
        statuses = (await s.execute(select(Delivery.status).where(Delivery.sender_id == sender_id))).scalars().all()
    assert (statuses.count("bounced"), statuses.count("sent")) == (1, 19)
    assert (await sender_row(sf, sender_id)).paused_at is None
    assert (await sendgrid.post(first))["duplicates"] == 2  # a replay changes nothing
    # Two more hard bounces in one batch (applied concurrently): the sender is paused once.
    await sendgrid.post([bounce(2, 3000 + sender_id), bounce(3, 4000 + sender_id)])
    acct = await sender_row(sf, sender_id)
    assert (acct.paused_kind, acct.paused_until) == ("bounce_rate", None)
    assert "2 of the last 20 sends bounced" in (acct.paused_reason or "")
    assert [e.data["kind"] for e in await events_of(sf, EventType.SENDER_PAUSED)] == ["bounce_rate"]

"""Helpers for engine tests: people, senders, sequences and a fully wired worker.

Everything is real: rows go to the test's PostgreSQL database, the worker is the one
`worker.py` builds, email goes to an aiosmtpd server and X/relay calls go to local
HTTP servers (tests/fakes.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from activities.channels.email import EmailChannel, SmtpPool
from activities.channels.relay import RelayChannel
from activities.channels.x import XChannel, make_x_client
from activities.delivery import DeliveryConfig
from db.session import SessionFactory
from db.tables import Enrollment, Event, Identity, Person, SenderAccount, Sequence, SequenceVersion
from models.enrollment import EnrollmentInput, SequenceRef, StatusView
from models.sequence import SequenceDefinition
from models.sequence_checks import validate_definition
from tests.eventually import eventually
from worker import WorkerDeps, Workers, build_worker
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for
from workflows.search_attributes import PERSON_ID, SEQUENCE_NAME, SEQUENCE_VERSION

LINK_SECRET = "test-link-secret"


async def make_person(
    sf: SessionFactory,
    *,
    email: str | None = None,
    x: str | None = None,
    linkedin: str | None = None,
    xmtp: str | None = None,
    first_name: str = "Ada",
    company: str = "Acme",
    timezone: str = "UTC",
    fields: dict[str, Any] | None = None,
) -> int:
    """Insert a person with identities; returns the id."""
    async with sf() as s, s.begin():
        person = Person(
            first_name=first_name,
            last_name="Lovelace",
            company=company,
            timezone=timezone,
            fields=fields or {},
        )
        s.add(person)
        await s.flush()
        for channel, value in (("email", email), ("x", x), ("linkedin", linkedin), ("xmtp", xmtp)):
            if value:
                s.add(Identity(person_id=person.id, channel=channel, value=value))
        return int(person.id)


async def make_sender(
    sf: SessionFactory,
    channel: str,
    address: str,
    *,
    per_hour: int = 1000,
    per_day: int = 10000,
    spacing: float = 0.0,
    jitter: float = 0.0,
) -> int:
    """Insert a sender account with generous caps by default."""
    async with sf() as s, s.begin():
        acct = SenderAccount(
            channel=channel,
            address=address,
            per_hour=per_hour,
            per_day=per_day,
            min_spacing_seconds=spacing,
            jitter_seconds=jitter,
        )
        s.add(acct)
        await s.flush()
        return int(acct.id)


async def all_senders(sf: SessionFactory) -> None:
    """One sender per channel, uncapped for practical purposes."""
    await make_sender(sf, "email", "sales@acme.test")
    await make_sender(sf, "x", "900")
    await make_sender(sf, "linkedin", "https://www.linkedin.com/in/seller")
    await make_sender(sf, "xmtp", "0x" + "ab" * 20)


async def store_version(sf: SessionFactory, raw: dict[str, Any] | str) -> tuple[SequenceRef, SequenceDefinition]:
    """Validate and store a version directly (the CLI path has its own tests)."""
    data = yaml.safe_load(raw) if isinstance(raw, str) else raw
    defn = validate_definition(data)
    digest = hashlib.sha256(json.dumps(defn.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    async with sf() as s, s.begin():
        seq = (await s.execute(select(Sequence).where(Sequence.name == defn.name))).scalar_one_or_none()
        if seq is None:
            seq = Sequence(name=defn.name)
            s.add(seq)
            await s.flush()
        count = len((await s.execute(select(SequenceVersion.id).where(SequenceVersion.sequence_id == seq.id))).all())
        version = SequenceVersion(
            sequence_id=seq.id,
            version=count + 1,
            content_hash=digest,
            definition=defn.model_dump(mode="json"),
            source=json.dumps(data),
        )
        s.add(version)
        await s.flush()
        ref = SequenceRef(
            sequence_id=seq.id,
            sequence_name=defn.name,
            version_id=version.id,
            version=version.version,
        )
    return ref, defn


async def start_enrollment(
    client: Client,
    task_queue: str,
    sf: SessionFactory,
    ref: SequenceRef,
    defn: SequenceDefinition,
    person_id: int,
    *,
    timezone: str | None = None,
    max_steps_per_run: int = 500,
    start_signal: str | None = None,
    start_signal_args: list[Any] | None = None,
) -> WorkflowHandle[Any, Any]:
    """Insert the enrollment row and start its workflow."""
    async with sf() as s, s.begin():
        row = Enrollment(
            sequence_id=ref.sequence_id,
            sequence_version_id=ref.version_id,
            person_id=person_id,
            workflow_id=workflow_id_for(ref.sequence_name, person_id),
        )
        s.add(row)
        await s.flush()
        enrollment_id = int(row.id)
    return await client.start_workflow(
        EnrollmentWorkflow.run,
        EnrollmentInput(
            enrollment_id=enrollment_id,
            person_id=person_id,
            person_timezone=timezone,
            sequence=ref,
            definition=defn,
            max_steps_per_run=max_steps_per_run,
        ),
        id=workflow_id_for(ref.sequence_name, person_id),
        task_queue=task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SEQUENCE_NAME, ref.sequence_name),
                SearchAttributePair(SEQUENCE_VERSION, ref.version),
                SearchAttributePair(PERSON_ID, str(person_id)),
            ]
        ),
        start_signal=start_signal,
        start_signal_args=start_signal_args or [],
    )


async def wait_for_status(
    handle: WorkflowHandle[Any, Any],
    predicate: Callable[[StatusView], bool],
    *,
    attempts: int = 400,
) -> StatusView:
    """Query until the status satisfies `predicate` (bounded; yields between tries)."""

    async def matched() -> StatusView | None:
        view = await handle.query(EnrollmentWorkflow.status)
        return view if predicate(view) else None

    view = await eventually(matched, "the enrollment's status to match", tries=attempts)
    assert view is not None  # eventually() returns only a truthy value
    await wait_until_settled(handle)
    return view


_BUSY = {
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
}


async def wait_until_settled(handle: WorkflowHandle[Any, Any], *, attempts: int = 400) -> None:
    """Wait until the server has recorded what the workflow's last task decided.

    A query can answer from the worker's state before the workflow task that started a
    timer has completed on the server; skipping time then (`env.sleep`) would skip it
    before the timer exists. The history's last event tells: nothing scheduled or running.
    """

    async def settled() -> bool:
        history = await handle.fetch_history()
        return bool(history.events) and history.events[-1].event_type not in _BUSY

    await eventually(settled, "the workflow to settle (a task stayed scheduled or running)", tries=attempts)


async def events_of(sf: SessionFactory, type_: str | None = None) -> list[Event]:
    """Every logged event (optionally of one type), in order."""
    async with sf() as s:
        q = select(Event).order_by(Event.id)
        if type_:
            q = q.where(Event.type == type_)
        return list((await s.execute(q)).scalars())


@dataclass
class Channels:
    """The real channel clients pointed at the test's local servers."""

    email: EmailChannel
    x: XChannel
    relay: RelayChannel

    def mapping(self) -> dict[str, Any]:
        return {"email": self.email, "x": self.x, "linkedin": self.relay, "xmtp": self.relay}

    async def aclose(self) -> None:
        await self.email.aclose()
        await self.x.aclose()
        await self.relay.aclose()


def make_channels(smtp: Any, x: Any, relay: Any) -> Channels:
    """Channel clients for the test's SMTP server and fake X / relay servers."""
    import httpx

    return Channels(
        email=EmailChannel(SmtpPool(smtp.host, smtp.port, size=2, timeout=10), default_footer="1 Test St"),
        x=XChannel(make_x_client(x.base_url, x.token, timeout=10)),
        relay=RelayChannel(httpx.AsyncClient(base_url=relay.base_url, timeout=10), relay.token, relay.signing_key),
    )


@asynccontextmanager
async def running_worker(
    client: Client,
    task_queue: str,
    sf: SessionFactory,
    channels: Channels,
    *,
    touch_cap: int = 0,
    fault: Callable[[str], None] | None = None,
    delivery: dict[str, Any] | DeliveryConfig | None = None,
    **kwargs: Any,
) -> AsyncIterator[Workers]:
    """The production worker (build_worker) wired to the test's servers.

    `delivery`: overrides of the test DeliveryConfig, or the DeliveryConfig itself.
    """
    deps = WorkerDeps(
        session_factory=sf,
        channels=channels.mapping(),
        delivery=delivery
        if isinstance(delivery, DeliveryConfig)
        else DeliveryConfig(
            **{
                "public_base_url": "https://links.acme.test",
                "link_secret": LINK_SECRET,
                "postal_address": "Acme Inc, 1 Test Street, Springfield",
                "person_daily_touch_cap": touch_cap,
                **(delivery or {}),
            }
        ),
        fault=fault,
    )
    worker = build_worker(client, task_queue, deps, **kwargs)
    async with worker:
        yield worker


ONE_DAY = timedelta(days=1)


class Crash:
    """Simulates the worker dying at one point, once (the worker's `fault` hook)."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.fired = 0

    def __call__(self, where: str) -> None:
        if where == self.point and not self.fired:
            self.fired += 1
            raise RuntimeError(f"simulated crash {where}")


@pytest.fixture
def wired(
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    x_server: Any,
    relay_server: Any,
) -> Callable[..., Any]:
    """An async context manager factory: the production worker, with options, on local servers.

    Import it into a test module (with `x_server` and `relay_server` from tests/fakes.py).
    """

    @asynccontextmanager
    async def run(**kw: Any) -> AsyncIterator[Any]:
        channels = make_channels(smtp_server, x_server, relay_server)
        try:
            async with running_worker(temporal_env.client, task_queue, session_factory, channels, **kw) as worker:
                yield worker
        finally:
            await channels.aclose()

    return run

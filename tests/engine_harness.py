"""The one test harness for the engine: the production worker on real local servers, and helpers.

Everything is real: rows go to the test's PostgreSQL database, the worker is the one
`worker.py` builds from settings (`worker_deps`, `build_worker`), email goes to an aiosmtpd
server and X/relay calls go to the local stand-ins (devstack/fake_x.py, devstack/fake_relay.py).

Fixtures (registered for every module by tests/conftest.py, nothing to import):

- `wired`: a factory of async context managers, `async with wired(**options) as worker:` runs
  the production worker until the block ends. Options: `settings={...}` (Settings overrides,
  e.g. another SMTP server), `touch_cap` (default: Settings' 1, what users get; a test that
  needs it off passes `touch_cap=0` with its reason), `delivery={...}` (DeliveryConfig overrides) or a
  whole `DeliveryConfig`, `channels={...}` (a channel client configured otherwise than
  settings can say, e.g. a longer timeout), `fault` (the crash hook), `client` / `task_queue` (default: the
  `temporal_client` fixture, i.e. the module's time-skipping server, and the test's queue),
  and Worker keyword arguments.
- `sequencer`: the worker already running with one sender per channel (`all_senders`), as a
  `Sequencer` that makes people (`person`, `lead`), enrolls them (`start`) and reads events;
  `sequencer_stack`: the same before the worker starts, for `async with stack.worker(**options):`.

Factories (people, senders, sequence versions, segments) are devstack/factories.py, shared
with the benchmarks; they are re-exported here for the tests that import them from here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Protocol

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

from activities.channels import ChannelClient, aclose_channels
from activities.delivery import DeliveryConfig
from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Event
from devstack.factories import all_senders, make_person, make_sender, seed_people, sequence_file, store_version
from devstack.fake_relay import RELAY_SIGNING_KEY, RELAY_TOKEN
from devstack.fake_x import X_TOKEN
from models.activities import EnrollmentRef
from models.enrollment import EnrollmentInput, SequenceRef, StatusView
from models.outcomes import EventType
from models.sequence import SequenceDefinition
from services.secret_box import generate_key
from settings import Settings
from tests.eventually import eventually
from worker import Workers, build_worker, worker_deps
from workflows.enrollment import EnrollmentWorkflow, workflow_id_for
from workflows.patches import BASELINE
from workflows.search_attributes import PERSON_ID, SEQUENCE_NAME, SEQUENCE_VERSION

__all__ = [
    "LINK_SECRET",
    "ONE_DAY",
    "SECRETS_KEY",
    "Crash",
    "Sequencer",
    "all_senders",
    "deliveries_of",
    "enroll",
    "enrollment_ref",
    "events_of",
    "harness_settings",
    "make_person",
    "make_sender",
    "seed_people",
    "sequence_file",
    "start_enrollment",
    "store_version",
    "wait_for_status",
    "wait_until_settled",
]

LINK_SECRET = "test-link-secret"
#: The harness worker's SECRETS_KEY (stored SMTP/IMAP passwords and DKIM keys open with it).
SECRETS_KEY = generate_key()
ONE_DAY = timedelta(days=1)


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
    patch_baseline: int = BASELINE,
) -> WorkflowHandle[Any, Any]:
    """Insert the enrollment row and start its workflow (with this code's patch baseline, as
    activities/enroll.py starts it; 0 starts it as runs from before the baseline were)."""
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
            patch_baseline=patch_baseline,
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


async def enroll(
    client: Client, task_queue: str, sf: SessionFactory, raw: dict[str, Any] | str, person_id: int, **kw: Any
) -> WorkflowHandle[Any, Any]:
    """Store `raw` as a new version and enroll `person_id` in it (`kw`: `start_enrollment`'s options)."""
    ref, defn = await store_version(sf, raw)
    return await start_enrollment(client, task_queue, sf, ref, defn, person_id, **kw)


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
    HistoryEventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    HistoryEventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    HistoryEventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    HistoryEventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
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


async def events_of(sf: SessionFactory, type_: EventType | None = None) -> list[Event]:
    """Every logged event (optionally of one type), in order."""
    async with sf() as s:
        q = select(Event).order_by(Event.id)
        if type_:
            q = q.where(Event.type == type_)
        return list((await s.execute(q)).scalars())


async def deliveries_of(sf: SessionFactory) -> list[Delivery]:
    """Every row of the deliveries ledger, in order."""
    async with sf() as s:
        return list((await s.execute(select(Delivery).order_by(Delivery.id))).scalars())


class _Server(Protocol):
    host: str
    port: int


class _Http(Protocol):
    base_url: str


def harness_settings(smtp: _Server | None, x: _Http | None, relay: _Http | None, **overrides: Any) -> Settings:
    """Settings pointing every channel at the test's local servers (`overrides`: any other field).

    The worker is built from these exactly as `worker.py` builds it in production, with the
    limits users get (person touch cap 1): a test that switches one off says so and why.
    """
    values: dict[str, Any] = {
        "sequencer_env": "dev",
        "smtp_host": smtp.host if smtp else "127.0.0.1",
        "smtp_port": smtp.port if smtp else 9,
        "smtp_username": "",
        "smtp_password": SecretStr(""),
        "smtp_starttls": False,
        "smtp_pool_size": 2,
        "smtp_timeout_seconds": 10.0,
        "x_api_base_url": x.base_url if x else "http://127.0.0.1:9",
        "x_api_token": SecretStr(X_TOKEN),
        "relay_url": relay.base_url if relay else "http://127.0.0.1:9",
        "relay_token": SecretStr(RELAY_TOKEN),
        "relay_signing_key": SecretStr(RELAY_SIGNING_KEY),
        "link_secret": SecretStr(LINK_SECRET),
        "webhook_secret": SecretStr("test-webhook-secret"),
        "public_base_url": "https://links.acme.test",
        "postal_address": "Acme Inc, 1 Test Street, Springfield",
        "secrets_key": SecretStr(SECRETS_KEY),
        "unsubscribe_mailto": "",
    }
    values.update(overrides)
    return Settings(**values)


class Crash:
    """Simulates the worker dying at one point, once (the worker's `fault` hook)."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.fired = 0

    def __call__(self, where: str) -> None:
        if where == self.point and not self.fired:
            self.fired += 1
            raise RuntimeError(f"simulated crash {where}")


class Wired(Protocol):
    """The `wired` fixture: `async with wired(**options) as worker:` (see the module docstring)."""

    def __call__(
        self,
        *,
        client: Client | None = ...,
        task_queue: str | None = ...,
        settings: dict[str, Any] | None = ...,
        touch_cap: int | None = ...,
        fault: Callable[[str], None] | None = ...,
        delivery: dict[str, Any] | DeliveryConfig | None = ...,
        channels: Mapping[str, ChannelClient] | None = ...,
        **worker_kwargs: Any,
    ) -> AbstractAsyncContextManager[Workers]: ...


@pytest.fixture
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    """The Temporal client `wired` runs the worker on (a module on the dev server overrides this)."""
    return temporal_env.client


@pytest.fixture
def wired(
    temporal_client: Client,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    x_server: Any,
    relay_server: Any,
) -> Wired:
    """The production worker (worker.py's `worker_deps` + `build_worker`) on the test's local servers."""
    test_queue = task_queue

    @asynccontextmanager
    async def run(
        *,
        client: Client | None = None,
        task_queue: str | None = None,
        settings: dict[str, Any] | None = None,
        touch_cap: int | None = None,
        fault: Callable[[str], None] | None = None,
        delivery: dict[str, Any] | DeliveryConfig | None = None,
        channels: Mapping[str, ChannelClient] | None = None,
        **worker_kwargs: Any,
    ) -> AsyncIterator[Workers]:
        overrides = dict(settings or {})
        if touch_cap is not None:  # default: Settings' (1), what users get
            overrides.setdefault("person_daily_touch_cap", touch_cap)
        deps = worker_deps(
            harness_settings(smtp_server, x_server, relay_server, **overrides), session_factory, fault=fault
        )
        if channels:  # a client configured otherwise than settings can say (closed with the others)
            deps.channels = {**deps.channels, **channels}
        if isinstance(delivery, DeliveryConfig):
            deps.delivery = delivery
        elif delivery:
            deps.delivery = replace(deps.delivery, **delivery)
        try:
            async with build_worker(
                client or temporal_client, task_queue or test_queue, deps, **worker_kwargs
            ) as worker:
                yield worker
        finally:
            await aclose_channels(dict(deps.channels))

    return run


@dataclass
class Sequencer:
    """A running production worker with one sender per channel, and the servers it talks to."""

    env: WorkflowEnvironment
    sf: SessionFactory
    task_queue: str
    smtp: Any
    x: Any
    relay: Any
    #: The `wired` fixture, for `worker()`.
    wired: Wired | None = field(default=None, kw_only=True)

    def worker(self, **options: Any) -> AbstractAsyncContextManager[Workers]:
        """`async with stack.worker(**options):` the production worker (the `wired` options)."""
        assert self.wired is not None, "made without the `wired` fixture"
        return self.wired(**{"client": self.env.client, **options})

    @property
    def client(self) -> Client:
        return self.env.client

    async def person(self, **kw: Any) -> int:
        """A person with a fresh email address (and whatever identities `kw` gives)."""
        kw.setdefault("email", f"{uuid.uuid4().hex[:10]}@lead.test")
        return await make_person(self.sf, **kw)

    async def lead(self, **kw: Any) -> int:
        """A person reachable on every channel (fresh identities unless `kw` gives them)."""
        defaults: dict[str, Any] = {
            "email": f"{uuid.uuid4().hex[:8]}@lead.test",
            "x": str(uuid.uuid4().int % 10**12),
            "linkedin": f"https://www.linkedin.com/in/{uuid.uuid4().hex[:8]}",
            "xmtp": "0x" + uuid.uuid4().hex + "abcdefab",
        }
        defaults.update(kw)
        return await make_person(self.sf, **defaults)

    async def start(self, raw: dict[str, Any] | str, person: int | None = None, **kw: Any) -> WorkflowHandle[Any, Any]:
        """Store `raw` as a new version and enroll `person` (default: a new `lead()`)."""
        pid = person if person is not None else await self.lead()
        return await enroll(self.env.client, self.task_queue, self.sf, raw, pid, **kw)

    async def start_many(self, raw: dict[str, Any], people: list[int]) -> list[WorkflowHandle[Any, Any]]:
        """One version of `raw`, every person in `people` enrolled in it."""
        ref, defn = await store_version(self.sf, raw)
        return [await start_enrollment(self.env.client, self.task_queue, self.sf, ref, defn, p) for p in people]

    async def events(self, type_: EventType | None = None) -> list[Event]:
        return await events_of(self.sf, type_)


@pytest.fixture
async def sequencer_stack(
    temporal_env: WorkflowEnvironment,
    wired: Wired,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    x_server: Any,
    relay_server: Any,
) -> Sequencer:
    """`sequencer` before its worker starts (one sender per channel): `async with stack.worker(**options):`."""
    await all_senders(session_factory)
    return Sequencer(temporal_env, session_factory, task_queue, smtp_server, x_server, relay_server, wired=wired)


@pytest.fixture
async def sequencer(sequencer_stack: Sequencer) -> AsyncIterator[Sequencer]:
    """The production worker running on the module's Temporal server, with `all_senders`."""
    async with sequencer_stack.worker():
        yield sequencer_stack


async def enrollment_ref(sf: SessionFactory, ref: SequenceRef, person_id: int) -> EnrollmentRef:
    """An enrollment row of `person_id` in `ref`, without a workflow (for activities run directly)."""
    async with sf() as s, s.begin():
        row = Enrollment(
            sequence_id=ref.sequence_id,
            sequence_version_id=ref.version_id,
            person_id=person_id,
            workflow_id=f"w-{person_id}",
        )
        s.add(row)
        await s.flush()
        enrollment_id = int(row.id)
    return EnrollmentRef(enrollment_id=enrollment_id, person_id=person_id, sequence=ref, workflow_id=f"w-{person_id}")

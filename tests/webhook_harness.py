"""The webhook app served for real beside the production worker: `hook` and `start_hook`.

`webhooks.app:create_app` runs under a real uvicorn server on a free loopback port, in the
test's event loop, with its lifespan: it makes its own engine on the test's PostgreSQL
database and connects to the time-skipping Temporal server by address, as in production.
The production worker (`wired`, tests/engine_harness.py) runs the enrollment workflows, so
signals really reach them; email goes to the aiosmtpd `smtp_server`.

Fixtures (registered by tests/conftest.py): `hook`, a running app + worker as a `Hook`;
`start_hook(app={...}, worker={...})`, the same with app / worker settings overrides.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory
from db.tables import Delivery, Identity, SendSlot
from models.enrollment import EnrollmentStatus, Phase
from models.outcomes import EventType
from settings import Settings
from tests.engine_harness import Sequencer, Wired, all_senders, events_of, harness_settings, wait_for_status
from tests.eventually import eventually
from webhooks.app import create_app
from webhooks.signature import sign

WEBHOOK_SECRET = "test-webhook-secret"  # not the link secret: each has its own key


@asynccontextmanager
async def serve(app: FastAPI, **config: Any) -> AsyncIterator[str]:
    """Serve `app` with uvicorn (lifespan on) on a free 127.0.0.1 port in this event loop.

    `config`: more uvicorn.Config arguments (`ssl_certfile`/`ssl_keyfile` serve https).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        # readiness: the server sets `started` after the lifespan ran (or the task ends failing)
        await eventually(lambda: server.started or task.done(), "the app to start", tries=2000, interval=0.005)
        if not server.started:
            task.result()
            raise RuntimeError("the app did not start")
        scheme = "https" if "ssl_certfile" in config else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=15)
        sock.close()


def temporal_address(env: WorkflowEnvironment) -> str:
    """host:port of the time-skipping server, for the app to connect to by itself."""
    return env.client.service_client.config.target_host


def app_settings(env: WorkflowEnvironment, database_url: str, **overrides: Any) -> Settings:
    """Settings pointing the app at the test's database, Temporal server and link secret."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "temporal_address": temporal_address(env),
        "webhook_max_body_bytes": 4096,
        **overrides,
    }
    return harness_settings(None, None, None, **values)


def signed(
    body: bytes, *, secret: str = WEBHOOK_SECRET, at: int | None = None, channel: str = "email"
) -> dict[str, str]:
    """The headers a provider sends."""
    stamp = int(time.time()) if at is None else at
    return {"X-Signature": sign(secret, body, stamp, channel=channel), "Content-Type": "application/json"}


def email_sequence(gap: str = "2d", subject: str = "Hello {{ first_name }}", **extra: Any) -> dict[str, Any]:
    """m0 (email, `subject`) → REPLIED → done | NOT_REPLIED after `gap` → m1 (email) → END."""
    return {
        "name": extra.pop("name", f"hook-{uuid.uuid4().hex[:8]}"),
        **extra,
        "steps": [
            {
                "id": "m0",
                "action": "SEND_EMAIL",
                "subject": subject,
                "body": "First mail",
                "html": "<p>First mail</p>",
                "edges": [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": gap, "to": "m1"}],
            },
            {
                "id": "m1",
                "action": "SEND_EMAIL",
                "subject": "Again",
                "body": "Second mail",
                "edges": [{"trigger": "END"}],
            },
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }


@dataclass
class Hook(Sequencer):
    """A running webhook app, a running worker and the servers they talk to."""

    http: httpx.AsyncClient
    base_url: str

    async def post(
        self,
        channel: str,
        payload: dict[str, Any] | bytes,
        *,
        secret: str = WEBHOOK_SECRET,
        at: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        sent = signed(body, secret=secret, at=at, channel=channel) if headers is None else headers
        return await self.http.post(f"/webhooks/{channel}", content=body, headers=sent)

    async def add_identity(self, person_id: int, channel: str, value: str) -> None:
        async with self.sf() as s, s.begin():
            s.add(Identity(person_id=person_id, channel=channel, value=value))

    async def enroll(self, raw: dict[str, Any], person_id: int) -> WorkflowHandle[Any, Any]:
        return await self.start(raw, person_id)

    async def enroll_many(self, raw: dict[str, Any], people: list[int]) -> list[WorkflowHandle[Any, Any]]:
        return await self.start_many(raw, people)

    async def waiting_at(self, handle: WorkflowHandle[Any, Any], step: str = "m0") -> Any:
        return await wait_for_status(handle, lambda v: v.current_step == step and v.phase == "waiting")

    async def count(self, model: Any, *where: Any) -> int:
        async with self.sf() as s:
            return int((await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one())

    def mails_to(self, address: str) -> list[Any]:
        return [m for m in self.smtp.parsed() if m["To"] == address]

    async def enroll_held_by_the_touch_cap(
        self, first_raw: dict[str, Any], held_raw: dict[str, Any], person_id: int
    ) -> tuple[WorkflowHandle[Any, Any], WorkflowHandle[Any, Any]]:
        """One person in two sequences with the default person touch cap (1 a day): `first_raw`'s
        m0 goes out, `held_raw`'s m0 waits for a slot the governor booked a day after it."""
        first = await self.enroll(first_raw, person_id)
        await self.waiting_at(first)
        held = await self.enroll(held_raw, person_id)
        view = await wait_for_status(held, lambda v: v.phase == Phase.WAITING_FOR_SLOT)
        assert (view.status, view.current_step) == (EnrollmentStatus.ACTIVE, "m0")
        async with self.sf() as s:
            booked = sorted(
                (await s.execute(select(SendSlot.slot_at).where(SendSlot.person_id == person_id))).scalars()
            )
        assert len(booked) == 2 and view.until == booked[1], (booked, view.until)
        assert booked[1] - booked[0] >= timedelta(hours=24), booked  # the cap's day after the first send
        deferred = await events_of(self.sf, EventType.DEFERRED_UNTIL)
        assert [(e.enrollment_id, e.data["reason"]) for e in deferred] == [(view.enrollment_id, "person frequency cap")]
        assert await self.count(Delivery, Delivery.enrollment_id == view.enrollment_id) == 0  # nothing claimed
        assert len(self.smtp.messages) == 1
        return first, held


class StartHook(Protocol):
    """`async with start_hook(app={...}, worker={...}) as hook:` (settings overrides for each)."""

    def __call__(
        self, *, app: dict[str, Any] | None = ..., worker: dict[str, Any] | None = ...
    ) -> AbstractAsyncContextManager[Hook]: ...


@pytest.fixture
def start_hook(
    temporal_env: WorkflowEnvironment,
    database_url: str,
    session_factory: SessionFactory,
    task_queue: str,
    wired: Wired,
    smtp_server: Any,
    x_server: Any,
    relay_server: Any,
) -> StartHook:
    """The webhook app (own engine, own Temporal connection) plus the production worker, with options."""

    @asynccontextmanager
    async def run(*, app: dict[str, Any] | None = None, worker: dict[str, Any] | None = None) -> AsyncIterator[Hook]:
        await all_senders(session_factory)
        web = create_app(app_settings(temporal_env, database_url, **(app or {})))
        async with (
            wired(client=temporal_env.client, settings=worker),
            serve(web) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
        ):
            yield Hook(
                temporal_env, session_factory, task_queue, smtp_server, x_server, relay_server, http=http, base_url=base
            )

    return run


#: Worker settings for a test that needs the person touch cap off, e.g. one person in two
#: sequences whose emails both go out at once: `@pytest.mark.parametrize("hook", [TOUCH_CAP_OFF], indirect=True)`.
TOUCH_CAP_OFF: dict[str, Any] = {"person_daily_touch_cap": 0}


@pytest.fixture
async def hook(start_hook: StartHook, request: pytest.FixtureRequest) -> AsyncIterator[Hook]:
    """The webhook app plus the production worker, with the defaults users get (indirect param: worker settings)."""
    async with start_hook(worker=getattr(request, "param", None)) as running:
        yield running


async def signals_in_history(handle: WorkflowHandle[Any, Any], name: str) -> int:
    """How many times the workflow was signalled `name` (its history, not our bookkeeping)."""
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("workflow_execution_signaled_event_attributes")
        and e.workflow_execution_signaled_event_attributes.signal_name == name
    )

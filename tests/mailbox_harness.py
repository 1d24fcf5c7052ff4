"""The mailbox watcher wired like production, for tests and the bench.

- `watcher_worker(...)`: the production worker (build_worker) on its own task queue with
  the settings that decrypt stored connections; the watcher workflow and activity run
  there, the enrollments keep running on the `hook` worker.
- `connect_mailbox(...)`: store an IMAP connection on a sender the way `senders add --imap` does.
- `wait_state(...)`: poll the stored watcher state until a predicate holds (bounded).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from pydantic import SecretStr
from sqlalchemy import select
from temporalio.client import Client

from activities.delivery import DeliveryConfig
from activities.mailbox import current_state
from db.session import SessionFactory
from db.tables import MailboxState, SenderAccount, SenderConnection
from services.mail_urls import parse_mail_url
from services.secret_box import generate_key
from services.sender_connections import save_connection
from settings import Settings
from tests.engine_harness import LINK_SECRET
from worker import WorkerDeps, Workers, build_worker

KEY = generate_key()
SETTINGS = Settings(secrets_key=SecretStr(KEY), webhook_secret=SecretStr(LINK_SECRET))
#: Fast heartbeats so a dropped connection or a dead worker is noticed quickly in tests.
FAST = {"heartbeat_seconds": 0.2, "heartbeat_timeout_seconds": 5.0}


async def connect_mailbox(
    sf: SessionFactory, address: str, *, host: str, port: int, user: str, password: str, folder: str
) -> int:
    """Give the sender `address` an IMAP connection (stored encrypted); its id."""
    url = f"imap://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(folder, safe='')}"
    async with sf() as s, s.begin():
        sender = (
            await s.execute(
                select(SenderAccount).where(SenderAccount.channel == "email", SenderAccount.address == address)
            )
        ).scalar_one()
        await save_connection(s, sender, parse_mail_url(url, kind="imap", flag="--imap"), settings=SETTINGS)
        return int(sender.id)


@asynccontextmanager
async def watcher_worker(client: Client, task_queue: str, sf: SessionFactory, **kwargs: Any) -> AsyncIterator[Workers]:
    """The production worker on `task_queue`, able to decrypt the stored mailbox connections."""
    deps = WorkerDeps(
        session_factory=sf,
        channels={},
        delivery=DeliveryConfig(
            public_base_url="https://links.acme.test",
            link_secret=LINK_SECRET,
            postal_address="Acme Inc, 1 Test Street, Springfield",
        ),
        settings=SETTINGS,
    )
    worker = build_worker(client, task_queue, deps, **kwargs)
    async with worker:
        yield worker


async def wait_state(
    sf: SessionFactory, sender_id: int, predicate: Callable[[MailboxState], bool], *, attempts: int = 1500
) -> MailboxState:
    """The watcher's stored state once `predicate` holds (bounded polling)."""
    state = None
    for _ in range(attempts):
        state = await current_state(sf, sender_id)
        if state is not None and predicate(state):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"mailbox state never matched; last: {state and vars(state)}")


async def connection_status(sf: SessionFactory, sender_id: int) -> tuple[str | None, str | None]:
    """What `senders list` shows for the sender's mailbox: (status, reason)."""
    async with sf() as s:
        row = (
            await s.execute(
                select(SenderConnection).where(SenderConnection.sender_id == sender_id, SenderConnection.kind == "imap")
            )
        ).scalar_one()
        return row.status, row.status_reason

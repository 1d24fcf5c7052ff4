"""The mailbox watcher wired like production, for tests and the bench.

- The watchers' worker is the harness's `wired(task_queue=...)`: its settings (SETTINGS here)
  hold the SECRETS_KEY that decrypts the stored connections.
- `connect_mailbox(...)`: store an IMAP connection on a sender the way `senders add --imap` does.
- `wait_state(...)`: the stored watcher state once a predicate holds (`eventually`).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from sqlalchemy import select

from activities.mailbox import current_state
from db.session import SessionFactory
from db.tables import MailboxState, SenderAccount, SenderConnection
from services.mail_urls import parse_mail_url
from services.sender_connections import save_connection
from tests.engine_harness import SECRETS_KEY, harness_settings
from tests.eventually import eventually

KEY = SECRETS_KEY
SETTINGS = harness_settings(None, None, None)
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


async def wait_state(
    sf: SessionFactory, sender_id: int, predicate: Callable[[MailboxState], bool], *, attempts: int = 1500
) -> MailboxState:
    """The watcher's stored state once `predicate` holds (bounded polling)."""

    async def matched() -> MailboxState | None:
        state = await current_state(sf, sender_id)
        return state if state is not None and predicate(state) else None

    found = await eventually(matched, f"mailbox state of sender {sender_id} to match", tries=attempts)
    assert found is not None  # eventually() returns only a truthy value
    return found


async def connection_status(sf: SessionFactory, sender_id: int) -> tuple[str | None, str | None]:
    """What `senders list` shows for the sender's mailbox: (status, reason)."""
    async with sf() as s:
        row = (
            await s.execute(
                select(SenderConnection).where(SenderConnection.sender_id == sender_id, SenderConnection.kind == "imap")
            )
        ).scalar_one()
        return row.status, row.status_reason

"""`starter.py reply` for email: a real RFC 5322 reply, appended to the sender's own mailbox.

So a newcomer watches a reply travel the way a prospect's does: IMAP APPEND into the
mailbox that sent the person's last email -> the mailbox watcher (IDLE) -> the inbound
pipeline -> the lead's workflow. The reply is threaded under that email (In-Reply-To and
References carry its Message-ID) and comes from the person's address.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Identity, SenderAccount
from models.outcomes import DeliveryStatus
from services.mailbox_login import MailboxError, open_imap
from services.sender_connections import imap_connection, token_cache
from settings import Settings


class ReplyError(LookupError):
    """The reply cannot be appended (no email sent to the person, no mailbox on that sender)."""


@dataclass
class AppendedReply:
    """Where the reply went."""

    sender_id: int
    mailbox: str
    message_id: str
    in_reply_to: str


def compose_reply(*, sender: str, to: str, in_reply_to: str, text: str, when: object = None) -> tuple[bytes, str]:
    """The reply's bytes (CRLF, as a mail client writes them) and its Message-ID."""
    from datetime import UTC, datetime

    msg = EmailMessage(policy=SMTP)
    message_id = make_msgid(idstring=uuid.uuid4().hex[:12], domain=sender.rsplit("@", 1)[-1] or "localhost")
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "Re: your email"
    msg["Date"] = format_datetime(when if isinstance(when, datetime) else datetime.now(UTC))
    msg["Message-ID"] = message_id
    msg["In-Reply-To"] = in_reply_to
    msg["References"] = in_reply_to
    msg.set_content(f"{text}\n\nOn an earlier day, {to} wrote:\n> (your email)\n")
    return msg.as_bytes(), message_id


async def append_reply(session_factory: SessionFactory, settings: Settings, person_id: int, text: str) -> AppendedReply:
    """Append a reply from `person_id` under their last email to the mailbox that sent it."""
    async with session_factory() as session:
        row = (
            await session.execute(
                select(Delivery.message_id, Delivery.sender_id, Identity.value, SenderAccount.address)
                .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
                .join(Identity, Identity.id == Delivery.identity_id)
                .join(SenderAccount, SenderAccount.id == Delivery.sender_id)
                .where(
                    Enrollment.person_id == person_id,
                    Delivery.channel == "email",
                    Delivery.message_id.is_not(None),
                    Delivery.status.in_([DeliveryStatus.SENT, DeliveryStatus.UNCERTAIN]),
                )
                .order_by(Delivery.id.desc())
                .limit(1)
            )
        ).first()
    if row is None:
        raise ReplyError(f"person {person_id} has not been sent an email yet: nothing to reply to")
    conn = await imap_connection(session_factory, settings, int(row.sender_id))
    if conn is None:
        raise ReplyError(f"sender {row.sender_id} ({row.address}) has no mailbox (IMAP) connection")
    raw, message_id = compose_reply(
        sender=str(row.value), to=str(row.address), in_reply_to=str(row.message_id), text=text
    )
    tokens = token_cache(session_factory, settings)
    try:
        client = await open_imap(conn, tokens)
        try:
            folder = conn.folder or "INBOX"
            resp = await client.append(raw, mailbox=folder)
            if resp.result != "OK":
                raise ReplyError(f"{conn.what}: APPEND to {folder} refused: {resp.lines}")
        finally:
            try:
                await client.logout()
            except Exception:  # noqa: S110 - closing anyway
                pass
    except MailboxError as err:
        raise ReplyError(str(err)) from err
    finally:
        await tokens.aclose()
    return AppendedReply(int(row.sender_id), f"{conn.host}:{conn.port}/{folder}", message_id, str(row.message_id))

"""Sending accounts and their per-channel defaults.

Defaults are lowest for X and LinkedIn (the providers that ban for bursts) and higher
for email, as v1 learned. Re-adding an account updates its caps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import SenderAccount, SenderConnection
from models.sequence import is_timezone
from services.mail_urls import MailUrl
from services.sender_connections import OAuthInput, remove_connection, save_connection
from settings import Settings


@dataclass(frozen=True)
class SenderDefaults:
    """Caps and pacing used when `senders add` leaves them out."""

    per_hour: int
    per_day: int
    spacing: float
    jitter: float


CHANNEL_DEFAULTS = {
    "email": SenderDefaults(per_hour=50, per_day=400, spacing=60.0, jitter=30.0),
    "x": SenderDefaults(per_hour=10, per_day=50, spacing=300.0, jitter=120.0),
    "linkedin": SenderDefaults(per_hour=8, per_day=40, spacing=300.0, jitter=120.0),
    "xmtp": SenderDefaults(per_hour=30, per_day=300, spacing=60.0, jitter=30.0),
}


async def add_sender(
    session_factory: SessionFactory,
    *,
    channel: str,
    address: str,
    per_hour: int | None = None,
    per_day: int | None = None,
    spacing: float | None = None,
    jitter: float | None = None,
    warmup_start_per_day: int | None = None,
    warmup_days: int = 0,
    timezone: str = "UTC",
    display_name: str | None = None,
    smtp: MailUrl | None = None,
    imap: MailUrl | None = None,
    oauth: OAuthInput | None = None,
    remove: frozenset[str] = frozenset(),
    settings: Settings | None = None,
) -> SenderAccount:
    """Create or update a sender account (ValueError names the bad field).

    `smtp`/`imap` set the sender's own connections (stored encrypted, in the same
    transaction); connections not given are kept, those named in `remove` are deleted.
    """
    if channel not in CHANNEL_DEFAULTS:
        raise ValueError(f"--channel: unknown channel {channel!r} (use {', '.join(CHANNEL_DEFAULTS)})")
    d = CHANNEL_DEFAULTS[channel]
    per_hour = d.per_hour if per_hour is None else per_hour
    per_day = d.per_day if per_day is None else per_day
    spacing = d.spacing if spacing is None else spacing
    jitter = d.jitter if jitter is None else jitter
    if per_hour <= 0:
        raise ValueError(f"--per-hour must be positive, got {per_hour}")
    if per_day <= 0:
        raise ValueError(f"--per-day must be positive, got {per_day}")
    if per_hour > per_day:
        raise ValueError(f"--per-hour ({per_hour}) cannot exceed --per-day ({per_day})")
    if spacing < 0 or jitter < 0:
        raise ValueError("--spacing and --jitter cannot be negative")
    if warmup_start_per_day is not None and not 0 < warmup_start_per_day <= per_day:
        raise ValueError(f"--warmup-start must be between 1 and --per-day ({per_day})")
    if warmup_days < 0:
        raise ValueError("--warmup-days cannot be negative")
    if not is_timezone(timezone):
        raise ValueError(f"--timezone: {timezone!r} is not an IANA time zone")
    address = address.strip()
    if channel == "email":
        try:
            address = validate_email(address, check_deliverability=False).normalized.lower()
        except EmailNotValidError as err:
            raise ValueError(f"--address: {address!r} is not an email address ({err})") from None
    if not address:
        raise ValueError("--address is empty")
    if (smtp or imap or remove) and channel != "email":
        raise ValueError(f"--smtp/--imap: only email senders have mailbox connections, not {channel}")
    if (smtp or imap) and settings is None:
        raise ValueError("add_sender: connections need the settings (SECRETS_KEY)")
    async with session_factory() as session, session.begin():
        acct = (
            await session.execute(
                select(SenderAccount).where(SenderAccount.channel == channel, SenderAccount.address == address)
            )
        ).scalar_one_or_none()
        if acct is None:
            acct = SenderAccount(channel=channel, address=address)
            session.add(acct)
        acct.per_hour, acct.per_day = per_hour, per_day
        acct.min_spacing_seconds, acct.jitter_seconds = spacing, jitter
        acct.warmup_start_per_day, acct.warmup_days = warmup_start_per_day, warmup_days
        acct.timezone, acct.active = timezone, True
        if display_name is not None:
            acct.display_name = display_name
        await session.flush()
        for kind in sorted(remove):
            await remove_connection(session, acct.id, "imap" if kind == "imap" else "smtp")
        for url in (smtp, imap):
            if url is not None and settings is not None:
                await save_connection(session, acct, url, settings=settings, oauth=oauth)
    return acct


@dataclass
class SenderView:
    """A sender with its connections, for `senders list` (no secret in it)."""

    account: SenderAccount
    connections: dict[str, SenderConnection] = field(default_factory=dict)


async def list_senders(session_factory: SessionFactory, channel: str | None = None) -> list[SenderView]:
    """Every sender (optionally of one channel) with its own SMTP/IMAP connections."""
    async with session_factory() as session:
        query = select(SenderAccount).order_by(SenderAccount.id)
        if channel is not None:
            query = query.where(SenderAccount.channel == channel)
        views = {a.id: SenderView(a) for a in (await session.execute(query)).scalars()}
        if views:
            rows = await session.execute(select(SenderConnection).where(SenderConnection.sender_id.in_(list(views))))
            for row in rows.scalars():
                views[row.sender_id].connections[row.kind] = row
    return list(views.values())

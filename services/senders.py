"""Sending accounts and their per-channel defaults.

Defaults are lowest for X and LinkedIn (the providers that ban for bursts) and higher
for email, as v1 learned. Re-adding an account updates its caps.
"""

from __future__ import annotations

from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import SenderAccount
from models.sequence import is_timezone


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
) -> SenderAccount:
    """Create or update a sender account (ValueError names the bad field)."""
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
    return acct

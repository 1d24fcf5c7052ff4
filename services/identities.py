"""Identity values: one normal form per channel, so the identity graph can match them.

The same human arrives as "Ada@Example.com", "@ada_l", or a LinkedIn URL with
tracking parameters; normalizing on the way in (imports) and on the way out (webhook
lookups) is what makes cross-channel dedup and reply matching work.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from db.tables import Identity, Person
from models.identity_kinds import FIELD_KIND

#: CSV column → identity channel (the one table: models/identity_kinds.py).
COLUMN_CHANNEL = FIELD_KIND
_HANDLE = re.compile(r"^[A-Za-z0-9_]{1,15}$")
_XMTP = re.compile(r"^0x[0-9a-f]{40}$")


def normalize(channel: str, value: str) -> str:
    """The canonical form of an identity value (ValueError says what is wrong)."""
    raw = (value or "").strip()
    if not raw:
        raise ValueError(f"empty {channel} identity")
    if channel == "email":
        try:
            return validate_email(raw, check_deliverability=False).normalized.lower()
        except EmailNotValidError as err:
            raise ValueError(f"bad email {raw!r}: {err}") from None
    if channel == "x":
        if not raw.isdigit():
            raise ValueError(f"bad X user id {raw!r}: digits only")
        return raw
    if channel == "x_handle":
        handle = raw.removeprefix("@")
        if not _HANDLE.match(handle):
            raise ValueError(f"bad X handle {raw!r}: 1-15 letters, digits or _")
        return handle.lower()
    if channel == "linkedin":
        url = raw if "://" in raw else "https://" + raw
        parts = urlsplit(url)
        host = parts.netloc.lower().removeprefix("www.")
        path = parts.path.rstrip("/")
        if not host.endswith("linkedin.com") or not path.startswith("/in/") or len(path) <= 4:
            raise ValueError(f"bad LinkedIn URL {raw!r}: expected https://www.linkedin.com/in/NAME")
        return f"https://www.linkedin.com{path.lower()}"
    if channel == "xmtp":
        addr = raw.lower()
        if not _XMTP.match(addr):
            raise ValueError(f"bad XMTP address {raw!r}: expected 0x and 40 hex digits")
        return addr
    raise ValueError(f"unknown identity channel {channel!r}")


def lookup_value(channel: str, value: str) -> str:
    """The form to look an inbound value up by (ValueError when it cannot be an identity).

    `normalize()`, except that an email address on a reserved or special-use domain
    (`.test`, `.local`, …), which the validator refuses for sending, is still matched by
    its lower-cased form: whoever stored it, a reply from it belongs to its person.
    """
    try:
        return normalize(channel, value)
    except ValueError:
        raw = (value or "").strip()
        local, at, domain = raw.rpartition("@")
        if channel == "email" and at and local and "." in domain and not any(c.isspace() for c in raw):
            return raw.lower()
        raise


async def find_person_by_identity(session: AsyncSession, channel: str, value: str) -> Person | None:
    """The person owning this identity, or None (ValueError for a malformed value)."""
    canonical = lookup_value(channel, value)
    return (
        await session.execute(
            select(Person)
            .join(Identity, Identity.person_id == Person.id)
            .where(Identity.channel == channel, Identity.value == canonical)
        )
    ).scalar_one_or_none()


class IdentityOwnedError(ValueError):
    """The identity to attach to a person already belongs to another person."""

    def __init__(self, channel: str, value: str, owner_id: int, person_id: int) -> None:
        super().__init__(
            f"{channel} identity {value!r} already belongs to person {owner_id}, not person {person_id} "
            "(the same account imported as two people?); merge them or correct the data"
        )
        self.channel = channel
        self.value = value
        self.owner_id = owner_id
        self.person_id = person_id


async def attach_identity(
    session: AsyncSession,
    person_id: int,
    channel: str,
    value: str,
    *,
    consent: str = "unknown",
) -> tuple[Identity, bool]:
    """Store `value` as the person's identity on `channel`: (the row, whether it is new).

    Idempotent and safe under concurrency (INSERT … ON CONFLICT DO NOTHING on the unique
    (channel, value), then the owner is read): the same value for the same person is
    returned as it is.

    Raises:
        ValueError: the value is malformed for the channel.
        IdentityOwnedError: another person owns this identity (nothing is changed).
    """
    canonical = normalize(channel, value)
    inserted = (
        await session.execute(
            insert(Identity)
            .values(person_id=person_id, channel=channel, value=canonical, consent=consent)
            .on_conflict_do_nothing(constraint="uq_identities_channel_value")
            .returning(Identity.id)
        )
    ).scalar_one_or_none()
    row = (
        await session.execute(select(Identity).where(Identity.channel == channel, Identity.value == canonical))
    ).scalar_one()
    if row.person_id != person_id:
        raise IdentityOwnedError(channel, canonical, int(row.person_id), person_id)
    return row, inserted is not None

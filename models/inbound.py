"""The one normalized inbound event every source hands to the inbound pipeline.

The signed webhook, the mailbox watchers (IMAP) and the provider adapters each turn
what they received into an `InboundEvent`; `services.inbound_pipeline.InboundPipeline`
does the rest (dedup, identity resolution, consent rules, classification, signals).
Pure pydantic: no I/O, safe to pass through Temporal.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from models.outcomes import InboundStatus

#: What a source says happened. `auto_reply` is an auto-responder recognised by its
#: headers (handled as out-of-office, never as a reply); `unknown` is mail that is none
#: of the others and could not be read as a reply (recorded, never an error).
InboundType = Literal[
    "reply",
    "connection_accepted",
    "followed_back",
    "replied_to_note",
    "bounce",
    "complaint",
    "auto_reply",
    "unknown",
]
INBOUND_TYPES: tuple[str, ...] = InboundType.__args__  # type: ignore[attr-defined]


class MailboxRef(BaseModel):
    """Where a message read by IMAP lies (for the audit trail; never used to change mail)."""

    sender_id: int
    folder: str
    uidvalidity: int
    uid: int


class InboundEvent(BaseModel):
    """One thing that came in, from any source, in one shape.

    `event_id` is the deduplication key within `channel`: the provider's event id for
    webhooks, the Message-ID for mail read from a mailbox (so the same message read twice,
    after a reconnect or a UIDVALIDITY change, has an effect once).
    """

    source: str = "webhook"
    channel: str
    event_id: str = Field(min_length=1, max_length=300)
    type: InboundType
    sender: str = Field(min_length=1, max_length=512)
    text: str | None = Field(default=None, max_length=100_000)
    in_reply_to: str | None = Field(default=None, max_length=1000)
    references: list[str] = Field(default_factory=list, max_length=100)
    occurred_at: datetime | None = None
    #: Bounces: permanent (5.x.x, hard) or temporary (4.x.x, soft; recorded only).
    permanent: bool = True
    #: Bounces and complaints: Message-IDs of our own mail they are about, and the
    #: recipient addresses they name (matched to our deliveries and identities).
    about_message_ids: list[str] = Field(default_factory=list, max_length=100)
    about_recipients: list[str] = Field(default_factory=list, max_length=100)
    provider_message_id: str | None = Field(default=None, max_length=400)
    subject: str | None = Field(default=None, max_length=1000)
    #: Why a message is `unknown` (for example "malformed MIME: ..."), diagnostic codes.
    detail: dict[str, Any] = Field(default_factory=dict)
    mailbox: MailboxRef | None = None

    @field_validator("references", "about_message_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        """Accept the raw header too: `References: <a@x> <b@y>` as one string."""
        if isinstance(value, str):
            return [part for part in re.split(r"[\s,]+", value) if part]
        return value


class InboundOutcome(BaseModel):
    """What the pipeline did with one event."""

    status: InboundStatus
    person_id: int | None = None
    enrollments: int = 0
    classification: str | None = None

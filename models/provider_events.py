"""A provider's event (ESP webhook, X Account Activity) in one normalized shape.

Each adapter in webhooks/providers/ parses its provider's body into these; the provider
ingest (operations/provider_ingest.py) records or applies them. Pure pydantic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["EventKind", "ProviderEvent"]

EventKind = Literal[
    "delivered",
    "bounce",
    "deferred",
    "complaint",
    "unsubscribe",
    "open",
    "click",
    "reply",
    "followed_back",
    "ignored",
]


class ProviderEvent(BaseModel):
    """One provider event in the shape the inbound pipeline understands.

    `event_id` is the provider's own event id (deduplication key, unique per provider);
    `delivery_key`, `message_ids` and `recipient` are what the event can be matched to a
    ledger row by, in that order of trust.
    """

    provider: str
    event_id: str = Field(min_length=1, max_length=280)
    kind: EventKind
    channel: Literal["email", "x"] = "email"
    bounce: Literal["hard", "soft"] | None = None
    recipient: str | None = None
    sender: str | None = None
    message_ids: list[str] = Field(default_factory=list)
    delivery_key: str | None = None
    occurred_at: datetime | None = None
    url: str | None = None
    text: str | None = None
    in_reply_to: str | None = None
    references: list[str] = Field(default_factory=list)
    reason: str | None = None
    custom: dict[str, str] = Field(default_factory=dict)

"""The body of `POST /webhooks/{channel}` and its translation into the pipeline's `InboundEvent`."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from models.inbound import InboundEvent

#: The kinds of `InboundType` a caller of the signed webhook may send (the rest are the mail reader's).
WebhookType = Literal["reply", "connection_accepted", "followed_back", "replied_to_note", "bounce", "complaint"]


class InboundPayload(BaseModel):
    """The body of `POST /webhooks/{channel}`."""

    event_id: str = Field(min_length=1, max_length=300)
    type: WebhookType
    from_: str = Field(alias="from", min_length=1, max_length=512)
    text: str | None = Field(default=None, max_length=100_000)
    in_reply_to: str | None = Field(default=None, max_length=1000)
    references: list[str] = Field(default_factory=list, max_length=100)
    occurred_at: datetime | None = None

    model_config = {"populate_by_name": True, "extra": "ignore"}

    @field_validator("references", mode="before")
    @classmethod
    def _split_references(cls, value: Any) -> Any:
        """Accept the raw header too: `References: <a@x> <b@y>` as one string."""
        if isinstance(value, str):
            return [part for part in re.split(r"[\s,]+", value) if part]
        return value

    def to_event(self, channel: str) -> InboundEvent:
        """The normalized event (a webhook bounce names the address that bounced in `from`)."""
        return InboundEvent(
            source="webhook",
            channel=channel,
            event_id=self.event_id,
            type=self.type,
            sender=self.from_,
            text=self.text,
            in_reply_to=self.in_reply_to,
            references=self.references,
            occurred_at=self.occurred_at,
        )

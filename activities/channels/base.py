"""The one interface every outbound channel speaks, and the errors it may raise.

Why one interface: the delivery activity claims a ledger row, calls `send`, and decides
what happens next (retry, dead letter, uncertain) only from the *class* of the error, so
the classification of provider failures lives here, next to the providers, and the
activity never parses SMTP codes or HTTP statuses. This module is plain Python (no
Temporal), so channels can be tested against local servers without a worker.

The three error classes map to the ledger's outcomes:

- `TransientChannelError`: nothing was delivered; try again later (optionally not before
  `retry_after` seconds, e.g. from an `x-rate-limit-reset` header).
- `PermanentChannelError`: nothing was delivered and retrying will not help; `bounce`
  says the recipient identity itself is bad (suppress it).
- `UncertainChannelError`: the request may have reached the provider but no answer came
  back; re-sending could contact the person twice, so the delivery is recorded as
  uncertain and never re-sent.
- `SenderConfigError`: our own credentials or configuration were refused (SMTP 535,
  HTTP 401); nothing was delivered and the sender, not the lead, needs attention.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.sequence import ACTION_CHANNEL, Action, Channel

_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


class DkimKey(BaseModel):
    """A DKIM signing key for one sender: `selector._domainkey.domain` publishes its public half.

    Built by the delivery activity from the sender account (the key decrypted just before
    the send) and never part of a workflow payload.
    """

    model_config = ConfigDict(frozen=True)

    selector: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    private_key: SecretStr


class OutboundMessage(BaseModel):
    """One action to perform on one channel for one recipient.

    `idempotency_key` is the deliveries ledger key; channels that can pass it on (the relay)
    do, and email derives its Message-ID from it.
    """

    model_config = ConfigDict(frozen=True)

    channel: str
    action: str
    idempotency_key: str = Field(min_length=1)
    sender: str = Field(min_length=1)
    sender_name: str | None = None
    #: The sender account: email goes through its own SMTP connection when it has one.
    sender_id: int | None = None
    to: str = Field(min_length=1)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = Field(default_factory=list)
    unsubscribe_url: str | None = None
    #: An optional `mailto:` URI written beside the https one in List-Unsubscribe.
    unsubscribe_mailto: str | None = None
    footer: str | None = None
    #: Sign the email with this key (when the sender's relay does not sign).
    dkim: DkimKey | None = None

    @model_validator(mode="after")
    def _check_channel_and_action(self) -> OutboundMessage:
        channels = {c.value for c in Channel}
        if self.channel not in channels:
            raise ValueError(
                f"OutboundMessage.channel: unknown channel {self.channel!r}; expected one of {sorted(channels)}"
            )
        try:
            action = Action(self.action)
        except ValueError:
            raise ValueError(
                f"OutboundMessage.action: unknown action {self.action!r}; "
                f"expected one of {sorted(a.value for a in Action)}"
            ) from None
        expected = ACTION_CHANNEL.get(action)
        if expected is None or expected.value != self.channel:
            raise ValueError(f"OutboundMessage.action: {action.value} is not an action of channel {self.channel!r}")
        return self


class SendResult(BaseModel):
    """What the provider said about an accepted action."""

    provider_message_id: str | None = None


class ChannelError(Exception):
    """A send failed; the subclass says whether to retry, give up, or never re-send."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" if self.code else self.message


class TransientChannelError(ChannelError):
    """Not delivered; retry later, not before `retry_after` seconds when given."""

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class PermanentChannelError(ChannelError):
    """Not delivered and never will be; `bounce` means the recipient identity is bad."""

    def __init__(self, message: str, *, code: str | None = None, bounce: bool = False) -> None:
        super().__init__(message, code=code)
        self.bounce = bounce


class UncertainChannelError(ChannelError):
    """The provider may have acted but did not answer; do not send again."""


class SenderConfigError(ChannelError):
    """Our own account was refused (SMTP 535, HTTP 401): nothing was delivered, and the lead
    is not at fault. The delivery pauses the sender (services/sender_breaker.py) and the
    lead waits for it instead of failing."""


class SendAborted(Exception):
    """Raised by a `before_write` hook: do not perform the action (nothing was written).

    The delivery activity's hook raises it when its attempt no longer owns the ledger row
    (another attempt or the give-up took it); channels let it through unclassified and
    drop the connection they were about to write on.
    """


#: Called by a channel right before the irreversible write (the message body, the POST);
#: the delivery activity marks the ledger row `sending` there.
BeforeWrite = Callable[[], Awaitable[None]]


async def no_hook() -> None:
    """The `before_write` of a send that needs none."""


@runtime_checkable
class ChannelClient(Protocol):
    """A channel: performs one `OutboundMessage` and classifies failures."""

    async def send(self, msg: OutboundMessage, before_write: BeforeWrite = no_hook) -> SendResult:
        """Perform the action; await `before_write()` right before the irreversible write.

        Raise a `ChannelError` subclass on failure; let `SendAborted` from the hook through.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def make_message_id(idempotency_key: str, domain: str, *, secret: str | None) -> str:
    """An RFC 5322 Message-ID for a delivery key that reveals and allows computing nothing.

    With `secret` (the link secret): `<HMAC-SHA256(secret, key)@domain>`, the same for every
    retry of a delivery, yet nobody who knows the public ids (enrollment, step, attempt,
    or a lead's own Message-IDs) can compute another lead's id and forge a reply to it.
    Without one: random. The delivery activity stores the id in the ledger before the
    first write and reuses the stored one on retries, and replies are matched through
    that stored id, so threading never depends on recomputing it.
    """
    if not idempotency_key:
        raise ValueError("make_message_id: idempotency_key must not be empty")
    if not _DOMAIN_RE.match(domain):
        raise ValueError(f"make_message_id: domain {domain!r} is not a valid host name")
    if secret:
        mac = hmac.new(secret.encode("utf-8"), b"message-id\0" + idempotency_key.encode("utf-8"), hashlib.sha256)
        token = mac.hexdigest()[:32]
    else:
        token = secrets.token_hex(16)
    return f"<{token}.seq@{domain.lower()}>"

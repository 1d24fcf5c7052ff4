"""Outbound channels behind one interface (`ChannelClient.send(OutboundMessage)`).

Why a package: each provider (SMTP, the X API, the user's relay for LinkedIn and XMTP)
has its own protocol and failure vocabulary, but the delivery activity only needs
"sent / retry later / give up / unknown". `make_channels` builds the map the worker
injects into the delivery activities, keyed by channel name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from activities.channels.base import (
    BeforeWrite,
    ChannelClient,
    ChannelError,
    OutboundMessage,
    PermanentChannelError,
    SendAborted,
    SenderConfigError,
    SendResult,
    TransientChannelError,
    UncertainChannelError,
    make_message_id,
)

if TYPE_CHECKING:
    from db.session import SessionFactory
    from settings import Settings

__all__ = [
    "BeforeWrite",
    "ChannelClient",
    "ChannelError",
    "OutboundMessage",
    "PermanentChannelError",
    "SendAborted",
    "SendResult",
    "SenderConfigError",
    "TransientChannelError",
    "UncertainChannelError",
    "aclose_channels",
    "make_channels",
    "make_message_id",
]


def make_channels(settings: Settings, session_factory: SessionFactory | None = None) -> dict[str, ChannelClient]:
    """Every channel configured from settings: email, x, linkedin and xmtp (one relay).

    With `session_factory`, email senders that have their own SMTP connection send
    through it (a pool per sender); the others use the global `SMTP_*` relay.
    """
    from activities.channels.email import EmailChannel
    from activities.channels.relay import RelayChannel
    from activities.channels.sender_smtp import SenderSmtpPools
    from activities.channels.x import XChannel

    relay = RelayChannel.from_settings(settings)
    email = EmailChannel.from_settings(settings)
    if session_factory is not None:
        email.senders = SenderSmtpPools(session_factory, settings)
    return {
        "email": email,
        "x": XChannel.from_settings(settings),
        "linkedin": relay,
        "xmtp": relay,
    }


async def aclose_channels(channels: dict[str, ChannelClient]) -> None:
    """Close each distinct channel client once (linkedin and xmtp share the relay)."""
    seen: set[int] = set()
    for client in channels.values():
        if id(client) not in seen:
            seen.add(id(client))
            await client.aclose()

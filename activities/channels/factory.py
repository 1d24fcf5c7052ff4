"""Builds the real channel clients from settings (used by `worker.py`)."""

from __future__ import annotations

from activities.channels.base import ChannelClient
from activities.channels.email import EmailChannel
from activities.channels.relay import RelayChannel
from activities.channels.x import XChannel
from settings import Settings


def make_channels(settings: Settings) -> dict[str, ChannelClient]:
    """email → SMTP pool, x → X API v2, linkedin and xmtp → the signed relay."""
    relay = RelayChannel.from_settings(settings)
    return {
        "email": EmailChannel.from_settings(settings),
        "x": XChannel.from_settings(settings),
        "linkedin": relay,
        "xmtp": relay,
    }

"""Which identity kinds exist, what a person's field calls each, and which serve a channel.

The one answer to "which identity kinds can receive channel X" (delivery), "which CSV
column holds which kind" (import), "which template variable shows which kind"
(templating) and "which rule field filters on which kind" (segments). Pure data, so
workflows, activities and services can all read it.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType

from models.sequence import Channel

__all__ = [
    "FIELD_KIND",
    "KIND_FIELD",
    "IdentityKind",
    "kinds_for_channel",
    "stand_in_kind",
    "target_kind",
]


class IdentityKind(StrEnum):
    """The `identities.channel` values: one normal form each (services/identities.py)."""

    EMAIL = "email"
    X = "x"  # an X user id: what the X API sends to
    X_HANDLE = "x_handle"  # a handle: resolved to an X user id before the first send
    LINKEDIN = "linkedin"
    XMTP = "xmtp"


#: Person field (CSV column, template variable, segment rule field) → identity kind.
FIELD_KIND: MappingProxyType[str, IdentityKind] = MappingProxyType(
    {
        "email": IdentityKind.EMAIL,
        "x_user_id": IdentityKind.X,
        "x_handle": IdentityKind.X_HANDLE,
        "linkedin_url": IdentityKind.LINKEDIN,
        "xmtp_address": IdentityKind.XMTP,
    }
)
#: Identity kind → the person field that holds it.
KIND_FIELD: MappingProxyType[str, str] = MappingProxyType({kind: f for f, kind in FIELD_KIND.items()})

_TARGET: dict[Channel, IdentityKind] = {
    Channel.EMAIL: IdentityKind.EMAIL,
    Channel.X: IdentityKind.X,
    Channel.LINKEDIN: IdentityKind.LINKEDIN,
    Channel.XMTP: IdentityKind.XMTP,
}
_STAND_IN: dict[Channel, IdentityKind] = {Channel.X: IdentityKind.X_HANDLE}


def target_kind(channel: Channel | str) -> IdentityKind:
    """The identity a send on `channel` is addressed to."""
    return _TARGET[Channel(channel)]


def stand_in_kind(channel: Channel | str) -> IdentityKind | None:
    """An identity that stands in for the target until resolved (an X handle), if any."""
    return _STAND_IN.get(Channel(channel))


def kinds_for_channel(channel: Channel | str) -> tuple[IdentityKind, ...]:
    """Every identity kind that can receive `channel`, the target first."""
    stand_in = stand_in_kind(channel)
    return (target_kind(channel), stand_in) if stand_in else (target_kind(channel),)

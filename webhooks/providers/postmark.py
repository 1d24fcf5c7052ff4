"""Postmark: webhooks with HTTP basic authentication, and the inbound JSON.

Postmark sends one JSON object per request, its `RecordType` naming the event. Bounce
types are Postmark's own: `HardBounce` and `BadEmailAddress` are hard; `SoftBounce`,
`Transient`, `DnsError` and the other temporary ones are soft (recorded only); an
`AutoResponder` is not a bounce at all. Custom data comes back in `Metadata`
(sent as `X-PM-Metadata-<key>` headers through the SMTP relay).

Inbound messages have no `RecordType`; `StrippedTextReply` is the reply without the
quoted thread, and `Headers` carries In-Reply-To / References for threading.
"""

from __future__ import annotations

import json
from typing import Any

from webhooks.providers.base import (
    DELIVERY_KEY_ARG,
    ProviderEvent,
    ProviderFormatError,
    bare_message_id,
    basic_auth_ok,
    from_iso,
    require,
)
from webhooks.providers.replies import reply_text

NAME = "postmark"
HARD = {"HardBounce", "BadEmailAddress", "ManuallyDeactivated"}
NOT_A_BOUNCE = {"AutoResponder", "Subscribe", "AddressChange", "OpenRelayTest", "ChallengeVerification"}


def verify(credentials: list[str], authorization: str | None) -> None:
    """Basic authentication against the configured `user:password` entries."""
    basic_auth_ok(authorization, credentials)


def _metadata(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj.get("Metadata")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def parse(body: bytes) -> list[ProviderEvent]:
    """One Postmark webhook body as normalized events (an empty list for ignored kinds)."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ProviderFormatError("body", f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ProviderFormatError("body", "expected a JSON object")
    record = data.get("RecordType")
    if record is None:
        if "FromFull" in data or "StrippedTextReply" in data or "TextBody" in data:
            return [_inbound(data)]
        raise ProviderFormatError("RecordType", "is missing")
    if record == "Inbound":
        return [_inbound(data)]
    meta = _metadata(data)
    message_id = require(data, "MessageID", "")
    common: dict[str, Any] = {
        "provider": NAME,
        "message_ids": [message_id],
        "delivery_key": meta.get(DELIVERY_KEY_ARG),
        "custom": meta,
    }
    if record in ("Bounce", "SpamComplaint"):
        bounce_id = require(data, "ID", "", (int, str))
        kind_name = require(data, "Type", "")
        email = require(data, "Email", "")
        occurred = from_iso(require(data, "BouncedAt", ""), "BouncedAt")
        reason = str(data.get("Description") or data.get("Details") or "")[:500] or None
        if record == "SpamComplaint" or kind_name == "SpamComplaint":
            return [
                ProviderEvent(
                    event_id=f"complaint:{bounce_id}",
                    kind="complaint",
                    recipient=email,
                    occurred_at=occurred,
                    reason=reason,
                    **common,
                )
            ]
        if kind_name == "Unsubscribe":
            return [
                ProviderEvent(
                    event_id=f"bounce:{bounce_id}",
                    kind="unsubscribe",
                    recipient=email,
                    occurred_at=occurred,
                    reason=reason,
                    **common,
                )
            ]
        if kind_name in NOT_A_BOUNCE:
            return [
                ProviderEvent(
                    event_id=f"bounce:{bounce_id}",
                    kind="ignored",
                    recipient=email,
                    occurred_at=occurred,
                    reason=f"{kind_name}: {reason or ''}",
                    **common,
                )
            ]
        severity = "hard" if kind_name in HARD else "soft"
        return [
            ProviderEvent(
                event_id=f"bounce:{bounce_id}",
                kind="bounce",
                bounce=severity,
                recipient=email,
                occurred_at=occurred,
                reason=f"{kind_name}: {reason or ''}",
                **common,
            )
        ]
    recipient = require(data, "Recipient", "")
    if record == "Delivery":
        at = require(data, "DeliveredAt", "")
        return [
            ProviderEvent(
                event_id=f"delivery:{message_id}:{recipient}",
                kind="delivered",
                recipient=recipient,
                occurred_at=from_iso(at, "DeliveredAt"),
                **common,
            )
        ]
    if record == "Open":
        at = require(data, "ReceivedAt", "")
        return [
            ProviderEvent(
                event_id=f"open:{message_id}:{recipient}:{at}",
                kind="open",
                recipient=recipient,
                occurred_at=from_iso(at, "ReceivedAt"),
                **common,
            )
        ]
    if record == "Click":
        at = require(data, "ReceivedAt", "")
        link = require(data, "OriginalLink", "")
        return [
            ProviderEvent(
                event_id=f"click:{message_id}:{recipient}:{at}"[:280],
                kind="click",
                recipient=recipient,
                url=link,
                occurred_at=from_iso(at, "ReceivedAt"),
                **common,
            )
        ]
    if record == "SubscriptionChange":
        at = require(data, "ChangedAt", "")
        suppress = data.get("SuppressSending")
        if not isinstance(suppress, bool):
            raise ProviderFormatError("SuppressSending", "expected true or false")
        reason = str(data.get("SuppressionReason") or "")
        event_id = f"subscription:{message_id}:{recipient}:{at}"
        kind = "ignored"
        bounce = None
        if suppress and reason == "HardBounce":
            kind, bounce = "bounce", "hard"
        elif suppress and reason == "SpamComplaint":
            kind = "complaint"
        elif suppress:
            kind = "unsubscribe"
        return [
            ProviderEvent(
                event_id=event_id,
                kind=kind,
                bounce=bounce,
                recipient=recipient,
                occurred_at=from_iso(at, "ChangedAt"),
                reason=reason or None,
                **common,
            )
        ]
    raise ProviderFormatError("RecordType", f"unknown record type {record!r}")


def _inbound(data: dict[str, Any]) -> ProviderEvent:
    full = data.get("FromFull")
    sender = full.get("Email") if isinstance(full, dict) and full.get("Email") else require(data, "From", "")
    message_id = require(data, "MessageID", "")
    headers = {}
    raw_headers = data.get("Headers") or []
    if not isinstance(raw_headers, list):
        raise ProviderFormatError("Headers", "expected a list of {Name, Value}")
    for index, item in enumerate(raw_headers):
        if not isinstance(item, dict) or "Name" not in item:
            raise ProviderFormatError(f"Headers[{index}]", "expected {Name, Value}")
        headers[str(item["Name"]).lower()] = str(item.get("Value", ""))
    stripped = data.get("StrippedTextReply")
    text = stripped if isinstance(stripped, str) and stripped.strip() else reply_text(str(data.get("TextBody") or ""))
    original_id = bare_message_id(headers.get("message-id")) or message_id
    return ProviderEvent(
        provider=NAME,
        event_id=f"inbound:{original_id}"[:280],
        kind="reply",
        sender=sender,
        text=text,
        in_reply_to=headers.get("in-reply-to") or None,
        references=headers.get("references", "").split(),
        occurred_at=None,
    )

"""Standard Webhooks (Resend, and services built on Svix): `webhook-id`,
`webhook-timestamp`, `webhook-signature`, verified with the `standardwebhooks` library.

The secret is the `whsec_…` string the provider shows; several may be configured while
rotating. `webhook-id` is the event's id (the same on every retry), so it is the
deduplication key. Resend's event types map as: email.delivered, email.bounced
(bounce.type Permanent is hard, anything else soft), email.delivery_delayed (a
deferral), email.complained, email.opened, email.clicked, email.received (a reply).
"""

from __future__ import annotations

import json
from typing import Any

from standardwebhooks.webhooks import Webhook

from webhooks.providers.base import (
    DELIVERY_KEY_ARG,
    ProviderAuthError,
    ProviderEvent,
    ProviderFormatError,
    from_iso,
    require,
)
from webhooks.providers.replies import reply_text

NAME = "resend"
HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def verify(secrets: list[str], headers: dict[str, str], body: bytes) -> str:
    """Check the signature with each secret; return the `webhook-id`."""
    if not secrets:
        raise ProviderAuthError("no Standard Webhooks secret is configured (RESEND_WEBHOOK_SECRETS)")
    wanted = {name: headers.get(name) or headers.get(name.replace("webhook-", "svix-")) or "" for name in HEADERS}
    if not all(wanted.values()):
        raise ProviderAuthError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ProviderAuthError("the body is not UTF-8, so it cannot be the signed text") from None
    last = "bad signature"
    for secret in secrets:
        try:
            Webhook(secret).verify(text, wanted, json_parse=False)
            return wanted["webhook-id"]
        except Exception as err:  # the library raises several kinds for malformed headers
            last = str(err) or err.__class__.__name__
    raise ProviderAuthError(last)


def _tags(data: dict[str, Any]) -> dict[str, str]:
    tags = data.get("tags")
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    if isinstance(tags, list):
        return {str(t["name"]): str(t.get("value", "")) for t in tags if isinstance(t, dict) and "name" in t}
    return {}


def parse(body: bytes, webhook_id: str) -> list[ProviderEvent]:
    """A Resend event as a normalized event."""
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise ProviderFormatError("body", f"not JSON ({err})") from None
    if not isinstance(payload, dict):
        raise ProviderFormatError("body", "expected a JSON object")
    kind_name = require(payload, "type", "")
    data = require(payload, "data", "", dict)
    at = payload.get("created_at")
    occurred = from_iso(at, "created_at") if isinstance(at, str) else None
    tags = _tags(data)
    to = data.get("to")
    recipient = to[0] if isinstance(to, list) and to else (to if isinstance(to, str) else None)
    email_id = data.get("email_id") if isinstance(data.get("email_id"), str) else None
    common: dict[str, Any] = {
        "provider": NAME,
        "event_id": webhook_id,
        "recipient": recipient,
        "message_ids": [email_id] if email_id else [],
        "delivery_key": tags.get(DELIVERY_KEY_ARG),
        "occurred_at": occurred,
        "custom": tags,
    }
    if kind_name == "email.received":
        sender = require(data, "from", "data")
        text = data.get("text") if isinstance(data.get("text"), str) else ""
        headers = data.get("headers") if isinstance(data.get("headers"), dict) else {}
        lower = {str(k).lower(): str(v) for k, v in headers.items()}
        common.update(recipient=None, sender=sender)
        return [
            ProviderEvent(
                kind="reply",
                text=reply_text(text) if text else None,
                in_reply_to=lower.get("in-reply-to"),
                references=lower.get("references", "").split(),
                **common,
            )
        ]
    if recipient is None:
        raise ProviderFormatError("data.to", "is missing")
    if kind_name == "email.bounced":
        bounce = data.get("bounce") if isinstance(data.get("bounce"), dict) else {}
        level = "soft" if bounce.get("type") in ("Transient", "Undetermined") else "hard"
        reason = f"{bounce.get('type', '')}/{bounce.get('subType', '')}: {bounce.get('message', '')}"[:500]
        return [ProviderEvent(kind="bounce", bounce=level, reason=reason, **common)]
    simple = {
        "email.delivered": "delivered",
        "email.delivery_delayed": "deferred",
        "email.complained": "complaint",
        "email.opened": "open",
    }
    if kind_name in simple:
        return [ProviderEvent(kind=simple[kind_name], **common)]
    if kind_name == "email.clicked":
        click = require(data, "click", "data", dict)
        return [ProviderEvent(kind="click", url=require(click, "link", "data.click"), **common)]
    return [ProviderEvent(kind="ignored", reason=kind_name, **common)]

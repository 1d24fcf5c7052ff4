"""Mailgun: HMAC-SHA256 of `timestamp + token` with the webhook signing key.

The signature covers the timestamp and a random token, not the body, so a captured
request could carry another body: the timestamp must be fresh and each token is
accepted once (the router remembers them in PostgreSQL). `failed` with severity
`temporary` is a deferral; `permanent` is a hard bounce. Custom data sent with
`X-Mailgun-Variables` comes back as `user-variables`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from webhooks.providers.base import (
    DELIVERY_KEY_ARG,
    ProviderAuthError,
    ProviderEvent,
    ProviderFormatError,
    bare_message_id,
    check_fresh,
    from_unix,
    require,
    require_id,
)

NAME = "mailgun"


def load(body: bytes) -> dict[str, Any]:
    """The JSON body (ProviderFormatError when it is not an object)."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ProviderFormatError("body", f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ProviderFormatError("body", "expected a JSON object")
    return data


def verify(signing_keys: list[str], data: dict[str, Any], *, now: float, window_seconds: int) -> str:
    """Check `signature`; return its token (to be remembered against replay)."""
    if not signing_keys:
        raise ProviderAuthError("no Mailgun signing key is configured (MAILGUN_SIGNING_KEYS)")
    sig = data.get("signature")
    if not isinstance(sig, dict):
        raise ProviderAuthError("missing signature object")
    timestamp, token, given = sig.get("timestamp"), sig.get("token"), sig.get("signature")
    if not (isinstance(timestamp, str | int) and isinstance(token, str) and isinstance(given, str) and token):
        raise ProviderAuthError("signature needs timestamp, token and signature")
    check_fresh(timestamp, now, window_seconds, "signature.timestamp")
    message = f"{timestamp}{token}".encode()
    for key in signing_keys:
        expected = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace")):
            return token
    raise ProviderAuthError("bad signature")


def parse(data: dict[str, Any]) -> list[ProviderEvent]:
    """The `event-data` object as one normalized event."""
    ev = require(data, "event-data", "", dict)
    where = "event-data"
    name = require(ev, "event", where)
    event_id = require_id(ev, "id", where)
    occurred = from_unix(require(ev, "timestamp", where, (int, float, str)), f"{where}.timestamp")
    variables = ev.get("user-variables") or {}
    custom = {str(k): str(v) for k, v in variables.items()} if isinstance(variables, dict) else {}
    message: dict[str, Any] = ev["message"] if isinstance(ev.get("message"), dict) else {}
    headers: dict[str, Any] = message["headers"] if isinstance(message.get("headers"), dict) else {}
    mid = bare_message_id(headers.get("message-id") if isinstance(headers.get("message-id"), str) else None)
    status = ev.get("delivery-status") if isinstance(ev.get("delivery-status"), dict) else {}
    reason = str(status.get("description") or status.get("message") or ev.get("reason") or "")[:500] or None
    bounce = None
    if name == "delivered":
        kind = "delivered"
    elif name == "failed":
        severity = require(ev, "severity", where)
        if severity == "permanent":
            kind, bounce = "bounce", "hard"
        elif severity == "temporary":
            kind = "deferred"
        else:
            raise ProviderFormatError(f"{where}.severity", f"expected permanent or temporary, got {severity!r}")
    elif name == "opened":
        kind = "open"
    elif name == "clicked":
        kind = "click"
    elif name == "complained":
        kind = "complaint"
    elif name == "unsubscribed":
        kind = "unsubscribe"
    else:
        kind = "ignored"  # accepted, stored, …
    return [
        ProviderEvent(
            provider=NAME,
            event_id=event_id,
            kind=kind,
            bounce=bounce,
            recipient=ev.get("recipient") if isinstance(ev.get("recipient"), str) else None,
            message_ids=[mid] if mid else [],
            delivery_key=custom.get(DELIVERY_KEY_ARG),
            occurred_at=occurred,
            url=ev.get("url") if isinstance(ev.get("url"), str) else None,
            reason=reason,
            custom=custom,
        )
    ]

"""Webhook authentication: HMAC-SHA256 over "t.channel.body" with a replay window.

The header is `X-Signature: t=<unix>,v2=<hex>` where v2 is
HMAC-SHA256(secret, "{t}.{channel}." + body): the channel is signed too, so an event
signed for one channel cannot be replayed at another's URL. Several `v2=` entries may
be present while a secret is being rotated, and several secrets may be configured
(each is tried). The old `v1=` (HMAC over "{t}." + body, no channel) is accepted only
when the caller allows it (`WEBHOOK_ACCEPT_V1`, for a migration). Signatures are
compared in constant time, and a timestamp outside the window (too old, too far in
the future, or absurd) is refused so that a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A unix time in seconds: up to 12 digits (year 33658); anything longer is refused
#: before any arithmetic, so a 5,000-digit `t=` is a 401 and never an overflow.
_UNIX_TIME = re.compile(r"^[0-9]{1,12}$")


class SignatureError(ValueError):
    """Why a request was refused (missing, malformed, expired or bad signature)."""


def _mac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int, *, channel: str) -> str:
    """The header value for `body` posted to `/webhooks/{channel}` at `timestamp`."""
    return f"t={timestamp},v2={_mac(secret, f'{timestamp}.{channel}.'.encode() + body)}"


def sign_v1(secret: str, body: bytes, timestamp: int) -> str:
    """The old header value (body only; accepted only with `WEBHOOK_ACCEPT_V1=true`)."""
    return f"t={timestamp},v1={_mac(secret, f'{timestamp}.'.encode() + body)}"


def verify(
    secrets: str | Sequence[str],
    header: str | None,
    body: bytes,
    *,
    channel: str,
    now: float,
    window_seconds: int = 300,
    accept_v1: bool = False,
) -> None:
    """Raise SignatureError unless `header` signs `body` for `channel` within the window."""
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not header:
        raise SignatureError("missing X-Signature header")
    timestamp: int | None = None
    candidates: dict[str, list[str]] = {"v1": [], "v2": []}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed X-Signature header: expected t=<unix>,v2=<hex>")
        value = value.strip()
        if key == "t":
            if not _UNIX_TIME.match(value):
                raise SignatureError("malformed X-Signature header: t is not a unix time in seconds")
            timestamp = int(value)
        elif key in candidates:
            candidate = value.lower()
            if not _HEX_SHA256.match(candidate):  # also keeps compare_digest away from non-ASCII text
                raise SignatureError(f"malformed X-Signature header: {key} must be 64 hex digits")
            candidates[key].append(candidate)
    if timestamp is None or not (candidates["v2"] or candidates["v1"]):
        raise SignatureError("malformed X-Signature header: expected t=<unix>,v2=<hex>")
    if abs(int(now) - timestamp) > window_seconds:
        raise SignatureError(f"timestamp outside the {window_seconds}s replay window")
    if not keys:
        raise SignatureError("no webhook secret is configured for this channel")
    for secret in keys:
        expected = _mac(secret, f"{timestamp}.{channel}.".encode() + body).encode()
        if any(hmac.compare_digest(expected, c.encode()) for c in candidates["v2"]):
            return
        if accept_v1:
            legacy = _mac(secret, f"{timestamp}.".encode() + body).encode()
            if any(hmac.compare_digest(legacy, c.encode()) for c in candidates["v1"]):
                return
    if candidates["v1"] and not candidates["v2"] and not accept_v1:
        raise SignatureError("v1 signatures (without the channel) are not accepted: sign with v2")
    raise SignatureError("bad signature")

"""Webhook authentication: HMAC-SHA256 over "t.body" with a replay window.

The header is `X-Signature: t=<unix>,v1=<hex>`; several `v1=` entries may be present
while a secret is being rotated. Signatures are compared in constant time, and a
timestamp outside the window (too old, or too far in the future) is refused so that a
captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import re

_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """Why a request was refused (missing, malformed, expired or bad signature)."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The header value for `body` signed at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str | None, body: bytes, *, now: float, window_seconds: int = 300) -> None:
    """Raise SignatureError unless `header` signs `body` within the replay window."""
    if not header:
        raise SignatureError("missing X-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed X-Signature header: expected t=<unix>,v1=<hex>")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("malformed X-Signature header: t is not a unix time") from None
        elif key == "v1":
            candidate = value.strip().lower()
            if not _HEX_SHA256.match(candidate):  # also keeps compare_digest away from non-ASCII text
                raise SignatureError("malformed X-Signature header: v1 must be 64 hex digits")
            candidates.append(candidate)
    if timestamp is None or not candidates:
        raise SignatureError("malformed X-Signature header: expected t=<unix>,v1=<hex>")
    if abs(now - timestamp) > window_seconds:
        raise SignatureError(f"timestamp outside the {window_seconds}s replay window")
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    if not any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates):
        raise SignatureError("bad signature")

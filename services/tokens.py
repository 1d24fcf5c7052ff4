"""Signed, URL-safe tokens for unsubscribe and open-tracking links.

A token is base64url(JSON payload) + "." + base64url(truncated HMAC-SHA256 over the
purpose and the payload). The purpose is inside the MAC, so an open-tracking token can
never unsubscribe anyone. Unsubscribe tokens do not expire: a person must be able to
unsubscribe from a message however old it is (CAN-SPAM asks links to work for 30 days
at least), and the only thing a token can do is stop messages to its own person.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

MAC_BYTES = 16


class TokenError(ValueError):
    """A token that was tampered with, truncated, or made for another purpose."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, purpose: str, body: str) -> bytes:
    return hmac.new(secret.encode(), f"{purpose}:{body}".encode(), hashlib.sha256).digest()[:MAC_BYTES]


def make_token(secret: str, purpose: str, payload: dict[str, Any]) -> str:
    """A compact signed token carrying `payload` for `purpose`."""
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_b64(_mac(secret, purpose, body))}"


def read_token(secret: str, purpose: str, token: str) -> dict[str, Any]:
    """The payload of a valid token (TokenError otherwise)."""
    try:
        body, mac = token.split(".", 1)
        given = _unb64(mac)
    except (ValueError, TypeError) as err:
        raise TokenError("malformed token") from err
    if not hmac.compare_digest(given, _mac(secret, purpose, body)):
        raise TokenError("bad signature")
    try:
        payload = json.loads(_unb64(body))
    except (ValueError, TypeError) as err:
        raise TokenError("malformed payload") from err
    if not isinstance(payload, dict):
        raise TokenError("malformed payload")
    return payload

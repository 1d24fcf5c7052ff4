"""Opaque, authenticated, URL-safe tokens for unsubscribe, open and click links.

A token is base64url(nonce || AES-256-GCM(payload JSON)), with the key derived from
`LINK_SECRET` by HKDF and the purpose as associated data: the token reveals nothing
(not the person, not the delivery, not even its own purpose), cannot be altered, and a
token made for one purpose (an open pixel) never works for another (unsubscribe).

`LINK_SECRET` may list several keys: new tokens use the first, and every key is tried
when reading, so links already sent keep working after a rotation. Tokens of the first
format (base64url(JSON) + "." + truncated HMAC-SHA256 over purpose and payload, made
with the then `WEBHOOK_SECRET`) are still read, with the same keys: list the old
`WEBHOOK_SECRET` last in `LINK_SECRET` while those links are in mailboxes.

Unsubscribe tokens do not expire: a person must be able to unsubscribe from a message
however old it is, and the only thing a token can do is stop messages to its own person.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAC_BYTES = 16
NONCE_BYTES = 12


class TokenError(ValueError):
    """A token that was tampered with, truncated, or made for another purpose."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@lru_cache(maxsize=64)
def _aead(secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"sequencer link token v2").derive(secret.encode())
    return AESGCM(key)


def _keys(secret: str | Sequence[str]) -> list[str]:
    keys = [secret] if isinstance(secret, str) else list(secret)
    return [k for k in keys if k]


def make_token(secret: str | Sequence[str], purpose: str, payload: dict[str, Any]) -> str:
    """An opaque token carrying `payload` for `purpose` (the first key of `secret` encrypts)."""
    keys = _keys(secret)
    if not keys:
        raise ValueError("no link secret: set LINK_SECRET")
    nonce = os.urandom(NONCE_BYTES)
    plain = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return _b64(nonce + _aead(keys[0]).encrypt(nonce, plain, purpose.encode()))


def read_token(secret: str | Sequence[str], purpose: str, token: str) -> dict[str, Any]:
    """The payload of a valid token made with any of the keys (TokenError otherwise)."""
    keys = _keys(secret)
    if "." in token:
        return _read_legacy(keys, purpose, token)
    try:
        raw = _unb64(token)
    except (ValueError, binascii.Error) as err:
        raise TokenError("malformed token") from err
    if len(raw) <= NONCE_BYTES + MAC_BYTES:
        raise TokenError("malformed token")
    for key in keys:
        try:
            plain = _aead(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], purpose.encode())
        except InvalidTag:
            continue
        return _payload(plain)
    raise TokenError("bad signature")


def make_legacy_token(secret: str, purpose: str, payload: dict[str, Any]) -> str:
    """A token in the first format (readable payload): only to test that old links still work."""
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_b64(_legacy_mac(secret, purpose, body))}"


def _legacy_mac(secret: str, purpose: str, body: str) -> bytes:
    return hmac.new(secret.encode(), f"{purpose}:{body}".encode(), hashlib.sha256).digest()[:MAC_BYTES]


def _read_legacy(keys: list[str], purpose: str, token: str) -> dict[str, Any]:
    try:
        body, mac = token.split(".", 1)
        given = _unb64(mac)
    except (ValueError, TypeError, binascii.Error) as err:
        raise TokenError("malformed token") from err
    if not any(hmac.compare_digest(given, _legacy_mac(key, purpose, body)) for key in keys):
        raise TokenError("bad signature")
    try:
        return _payload(_unb64(body))
    except (binascii.Error, ValueError) as err:
        raise TokenError("malformed payload") from err


def _payload(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (ValueError, TypeError) as err:
        raise TokenError("malformed payload") from err
    if not isinstance(payload, dict):
        raise TokenError("malformed payload")
    return payload

"""X Account Activity API: the CRC challenge and signed event deliveries.

X checks the webhook with `GET ?crc_token=…`, answered at once (no I/O) with
`{"response_token": "sha256=" + base64(HMAC-SHA256(consumer secret, crc_token))}`;
every POST carries `x-twitter-webhooks-signature: sha256=<base64 HMAC of the body>`.

`direct_message_events` of type `message_create` sent *to* the subscribed account are
replies on the x channel; those it sent itself (our own DMs echoed back) are ignored.
`follow_events` whose target is the subscribed account are a lead following us:
FOLLOWED_BACK. Everything else in the envelope is ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from webhooks.providers.base import ProviderAuthError, ProviderEvent, ProviderFormatError, from_unix, require

NAME = "x"
SIGNATURE_HEADER = "x-twitter-webhooks-signature"


def _digest(secret: str, data: bytes) -> str:
    return "sha256=" + base64.b64encode(hmac.new(secret.encode(), data, hashlib.sha256).digest()).decode()


def crc_response(secret: str, crc_token: str) -> dict[str, str]:
    """The answer to X's challenge, made with the current (first) consumer secret."""
    return {"response_token": _digest(secret, crc_token.encode())}


def verify(secrets: list[str], header: str | None, body: bytes) -> None:
    """The body's signature with any configured consumer secret."""
    if not secrets:
        raise ProviderAuthError("no X consumer secret is configured (X_CONSUMER_SECRETS)")
    if not header or not header.startswith("sha256="):
        raise ProviderAuthError(f"missing or malformed {SIGNATURE_HEADER} header")
    given = header.strip().encode("ascii", "replace")
    if not any(hmac.compare_digest(_digest(s, body).encode(), given) for s in secrets):
        raise ProviderAuthError("bad signature")


def parse(body: bytes) -> list[ProviderEvent]:
    """Direct messages and follows of one Account Activity delivery."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ProviderFormatError("body", f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ProviderFormatError("body", "expected a JSON object")
    us = str(require(data, "for_user_id", "", (str, int)))
    out: list[ProviderEvent] = []
    for index, dm in enumerate(_list(data, "direct_message_events")):
        where = f"direct_message_events[{index}]"
        event_id = str(require(dm, "id", where, (str, int)))
        if dm.get("type") != "message_create":
            continue
        create: dict[str, Any] = require(dm, "message_create", where, dict)
        sender = str(require(create, "sender_id", f"{where}.message_create", (str, int)))
        text = ""
        message_data = create.get("message_data")
        if isinstance(message_data, dict) and isinstance(message_data.get("text"), str):
            text = message_data["text"]
        stamp = dm.get("created_timestamp")
        occurred = from_unix(int(stamp) / 1000, f"{where}.created_timestamp") if stamp is not None else None
        if sender == us:  # our own message, echoed back to the subscribed account
            out.append(
                ProviderEvent(
                    provider=NAME,
                    channel="x",
                    event_id=f"dm:{event_id}",
                    kind="ignored",
                    sender=sender,
                    reason="our own direct message",
                )
            )
            continue
        out.append(
            ProviderEvent(
                provider=NAME,
                channel="x",
                event_id=f"dm:{event_id}",
                kind="reply",
                sender=sender,
                text=text,
                occurred_at=occurred,
            )
        )
    for index, follow in enumerate(_list(data, "follow_events")):
        where = f"follow_events[{index}]"
        if follow.get("type") != "follow":
            continue
        source = str(require(require(follow, "source", where, dict), "id", f"{where}.source", (str, int)))
        target = str(require(require(follow, "target", where, dict), "id", f"{where}.target", (str, int)))
        stamp = str(follow.get("created_timestamp") or "")
        event_id = f"follow:{source}:{target}:{stamp}"
        if target != us:  # we followed someone: our own action, already in the ledger
            out.append(
                ProviderEvent(
                    provider=NAME,
                    channel="x",
                    event_id=event_id,
                    kind="ignored",
                    sender=source,
                    reason="a follow by the subscribed account",
                )
            )
            continue
        occurred = from_unix(int(stamp) / 1000, f"{where}.created_timestamp") if stamp.isdigit() else None
        out.append(
            ProviderEvent(
                provider=NAME, channel="x", event_id=event_id, kind="followed_back", sender=source, occurred_at=occurred
            )
        )
    return out


def _list(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ProviderFormatError(key, "expected a list of objects")
    return value

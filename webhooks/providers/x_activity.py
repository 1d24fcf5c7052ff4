"""X Account Activity API (and the X Activity API envelope): CRC and signed deliveries.

X checks the webhook with `GET ?crc_token=…`, answered at once (no I/O) with
`{"response_token": "sha256=" + base64(HMAC-SHA256(consumer secret, crc_token))}`;
every POST carries `x-twitter-webhooks-signature: sha256=<base64 HMAC of the body>`.

`direct_message_events` of type `message_create` sent *to* the subscribed account are
replies on the x channel; those it sent itself (our own DMs echoed back) are ignored.
`follow_events` whose target is the subscribed account are a lead following us:
FOLLOWED_BACK. Everything else in the envelope is ignored. The newer X Activity API
(XAA) delivers `{"data": {"event_uuid", "filter": {"user_id"}, "event_type", "payload"}}`:
`dm.received`/`dm.sent` and `follow.follow` are read the same way; other types are ignored.
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
    if isinstance(data.get("data"), dict) and "event_type" in data["data"]:
        return _activity_api(data["data"])
    us = str(require(data, "for_user_id", "", (str, int)))
    return _dms(data, us, "direct_message_events") + _follows(data, us)


def _dms(data: dict[str, Any], us: str, where_prefix: str) -> list[ProviderEvent]:
    out: list[ProviderEvent] = []
    for index, dm in enumerate(_list(data, "direct_message_events", where_prefix)):
        where = f"{where_prefix}[{index}]"
        event_id = str(require(dm, "id", where, (str, int)))
        if dm.get("type") != "message_create":
            continue
        create: dict[str, Any] = require(dm, "message_create", where, dict)
        sender = str(require(create, "sender_id", f"{where}.message_create", (str, int)))
        text = ""
        message_data = create.get("message_data")
        if isinstance(message_data, dict) and isinstance(message_data.get("text"), str):
            text = message_data["text"]
        stamp = str(dm.get("created_timestamp") or "")
        occurred = from_unix(int(stamp) / 1000, f"{where}.created_timestamp") if stamp.isdigit() else None
        mine = sender == us  # our own message, echoed back to the subscribed account
        out.append(
            ProviderEvent(
                provider=NAME,
                channel="x",
                event_id=f"dm:{event_id}",
                kind="ignored" if mine else "reply",
                sender=sender,
                text=None if mine else text,
                occurred_at=occurred,
                reason="our own direct message" if mine else None,
            )
        )
    return out


def _follow(source: str, target: str, us: str, event_id: str, stamp: str, where: str) -> ProviderEvent:
    """A follow of the subscribed account is FOLLOWED_BACK; one by it is our own action, ignored."""
    occurred = from_unix(int(stamp) / 1000, f"{where}.created_timestamp") if stamp.isdigit() else None
    ours = target != us
    return ProviderEvent(
        provider=NAME,
        channel="x",
        event_id=event_id,
        kind="ignored" if ours else "followed_back",
        sender=source,
        occurred_at=occurred,
        reason="a follow by the subscribed account" if ours else None,
    )


def _follows(data: dict[str, Any], us: str) -> list[ProviderEvent]:
    out: list[ProviderEvent] = []
    for index, follow in enumerate(_list(data, "follow_events")):
        where = f"follow_events[{index}]"
        if follow.get("type") != "follow":
            continue
        source = str(require(require(follow, "source", where, dict), "id", f"{where}.source", (str, int)))
        target = str(require(require(follow, "target", where, dict), "id", f"{where}.target", (str, int)))
        stamp = str(follow.get("created_timestamp") or "")
        out.append(_follow(source, target, us, f"follow:{source}:{target}:{stamp}", stamp, where))
    return out


def _activity_api(env: dict[str, Any]) -> list[ProviderEvent]:
    """The X Activity API (XAA) envelope: `data.{event_uuid, filter.user_id, event_type, payload}`.

    `dm.received` / `dm.sent` carry Account Activity-shaped `direct_message_events`;
    `follow.follow` carries `source.data` (the follower) and `target.data`.
    """
    kind = require(env, "event_type", "data")
    uuid = str(require(env, "event_uuid", "data", (str, int)))
    us = str(require(require(env, "filter", "data", dict), "user_id", "data.filter", (str, int)))
    payload = require(env, "payload", "data", dict)
    if kind in ("dm.received", "dm.sent"):
        return _dms(payload, us, "data.payload.direct_message_events")
    if kind == "follow.follow":
        where = "data.payload"
        source = require(
            require(require(payload, "source", where, dict), "data", f"{where}.source", dict),
            "id",
            f"{where}.source.data",
            (str, int),
        )
        target = require(
            require(require(payload, "target", where, dict), "data", f"{where}.target", dict),
            "id",
            f"{where}.target.data",
            (str, int),
        )
        return [_follow(str(source), str(target), us, f"xaa:{uuid}", "", where)]
    return [ProviderEvent(provider=NAME, channel="x", event_id=f"xaa:{uuid}", kind="ignored", reason=kind)]


def _list(data: dict[str, Any], key: str, where: str | None = None) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ProviderFormatError(where or key, "expected a list of objects")
    return value

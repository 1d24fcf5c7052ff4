"""Amazon SES through Amazon SNS: signed SNS messages carrying SES notifications.

SNS signs a canonical "key\\nvalue\\n" string of the message (the keys depend on the
message type) with RSA: SHA1 for `SignatureVersion` 1, SHA256 for 2. The signing
certificate is fetched from `SigningCertURL` only when that URL is https on a host
matching the allow-list pattern (by default SNS's own `sns.<region>.amazonaws.com`),
and cached. `SubscriptionConfirmation` is confirmed by fetching `SubscribeURL` (same
host rule); `TopicArn` must be one the user configured.

SES notifications: `Bounce` with `bounceType` Permanent is a hard bounce, Transient and
Undetermined are soft; `Complaint`; `Delivery`. Event publishing (`eventType`) adds
Open, Click and DeliveryDelay. Message tags (X-SES-MESSAGE-TAGS) come back in
`mail.tags` as lists of values.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import ssl
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from webhooks.providers.base import (
    DELIVERY_KEY_ARG,
    ProviderAuthError,
    ProviderEvent,
    ProviderFormatError,
    from_iso,
    require,
)

NAME = "ses"
DEFAULT_HOST_PATTERN = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
_SIGNED_KEYS = {
    "Notification": ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"],
    "SubscriptionConfirmation": ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"],
    "UnsubscribeConfirmation": ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"],
}


def load(body: bytes) -> dict[str, Any]:
    """The SNS envelope, with the fields every message type needs checked."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ProviderFormatError("body", f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ProviderFormatError("body", "expected a JSON object")
    kind = require(data, "Type", "")
    if kind not in _SIGNED_KEYS:
        raise ProviderFormatError("Type", f"unknown SNS message type {kind!r}")
    for key in ("MessageId", "TopicArn", "Timestamp", "Signature", "SigningCertURL", "Message"):
        require(data, key, "")
    return data


def string_to_sign(msg: dict[str, Any]) -> bytes:
    """The canonical text SNS signs for this message type."""
    parts: list[str] = []
    for key in _SIGNED_KEYS[msg["Type"]]:
        if key == "Subject" and msg.get("Subject") is None:
            continue
        if key not in msg or msg[key] is None:
            raise ProviderFormatError(key, "is missing")
        parts += [key, str(msg[key])]
    return ("\n".join(parts) + "\n").encode()


def check_url(url: str, host_pattern: str, what: str) -> None:
    """Only https URLs on an allow-listed host are ever fetched (no SSRF through SNS)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not re.match(host_pattern, parts.hostname):
        raise ProviderAuthError(f"{what} {url!r} is not https on an allowed SNS host")
    if what == "SigningCertURL" and not parts.path.endswith(".pem"):
        raise ProviderAuthError(f"SigningCertURL {url!r} is not a .pem certificate")


class CertificateCache:
    """Signing certificates by URL, fetched once (over verified TLS) and kept."""

    def __init__(self, host_pattern: str = DEFAULT_HOST_PATTERN, *, ca_file: str | None = None) -> None:
        self.host_pattern = host_pattern
        self.ca_file = ca_file or None
        self._certs: dict[str, x509.Certificate] = {}
        self._lock = asyncio.Lock()
        #: Certificates actually downloaded (tests check the cache with it).
        self.fetches = 0

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()

    async def get(self, url: str) -> x509.Certificate:
        check_url(url, self.host_pattern, "SigningCertURL")
        if url in self._certs:
            return self._certs[url]
        async with self._lock:
            if url not in self._certs:
                try:
                    async with httpx.AsyncClient(verify=self._tls(), timeout=10, follow_redirects=False) as http:
                        resp = await http.get(url)
                except httpx.HTTPError as err:
                    raise ProviderAuthError(f"could not fetch the signing certificate: {err}") from None
                if resp.status_code != 200:
                    raise ProviderAuthError(f"signing certificate fetch answered {resp.status_code}")
                try:
                    cert = x509.load_pem_x509_certificate(resp.content)
                except ValueError:
                    raise ProviderAuthError("the signing certificate is not a PEM certificate") from None
                self.fetches += 1
                self._certs[url] = cert
        return self._certs[url]

    async def confirm(self, url: str) -> None:
        """Visit SubscribeURL (allow-listed hosts only) to confirm the subscription."""
        check_url(url, self.host_pattern, "SubscribeURL")
        async with httpx.AsyncClient(verify=self._tls(), timeout=10, follow_redirects=False) as http:
            resp = await http.get(url)
        if resp.status_code != 200:
            raise RuntimeError(f"SNS SubscribeURL answered {resp.status_code}")


async def verify(
    msg: dict[str, Any], certs: CertificateCache, topic_arns: list[str], *, now: float, max_age_seconds: int
) -> None:
    """Topic, age and signature of an SNS message (ProviderAuthError otherwise)."""
    if not topic_arns:
        raise ProviderAuthError("no SNS topic is configured (SES_TOPIC_ARNS)")
    if msg["TopicArn"] not in topic_arns:
        raise ProviderAuthError(f"TopicArn {msg['TopicArn']!r} is not one of SES_TOPIC_ARNS")
    version = str(msg.get("SignatureVersion", ""))
    if version not in ("1", "2"):
        raise ProviderAuthError(f"unsupported SignatureVersion {version!r}")
    try:
        sent = from_iso(msg["Timestamp"], "Timestamp").timestamp()
    except ProviderFormatError:
        raise ProviderAuthError("Timestamp is not an ISO 8601 time") from None
    if now - sent > max_age_seconds or sent - now > 300:
        raise ProviderAuthError(f"Timestamp is outside the {max_age_seconds}s window")
    try:
        signature = base64.b64decode(msg["Signature"], validate=True)
    except (ValueError, binascii.Error):
        raise ProviderAuthError("Signature is not base64") from None
    cert = await certs.get(msg["SigningCertURL"])
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ProviderAuthError("the signing certificate does not hold an RSA key")
    algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    try:
        key.verify(signature, string_to_sign(msg), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise ProviderAuthError("bad signature") from None


def decode_key(tag: str) -> str:
    """A delivery key from its SES tag form (SES tag values allow only [A-Za-z0-9_.@-])."""
    return base64.urlsafe_b64decode(tag + "=" * (-len(tag) % 4)).decode()


def encode_key(key: str) -> str:
    """The delivery key as an SES tag value."""
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def parse(msg: dict[str, Any]) -> list[ProviderEvent]:
    """The SES notification inside an SNS Notification, one event per recipient."""
    try:
        note = json.loads(msg["Message"])
    except ValueError as err:
        raise ProviderFormatError("Message", f"not a JSON SES notification ({err})") from None
    if not isinstance(note, dict):
        raise ProviderFormatError("Message", "expected a JSON object")
    kind_name = note.get("notificationType") or note.get("eventType")
    if not isinstance(kind_name, str):
        raise ProviderFormatError("Message.notificationType", "is missing")
    mail = require(note, "mail", "Message", dict)
    message_id = require(mail, "messageId", "Message.mail")
    tags = mail.get("tags") if isinstance(mail.get("tags"), dict) else {}
    custom = {str(k): str(v[0]) for k, v in tags.items() if isinstance(v, list) and v}
    key = None
    if DELIVERY_KEY_ARG in custom:
        try:
            key = decode_key(custom[DELIVERY_KEY_ARG])
        except (ValueError, binascii.Error):
            key = None
    ids = [message_id]
    common = mail.get("commonHeaders") if isinstance(mail.get("commonHeaders"), dict) else {}
    if isinstance(common.get("messageId"), str):
        ids.append(common["messageId"].strip("<>"))
    base = {"provider": NAME, "message_ids": ids, "delivery_key": key, "custom": custom}
    sns_id = msg["MessageId"]

    def when(obj: dict[str, Any], where: str) -> datetime | None:
        return from_iso(obj["timestamp"], f"{where}.timestamp") if isinstance(obj.get("timestamp"), str) else None

    if kind_name == "Bounce":
        bounce = require(note, "bounce", "Message", dict)
        severity = require(bounce, "bounceType", "Message.bounce")
        recipients = require(bounce, "bouncedRecipients", "Message.bounce", list)
        level = "hard" if severity == "Permanent" else "soft"
        return [
            ProviderEvent(
                event_id=f"{sns_id}:{i}",
                kind="bounce",
                bounce=level,
                recipient=require(r, "emailAddress", f"Message.bounce.bouncedRecipients[{i}]"),
                occurred_at=when(bounce, "Message.bounce"),
                reason=f"{severity}/{bounce.get('bounceSubType', '')}: {r.get('diagnosticCode', '')}"[:500],
                **base,
            )
            for i, r in enumerate(recipients)
        ]
    if kind_name == "Complaint":
        complaint = require(note, "complaint", "Message", dict)
        recipients = require(complaint, "complainedRecipients", "Message.complaint", list)
        return [
            ProviderEvent(
                event_id=f"{sns_id}:{i}",
                kind="complaint",
                recipient=require(r, "emailAddress", f"Message.complaint.complainedRecipients[{i}]"),
                occurred_at=when(complaint, "Message.complaint"),
                reason=str(complaint.get("complaintFeedbackType") or "") or None,
                **base,
            )
            for i, r in enumerate(recipients)
        ]
    if kind_name == "Delivery":
        delivery = require(note, "delivery", "Message", dict)
        recipients = require(delivery, "recipients", "Message.delivery", list)
        return [
            ProviderEvent(
                event_id=f"{sns_id}:{i}",
                kind="delivered",
                recipient=str(r),
                occurred_at=when(delivery, "Message.delivery"),
                **base,
            )
            for i, r in enumerate(recipients)
        ]
    destination = mail.get("destination") if isinstance(mail.get("destination"), list) else []
    recipient = str(destination[0]) if destination else None
    if kind_name == "Open":
        opened = require(note, "open", "Message", dict)
        return [
            ProviderEvent(
                event_id=sns_id, kind="open", recipient=recipient, occurred_at=when(opened, "Message.open"), **base
            )
        ]
    if kind_name == "Click":
        click = require(note, "click", "Message", dict)
        return [
            ProviderEvent(
                event_id=sns_id,
                kind="click",
                recipient=recipient,
                url=require(click, "link", "Message.click"),
                occurred_at=when(click, "Message.click"),
                **base,
            )
        ]
    if kind_name == "DeliveryDelay":
        return [ProviderEvent(event_id=sns_id, kind="deferred", recipient=recipient, **base)]
    return [ProviderEvent(event_id=sns_id, kind="ignored", recipient=recipient, reason=kind_name, **base)]

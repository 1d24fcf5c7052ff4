"""SendGrid: the signed Event Webhook and Inbound Parse.

Event Webhook: SendGrid signs `timestamp + raw body` with ECDSA P-256 / SHA-256 and sends
the base64 DER signature in `X-Twilio-Email-Event-Webhook-Signature` and the timestamp
in `X-Twilio-Email-Event-Webhook-Timestamp`; the verification key is the base64 DER
public key shown in the SendGrid console (several may be configured while rotating).
The body is a JSON array of events; custom args (`unique_args` of X-SMTPAPI) arrive as
top-level keys of each event, which is how `sequencer_key` comes back.

A `bounce` of type `blocked` is SendGrid's temporary refusal (soft); type `bounce` is a
permanent one (hard). `deferred` is a deferral, never a bounce.

Inbound Parse posts multipart/form-data (`from`, `to`, `subject`, `text`, `headers`,
`envelope`, …) and has no signature of its own: its URL carries basic-auth credentials.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

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
from webhooks.providers.replies import reply_text

NAME = "sendgrid"
SIGNATURE_HEADER = "x-twilio-email-event-webhook-signature"
TIMESTAMP_HEADER = "x-twilio-email-event-webhook-timestamp"

#: Fields SendGrid itself puts on events; every other top-level key is a custom arg.
STANDARD_FIELDS = {
    "email",
    "timestamp",
    "smtp-id",
    "event",
    "category",
    "sg_event_id",
    "sg_message_id",
    "reason",
    "status",
    "response",
    "attempt",
    "type",
    "ip",
    "useragent",
    "url",
    "url_offset",
    "tls",
    "cert_err",
    "asm_group_id",
    "marketing_campaign_id",
    "marketing_campaign_name",
    "sg_machine_open",
    "bounce_classification",
    "pool",
    "sg_template_id",
    "sg_template_name",
    "send_at",
    "singlesend_id",
    "singlesend_name",
    "template_id",
    "mc_stats",
    "phase_id",
    "post_type",
    "sg_content_type",
    "sg_user_id",
    "unique_args",
}


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key from its base64 DER (the console's form) or PEM text."""
    raw = text.strip()
    try:
        if raw.startswith("-----BEGIN"):
            key = load_pem_public_key(raw.encode())
        else:
            key = load_der_public_key(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error) as err:
        raise ValueError(f"SENDGRID_WEBHOOK_PUBLIC_KEYS: not a base64 DER or PEM public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("SENDGRID_WEBHOOK_PUBLIC_KEYS: the key is not an ECDSA public key")
    return key


def verify(public_keys: list[str], headers: dict[str, str], body: bytes, *, now: float, window_seconds: int) -> None:
    """Raise ProviderAuthError unless one configured key signs `timestamp + body`."""
    if not public_keys:
        raise ProviderAuthError("no SendGrid verification key is configured (SENDGRID_WEBHOOK_PUBLIC_KEYS)")
    signature = headers.get(SIGNATURE_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    if not signature or not timestamp:
        raise ProviderAuthError(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
    check_fresh(timestamp, now, window_seconds, TIMESTAMP_HEADER)
    try:
        der = base64.b64decode(signature.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise ProviderAuthError(f"{SIGNATURE_HEADER} is not base64") from None
    payload = timestamp.encode() + body
    for text in public_keys:
        try:
            load_public_key(text).verify(der, payload, ec.ECDSA(hashes.SHA256()))
            return
        except InvalidSignature:
            continue
    raise ProviderAuthError("bad signature")


def _kind(event: dict[str, Any], where: str) -> tuple[str, str | None]:
    name = require(event, "event", where)
    if name == "delivered":
        return "delivered", None
    if name == "deferred":
        return "deferred", None
    if name == "bounce":
        return "bounce", "soft" if str(event.get("type", "")).lower() == "blocked" else "hard"
    if name == "open":
        return "open", None
    if name == "click":
        return "click", None
    if name == "spamreport":
        return "complaint", None
    if name in ("unsubscribe", "group_unsubscribe"):
        return "unsubscribe", None
    if name == "dropped":
        reason = str(event.get("reason", ""))
        if reason == "Bounced Address":
            return "bounce", "hard"
        if reason == "Spam Reporting Address":
            return "complaint", None
        if reason == "Unsubscribed Address":
            return "unsubscribe", None
    return "ignored", None  # processed, group_resubscribe, account events…


def parse_events(body: bytes) -> list[ProviderEvent]:
    """The Event Webhook body (a JSON array) as normalized events."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ProviderFormatError("body", f"not JSON ({err})") from None
    if not isinstance(data, list):
        raise ProviderFormatError("body", "expected a JSON array of events")
    out: list[ProviderEvent] = []
    for index, event in enumerate(data):
        where = f"[{index}]"
        if not isinstance(event, dict):
            raise ProviderFormatError(where, "expected a JSON object")
        event_id = require_id(event, "sg_event_id", where)
        email = require(event, "email", where)
        kind, bounce = _kind(event, where)
        occurred = from_unix(require(event, "timestamp", where, (int, float)), f"{where}.timestamp")
        custom = {k: str(v) for k, v in event.items() if k not in STANDARD_FIELDS and isinstance(v, str | int)}
        if isinstance(event.get("unique_args"), dict):  # older v2 webhooks nest them
            custom.update({k: str(v) for k, v in event["unique_args"].items()})
        ids = []
        sg_id = event.get("sg_message_id")
        if isinstance(sg_id, str) and sg_id:
            ids += [sg_id, sg_id.split(".filter", 1)[0]]
        smtp_id = bare_message_id(event.get("smtp-id") if isinstance(event.get("smtp-id"), str) else None)
        if smtp_id:
            ids.append(smtp_id)
        out.append(
            ProviderEvent(
                provider=NAME,
                event_id=event_id,
                kind=kind,
                bounce=bounce,
                recipient=email,
                message_ids=list(dict.fromkeys(ids)),
                delivery_key=custom.get(DELIVERY_KEY_ARG),
                occurred_at=occurred,
                url=event.get("url") if isinstance(event.get("url"), str) else None,
                reason=str(event.get("reason") or event.get("response") or "")[:500] or None,
                custom=custom,
            )
        )
    return out


def parse_inbound(fields: dict[str, str]) -> ProviderEvent:
    """An Inbound Parse post (its form fields) as a reply event."""
    sender = require(fields, "from", "")
    raw_headers = fields.get("headers", "")
    headers = BytesParser(policy=default_policy).parsebytes(raw_headers.encode("utf-8", "replace") + b"\r\n\r\n")
    message_id = bare_message_id(str(headers.get("Message-ID") or "")) or None
    text = fields.get("text")
    if text is None and not fields.get("html"):
        raise ProviderFormatError("text", "is missing (and there is no html either)")
    body_text = text if text is not None else fields.get("html", "")
    event_id = (
        message_id
        or hashlib.sha256((sender + fields.get("subject", "") + raw_headers + body_text).encode()).hexdigest()
    )
    references = str(headers.get("References") or "").split()
    return ProviderEvent(
        provider=NAME,
        event_id=f"inbound:{event_id}"[:280],
        kind="reply",
        sender=sender,
        text=reply_text(body_text),
        in_reply_to=str(headers.get("In-Reply-To") or "").strip() or None,
        references=references,
    )

"""Provider payloads shaped like each provider's documented samples, and signers that
sign them the way the provider does, with keys generated here (no provider secrets).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from standardwebhooks.webhooks import Webhook

from webhooks.providers import ses

# --------------------------------------------------------------------------- SendGrid


class SendGridSigner:
    """An ECDSA P-256 key pair, as SendGrid's Signed Event Webhook uses."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(der).decode()  # what the console shows

    def headers(self, body: bytes, at: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if at is None else at)
        sig = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
            "Content-Type": "application/json",
        }


def sendgrid_event(event: str, email: str, n: int = 0, **extra: Any) -> dict[str, Any]:
    """One event as in SendGrid's Event Webhook reference."""
    return {
        "email": email,
        "timestamp": 1513299569 + n,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": event,
        "category": "cat facts",
        "sg_event_id": f"sg_event_id_{event}_{n}",
        "sg_message_id": f"14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.{n}",
        **extra,
    }


# --------------------------------------------------------------------------- Mailgun


def mailgun_body(key: str, event_data: dict[str, Any], *, at: int | None = None, token: str | None = None) -> bytes:
    stamp = str(int(time.time()) if at is None else at)
    tok = token or hashlib.sha256(f"{stamp}{json.dumps(event_data)}{time.time_ns()}".encode()).hexdigest()[:50]
    sig = hmac.new(key.encode(), f"{stamp}{tok}".encode(), hashlib.sha256).hexdigest()
    return json.dumps(
        {"signature": {"timestamp": stamp, "token": tok, "signature": sig}, "event-data": event_data}
    ).encode()


def mailgun_event(event: str, recipient: str, **extra: Any) -> dict[str, Any]:
    """As in Mailgun's webhook samples (event-data)."""
    return {
        "id": f"CPgfbmQMTCKtHW6uIWtuVe-{uuid.uuid4().hex[:8]}",
        "timestamp": 1521472262.908181,
        "log-level": "info",
        "event": event,
        "recipient": recipient,
        "message": {"headers": {"to": recipient, "message-id": "20130503182626.18666.16540@example.com"}},
        "user-variables": {},
        **extra,
    }


# --------------------------------------------------------------------------- SNS / SES


class SnsSigner:
    """An RSA key and a self-signed certificate standing in for SNS's signing certificate."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, msg: dict[str, Any], version: str = "1") -> dict[str, Any]:
        msg = {**msg, "SignatureVersion": version}
        algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        sig = self.key.sign(ses.string_to_sign(msg), padding.PKCS1v15(), algorithm)
        return {**msg, "Signature": base64.b64encode(sig).decode()}


def sns_notification(topic: str, cert_url: str, message: dict[str, Any], *, n: int = 0) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": f"22b80b92-fdea-4c2c-8f9d-bdfb0c7bf32{n}",
        "TopicArn": topic,
        "Message": json.dumps(message),
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "SigningCertURL": cert_url,
        "UnsubscribeURL": cert_url.rsplit("/", 1)[0] + "/?Action=Unsubscribe",
    }


def ses_bounce(recipient: str, bounce_type: str = "Permanent", *, message_id: str = "EXAMPLE7c191be45", tags=None):
    """As in the SES notification examples."""
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": recipient,
                    "action": "failed",
                    "status": "5.0.0",
                    "diagnosticCode": "smtp; 550 user unknown",
                }
            ],
            "timestamp": "2016-01-27T14:59:38.237Z",
            "feedbackId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
        },
        "mail": {
            "timestamp": "2016-01-27T14:59:38.237Z",
            "messageId": message_id,
            "source": "john@example.com",
            "destination": [recipient],
            "tags": tags or {},
        },
    }


# --------------------------------------------------------------------------- Standard Webhooks


def standard_headers(secret: str, body: bytes, msg_id: str, at: datetime | None = None) -> dict[str, str]:
    when = at or datetime.now(UTC)
    sig = Webhook(secret).sign(msg_id, when, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": sig,
        "Content-Type": "application/json",
    }


def new_whsec() -> str:
    return "whsec_" + base64.b64encode(hashlib.sha256(str(time.time_ns()).encode()).digest()).decode()


# --------------------------------------------------------------------------- X


def x_signature(secret: str, body: bytes) -> str:
    return "sha256=" + base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def x_dm(for_user: str, sender: str, text: str, dm_id: str) -> dict[str, Any]:
    """As in the Account Activity data objects: direct_message_events."""
    return {
        "for_user_id": for_user,
        "direct_message_events": [
            {
                "type": "message_create",
                "id": dm_id,
                "created_timestamp": "1555366155556",
                "message_create": {
                    "target": {"recipient_id": for_user if sender != for_user else "999"},
                    "sender_id": sender,
                    "message_data": {
                        "text": text,
                        "entities": {"hashtags": [], "symbols": [], "user_mentions": [], "urls": []},
                    },
                },
            }
        ],
        "users": {},
    }


def x_follow(for_user: str, source: str, target: str) -> dict[str, Any]:
    return {
        "for_user_id": for_user,
        "follow_events": [
            {
                "type": "follow",
                "created_timestamp": "1517588749178",
                "target": {"id": target, "screen_name": "target"},
                "source": {"id": source, "screen_name": "source"},
            }
        ],
    }


def xaa_envelope(event_type: str, us: str, payload: dict[str, Any], uuid_: str = "-7953119945885597316") -> dict:
    """The X Activity API envelope, as in its event-payloads documentation."""
    return {
        "data": {
            "event_uuid": uuid_,
            "filter": {"user_id": us},
            "event_type": event_type,
            "tag": "follows",
            "payload": payload,
        }
    }


def xaa_follow(us: str, source: str, target: str) -> dict[str, Any]:
    user = {"protected": False, "verified": True, "username": "ExampleUser", "name": "Example User"}
    return xaa_envelope(
        "follow.follow", us, {"source": {"data": {**user, "id": source}}, "target": {"data": {**user, "id": target}}}
    )


def xaa_dm(us: str, sender: str, text: str, dm_id: str) -> dict[str, Any]:
    inner = x_dm(us, sender, text, dm_id)
    return xaa_envelope("dm.received", us, {"direct_message_events": inner["direct_message_events"], "users": {}})

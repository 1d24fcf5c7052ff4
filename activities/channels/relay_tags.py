"""Custom data for email service providers' SMTP relays, and their message ids.

An ESP may rewrite the Message-ID, so its events are matched to a delivery by the
custom data it hands back: each relay has its own header for it, which the relay
removes before the message leaves (EMAIL_RELAY_TAGS names the relays in use, so no
other server ever sees these headers). Every header carries the ledger's delivery key
under `sequencer_key`; the provider adapters read it back (webhooks/providers/).

| relay    | header                                         | comes back as                     |
|----------|------------------------------------------------|-----------------------------------|
| sendgrid | X-SMTPAPI: {"unique_args": {...}}              | top-level keys of each event      |
| mailgun  | X-Mailgun-Variables: {...}                     | event-data.user-variables         |
| postmark | X-PM-Metadata-sequencer_key: ...               | Metadata                          |
| ses      | X-SES-MESSAGE-TAGS: sequencer_key=<base64url>  | mail.tags (SES allows [A-Za-z0-9_-]) |

The final SMTP reply of some relays names their own message id (SendGrid "250 Ok:
queued as <id>", SES "250 Ok <id>"); `relay_message_id` reads it so that the ledger
stores what the provider's events will quote.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable

DELIVERY_KEY_ARG = "sequencer_key"
RELAYS = ("sendgrid", "mailgun", "postmark", "ses")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_QUEUED_AS = re.compile(r"queued as\s+<?([A-Za-z0-9._@=+-]{6,200})>?", re.IGNORECASE)
_SES_OK = re.compile(r"^Ok\s+([0-9a-f]{16}-[0-9a-f-]{20,}-[0-9]{6})\s*$", re.IGNORECASE)


def ses_tag_value(key: str) -> str:
    """The delivery key in the alphabet SES allows for tag values."""
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def relay_headers(relays: Iterable[str], key: str) -> bytes:
    """The raw header lines (CRLF ended) tagging one message with its delivery key."""
    out = b""
    for relay in relays:
        if relay == "sendgrid":
            value = json.dumps({"unique_args": {DELIVERY_KEY_ARG: key}}, separators=(", ", ": "))
            out += f"X-SMTPAPI: {value}\r\n".encode("ascii")
        elif relay == "mailgun":
            value = json.dumps({DELIVERY_KEY_ARG: key}, separators=(", ", ": "))
            out += f"X-Mailgun-Variables: {value}\r\n".encode("ascii")
        elif relay == "postmark":
            if _PRINTABLE.match(key):
                out += f"X-PM-Metadata-{DELIVERY_KEY_ARG}: {key}\r\n".encode("ascii")
        elif relay == "ses":
            out += f"X-SES-MESSAGE-TAGS: {DELIVERY_KEY_ARG}={ses_tag_value(key)}\r\n".encode("ascii")
        else:
            raise ValueError(f"EMAIL_RELAY_TAGS: unknown relay {relay!r}; expected some of {', '.join(RELAYS)}")
    return out


def relay_message_id(reply: str | None) -> str | None:
    """The relay's own message id in its final SMTP reply text, when it names one."""
    if not reply:
        return None
    text = reply.strip()
    found = _QUEUED_AS.search(text) or _SES_OK.match(text)
    return found.group(1) if found else None

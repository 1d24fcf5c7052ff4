"""Raw RFC 5322 mail from a connected mailbox -> one normalized `InboundEvent`.

Pure (no I/O), so every rule can be tested on bytes alone. In order:

1. Unreadable mail (the MIME structure cannot be parsed, no sender) is `unknown` with the
   reason in `detail` (recorded by the pipeline; the watcher goes on).
2. A delivery status notification (RFC 3464, `multipart/report; report-type=delivery-status`)
   is a `bounce`: permanent when the DSN says `Action: failed` / status 5.x.x, temporary
   for `delayed` / 4.x.x. Non-standard bounces are recognised by flufl.bounce's detectors
   (Exim, Postfix, qmail, Microsoft, ...), which also say permanent vs temporary. The
   Message-ID of our mail inside the report (message/rfc822 or text/rfc822-headers) is
   what the pipeline matches to our delivery.
3. An abuse report (ARF, RFC 5965, `report-type=feedback-report`) is a `complaint`.
4. An auto-responder by header (RFC 3834 `Auto-Submitted` other than `no`, `X-Autoreply`,
   `X-Autorespond`, `Precedence: auto_reply`, or `Precedence: bulk/junk/list` with an
   auto-reply subject) is `auto_reply` (out-of-office handling, never a reply).
5. A request sent through our List-Unsubscribe `mailto:` (UNSUBSCRIBE_MAILTO, subject
   `unsubscribe-<token>`) is a `reply` carrying the token in `detail["unsubscribe_token"]`:
   the pipeline reads the token and unsubscribes that person, whatever the body says.
6. Everything else is a `reply`, with its newest part only: quoted history and
   signatures stripped (mail-parser-reply) before the pipeline classifies the text.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, HeaderParser
from email.utils import parseaddr, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

from flufl.bounce import all_failures
from mailparser_reply import EmailReplyParser

from models.inbound import InboundEvent, MailboxRef

#: Languages whose reply headers ("On ... wrote:", "Am ... schrieb:") and signatures are stripped.
REPLY_LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "pt", "sv", "pl"]
AUTO_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|auto:|out of (the )?office|abwesen|absence|"
    r"r[ée]ponse automatique|respuesta autom[aá]tica|risposta automatica|vacation|on leave)",
    re.IGNORECASE,
)
#: The subject our List-Unsubscribe mailto: asks for (activities/delivery.py writes it).
UNSUBSCRIBE_SUBJECT = re.compile(r"^\s*unsubscribe-([A-Za-z0-9_.=-]{8,2000})\s*$", re.IGNORECASE)
_FATAL_DEFECTS = ("StartBoundaryNotFoundDefect", "MultipartInvariantViolationDefect", "NoBoundaryInMultipartDefect")
_reply_parser = EmailReplyParser(languages=REPLY_LANGUAGES)


class _Text(HTMLParser):
    """The visible text of an HTML body (for mail that has no text/plain part)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in ("br", "p", "div", "tr", "li", "blockquote"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_text(html: str) -> str:
    """Visible text of an HTML document."""
    parser = _Text()
    parser.feed(html)
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()


def message_key(msg: Message, raw: bytes) -> str:
    """The deduplication key: the Message-ID, or a digest of the bytes when there is none."""
    mid = _message_id(msg.get("Message-ID"))
    return mid if mid else f"sha256:{hashlib.sha256(raw).hexdigest()}"


def _message_id(value: Any) -> str | None:
    text = str(value or "").strip()
    found = re.search(r"<[^<>\s]+>", text)
    if found:
        return found.group(0)[:300]
    return f"<{text}>"[:300] if text and " " not in text else None


def _ids(value: Any) -> list[str]:
    return re.findall(r"<[^<>\s]+>", str(value or ""))


def _when(msg: Message) -> datetime | None:
    try:
        value = parsedate_to_datetime(str(msg.get("Date", "")))
    except (TypeError, ValueError, IndexError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def body_text(msg: Message) -> str:
    """The message's text: its text/plain part, else its HTML part as text."""
    if isinstance(msg, EmailMessage):
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
        return html_text(content) if part.get_content_subtype() == "html" else str(content)
    payload = msg.get_payload(decode=True)
    return payload.decode(msg.get_content_charset() or "utf-8", errors="replace") if isinstance(payload, bytes) else ""


def newest_part(text: str) -> str:
    """The reply without the quoted history and the signature (mail-parser-reply)."""
    try:
        latest = _reply_parser.parse_reply(text=text)
    except Exception:  # a pathological body: keep it whole, the classifier strips quotes too
        return text.strip()
    return (latest or "").strip() or text.strip()


def _report_parts(msg: Message, report_type: str) -> tuple[list[Message], list[Message]] | None:
    """(status blocks, returned headers) of a multipart/report of this type, or None."""
    if msg.get_content_type() != "multipart/report" or str(msg.get_param("report-type", "")).lower() != report_type:
        return None
    blocks: list[Message] = []
    returned: list[Message] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/feedback-report"):
            payload = part.get_payload()
            if isinstance(payload, list):  # the stdlib parses these as a list of header blocks
                blocks += [p for p in payload if isinstance(p, Message)]
            else:
                raw = part.get_payload(decode=True) or b""
                blocks += [BytesHeaderParser().parsebytes(chunk) for chunk in bytes(raw).split(b"\n\n") if chunk]
        elif ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                returned.append(payload[0])
        elif ctype in ("text/rfc822-headers", "text/rfc822-header"):
            data = part.get_payload(decode=True)
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(part.get_payload())
            returned.append(HeaderParser().parsestr(text))
    return blocks, returned


def _returned_ids(returned: list[Message]) -> list[str]:
    out: list[str] = []
    for headers in returned:
        mid = _message_id(headers.get("Message-ID"))
        if mid:
            out.append(mid)
    return out


def _recipient(value: Any) -> str | None:
    text = str(value or "").strip()
    if ";" in text:  # "rfc822; ada@x.test"
        text = text.split(";", 1)[1]
    address = parseaddr(text)[1] or text.strip().strip("<>")
    return address or None


def _dsn(msg: Message) -> dict[str, Any] | None:
    """A standard DSN's verdict: permanent?, recipients, returned Message-IDs, status text."""
    found = _report_parts(msg, "delivery-status")
    if found is None:
        return None
    blocks, returned = found
    recipients: list[str] = []
    permanent = False
    temporary = False
    status = diagnostic = action = ""
    for block in blocks:
        rcpt = _recipient(block.get("Final-Recipient") or block.get("Original-Recipient"))
        if rcpt is None:
            continue
        act = str(block.get("Action", "")).strip().lower()
        code = str(block.get("Status", "")).strip()
        if act == "failed" or code.startswith("5"):
            permanent = True
        elif act in ("delayed", "relayed", "expanded", "delivered") or code.startswith("4"):
            temporary = temporary or act == "delayed" or code.startswith("4")
        else:
            continue
        recipients.append(rcpt)
        status, action = status or code, action or act
        diagnostic = diagnostic or " ".join(str(block.get("Diagnostic-Code", "")).split())
    if not (permanent or temporary):
        return None  # a success notice (delivered/relayed): nothing to act on
    return {
        "permanent": permanent,
        "recipients": recipients,
        "ids": _returned_ids(returned),
        "detail": {"status": status, "action": action, "diagnostic": diagnostic[:500], "format": "rfc3464"},
    }


def _other_bounce(msg: Message) -> dict[str, Any] | None:
    """A non-standard bounce recognised by flufl.bounce's detectors."""
    sender = parseaddr(str(msg.get("From", "")))[1].lower()
    if not (sender.startswith(("mailer-daemon", "postmaster")) or msg.get("X-Failed-Recipients")):
        return None
    try:
        temporary, permanent = all_failures(msg)
    except Exception:
        return None
    if not (temporary or permanent):
        return None
    recipients = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in (permanent or temporary)]
    returned: list[Message] = []
    for part in msg.walk():
        payload = part.get_payload() if part.get_content_type() == "message/rfc822" else None
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            returned.append(payload[0])
    text = body_text(msg) if not returned else ""
    ids = _returned_ids(returned) or [i for i in _ids(text)]
    return {
        "permanent": bool(permanent),
        "recipients": recipients,
        "ids": ids,
        "detail": {"status": "5.0.0" if permanent else "4.0.0", "format": "flufl.bounce"},
    }


def _arf(msg: Message) -> dict[str, Any] | None:
    found = _report_parts(msg, "feedback-report")
    if found is None:
        return None
    blocks, returned = found
    report = blocks[0] if blocks else Message()
    recipients = [r for r in (_recipient(report.get("Original-Rcpt-To")),) if r]
    recipients += [parseaddr(str(h.get("To", "")))[1] for h in returned if h.get("To")]
    return {
        "ids": _returned_ids(returned),
        "recipients": [r for r in recipients if r],
        "detail": {"feedback_type": str(report.get("Feedback-Type", "")).strip(), "format": "rfc5965"},
    }


def auto_reply_reason(msg: Message) -> str | None:
    """Why the headers say this is an auto-responder (RFC 3834 and common vendor headers), or None."""
    auto = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {auto}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder"):
        if msg.get(name) is not None:
            return name
    precedence = str(msg.get("Precedence", "")).strip().lower()
    if precedence == "auto_reply":
        return "Precedence: auto_reply"
    if precedence in ("bulk", "junk", "list") and AUTO_SUBJECT.search(str(msg.get("Subject", ""))):
        return f"Precedence: {precedence} with an auto-reply subject"
    return None


def _malformed(reason: str, raw: bytes, sender: str, mailbox: MailboxRef | None) -> InboundEvent:
    return InboundEvent(
        source="imap",
        channel="email",
        event_id=f"sha256:{hashlib.sha256(raw).hexdigest()}",
        type="unknown",
        sender=sender or "(unknown)",
        detail={"malformed": True, "reason": reason[:500]},
        mailbox=mailbox,
    )


def read_mail(raw: bytes, *, mailbox: MailboxRef | None = None, received_at: datetime | None = None) -> InboundEvent:
    """Classify one raw message into the pipeline's event (never raises on bad input)."""
    try:
        msg = message_from_bytes(raw, policy=policy.default)
        sender = str(msg.get("From", "") or "")
    except Exception as err:  # the header block itself cannot be read
        return _malformed(f"unreadable message: {err.__class__.__name__}: {err}", raw, "", mailbox)
    fatal = [d.__class__.__name__ for d in msg.defects if d.__class__.__name__ in _FATAL_DEFECTS]
    for part in msg.walk() if not fatal else []:
        fatal += [d.__class__.__name__ for d in part.defects if d.__class__.__name__ in _FATAL_DEFECTS]
    address = parseaddr(sender)[1]
    if fatal:
        return _malformed(f"malformed MIME: {', '.join(dict.fromkeys(fatal))}", raw, address or sender, mailbox)
    if not address:
        return _malformed("no sender address in From", raw, sender, mailbox)
    try:
        common: dict[str, Any] = {
            "source": "imap",
            "channel": "email",
            "event_id": message_key(msg, raw),
            "sender": address[:512],
            "occurred_at": _when(msg) or received_at,
            "subject": str(msg.get("Subject", "") or "")[:1000] or None,
            "in_reply_to": _message_id(msg.get("In-Reply-To")),
            "references": _ids(msg.get("References"))[-100:],
            "mailbox": mailbox,
        }
        dsn = _dsn(msg) or (None if msg.get_content_type() == "multipart/report" else _other_bounce(msg))
        if dsn is not None:
            return InboundEvent(
                type="bounce",
                permanent=dsn["permanent"],
                about_message_ids=dsn["ids"][:100],
                about_recipients=dsn["recipients"][:100],
                detail=dsn["detail"],
                **common,
            )
        arf = _arf(msg)
        if arf is not None:
            return InboundEvent(
                type="complaint",
                about_message_ids=arf["ids"][:100],
                about_recipients=arf["recipients"][:100],
                detail=arf["detail"],
                **common,
            )
        if msg.get_content_type() == "multipart/report":  # a delivery success notice, a read receipt
            kind = msg.get_param("report-type", "") or "unknown"
            return InboundEvent(
                type="unknown", detail={"reason": f"report of type {kind}, nothing to act on"}, **common
            )
        text = body_text(msg)
        request = UNSUBSCRIBE_SUBJECT.match(common["subject"] or "")
        if request is not None:
            return InboundEvent(
                type="reply", text=newest_part(text)[:100_000], detail={"unsubscribe_token": request.group(1)}, **common
            )
        why = auto_reply_reason(msg)
        if why is not None:
            return InboundEvent(type="auto_reply", text=text[:100_000], detail={"auto_reply": why}, **common)
        return InboundEvent(type="reply", text=newest_part(text)[:100_000], **common)
    except Exception as err:  # a part that cannot be decoded (unknown charset, broken encoding)
        return _malformed(f"unreadable content: {err.__class__.__name__}: {err}", raw, address, mailbox)


__all__ = ["read_mail", "auto_reply_reason", "newest_part", "body_text", "message_key", "REPLY_LANGUAGES"]

"""Raw RFC 5322 messages as mail servers and mail clients write them (bytes, CRLF).

Shapes follow the RFCs and what real systems send: a Gmail-style reply quoting our
mail, an RFC 3464 DSN from Postfix (hard and soft), an RFC 5965 ARF abuse report, an
RFC 3834 auto-reply, a non-standard Exim bounce and a broken multipart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime


def _date(when: datetime | None) -> str:
    return format_datetime(when or datetime.now(UTC))


def reply(
    *,
    sender: str,
    to: str,
    in_reply_to: str | None,
    text: str,
    message_id: str,
    subject: str = "Re: Hello",
    when: datetime | None = None,
    quoted: str = "Hello, would you like to talk?",
) -> bytes:
    """A plain-text reply quoting our message, threaded by In-Reply-To/References."""
    thread = f"In-Reply-To: {in_reply_to}\r\nReferences: {in_reply_to}\r\n" if in_reply_to else ""
    quote = "\r\n".join(f"> {line}" for line in quoted.splitlines())
    return (
        f"From: Lead <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {_date(when)}\r\n"
        f"Message-ID: {message_id}\r\n{thread}MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="UTF-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
        f"{text}\r\n\r\nOn Mon, Nov 30, 2026 at 10:00 AM Sender <{to}> wrote:\r\n{quote}\r\n"
    ).encode()


def dsn(
    *,
    to: str,
    recipient: str,
    original_id: str,
    message_id: str,
    permanent: bool = True,
    when: datetime | None = None,
) -> bytes:
    """An RFC 3464 delivery status notification from Postfix, returning our headers."""
    status, action = ("5.1.1", "failed") if permanent else ("4.4.1", "delayed")
    diag = (
        "smtp; 550 5.1.1 <{r}>: Recipient address rejected: User unknown"
        if permanent
        else "smtp; 451 4.4.1 Temporary failure, will retry"
    ).format(r=recipient)
    b = "=_dsn_boundary_1"
    return (
        f"From: MAILER-DAEMON@mx.lead.test (Mail Delivery System)\r\nTo: <{to}>\r\n"
        f"Subject: {'Undelivered Mail Returned to Sender' if permanent else 'Delayed Mail (still being retried)'}\r\n"
        f"Date: {_date(when)}\r\nMessage-ID: {message_id}\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"\r\n\r\n'
        f"--{b}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "This is the mail system at host mx.lead.test.\r\n\r\n"
        f"I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
        f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.lead.test\r\nArrival-Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mx.lead.test\r\nDiagnostic-Code: {diag}\r\n\r\n"
        f"--{b}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Sender <{to}>\r\nTo: <{recipient}>\r\nSubject: Hello\r\nMessage-ID: {original_id}\r\n\r\n"
        f"--{b}--\r\n"
    ).encode()


def arf(*, to: str, recipient: str, original_id: str, message_id: str, when: datetime | None = None) -> bytes:
    """An RFC 5965 abuse report (as a mailbox provider's feedback loop sends it), with our message."""
    b = "=_arf_boundary_1"
    return (
        f"From: <staff@fbl.mailbox.test>\r\nTo: <{to}>\r\nSubject: Abuse report\r\nDate: {_date(when)}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{b}"\r\n\r\n'
        f"--{b}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThis is an email abuse report.\r\n\r\n"
        f"--{b}\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
        f"Original-Mail-From: <{to}>\r\nOriginal-Rcpt-To: <{recipient}>\r\n"
        "Arrival-Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nReported-Domain: sender.test\r\n\r\n"
        f"--{b}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        f"From: Sender <{to}>\r\nTo: <{recipient}>\r\nSubject: Hello\r\nMessage-ID: {original_id}\r\n"
        "Date: Mon, 30 Nov 2026 09:59:00 +0000\r\n\r\nHello, would you like to talk?\r\n\r\n"
        f"--{b}--\r\n"
    ).encode()


def auto_reply(
    *,
    sender: str,
    to: str,
    in_reply_to: str | None,
    message_id: str,
    headers: str = "Auto-Submitted: auto-replied\r\n",
    text: str = "Thank you for your message. I will read it when I can.",
    subject: str = "Automatic reply: Hello",
    when: datetime | None = None,
) -> bytes:
    """An auto-responder's answer, recognisable by its headers (not by its text)."""
    thread = f"In-Reply-To: {in_reply_to}\r\nReferences: {in_reply_to}\r\n" if in_reply_to else ""
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {_date(when)}\r\n"
        f"Message-ID: {message_id}\r\n{thread}{headers}MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=UTF-8\r\n\r\n"
        f"{text}\r\n"
    ).encode()


def exim_bounce(*, to: str, recipient: str, original_id: str, message_id: str) -> bytes:
    """A non-standard bounce (Exim's plain-text format, no DSN part)."""
    return (
        f"From: Mail Delivery System <Mailer-Daemon@mx.lead.test>\r\nTo: <{to}>\r\n"
        f"Subject: Mail delivery failed: returning message to sender\r\nMessage-ID: {message_id}\r\n"
        f"X-Failed-Recipients: {recipient}\r\nAuto-Submitted: auto-replied\r\nDate: {_date(None)}\r\n\r\n"
        "This message was created automatically by mail delivery software.\r\n\r\n"
        "A message that you sent could not be delivered to one or more of its\r\n"
        "recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
        f"  {recipient}\r\n    550 5.1.1 User unknown\r\n\r\n"
        "------ This is a copy of the message, including all the headers. ------\r\n\r\n"
        f"From: Sender <{to}>\r\nTo: <{recipient}>\r\nSubject: Hello\r\nMessage-ID: {original_id}\r\n\r\nHello\r\n"
    ).encode()


def broken_multipart(*, sender: str, message_id: str) -> bytes:
    """A multipart message whose boundary never appears (a truncated or mangled upload)."""
    return (
        f"From: <{sender}>\r\nTo: <owner@sender.test>\r\nSubject: Re: Hello\r\nMessage-ID: {message_id}\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="never-there"\r\n\r\n'
        "Some text without any boundary line at all.\r\n"
    ).encode()

"""Email over SMTP: a pooled aiosmtplib sender for the bytes `email_compose` builds.

Why it is built this way:

- Connections are expensive (TCP + EHLO + STARTTLS + AUTH), so `SmtpPool` keeps up to
  `size` live clients in a bounded queue and reuses them across sends; a client found
  broken (the server closed an idle connection) is dropped and replaced once.
- The SMTP transaction is driven step by step (MAIL, RCPT, DATA, body) instead of with
  `sendmail`, because the ledger needs to know *where* a failure happened: anything
  that goes wrong before the message body is written cannot have delivered the message
  (transient), while a timeout or disconnect after the body was written and before the
  final reply may mean the server accepted it (uncertain, never re-sent).
- What the message says (headers, parts, footer, DKIM) is composed apart, in the pure
  `activities/channels/email_compose.py`, so it is tested byte for byte without a server.

What could and could not be distinguished with aiosmtplib 5: reply codes are exact at
every step (4xx transient, 5xx permanent). A 5xx to RCPT or to the message is a bounce
(the identity gets suppressed) unless its RFC 3463 enhanced code blames the system,
protocol or content (5.3/5.5/5.6, and 5.7 policy after DATA); 5xx to MAIL FROM never
is. A 421 to MAIL on a reused connection is taken as an idle-timed-out connection:
dropped and retried once on a fresh one. Connection errors
and timeouts while connecting, in EHLO/STARTTLS/AUTH, MAIL, RCPT and the `DATA` command
itself are transient. After `write()` of the body returns, the bytes are in the kernel's
buffer, not necessarily at the server; a failure from then until the final reply is
reported as uncertain even when the server never saw the final dot (we cannot tell).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import TYPE_CHECKING

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from activities.channels.base import (
    BeforeWrite,
    OutboundMessage,
    PermanentChannelError,
    SenderConfigError,
    SendResult,
    TransientChannelError,
    UncertainChannelError,
    no_hook,
)
from activities.channels.email_compose import ComposedEmail, compose_message
from activities.channels.relay_tags import relay_message_id

if TYPE_CHECKING:
    from activities.channels.sender_smtp import SenderSmtpPools
    from settings import Settings

_PERIOD_AT_LINE_START = re.compile(rb"(?m)^\.")
_LONE_LINE_ENDING = re.compile(rb"(?:\r\n|\n|\r(?!\n))")


def _dot_stuffed(message: bytes) -> bytes:
    """The DATA payload: CRLF line endings, leading dots doubled, ended by CRLF.CRLF."""
    body = _LONE_LINE_ENDING.sub(b"\r\n", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return _PERIOD_AT_LINE_START.sub(b"..", body) + b".\r\n"


_ENHANCED_STATUS = re.compile(r"^\s*5\.(\d{1,3})\.\d{1,3}\b")
#: RFC 3463 subjects that are not about the recipient: system (3), protocol (5),
#: content (6) and, after DATA, policy/security (7). A 5xx with one of these is a
#: failure but not a bounce, so the identity is not suppressed for our own mistake.
_NOT_RECIPIENT_SUBJECTS = {"3", "5", "6"}


def _recipient_bounce(text: str, *, after_data: bool) -> bool:
    """Whether a 5xx reply blames the recipient (no enhanced code: assume it does)."""
    match = _ENHANCED_STATUS.match(text)
    if match is None:
        return True
    subject = match.group(1)
    return subject not in _NOT_RECIPIENT_SUBJECTS and not (after_data and subject == "7")


#: Replies that refuse *our* login (RFC 4954): authentication required (530), mechanism too
#: weak (534), credentials invalid (535), encryption required (538). Not the lead's failure.
AUTH_REFUSED = frozenset({530, 534, 535, 538})


def _classify_reply(code: int, text: str, stage: str, *, bounce: bool) -> Exception:
    """Map an SMTP reply code to a channel error (`bounce` applies to 5xx only)."""
    message = f"SMTP {stage} refused: {code} {text}".strip()
    if code in AUTH_REFUSED:
        return SenderConfigError(f"{message} (the sender's SMTP login was refused)", code=str(code))
    if 400 <= code < 500:
        return TransientChannelError(message, code=str(code))
    if 500 <= code < 600:
        return PermanentChannelError(message, code=str(code), bounce=bounce)
    # Not a valid failure code (e.g. a malformed reply): nothing was accepted.
    return TransientChannelError(message, code=str(code))


class _BrokenBeforeData(Exception):
    """A pooled connection failed before anything of the message was sent."""

    def __init__(self, cause: BaseException, code: str = "disconnected") -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.code = code


class SmtpPool:
    """Up to `size` live SMTP connections, created lazily and reused across sends."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        use_tls: bool = False,
        size: int = 4,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
        final_reply_timeout: float | None = None,
        oauth_token: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        """`timeout` bounds every network step; `final_reply_timeout` (default: `timeout`)
        bounds the wait for the reply to the message body, after which the outcome is
        uncertain (RFC 5321 suggests servers may take up to 10 minutes there).
        `oauth_token` (instead of `password`) returns an access token for an XOAUTH2 login.
        """
        if size < 1:
            raise ValueError(f"SmtpPool size must be at least 1, got {size}")
        if timeout <= 0:
            raise ValueError(f"SmtpPool timeout must be positive, got {timeout}")
        if starttls and use_tls:
            raise ValueError("SmtpPool: starttls and use_tls are mutually exclusive")
        if oauth_token is not None and (password or not username):
            raise ValueError("SmtpPool: oauth_token needs a username and no password")
        self.host = host
        self.port = port
        self.username = username or None
        self.password = password or None
        self.starttls = starttls
        self.use_tls = use_tls
        self.size = size
        self.timeout = timeout
        self.tls_context = tls_context
        self.local_hostname = local_hostname
        self.final_reply_timeout = final_reply_timeout or timeout
        self.oauth_token = oauth_token
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue(maxsize=size)
        self._slots = asyncio.Semaphore(size)
        self._closed = False
        #: Connections opened over the pool's life (for tests and metrics).
        self.connections_opened = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, tls_context: ssl.SSLContext | None = None) -> SmtpPool:
        """A pool configured from `SMTP_*` settings."""
        return cls(
            settings.smtp_host,
            settings.smtp_port,
            username=settings.smtp_username or None,
            password=settings.smtp_password.get_secret_value() or None,
            starttls=settings.smtp_starttls,
            size=settings.smtp_pool_size,
            timeout=settings.smtp_timeout_seconds,
            tls_context=tls_context,
        )

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            start_tls=self.starttls,
            use_tls=self.use_tls,
            timeout=self.timeout,
            tls_context=self.tls_context,
            local_hostname=self.local_hostname,
            oauth_token_generator=self.oauth_token,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        try:
            await client.connect()
        except SMTPAuthenticationError as err:
            # The sender's login was refused: nothing was sent, and the lead is not at fault.
            client.close()
            raise SenderConfigError(
                f"SMTP login of {self.username} at {self.host}:{self.port} refused: {err.code} {err.message}",
                code="auth",
            ) from err
        except SMTPResponseException as err:
            client.close()
            raise _classify_reply(err.code, err.message, "connection", bounce=False) from err
        except (SMTPException, OSError, TimeoutError, ssl.SSLError) as err:
            client.close()
            if getattr(err.__cause__, "permanent", False):  # e.g. a revoked OAuth refresh token
                raise SenderConfigError(f"SMTP login of {self.username} not possible: {err}", code="auth") from err
            raise TransientChannelError(
                f"SMTP connect to {self.host}:{self.port} failed: {err}", code="connect"
            ) from err
        self.connections_opened += 1
        return client

    async def send(
        self, message: EmailMessage | bytes, sender: str, recipients: list[str], before_write: BeforeWrite = no_hook
    ) -> str:
        """Send one message (composed bytes, or an EmailMessage); return the server's final reply text.

        `before_write` is awaited once the server accepted DATA, right before the body is
        written (the irreversible step); if it raises, the connection is dropped unwritten.
        Raises `TransientChannelError`, `PermanentChannelError` or `UncertainChannelError`.
        """
        if self._closed:
            raise RuntimeError("SmtpPool.send: the pool is closed")
        if not recipients:
            raise PermanentChannelError("SMTP send: no recipients", code="no_recipients")
        raw = message if isinstance(message, bytes) else message.as_bytes(policy=SMTP_POLICY)
        payload = _dot_stuffed(raw)
        async with self._slots:
            client: aiosmtplib.SMTP | None = None
            try:
                client = self._idle.get_nowait()
            except asyncio.QueueEmpty:
                client = None
            reused = client is not None
            if client is None or not client.is_connected:
                if client is not None:
                    client.close()
                client = await self._connect()
                reused = False
            keep = False
            try:
                try:
                    reply = await self._transaction(client, payload, sender, recipients, before_write)
                except _BrokenBeforeData as broken:
                    client.close()
                    if not reused:
                        raise TransientChannelError(
                            f"SMTP connection lost before the message was sent: {broken}",
                            code=broken.code,
                        ) from broken.cause
                    # A stale pooled connection: reconnect once and try again.
                    client = await self._connect()
                    try:
                        reply = await self._transaction(client, payload, sender, recipients, before_write)
                    except _BrokenBeforeData as again:
                        raise TransientChannelError(
                            f"SMTP connection lost before the message was sent: {again}",
                            code=again.code,
                        ) from again.cause
                keep = True
                return reply
            except (TransientChannelError, PermanentChannelError) as err:
                # A refused envelope leaves a usable connection unless the server said 421.
                keep = err.code not in {"421", "disconnected", "connect"}
                raise
            finally:
                if keep and client.is_connected and not self._closed:
                    try:
                        self._idle.put_nowait(client)
                    except asyncio.QueueFull:
                        client.close()
                else:
                    client.close()

    async def _rset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (SMTPException, OSError):
            client.close()

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        payload: bytes,
        sender: str,
        recipients: list[str],
        before_write: BeforeWrite = no_hook,
    ) -> str:
        mail_options: list[str] = []
        try:
            # EHLO first (MAIL would do it too) so that extensions are known for options.
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if client.supports_extension("size"):
                mail_options.append(f"SIZE={len(payload)}")
            if client.supports_extension("8bitmime"):
                mail_options.append("BODY=8BITMIME")
            if not all(a.isascii() for a in [sender, *recipients]):
                if not client.supports_extension("smtputf8"):
                    raise PermanentChannelError(
                        "SMTP: a non-ASCII address needs SMTPUTF8, which the server lacks",
                        code="smtputf8",
                    )
                mail_options.append("SMTPUTF8")
            encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
            try:
                await client.mail(sender, options=mail_options, encoding=encoding)
            except SMTPResponseException as err:
                if err.code == 421:
                    # "Service closing": typical of a pooled connection the server timed out.
                    client.close()
                    raise _BrokenBeforeData(err, code="421") from err
                await self._rset(client)
                raise _classify_reply(err.code, err.message, "MAIL FROM", bounce=False) from err
            refused: list[SMTPRecipientRefused] = []
            for rcpt in recipients:
                try:
                    await client.rcpt(rcpt, encoding=encoding)
                except SMTPRecipientRefused as err:
                    refused.append(err)
            if len(refused) == len(recipients):
                await self._rset(client)
                worst = max(refused, key=lambda e: e.code)
                detail = "; ".join(f"{e.recipient}: {e.code} {e.message}" for e in refused)
                raise _classify_reply(
                    worst.code,
                    detail,
                    "RCPT TO",
                    bounce=_recipient_bounce(worst.message, after_data=False),
                )
            start = await client.execute_command(b"DATA")
            if start.code != 354:
                await self._rset(client)
                raise _classify_reply(start.code, start.message, "DATA", bounce=False)
        except (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError, TimeoutError) as err:
            raise _BrokenBeforeData(err) from err
        except SMTPResponseException as err:  # e.g. EHLO refused, malformed reply
            raise _classify_reply(err.code, err.message, "command", bounce=False) from err
        except ValueError as err:  # an address aiosmtplib refuses to put on the wire
            await self._rset(client)
            raise PermanentChannelError(f"SMTP: invalid envelope address: {err}", code="invalid_address") from err

        return await self._write_body(client, payload, before_write)

    async def _write_body(self, client: aiosmtplib.SMTP, payload: bytes, before_write: BeforeWrite) -> str:
        """After DATA's 354: the hook, then the body; from here a lost answer is uncertain."""
        protocol = client.protocol
        if protocol is None:
            raise _BrokenBeforeData(SMTPServerDisconnected("connection lost before the body"))
        try:
            await before_write()
        except BaseException:
            client.close()  # mid-DATA without the final dot: the server delivers nothing
            raise
        try:
            protocol.write(payload)
        except (SMTPServerDisconnected, ConnectionError) as err:
            client.close()
            raise _BrokenBeforeData(err) from err
        try:
            final = await protocol.read_response(timeout=self.final_reply_timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError, TimeoutError) as err:
            client.close()
            raise UncertainChannelError(
                f"SMTP: no reply after the message body was sent ({err}); the server may have accepted it",
                code="no_final_reply",
            ) from err
        except SMTPResponseException as err:
            client.close()
            raise UncertainChannelError(
                f"SMTP: unreadable reply after the message body: {err.code} {err.message}",
                code="bad_final_reply",
            ) from err
        if final.code != 250:
            raise _classify_reply(
                final.code,
                final.message,
                "message",
                bounce=_recipient_bounce(final.message, after_data=True),
            )
        return final.message

    async def aclose(self) -> None:
        """Close every idle connection (QUIT, then close)."""
        self._closed = True
        while True:
            try:
                client = self._idle.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                if client.is_connected:
                    await client.quit(timeout=min(self.timeout, 5.0))
            except (SMTPException, OSError):
                pass
            finally:
                client.close()


class EmailChannel:
    """The `email` channel: builds a compliant MIME message and sends it through a pool."""

    def __init__(
        self,
        pool: SmtpPool,
        *,
        default_footer: str | None = None,
        message_id_domain: str | None = None,
        senders: SenderSmtpPools | None = None,
        relay_tags: tuple[str, ...] = (),
    ) -> None:
        """`pool` is the global relay; `senders` the per-sender pools (own SMTP connections)."""
        self.pool = pool
        self.default_footer = default_footer
        self.message_id_domain = message_id_domain
        self.senders = senders
        self.relay_tags = relay_tags

    @classmethod
    def from_settings(cls, settings: Settings) -> EmailChannel:
        """A channel with a pool from `SMTP_*` and the `POSTAL_ADDRESS` footer."""
        return cls(
            SmtpPool.from_settings(settings),
            default_footer=settings.postal_address,
            relay_tags=tuple(settings.email_relay_tags),
        )

    def compose(self, msg: OutboundMessage, *, now: datetime | None = None) -> ComposedEmail:
        """The bytes for `msg` (raises `PermanentChannelError` if it is not sendable)."""
        return compose_message(
            msg,
            default_footer=self.default_footer,
            message_id_domain=self.message_id_domain,
            now=now,
            relay_tags=self.relay_tags,
        )

    async def send(self, msg: OutboundMessage, before_write: BeforeWrite = no_hook) -> SendResult:
        """Send the email; the provider id is the relay's own id when it names one, else the Message-ID."""
        if msg.dkim is not None:  # RSA signing in pure Python: keep the event loop free
            composed = await asyncio.to_thread(self.compose, msg)
        else:
            composed = self.compose(msg)
        pool = await self.pool_for(msg)
        try:
            reply = await pool.send(composed.raw, msg.sender, [msg.to], before_write)
        except SenderConfigError as err:
            if err.code == "auth" and pool is not self.pool and self.senders and msg.sender_id is not None:
                self.senders.login_refused(msg.sender_id)
            raise
        # An ESP relay that names its own id (SendGrid, SES) is matched by it; else our Message-ID.
        return SendResult(provider_message_id=relay_message_id(reply) or composed.message_id)

    async def pool_for(self, msg: OutboundMessage) -> SmtpPool:
        """The sender's own pool when it has an SMTP connection, else the global relay."""
        if self.senders is not None and msg.sender_id is not None:
            own = await self.senders.pool_for(msg.sender_id)
            if own is not None:
                return own
        return self.pool

    async def aclose(self) -> None:
        """Close the pools' connections (the global relay and every sender's)."""
        await self.pool.aclose()
        if self.senders is not None:
            await self.senders.aclose()

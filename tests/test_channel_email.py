"""The email channel and SMTP pool against real aiosmtpd servers.

Why: a message that arrives malformed, without its footer or unsubscribe headers, or is
sent twice, is the failure that hurts most, and SMTP failures must land in the right
class (4xx retry, 5xx bounce, lost final reply uncertain). Everything runs over real
SMTP on 127.0.0.1: the shared `smtp_server` fixture, and for STARTTLS + AUTH, a stale
pooled connection and a server that drops or stalls after the body, a local aiosmtpd
controller configured here.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr

from activities.channels.base import (
    OutboundMessage,
    PermanentChannelError,
    SenderConfigError,
    TransientChannelError,
    UncertainChannelError,
    make_message_id,
)
from activities.channels.email import EmailChannel, SmtpPool
from devstack.postgres import free_port
from settings import Settings
from tests.test_email_headers import raw_header_lines

if TYPE_CHECKING:
    from tests.mail_servers import SmtpRecorder

UNSUB = "https://links.example.com/u/tok123"
FOOTER = "Acme Inc., 1 Example Street, Springfield"


def _msg(key: str = "42:intro_email:1", **kw: Any) -> OutboundMessage:
    fields: dict[str, Any] = {
        "channel": "email",
        "action": "SEND_EMAIL",
        "idempotency_key": key,
        "sender": "ada@example.com",
        "sender_name": "Ada Sender",
        "to": "bob@example.org",
        "subject": "Quick question, Bob",
        "text": "Hi Bob,\n\nDo you use <engines> & gears?\n.a line starting with a dot\n\nAda",
        "unsubscribe_url": UNSUB,
        "footer": FOOTER,
    }
    fields.update(kw)
    return OutboundMessage.model_validate(fields)


def _parse(raw: bytes) -> EmailMessage:
    parsed = message_from_bytes(raw, policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _parts(message: EmailMessage) -> tuple[str, str]:
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and html is not None
    return (
        str(plain.get_content()).replace("\r\n", "\n"),
        str(html.get_content()).replace("\r\n", "\n"),
    )


@pytest.fixture
async def channel(smtp_server: SmtpRecorder) -> AsyncIterator[EmailChannel]:
    ch = EmailChannel(SmtpPool(smtp_server.host, smtp_server.port, size=2, timeout=5.0))
    yield ch
    await ch.aclose()


async def test_message_arrives_well_formed(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    result = await channel.send(_msg())
    assert len(smtp_server.messages) == 1
    mail_from, rcpt_tos, raw = smtp_server.messages[0]
    assert (mail_from, rcpt_tos) == ("ada@example.com", ["bob@example.org"])
    message = _parse(raw)
    assert message.get_content_type() == "multipart/alternative"
    assert message["From"] == "Ada Sender <ada@example.com>"
    assert message["To"] == "bob@example.org"
    assert message["Subject"] == "Quick question, Bob"
    assert message["MIME-Version"] == "1.0"
    assert len(message.get_all("MIME-Version") or []) == 1
    date = parsedate_to_datetime(str(message["Date"]))
    assert date.tzinfo is not None
    assert message["Message-ID"] == result.provider_message_id
    assert str(message["Message-ID"]).endswith(".seq@example.com>")
    assert message["List-Unsubscribe"] == f"<{UNSUB}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["In-Reply-To"] is None and message["References"] is None

    text, html = _parts(message)
    assert "Do you use <engines> & gears?" in text
    assert "\n.a line starting with a dot\n" in text  # dot-stuffing undone by the server
    assert FOOTER in text and UNSUB in text
    assert "Do you use &lt;engines&gt; &amp; gears?" in html
    assert "<engines>" not in html
    assert FOOTER in html and f'href="{UNSUB}"' in html
    assert html.rstrip().endswith("</html>")


async def test_message_id_is_the_given_one_else_random(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    # The delivery activity gives the ledger's id (stable across retries); without one, nothing derivable.
    await channel.send(_msg("42:intro_email:1", message_id="<given.1@example.com>"))
    await channel.send(_msg("42:intro_email:1"))
    await channel.send(_msg("42:intro_email:1"))
    ids = [m["Message-ID"] for m in smtp_server.parsed()]
    assert ids[0] == "<given.1@example.com>"
    assert len(set(ids)) == 3
    assert ids[1].startswith("<") and ids[1].endswith("@example.com>")


async def test_threading_headers_and_given_html(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    first = make_message_id("42:intro_email:1", "example.com", secret="link-secret")
    second = make_message_id("42:bump:1", "example.com", secret="link-secret")
    await channel.send(
        _msg(
            "42:bump2:1",
            subject="Re: Quick question, Bob",
            html="<html><body><p>Bumping this, Bob.</p></body></html>",
            text="Bumping this, Bob.",
            in_reply_to=second,
            references=[first, second],
            message_id="<given@example.com>",
        )
    )
    message = _parse(smtp_server.messages[0][2])
    assert message["Message-ID"] == "<given@example.com>"
    assert message["In-Reply-To"] == second
    assert str(message["References"]).split() == [first, second]
    _text, html = _parts(message)
    assert html.count("<body>") == 1 and html.count("</body>") == 1
    assert html.index("Bumping this") < html.index(FOOTER) < html.index("</body>")


async def test_non_ascii_subject_and_body_round_trip(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    await channel.send(_msg(subject="Café ☕ für Bob", text="Grüße aus Zürich — Ada"))
    message = _parse(smtp_server.messages[0][2])
    assert message["Subject"] == "Café ☕ für Bob"
    text, html = _parts(message)
    assert "Grüße aus Zürich — Ada" in text and "Grüße aus Zürich — Ada" in html
    assert smtp_server.messages[0][2].isascii()


async def test_the_headers_and_parts_written_directly_are_what_the_server_received(
    channel: EmailChannel, smtp_server: SmtpRecorder
) -> None:
    """The composer writes plain headers and the MIME parts itself (email_compose.py): checked on
    the server's raw bytes, no decoding policy in between."""
    await channel.send(_msg())
    await channel.send(_msg("42:intro_email:2", subject="Café ☕ für Bob", sender_name="Zoë Sender"))
    plain, encoded = (raw for _, _, raw in smtp_server.messages)
    head = raw_header_lines(plain)
    assert b"Subject: Quick question, Bob" in head
    assert b"To: bob@example.org" in head
    assert b"From: Ada Sender <ada@example.com>" in head
    assert b"MIME-Version: 1.0" in head
    [ctype] = [i for i, line in enumerate(head) if line.startswith(b"Content-Type: ")]
    assert head[ctype] == b"Content-Type: multipart/alternative;"
    boundary = head[ctype + 1].removeprefix(b' boundary="').removesuffix(b'"')
    assert head[ctype + 1] == b' boundary="' + boundary + b'"' and boundary
    body = plain.split(b"\r\n\r\n", 1)[1]
    parts = body.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 4  # text, html, the end
    assert parts[1].startswith(
        b'\r\nContent-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nHi Bob,\r\n"
    )
    assert parts[2].startswith(b'\r\nContent-Type: text/html; charset="utf-8"\r\n')
    assert b"MIME-Version" not in parts[2]
    # non-ASCII: RFC 2047 encoded words on the wire, never raw UTF-8 in a header
    enc = raw_header_lines(encoded)
    [subject] = [line for line in enc if line.startswith(b"Subject: ")]
    [sender] = [line for line in enc if line.startswith(b"From: ")]
    assert subject.startswith(b"Subject: =?utf-8?") and sender.startswith(b"From: =?utf-8?")
    assert sender.endswith(b" <ada@example.com>")
    assert encoded.isascii() and all(len(line) <= 78 for line in enc)


async def test_three_sends_share_one_connection(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    before = smtp_server.connections  # aiosmtpd's own readiness probe counts as one
    for i in range(3):
        await channel.send(_msg(f"42:step{i}:1"))
    assert len(smtp_server.messages) == 3
    assert smtp_server.connections - before == 1
    assert channel.pool.connections_opened == 1


async def test_concurrent_sends_stay_within_the_pool_size(smtp_server: SmtpRecorder) -> None:
    before = smtp_server.connections
    ch = EmailChannel(SmtpPool(smtp_server.host, smtp_server.port, size=2, timeout=5.0))
    try:
        await asyncio.gather(*(ch.send(_msg(f"1:s{i}:1")) for i in range(6)))
    finally:
        await ch.aclose()
    assert len(smtp_server.messages) == 6
    assert 1 <= smtp_server.connections - before <= 2


@pytest.mark.parametrize("reply", ["421 4.3.2 Service shutting down, try later", "451 4.3.0 Try again"])
async def test_4xx_then_accepting_is_transient_then_sent(
    channel: EmailChannel, smtp_server: SmtpRecorder, reply: str
) -> None:
    smtp_server.fail_codes.append(reply)
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.code == reply[:3]
    assert smtp_server.messages == []
    await channel.send(_msg())
    assert len(smtp_server.messages) == 1


async def test_550_to_the_message_is_a_permanent_bounce(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    before = smtp_server.connections
    smtp_server.fail_codes.append("550 5.1.1 no such user")
    with pytest.raises(PermanentChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.code == "550"
    assert caught.value.bounce is True
    assert "no such user" in str(caught.value)
    # The connection stays usable for the next message.
    await channel.send(_msg("42:other:1"))
    assert len(smtp_server.messages) == 1
    assert smtp_server.connections - before == 1


@pytest.mark.parametrize(
    "reply",
    ["550 5.7.1 Message rejected as spam", "554 5.6.0 Message content rejected"],
)
async def test_content_or_policy_rejection_fails_without_bouncing_the_person(
    channel: EmailChannel, smtp_server: SmtpRecorder, reply: str
) -> None:
    smtp_server.fail_codes.append(reply)
    with pytest.raises(PermanentChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.bounce is False
    assert caught.value.code == reply[:3]


async def test_rejected_recipient_is_a_permanent_bounce(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    smtp_server.reject_rcpt["bob@example.org"] = "550 5.1.1 <bob@example.org>: user unknown"
    with pytest.raises(PermanentChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.bounce is True
    assert "user unknown" in str(caught.value)
    assert smtp_server.messages == []


async def test_recipient_deferred_with_4xx_is_transient(channel: EmailChannel, smtp_server: SmtpRecorder) -> None:
    smtp_server.reject_rcpt["bob@example.org"] = "450 4.2.1 mailbox busy"
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.code == "450"


async def test_unreachable_server_is_transient() -> None:
    ch = EmailChannel(SmtpPool("127.0.0.1", free_port(), timeout=2.0))
    try:
        with pytest.raises(TransientChannelError) as caught:
            await ch.send(_msg())
    finally:
        await ch.aclose()
    assert caught.value.code == "connect"


async def test_a_message_without_footer_or_unsubscribe_is_refused(
    channel: EmailChannel, smtp_server: SmtpRecorder
) -> None:
    before = smtp_server.connections
    with pytest.raises(PermanentChannelError, match="footer"):
        await channel.send(_msg(footer=None))
    with pytest.raises(PermanentChannelError, match="unsubscribe_url"):
        await channel.send(_msg(unsubscribe_url="mailto:unsub@example.com"))
    with pytest.raises(PermanentChannelError, match="is not an email address") as caught:
        await channel.send(_msg(to="bob-at-example.org"))
    assert caught.value.bounce is True
    assert smtp_server.messages == []
    assert smtp_server.connections == before


async def test_default_footer_from_settings(smtp_server: SmtpRecorder) -> None:
    settings = Settings(
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        smtp_pool_size=3,
        postal_address="Settings Co, 9 Road, Town",
    )
    ch = EmailChannel.from_settings(settings)
    assert (ch.pool.size, ch.pool.starttls, ch.pool.username) == (3, False, None)
    try:
        await ch.send(_msg(footer=None))
    finally:
        await ch.aclose()
    text, html = _parts(_parse(smtp_server.messages[0][2]))
    assert "Settings Co, 9 Road, Town" in text and "Settings Co, 9 Road, Town" in html


# ---------------------------------------------------------------- scripted servers


@dataclass
class Scripted:
    """An aiosmtpd handler with failure modes the shared fixture does not have."""

    messages: list[bytes] = field(default_factory=list)
    mail_replies: list[str] = field(default_factory=list)
    drop_after_data: bool = False
    stall_after_data: bool = False
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)
    tls_at_login: list[bool] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)

    @property
    def connections(self) -> int:
        """TCP connections made (STARTTLS re-runs connection_made on the same one)."""
        return len(self.peers)

    async def handle_MAIL(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self.mail_replies:
            return self.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope.content)
        if self.drop_after_data:
            server.transport.close()
            return "250 OK"
        if self.stall_after_data:
            await asyncio.Event().wait()
        return "250 OK queued"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.logins.append((auth_data.login, auth_data.password))
        self.tls_at_login.append(session.ssl is not None)
        return AuthResult(success=auth_data.password == b"s3cret", handled=False)


@contextmanager
def scripted_server(handler: Scripted, **smtp_kwargs: Any) -> Iterator[int]:
    """Run an aiosmtpd server with `handler`; yield its port."""
    from aiosmtpd.smtp import SMTP

    port = free_port()

    class CountingSMTP(SMTP):
        def connection_made(self, transport: Any) -> None:
            handler.peers.add(transport.get_extra_info("peername"))
            super().connection_made(transport)

    class CountingController(Controller):
        def factory(self) -> SMTP:
            return CountingSMTP(self.handler, **self.SMTP_kwargs)

    ctl = CountingController(handler, hostname="127.0.0.1", port=port, **smtp_kwargs)
    ctl.start()
    handler.peers.clear()  # forget aiosmtpd's readiness probe
    try:
        yield port
    finally:
        ctl.stop()


async def test_stale_pooled_connection_is_replaced_once() -> None:
    handler = Scripted()
    with scripted_server(handler) as port:
        pool = SmtpPool("127.0.0.1", port, size=1, timeout=5.0)
        ch = EmailChannel(pool)
        try:
            await ch.send(_msg("1:a:1"))
            # The server now refuses the reused connection as if it had timed it out.
            handler.mail_replies.append("421 4.4.2 idle too long, closing")
            await ch.send(_msg("1:b:1"))
            # The replacement failing the same way is not retried again.
            handler.mail_replies.extend(["421 4.4.2 closing"] * 3)
            with pytest.raises(TransientChannelError) as caught:
                await ch.send(_msg("1:c:1"))
            assert caught.value.code == "421"
            left = len(handler.mail_replies)
        finally:
            await ch.aclose()
    assert left == 1  # reused connection, then exactly one fresh one
    assert len(handler.messages) == 2
    assert handler.connections == 3
    assert pool.connections_opened == 3


async def test_disconnect_after_the_body_is_uncertain() -> None:
    handler = Scripted(drop_after_data=True)
    with scripted_server(handler) as port:
        ch = EmailChannel(SmtpPool("127.0.0.1", port, timeout=5.0))
        try:
            with pytest.raises(UncertainChannelError):
                await ch.send(_msg())
            handler.drop_after_data = False
            await ch.send(_msg("1:next:1"))  # the broken connection was dropped
        finally:
            await ch.aclose()
    assert len(handler.messages) == 2
    assert handler.connections == 2


async def test_timeout_waiting_for_the_final_reply_is_uncertain() -> None:
    handler = Scripted(stall_after_data=True)
    with scripted_server(handler) as port:
        ch = EmailChannel(SmtpPool("127.0.0.1", port, timeout=10.0, final_reply_timeout=0.3))
        try:
            with pytest.raises(UncertainChannelError, match="may have accepted"):
                await ch.send(_msg())
        finally:
            await ch.aclose()
    assert len(handler.messages) == 1


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_starttls_and_login(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    client_ctx = ssl.create_default_context(cafile=str(cert))
    handler = Scripted()
    with scripted_server(
        handler,
        tls_context=server_ctx,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=handler.authenticate,
    ) as port:
        # Without STARTTLS the server refuses the envelope (530): nothing is sent, and it is
        # our configuration, not the lead, that is wrong.
        plain = EmailChannel(SmtpPool("127.0.0.1", port, starttls=False, timeout=5.0))
        try:
            with pytest.raises(SenderConfigError) as refused:
                await plain.send(_msg("1:plain:1"))
            assert refused.value.code == "530"
        finally:
            await plain.aclose()

        wrong = EmailChannel(
            SmtpPool(
                "127.0.0.1",
                port,
                username="ada",
                password="nope",
                starttls=True,
                tls_context=client_ctx,
                timeout=5.0,
            )
        )
        try:
            # A refused login is the sender's problem, not the lead's: the sender pauses, nothing sent.
            with pytest.raises(SenderConfigError) as caught:
                await wrong.send(_msg("1:wrong:1"))
            assert caught.value.code == "auth" and "535" in str(caught.value)
        finally:
            await wrong.aclose()

        settings = Settings(
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_username="ada",
            smtp_password=SecretStr("s3cret"),
            smtp_starttls=True,
        )
        good = EmailChannel(SmtpPool.from_settings(settings, tls_context=client_ctx), default_footer=FOOTER)
        try:
            await good.send(_msg("1:tls:1"))
            await good.send(_msg("1:tls:2"))
        finally:
            await good.aclose()
    assert len(handler.messages) == 2
    assert handler.logins[-1] == (b"ada", b"s3cret")
    assert {pw for _, pw in handler.logins[:-1]} == {b"nope"}
    assert all(handler.tls_at_login)
    assert handler.connections == 3  # plain, wrong password, then one reused connection

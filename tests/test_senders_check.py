"""`senders test ID`: SMTP login, IMAP login, IDLE and folder, with clear reasons, as users run it.

Why: connecting a mailbox is where newcomers get stuck (app password vs account password,
OAuth token, wrong folder); the command must say which step failed and why, in one line
each, without printing a secret. Real servers: aiosmtpd with AUTH over implicit TLS, pymap
for IMAP (tests/imap_harness.py), a local OAuth token endpoint; the CLI runs as a
subprocess that trusts the test certificate through SSL_CERT_FILE, like a real CA.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from db.session import SessionFactory
from devstack.factories import add_email_sender
from services.mailbox_login import MailboxError, check_sender, open_imap
from services.oauth import TokenCache
from services.sender_connections import imap_connection
from tests.cli_harness import cli
from tests.engine_harness import SECRETS_KEY as KEY
from tests.imap_harness import Mailbox
from tests.mail_servers import (
    AuthSmtp,
    SmtpRecorder,
    TlsPair,
    add_oauth_sender,
    auth_smtp,
    settings_for,
    token_endpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@pytest.fixture
def smtps(tls: TlsPair) -> Iterator[AuthSmtp]:
    with auth_smtp(passwords={b"ada@a.example.com": b"good-pass"}, tls=tls, implicit_tls=True) as rec:
        yield rec


def imap_url(box: Mailbox, password: str | None = None, folder: str | None = None) -> str:
    user = box.user.replace("@", "%40")
    return f"imap://{user}:{password or box.password}@{box.host}:{box.port}/{folder or box.folder}"


async def test_all_checks_pass_with_the_right_logins(
    database_url: str, session_factory: SessionFactory, smtps: AuthSmtp, mailbox: Mailbox, tls: TlsPair
) -> None:
    sender = await add_email_sender(
        session_factory,
        settings_for(),
        "ada@a.example.com",
        smtp=f"smtps://ada%40a.example.com:good-pass@127.0.0.1:{smtps.port}",
        imap=imap_url(mailbox),
    )
    result = await cli(
        database_url, "senders", "test", str(sender), env={"SECRETS_KEY": KEY, "SSL_CERT_FILE": str(tls.cert)}
    )
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert f"ok   smtp login: 127.0.0.1:{smtps.port} (TLS), logged in as ada@a.example.com" in lines
    assert f"ok   imap login: {mailbox.user} at {mailbox.host}:{mailbox.port} (password)" in lines
    assert "ok   imap idle: the server supports IDLE: replies arrive by push" in lines
    assert f"ok   imap folder: {mailbox.folder} can be opened" in lines
    assert [login for _, login in smtps.logins] == [(b"ada@a.example.com", b"good-pass")]
    assert "good-pass" not in result.out + result.err and mailbox.password not in result.out + result.err


async def test_wrong_passwords_and_missing_folder_say_why(
    database_url: str, session_factory: SessionFactory, smtps: AuthSmtp, mailbox: Mailbox, tls: TlsPair
) -> None:
    sender = await add_email_sender(
        session_factory,
        settings_for(),
        "ada@a.example.com",
        smtp=f"smtps://ada%40a.example.com:bad-pass@127.0.0.1:{smtps.port}",
        imap=imap_url(mailbox, password="wrong-imap-pass"),
    )
    result = await cli(
        database_url, "senders", "test", str(sender), env={"SECRETS_KEY": KEY, "SSL_CERT_FILE": str(tls.cert)}
    )
    assert result.code == 1
    out = result.out.replace("\n", " ")
    assert f"FAIL smtp login: sender {sender} (ada@a.example.com) smtp: 127.0.0.1:{smtps.port} refused the login" in out
    assert "535" in out
    assert (
        f"FAIL imap login: sender {sender} (ada@a.example.com) imap: 127.0.0.1:{mailbox.port} refused the LOGIN" in out
    )
    assert "bad-pass" not in out and "wrong-imap-pass" not in out

    await add_email_sender(session_factory, settings_for(), "ada@a.example.com", imap=imap_url(mailbox, folder="Nope"))
    again = await cli(
        database_url, "senders", "test", str(sender), env={"SECRETS_KEY": KEY, "SSL_CERT_FILE": str(tls.cert)}
    )
    assert again.code == 1
    assert "ok   imap login" in again.out and "FAIL imap folder: cannot open Nope" in again.out


async def test_untrusted_certificate_and_closed_port_are_named(
    database_url: str, session_factory: SessionFactory, smtps: AuthSmtp, mailbox: Mailbox
) -> None:
    from devstack.postgres import free_port

    closed = free_port()
    sender = await add_email_sender(
        session_factory,
        settings_for(),
        "ada@a.example.com",
        smtp=f"smtps://ada%40a.example.com:good-pass@127.0.0.1:{smtps.port}",
        imap=f"imap://u:p@127.0.0.1:{closed}/INBOX",
    )
    result = await cli(database_url, "senders", "test", str(sender), env={"SECRETS_KEY": KEY})  # no SSL_CERT_FILE
    assert result.code == 1
    out = result.out.replace("\n", " ")
    assert (
        f"FAIL smtp login: sender {sender} (ada@a.example.com) smtp: cannot connect to 127.0.0.1:{smtps.port} (TLS)"
        in out
    )
    assert "CERTIFICATE_VERIFY_FAILED" in out or "certificate verify failed" in out
    assert f"FAIL imap login: sender {sender} (ada@a.example.com) imap: cannot connect to 127.0.0.1:{closed}" in out
    assert smtps.logins == []


async def test_sender_without_own_smtp_checks_the_global_relay(
    database_url: str, session_factory: SessionFactory, smtp_server: SmtpRecorder
) -> None:
    sender = await add_email_sender(session_factory, settings_for(), "carol@example.net")
    result = await cli(
        database_url,
        "senders",
        "test",
        str(sender),
        env={"SECRETS_KEY": KEY, "SMTP_HOST": smtp_server.host, "SMTP_PORT": str(smtp_server.port)},
    )
    assert result.code == 0, result.out + result.err
    assert f"no own SMTP, sends through the global relay SMTP_HOST 127.0.0.1:{smtp_server.port}" in result.out
    assert "warn imap: no mailbox connected" in result.out


async def test_missing_key_unknown_sender_and_other_channels(
    database_url: str, session_factory: SessionFactory, smtps: AuthSmtp
) -> None:
    from services.senders import add_sender

    sender = await add_email_sender(
        session_factory, settings_for(), "ada@a.example.com", smtp=f"smtps://ada:pw@127.0.0.1:{smtps.port}"
    )
    nokey = await cli(database_url, "senders", "test", str(sender), env={"SECRETS_KEY": ""})
    assert nokey.code == 1
    assert f"FAIL smtp login: sender {sender} (ada@a.example.com) smtp password: SECRETS_KEY is not set" in nokey.out
    unknown = await cli(database_url, "senders", "test", "9999", env={"SECRETS_KEY": KEY})
    assert unknown.code == 2 and "no sender with id 9999" in unknown.err
    x = await add_sender(session_factory, channel="x", address="1000000001")
    other = await cli(database_url, "senders", "test", str(x.id), env={"SECRETS_KEY": KEY})
    assert other.code == 2 and "only email senders have mailboxes" in other.err


async def test_oauth_smtp_login_through_the_token_endpoint(
    session_factory: SessionFactory, tls: TlsPair, mailbox: Mailbox
) -> None:
    with (
        token_endpoint({"rt-ok": "at-ok"}) as endpoint,
        auth_smtp(tokens={b"bob@b.example.org": b"at-ok"}, tls=tls) as server,
    ):
        settings = settings_for(endpoint)
        sender = await add_oauth_sender(session_factory, settings, server, "rt-ok", imap=imap_url(mailbox))
        results = await check_sender(session_factory, settings, sender, tls_context=tls.client_context())
        by_name = {r.name: r for r in results}
        assert by_name["smtp login"].ok, by_name["smtp login"].detail
        assert "logged in as bob@b.example.org with XOAUTH2" in by_name["smtp login"].detail
        assert server.logins and server.logins[0][0] == "XOAUTH2"
        assert endpoint.forms[0]["refresh_token"] == "rt-ok"

        endpoint.grants.clear()  # revoked: the endpoint now says invalid_grant
        cache = TokenCache()
        try:
            results = await check_sender(
                session_factory, settings, sender, tls_context=tls.client_context(), tokens=cache
            )
        finally:
            await cache.aclose()
        smtp = next(r for r in results if r.name == "smtp login")
        assert not smtp.ok
        assert "invalid_grant" in smtp.detail and "authorize again" in smtp.detail


async def test_open_imap_for_the_watcher(session_factory: SessionFactory, mailbox: Mailbox) -> None:
    """The login helper h6's watcher uses: a logged-in client, or a MailboxError with its stage."""
    settings = settings_for()
    sender = await add_email_sender(session_factory, settings, "ada@a.example.com", imap=imap_url(mailbox))
    conn = await imap_connection(session_factory, settings, sender)
    assert conn is not None
    tokens = TokenCache()
    try:
        client = await open_imap(conn, tokens, timeout=10)
        assert client.has_capability("IDLE")
        assert (await client.select(conn.folder or "INBOX")).result == "OK"
        await client.logout()
        await add_email_sender(session_factory, settings, "ada@a.example.com", imap=imap_url(mailbox, password="bad"))
        bad = await imap_connection(session_factory, settings, sender)
        assert bad is not None
        with pytest.raises(MailboxError) as caught:
            await open_imap(bad, tokens, timeout=10)
        assert caught.value.stage == "login" and caught.value.permanent
    finally:
        await tokens.aclose()


async def test_demo_sender_is_connected_to_the_dev_mailbox(session_factory: SessionFactory, mailbox: Mailbox) -> None:
    """`make run` sets DEMO_IMAP_URL to its IMAP server: the demo email sender watches it."""
    from operations.demo import SENDERS, add_demo_senders
    from services.senders import list_senders
    from settings import Settings

    settings = Settings(secrets_key=settings_for().secrets_key, demo_imap_url=imap_url(mailbox))
    lines = await add_demo_senders(session_factory, settings)
    assert lines[-1] == (
        f"mailbox: {SENDERS[0][1]} watches imap://{mailbox.user.replace('@', '%40')}@{mailbox.host}:{mailbox.port}/"
        f"{mailbox.folder}"
    )
    views = {v.account.address: v for v in await list_senders(session_factory)}
    demo = views[SENDERS[0][1]]
    assert set(demo.connections) == {"imap"} and all(not v.connections for a, v in views.items() if a != SENDERS[0][1])
    results = await check_sender(session_factory, settings, demo.account.id)
    assert [(r.name, r.ok) for r in results if r.name.startswith("imap")] == [
        ("imap login", True),
        ("imap idle", True),
        ("imap folder", True),
    ]
    # Unset: no mailbox is added, and a bad URL names the setting.
    assert not any(line.startswith("mailbox:") for line in await add_demo_senders(session_factory, settings_for()))
    with pytest.raises(ValueError, match="^DEMO_IMAP_URL: scheme 'http'"):
        await add_demo_senders(session_factory, Settings(secrets_key=settings.secrets_key, demo_imap_url="http://x"))

"""Sends go out through each sender's own SMTP (pooled per sender), others through the relay.

Why: a lead written to from ada@a.example.com must receive mail that left through a.test's
server with ada's login, never through another sender's mailbox or the global relay;
OAuth senders (Gmail, Microsoft 365) must log in with XOAUTH2 using a token fresh from
the token endpoint. Everything is real: aiosmtpd servers that require AUTH (one over
implicit TLS with a password, one over STARTTLS with XOAUTH2 only), a local OAuth token
endpoint over HTTP, PostgreSQL, and the production worker on the Temporal test server.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from activities.channels.base import OutboundMessage, SenderConfigError, TransientChannelError
from activities.channels.email import EmailChannel, SmtpPool
from activities.channels.sender_smtp import SenderSmtpPools
from db.session import SessionFactory
from db.tables import Delivery, SenderConnection
from devstack.factories import add_email_sender
from services.secret_box import generate_key
from services.sender_connections import token_cache
from settings import Settings
from tests.engine_harness import SECRETS_KEY as KEY
from tests.engine_harness import Wired, make_person, start_enrollment, store_version
from tests.mail_servers import (
    AuthSmtp,
    SmtpRecorder,
    TlsPair,
    TokenEndpoint,
    add_oauth_sender,
    auth_smtp,
    oauth_settings,
    sender_channel,
    settings_for,
    token_endpoint,
)

#: aiosmtpd cannot see that a Controller-level ssl_context is implicit TLS.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@pytest.fixture
def server_a(tls: TlsPair) -> Iterator[AuthSmtp]:
    """smtps (implicit TLS), password login for ada@a.example.com."""
    with auth_smtp(passwords={b"ada@a.example.com": b"pass-A/1"}, tls=tls, implicit_tls=True) as rec:
        yield rec


@pytest.fixture
def tokens_b() -> Iterator[TokenEndpoint]:
    with token_endpoint({"refresh-B": "access-B-1"}) as endpoint:
        yield endpoint


@pytest.fixture
def server_b(tls: TlsPair) -> Iterator[AuthSmtp]:
    """smtp + STARTTLS, XOAUTH2 only, for bob@b.example.org with the access token of refresh-B."""
    with auth_smtp(tokens={b"bob@b.example.org": b"access-B-1"}, tls=tls) as rec:
        yield rec


def _msg(sender: str, sender_id: int | None, to: str, key: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        channel="email",
        action="SEND_EMAIL",
        idempotency_key=key or f"1:{uuid.uuid4().hex[:8]}:1",
        sender=sender,
        sender_id=sender_id,
        to=to,
        subject="Hello",
        text="Hi there",
        unsubscribe_url="https://links.example.com/u/x",
        footer="1 Test St",
    )


def _xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


async def test_each_lead_is_mailed_through_its_senders_own_smtp_with_its_login(
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: SmtpRecorder,
    wired: Wired,
    monkeypatch: pytest.MonkeyPatch,
    tls: TlsPair,
    server_a: AuthSmtp,
    server_b: AuthSmtp,
    tokens_b: TokenEndpoint,
) -> None:
    settings = settings_for(tokens_b)
    sf = session_factory
    await add_email_sender(
        sf, settings, "ada@a.example.com", smtp=f"smtps://ada%40a.example.com:pass-A%2F1@127.0.0.1:{server_a.port}"
    )
    await add_email_sender(
        sf,
        settings,
        "bob@b.example.org",
        env={"B_REFRESH": "refresh-B"},
        smtp=f"smtp://bob@b.example.org@127.0.0.1:{server_b.port}?starttls=true",
        oauth_refresh_token_env="B_REFRESH",
    )
    await add_email_sender(sf, settings, "carol@example.net")  # no own SMTP: the global relay

    leads = {
        "ada@a.example.com": "lead-a@x.test",
        "bob@b.example.org": "lead-b@x.test",
        "carol@example.net": "lead-c@x.test",
    }
    handles = []
    for sender, lead in leads.items():
        ref, defn = await store_version(
            sf,
            {
                "name": f"via-{sender.split('@')[0]}-{uuid.uuid4().hex[:6]}",
                "senders": {"email": [sender]},
                "steps": [
                    {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]}
                ],
            },
        )
        person = await make_person(sf, email=lead)
        handles.append((ref, defn, person))

    # The senders' servers have a private CA: trusted the way an operator trusts one (SSL_CERT_FILE).
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cert))
    async with wired(settings=oauth_settings(tokens_b)):
        runs = [await start_enrollment(temporal_env.client, task_queue, sf, r, d, p) for r, d, p in handles]
        # Nothing here waits on a timer: with time skipping on, a slow moment of the worker lets
        # the test server jump to a task's timeout and time the task out (flaky on a loaded machine).
        with temporal_env.auto_time_skipping_disabled():
            await asyncio.gather(*(h.result() for h in runs))

    # Server A: one message, to lead A, from ada, in a session logged in with ada's password.
    assert [(m[0], m[1], m[3]) for m in server_a.messages] == [
        ("ada@a.example.com", ["lead-a@x.test"], b"ada@a.example.com")
    ]
    # (a retried attempt may log in again, on a loaded machine; every login is ada's and nothing was refused)
    assert {login for _, login in server_a.logins} == {(b"ada@a.example.com", b"pass-A/1")}
    assert server_a.refused == []
    assert b"To: lead-a@x.test" in server_a.messages[0][2]
    # Server B: XOAUTH2 with the access token the endpoint issued for bob's refresh token.
    assert [(m[0], m[1], m[3]) for m in server_b.messages] == [
        ("bob@b.example.org", ["lead-b@x.test"], b"bob@b.example.org")
    ]
    assert set(server_b.logins) == {("XOAUTH2", _xoauth2("bob@b.example.org", "access-B-1"))}
    assert server_b.refused == []
    assert tokens_b.forms[0] == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-B",
        "client_id": "client-1",
        "client_secret": "client-secret-1",
    }
    assert all(form == tokens_b.forms[0] for form in tokens_b.forms)
    # The sender without its own SMTP went through the global relay.
    assert [(m[0], m[1]) for m in smtp_server.messages] == [("carol@example.net", ["lead-c@x.test"])]
    async with sf() as s:
        statuses = sorted((await s.execute(select(Delivery.status))).scalars())
    assert statuses == ["sent", "sent", "sent"]
    # Mail from a sender is exactly what its server received (From header of the sender).
    parsed = message_from_bytes(server_b.messages[0][2])
    assert parsed["From"].endswith("<bob@b.example.org>") or parsed["From"] == "bob@b.example.org"


async def test_pool_per_sender_is_reused_rebuilt_on_change_and_closed(
    session_factory: SessionFactory, smtp_server: SmtpRecorder, tls: TlsPair, server_a: AuthSmtp
) -> None:
    settings = settings_for()
    sf = session_factory
    ada = await add_email_sender(
        sf, settings, "ada@a.example.com", smtp=f"smtps://ada%40a.example.com:pass-A%2F1@127.0.0.1:{server_a.port}"
    )
    pools = SenderSmtpPools(sf, settings, tls_context=tls.client_context(), size=2, timeout=10)
    channel = EmailChannel(SmtpPool(smtp_server.host, smtp_server.port, size=1, timeout=10), senders=pools)
    before = server_a.connections  # aiosmtpd's Controller connects once itself at start
    try:
        await channel.send(_msg("ada@a.example.com", ada, "one@x.test"))
        await channel.send(_msg("ada@a.example.com", ada, "two@x.test"))
        first = pools.pools()[ada]
        assert server_a.connections - before == 1 and first.connections_opened == 1  # one login, reused
        assert len(server_a.logins) == 1 and len(server_a.messages) == 2

        # Re-added with another password: the next send opens a new pool with the new login.
        with auth_smtp(passwords={b"ada@a.example.com": b"new-pass"}, tls=tls, implicit_tls=True) as moved:
            await add_email_sender(
                sf, settings, "ada@a.example.com", smtp=f"smtps://ada%40a.example.com:new-pass@127.0.0.1:{moved.port}"
            )
            await channel.send(_msg("ada@a.example.com", ada, "three@x.test"))
            assert pools.pools()[ada] is not first
            assert [login for _, login in moved.logins] == [(b"ada@a.example.com", b"new-pass")]
            assert [m[1] for m in moved.messages] == [["three@x.test"]]

            # Removed: back to the global relay; the sender's pool is closed.
            await add_email_sender(sf, settings, "ada@a.example.com", no_smtp=True)
            await channel.send(_msg("ada@a.example.com", ada, "four@x.test"))
            assert ada not in pools.pools()
            assert [m[1] for m in smtp_server.messages] == [["four@x.test"]]
            assert len(moved.messages) == 1
    finally:
        await channel.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await pools.pool_for(ada)


async def test_a_wrong_or_missing_key_is_a_transient_error_naming_the_sender(
    session_factory: SessionFactory, smtp_server: SmtpRecorder, server_a: AuthSmtp
) -> None:
    ada = await add_email_sender(
        session_factory, settings_for(), "ada@a.example.com", smtp=f"smtps://ada:pw@127.0.0.1:{server_a.port}"
    )
    for settings, reason in (
        (Settings(secrets_key=SecretStr("")), "SECRETS_KEY is not set"),
        (Settings(secrets_key=SecretStr(generate_key())), "not the key it was stored with"),
    ):
        async with sender_channel(session_factory, settings, smtp_server, None) as channel:
            with pytest.raises(SenderConfigError) as caught:
                await channel.send(_msg("ada@a.example.com", ada, "lead@x.test"))
        assert caught.value.code == "sender_config"
        assert f"sender {ada} (ada@a.example.com) smtp password" in str(caught.value) and reason in str(caught.value)
    assert server_a.logins == [] and smtp_server.messages == []  # nothing went anywhere else


async def test_oauth_refused_by_the_token_endpoint_sends_nothing_and_says_why(
    session_factory: SessionFactory, smtp_server: SmtpRecorder, tls: TlsPair, server_b: AuthSmtp
) -> None:
    with token_endpoint({}) as endpoint:  # knows no refresh token: invalid_grant
        settings = settings_for(endpoint)
        bob = await add_oauth_sender(session_factory, settings, server_b, "revoked")
        async with sender_channel(session_factory, settings, smtp_server, tls) as channel:
            with pytest.raises(SenderConfigError) as caught:
                await channel.send(_msg("bob@b.example.org", bob, "lead@x.test"))
    text = str(caught.value)
    assert caught.value.code == "auth"  # the delivery pauses the sender: not retried at once
    assert "token endpoint refused the refresh token: 400 invalid_grant: Token has been revoked." in text
    assert f"sender {bob} (bob@b.example.org) smtp" in text and "revoked" in text
    assert server_b.logins == [] and server_b.messages == [] and smtp_server.messages == []


async def test_a_stale_access_token_refused_by_the_server_is_not_reused(
    session_factory: SessionFactory, smtp_server: SmtpRecorder, tls: TlsPair
) -> None:
    """The server refuses the token (XOAUTH2 334 + 535): transient for the lead, nothing leaves,
    and the refused token is not used again."""
    with (
        token_endpoint({"rt": "expired-token"}) as endpoint,
        auth_smtp(tokens={b"bob@b.example.org": b"the-valid-token"}, tls=tls) as server,
    ):
        settings = settings_for(endpoint)
        bob = await add_oauth_sender(session_factory, settings, server, "rt")
        async with sender_channel(session_factory, settings, smtp_server, tls) as channel:
            with pytest.raises(SenderConfigError) as caught:
                await channel.send(_msg("bob@b.example.org", bob, "lead@x.test"))
            # The next attempt asks the endpoint again instead of reusing the refused token.
            endpoint.grants["rt"] = "the-valid-token"
            await channel.send(_msg("bob@b.example.org", bob, "lead@x.test"))
    assert caught.value.code == "auth"  # the delivery pauses the sender (services/sender_breaker.py)
    assert "SMTP login of bob@b.example.org at 127.0.0.1" in str(caught.value) and "535" in str(caught.value)
    assert server.refused == [("XOAUTH2", _xoauth2("bob@b.example.org", "expired-token"))]
    assert server.logins == [("XOAUTH2", _xoauth2("bob@b.example.org", "the-valid-token"))]
    assert len(endpoint.forms) == 2
    assert [m[1] for m in server.messages] == [["lead@x.test"]] and smtp_server.messages == []


async def test_rotated_refresh_token_is_stored_encrypted(
    session_factory: SessionFactory, smtp_server: SmtpRecorder, tls: TlsPair
) -> None:
    with (
        token_endpoint({"rt-1": "at-1", "rt-2": "at-1"}, rotate={"rt-1": "rt-2"}) as endpoint,
        auth_smtp(tokens={b"bob@b.example.org": b"at-1"}, tls=tls) as server,
    ):
        settings = settings_for(endpoint)
        bob = await add_oauth_sender(session_factory, settings, server, "rt-1")
        tokens = token_cache(session_factory, settings)  # what the worker uses: stores rotations
        pools = SenderSmtpPools(session_factory, settings, tls_context=tls.client_context(), tokens=tokens, size=1)
        channel = EmailChannel(SmtpPool(smtp_server.host, smtp_server.port, size=1, timeout=5), senders=pools)
        try:
            await channel.send(_msg("bob@b.example.org", bob, "one@x.test"))
            await channel.send(_msg("bob@b.example.org", bob, "two@x.test"))  # new pool (rotated), cached token
        finally:
            await channel.aclose()
            await tokens.aclose()
        assert [f["refresh_token"] for f in endpoint.forms] == ["rt-1"]
        assert len(server.messages) == 2
    from services.sender_connections import smtp_connection

    conn = await smtp_connection(session_factory, settings, bob)
    assert conn is not None and conn.oauth is not None and conn.oauth.refresh_token == "rt-2"
    async with session_factory() as s:
        stored = (await s.execute(select(SenderConnection.secret))).scalar_one()
    assert stored is not None and "rt-2" not in stored and base64.urlsafe_b64decode(stored)[:1] == b"\x80"


def test_tls_pair_is_trusted_only_by_its_own_context(tls: TlsPair, tmp_path: Path) -> None:
    """The fixture's certificate is not trusted by default (so TLS is really verified)."""
    import ssl

    default = ssl.create_default_context()
    assert not any(c.get("subject") and "127.0.0.1" in str(c["subject"]) for c in default.get_ca_certs())
    assert tls.client_context().get_ca_certs()


async def test_unreachable_token_endpoint_is_a_connect_error(
    session_factory: SessionFactory, smtp_server: SmtpRecorder, tls: TlsPair, server_b: AuthSmtp
) -> None:
    from devstack.postgres import free_port

    settings = Settings(
        secrets_key=SecretStr(KEY), oauth_token_url=f"http://127.0.0.1:{free_port()}/token", oauth_client_id="c"
    )
    bob = await add_oauth_sender(session_factory, settings, server_b, "rt")
    async with sender_channel(session_factory, settings, smtp_server, tls) as channel:
        with pytest.raises(TransientChannelError) as caught:
            await channel.send(_msg("bob@b.example.org", bob, "lead@x.test"))
    assert (
        caught.value.code == "connect" and "token endpoint" in str(caught.value) and "unreachable" in str(caught.value)
    )
    assert server_b.logins == [] and server_b.messages == [] and smtp_server.messages == []


async def test_the_worker_wires_per_sender_pools(session_factory: SessionFactory) -> None:
    """worker.py builds its channels with the session factory: email gets the per-sender registry."""
    from activities.channels import aclose_channels, make_channels

    channels = make_channels(settings_for(), session_factory)
    try:
        email = channels["email"]
        assert isinstance(email, EmailChannel) and isinstance(email.senders, SenderSmtpPools)
    finally:
        await aclose_channels(channels)
    assert email.senders._closed  # closed with the channels on shutdown

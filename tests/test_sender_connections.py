"""Sender connections at rest: encrypted, decrypted only with the key, never printed.

Why: a mailbox password or refresh token in clear in PostgreSQL, in `senders list` or in
an error message is a leak; a missing or wrong SECRETS_KEY must say which sender it
cannot open instead of failing somewhere later. Real PostgreSQL; the CLI runs as a
subprocess, as users run it.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from db.session import SessionFactory
from devstack.factories import add_email_sender
from services.mail_urls import OAuthInput, connection_flags
from services.secret_box import generate_key
from services.sender_connections import (
    ConnectionConfigError,
    imap_connection,
    mailbox_sender_ids,
    set_connection_status,
    smtp_connection,
)
from services.senders import add_sender, list_senders
from settings import Settings
from tests.cli_harness import cli

KEY = generate_key()
SETTINGS = Settings(secrets_key=SecretStr(KEY))


async def _add(
    sf: SessionFactory, address: str = "ada@example.com", settings: Settings = SETTINGS, **flags: Any
) -> int:
    """An email sender as `senders add` makes it (a refresh token in $RT for the OAuth flags); its id."""
    no_caps: dict[str, Any] = {"per_hour": None, "per_day": None, "spacing": None, "jitter": None}
    return await add_email_sender(sf, settings, address, env={"RT": "refresh-tok-123"}, **no_caps, **flags)


async def test_secrets_are_encrypted_at_rest_and_decrypted_on_load(session_factory: SessionFactory) -> None:
    acct_id = await _add(
        session_factory,
        smtp="smtps://ada:smtp-pass-1@smtp.example.com:465",
        imap="imaps://ada:imap-pass-2@imap.example.com:993/Replies",
    )
    async with session_factory() as session:
        dump = (await session.execute(text("SELECT row_to_json(c)::text FROM sender_connections c"))).scalars().all()
    assert len(dump) == 2
    assert not any("smtp-pass-1" in row or "imap-pass-2" in row for row in dump)

    smtp = await smtp_connection(session_factory, SETTINGS, acct_id)
    imap = await imap_connection(session_factory, SETTINGS, acct_id)
    assert smtp is not None and imap is not None
    assert (smtp.host, smtp.port, smtp.implicit_tls, smtp.username, smtp.password) == (
        "smtp.example.com",
        465,
        True,
        "ada",
        "smtp-pass-1",
    )
    assert (imap.host, imap.port, imap.implicit_tls, imap.password, imap.folder) == (
        "imap.example.com",
        993,
        True,
        "imap-pass-2",
        "Replies",
    )
    assert "imap-pass-2" not in repr(imap)
    assert await mailbox_sender_ids(session_factory) == [acct_id]


async def test_oauth_connection_keeps_refresh_token_and_client_secret_encrypted(
    session_factory: SessionFactory,
) -> None:
    settings = Settings(
        secrets_key=SecretStr(KEY),
        oauth_token_url="https://oauth2.googleapis.com/token",
        oauth_client_id="default-client",
    )
    acct = await add_sender(
        session_factory,
        channel="email",
        address="ada@gmail.com",
        imap=connection_flags(
            {"RT": "r"}, imap="imaps://ada@gmail.com@imap.gmail.com", oauth_refresh_token_env="RT"
        ).imap,
        oauth=OAuthInput(
            refresh_token="1//refresh-xyz", client_secret="client-secret-abc", scope="https://mail.google.com/"
        ),
        settings=settings,
    )
    async with session_factory() as session:
        dump = " ".join(
            (await session.execute(text("SELECT row_to_json(c)::text FROM sender_connections c"))).scalars()
        )
    assert "1//refresh-xyz" not in dump and "client-secret-abc" not in dump
    conn = await imap_connection(session_factory, settings, acct.id)
    assert conn is not None and conn.auth == "xoauth2" and conn.oauth is not None
    assert conn.username == "ada@gmail.com"
    assert (conn.oauth.refresh_token, conn.oauth.client_secret, conn.oauth.client_id, conn.oauth.token_url) == (
        "1//refresh-xyz",
        "client-secret-abc",
        "default-client",
        "https://oauth2.googleapis.com/token",
    )
    assert "1//refresh-xyz" not in repr(conn) and "client-secret-abc" not in repr(conn.oauth)


async def test_missing_or_wrong_key_names_the_sender(session_factory: SessionFactory) -> None:
    acct_id = await _add(session_factory, imap="imaps://ada:pw@imap.example.com")
    with pytest.raises(
        ConnectionConfigError, match=rf"sender {acct_id} \(ada@example.com\) imap.*SECRETS_KEY is not set"
    ):
        await imap_connection(session_factory, Settings(secrets_key=SecretStr("")), acct_id)
    with pytest.raises(ConnectionConfigError, match=rf"sender {acct_id} \(ada@example.com\) imap.*not the key"):
        await imap_connection(session_factory, Settings(secrets_key=SecretStr(generate_key())), acct_id)
    # rotation: a new first key with the old one after it still opens the secret
    rotated = Settings(secrets_key=SecretStr(f"{generate_key()},{KEY}"))
    conn = await imap_connection(session_factory, rotated, acct_id)
    assert conn is not None and conn.password == "pw"


async def test_adding_without_a_key_writes_nothing(session_factory: SessionFactory) -> None:
    with pytest.raises(ConnectionConfigError, match="SECRETS_KEY is not set"):
        await _add(session_factory, settings=Settings(secrets_key=SecretStr("")), smtp="smtps://a:pw@smtp.example.com")
    assert await list_senders(session_factory) == []


async def test_readding_keeps_replaces_and_removes_connections(session_factory: SessionFactory) -> None:
    acct_id = await _add(session_factory, smtp="smtps://a:one@smtp.example.com", imap="imaps://a:two@imap.example.com")
    await _add(session_factory)  # caps only: connections stay
    smtp = await smtp_connection(session_factory, SETTINGS, acct_id)
    assert smtp is not None and smtp.password == "one"
    await _add(session_factory, smtp="smtp://a:three@127.0.0.1:2525")
    smtp2 = await smtp_connection(session_factory, SETTINGS, acct_id)
    assert smtp2 is not None and (smtp2.port, smtp2.password, smtp2.implicit_tls) == (2525, "three", False)
    assert smtp2.id == smtp.id and smtp2.version != smtp.version
    await _add(session_factory, no_smtp=True)
    assert await smtp_connection(session_factory, SETTINGS, acct_id) is None
    assert await imap_connection(session_factory, SETTINGS, acct_id) is not None


async def test_connections_only_for_email_senders(session_factory: SessionFactory) -> None:
    flags = connection_flags({}, smtp="smtps://a:b@smtp.example.com")
    with pytest.raises(ValueError, match="only email senders have mailbox connections, not x"):
        await add_sender(session_factory, channel="x", address="123", smtp=flags.smtp, settings=SETTINGS)


async def test_cli_add_list_never_print_a_secret(database_url: str, session_factory: SessionFactory) -> None:
    added = await cli(
        database_url,
        "senders",
        "add",
        "--channel",
        "email",
        "--address",
        "Ada@Example.com",
        "--smtp",
        "smtps://ada:url%2Fsecret@smtp.example.com:465",
        "--imap",
        "imaps://ada@imap.example.com/INBOX",
        "--imap-password-env",
        "H5_TEST_IMAP_PW",
        env={"SECRETS_KEY": KEY, "H5_TEST_IMAP_PW": "env-imap-secret"},
    )
    assert added.code == 0, added.err
    assert "smtps://ada@smtp.example.com:465" in added.out and "imaps://ada@imap.example.com:993/INBOX" in added.out
    acct = (await list_senders(session_factory))[0].account
    await set_connection_status(session_factory, acct.id, "imap", "error", "login refused: bad password")
    await add_sender(session_factory, channel="x", address="1000000001")

    listed = await cli(database_url, "senders", "list", env={"SECRETS_KEY": KEY})
    assert listed.code == 0, listed.err
    for secret in ("url/secret", "url%2Fsecret", "env-imap-secret"):
        assert secret not in listed.out + added.out + listed.err + added.err
    assert "smtps://ada@smtp.example.com:465 (password)" in listed.out
    assert "imaps://ada@imap.example.com:993/INBOX (password)" in listed.out
    assert "imap error" in listed.out and "login refused: bad password" in listed.out
    assert "1000000001" in listed.out
    conn = await smtp_connection(session_factory, Settings(secrets_key=SecretStr(KEY)), acct.id)
    assert conn is not None and conn.password == "url/secret"


async def test_cli_add_bad_url_or_missing_key_is_one_clear_line(database_url: str) -> None:
    bad = await cli(
        database_url, "senders", "add", "--channel", "email", "--address", "a@example.com", "--smtp", "smtps://a:b@h:x"
    )
    assert bad.code == 2 and "--smtp: the port is not a number" in bad.err
    nokey = await cli(
        database_url,
        "senders",
        "add",
        "--channel",
        "email",
        "--address",
        "a@example.com",
        "--smtp",
        "smtps://a:b@smtp.example.com",
        env={"SECRETS_KEY": ""},
    )
    assert nokey.code == 2 and "sender a@example.com smtp" in nokey.err and "SECRETS_KEY is not set" in nokey.err
    assert "b@smtp" not in nokey.err


async def test_oauth_needs_a_token_endpoint_and_a_client_id(session_factory: SessionFactory) -> None:
    flags = connection_flags({"RT": "r"}, smtp="smtps://ada@smtp.gmail.com", oauth_refresh_token_env="RT")
    with pytest.raises(ValueError, match=r"^--oauth-token-url is required \(or set OAUTH_TOKEN_URL\)"):
        await add_sender(
            session_factory,
            channel="email",
            address="ada@gmail.com",
            smtp=flags.smtp,
            oauth=flags.oauth,
            settings=SETTINGS,
        )
    with_url = Settings(secrets_key=SecretStr(KEY), oauth_token_url="https://oauth2.googleapis.com/token")
    with pytest.raises(ValueError, match=r"^--oauth-client-id is required \(or set OAUTH_CLIENT_ID\)"):
        await add_sender(
            session_factory,
            channel="email",
            address="ada@gmail.com",
            smtp=flags.smtp,
            oauth=flags.oauth,
            settings=with_url,
        )
    assert await list_senders(session_factory) == []  # nothing half-written

"""The `--smtp`/`--imap` URLs and the connection flags of `senders add` (pure parsing).

Why: a wrongly read URL sends a password in clear text, logs in as the wrong user or
silently drops a connection; every bad value must fail with an error naming its flag.
"""

from __future__ import annotations

import pytest

from services.mail_urls import MailUrl, MailUrlError, connection_flags, parse_mail_url


def smtp(url: str, **kw: object) -> MailUrl:
    return parse_mail_url(url, kind="smtp", flag="--smtp", **kw)  # type: ignore[arg-type]


def imap(url: str, **kw: object) -> MailUrl:
    return parse_mail_url(url, kind="imap", flag="--imap", **kw)  # type: ignore[arg-type]


def test_smtps_with_user_and_password() -> None:
    url = smtp("smtps://ada:s3cret@smtp.example.com:465")
    assert (url.host, url.port, url.security, url.username, url.password, url.auth) == (
        "smtp.example.com",
        465,
        "tls",
        "ada",
        "s3cret",
        "password",
    )
    assert "s3cret" not in repr(url)
    assert url.display() == "smtps://ada@smtp.example.com:465"


def test_smtp_starttls_and_default_ports() -> None:
    url = smtp("smtp://ada:pw@smtp.example.com?starttls=true")
    assert (url.security, url.port) == ("starttls", 587)
    assert url.display() == "smtp://ada@smtp.example.com:587?starttls=true"
    assert smtp("smtps://ada:pw@smtp.example.com").port == 465
    assert smtp("smtp://relay.example.com").port == 25
    assert imap("imaps://ada:pw@imap.example.com").port == 993
    assert imap("imap://ada:pw@127.0.0.1").port == 143


def test_percent_encoded_user_and_password() -> None:
    url = smtp("smtps://ada%40example.com:p%40ss%3Aw%2Frd%23%3F@smtp.example.com:465")
    assert url.username == "ada@example.com"
    assert url.password == "p@ss:w/rd#?"
    # what `senders list` shows parses back to the same connection (without the password)
    shown = url.display()
    assert shown == "smtps://ada%40example.com@smtp.example.com:465"
    assert smtp(shown, password="x").username == "ada@example.com"
    folder = imap("imaps://a:b@h/Sales%20Q4/Replies")
    assert imap(folder.display(), password="b").folder == "Sales Q4/Replies"
    # an unencoded @ in the user name works too (the last @ ends the login)
    assert smtp("smtps://ada@example.com:pw@smtp.example.com").username == "ada@example.com"


def test_imap_folder_from_the_path() -> None:
    assert imap("imaps://ada:pw@imap.example.com:993/INBOX").folder == "INBOX"
    assert imap("imaps://ada:pw@imap.example.com").folder == "INBOX"
    assert imap("imaps://ada:pw@imap.example.com/Replies%2F2026").folder == "Replies/2026"
    assert imap("imaps://ada:pw@imap.example.com/Sales").display() == "imaps://ada@imap.example.com:993/Sales"


def test_password_from_the_environment() -> None:
    assert smtp("smtps://ada@smtp.example.com", password="from-env").password == "from-env"
    with pytest.raises(MailUrlError, match=r"--smtp: the URL has a password and so does --smtp-password-env"):
        smtp("smtps://ada:pw@smtp.example.com", password="from-env")


def test_smtp_without_login_is_a_relay_and_imap_needs_one() -> None:
    assert smtp("smtp://relay.internal:25").auth == "none"
    with pytest.raises(MailUrlError, match=r"^--imap: no password"):
        imap("imaps://ada@imap.example.com")


def test_xoauth2_by_option_or_by_oauth_available() -> None:
    assert smtp("smtps://ada@smtp.gmail.com?auth=xoauth2").auth == "xoauth2"
    assert imap("imaps://ada@imap.gmail.com", oauth_available=True).auth == "xoauth2"
    with pytest.raises(MailUrlError, match="remove the password"):
        smtp("smtps://ada:pw@smtp.gmail.com?auth=xoauth2")
    with pytest.raises(MailUrlError, match="needs a user name"):
        smtp("smtps://smtp.gmail.com?auth=xoauth2")


def test_no_clear_text_password_over_the_network() -> None:
    with pytest.raises(MailUrlError, match=r"--smtp: the password would cross the network in clear text"):
        smtp("smtp://ada:pw@smtp.example.com:587")
    with pytest.raises(MailUrlError, match=r"--imap: the password would cross the network in clear text"):
        imap("imap://ada:pw@imap.example.com")
    assert smtp("smtp://ada:pw@127.0.0.1:2525").security == "plain"
    assert imap("imap://ada:pw@localhost:1143").security == "plain"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "--smtp: empty URL"),
        ("imaps://a:b@host", "--smtp: scheme 'imaps' is not one of smtp, smtps"),
        ("smtp.example.com:465", "--smtp: scheme"),
        ("smtps://", "--smtp: no host"),
        ("smtps://ada:pw@host:notaport", "--smtp: the port is not a number"),
        ("smtps://ada:pw@host:70000", "--smtp: the port is not a number"),
        ("smtps://ada:pw@host:0", "--smtp: port 0"),
        ("smtps://ada:p#w@host", "--smtp: the URL contains '#'"),
        ("smtps://ada:pw@host?starttls=true", "--smtp: smtps:// is already TLS"),
        ("smtp://ada:pw@127.0.0.1?starttls=maybe", "--smtp: ?starttls='maybe' must be true or false"),
        ("smtps://ada:pw@host?tls=1", "--smtp: unknown option ?tls="),
        ("smtps://ada:pw@host?auth=cram", "--smtp: ?auth='cram' must be password or xoauth2"),
        ("smtps://ada:pw@host/path", "--smtp: an SMTP URL has no path"),
        ("smtps://ada:@host", "--smtp: the password is empty"),
    ],
)
def test_bad_smtp_urls_name_the_flag(url: str, message: str) -> None:
    with pytest.raises(MailUrlError) as caught:
        smtp(url)
    assert str(caught.value).startswith(message)


def test_imap_starttls_is_refused_clearly() -> None:
    with pytest.raises(MailUrlError, match=r"^--imap: STARTTLS is not supported for IMAP; use imaps://"):
        imap("imap://ada:pw@imap.example.com?starttls=true")


def test_connection_flags_read_secrets_from_the_environment() -> None:
    env = {"SMTP_PW": "smtp-secret", "IMAP_PW": "imap-secret"}
    flags = connection_flags(
        env,
        smtp="smtps://ada@smtp.example.com",
        imap="imaps://ada@imap.example.com/INBOX",
        smtp_password_env="SMTP_PW",
        imap_password_env="IMAP_PW",
    )
    assert flags.smtp is not None and flags.smtp.password == "smtp-secret"
    assert flags.imap is not None and flags.imap.password == "imap-secret"
    assert flags.oauth is None and flags.remove == frozenset()


def test_connection_flags_oauth() -> None:
    env = {"REFRESH": "1//refresh", "CLIENT_SECRET": "cs"}
    flags = connection_flags(
        env,
        smtp="smtps://ada@gmail.com@smtp.gmail.com",
        imap="imaps://ada@gmail.com@imap.gmail.com",
        oauth_refresh_token_env="REFRESH",
        oauth_client_id="client-1",
        oauth_client_secret_env="CLIENT_SECRET",
        oauth_token_url="google",
    )
    assert flags.smtp is not None and flags.smtp.auth == "xoauth2"
    assert flags.imap is not None and flags.imap.auth == "xoauth2"
    assert flags.oauth is not None
    assert (flags.oauth.refresh_token, flags.oauth.client_id, flags.oauth.client_secret) == (
        "1//refresh",
        "client-1",
        "cs",
    )
    assert flags.oauth.token_url == "https://oauth2.googleapis.com/token"
    assert "1//refresh" not in repr(flags)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smtp": "smtps://a@h", "smtp_password_env": "MISSING"}, "--smtp-password-env: environment variable MISSING"),
        ({"smtp": "smtps://a@h", "smtp_password_env": "EMPTY"}, "--smtp-password-env: environment variable EMPTY is"),
        ({"imap_password_env": "PW"}, "--imap-password-env needs --imap"),
        ({"smtp": "smtps://a:b@h", "no_smtp": True}, "--no-smtp and --smtp"),
        ({"oauth_client_id": "x"}, "--oauth-client-id needs --oauth-refresh-token-env"),
        ({"smtp": "smtps://a@h?auth=xoauth2"}, "?auth=xoauth2 needs --oauth-refresh-token-env"),
        (
            {"smtp": "smtps://a@h", "oauth_refresh_token_env": "PW", "oauth_token_url": "ftp://x"},
            "--oauth-token-url: 'ftp://x' is not",
        ),
        (
            {"smtp": "smtps://a@h", "oauth_refresh_token_env": "PW", "oauth_token_url": "http://tokens.example.com/t"},
            "--oauth-token-url: 'http://tokens.example.com/t' must be https",
        ),
        ({"smtp": "smtps://a:b@h", "oauth_refresh_token_env": "PW"}, "--oauth-refresh-token-env: no --smtp/--imap"),
    ],
)
def test_bad_connection_flags_name_the_flag(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(MailUrlError) as caught:
        connection_flags({"PW": "pw", "EMPTY": ""}, **kwargs)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_removing_connections() -> None:
    assert connection_flags({}, no_smtp=True, no_imap=True).remove == frozenset({"smtp", "imap"})

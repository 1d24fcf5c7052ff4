"""Parse the `--smtp` and `--imap` URLs of `senders add` into connection settings.

Why URLs: one argument carries host, port, security, login and (for IMAP) the folder,
in the form mail clients and libraries already use (`smtps://user:pass@host:465`,
`imap://user@host:143/INBOX?starttls=true`). Pure code, no I/O, so every rule is unit
tested and every bad URL fails with an error that names the flag.

Rules:

- `smtps://` and `imaps://` are implicit TLS (default ports 465 and 993); `smtp://` is
  plain unless `?starttls=true` (default ports 587 with STARTTLS, else 25); `imap://` is
  plain (port 143; IMAP STARTTLS is not offered: every mailbox provider serves imaps).
- User and password are percent-decoded (`p%40ss` is `p@ss`); a password may instead come
  from an environment variable (`--smtp-password-env VAR`), never both.
- `?auth=xoauth2` logs in with OAuth 2.0 (XOAUTH2) instead of a password; without a
  password and without `auth=`, SMTP sends without logging in (a trusted relay) and IMAP
  is refused (a mailbox always needs a login).
- A password is never sent in clear text to a host other than loopback: use implicit TLS
  or `?starttls=true`.
- The IMAP path is the folder to watch (percent-decoded, default `INBOX`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit

Kind = Literal["smtp", "imap"]
Security = Literal["tls", "starttls", "plain"]
Auth = Literal["password", "xoauth2", "none"]

#: scheme -> (kind, implicit TLS)
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "smtp": ("smtp", False),
    "smtps": ("smtp", True),
    "imap": ("imap", False),
    "imaps": ("imap", True),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class MailUrlError(ValueError):
    """A `--smtp`/`--imap` value that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class MailUrl:
    """One parsed connection: where, how secured, and how to log in."""

    kind: Kind
    host: str
    port: int
    security: Security
    username: str | None
    password: str | None = field(default=None, repr=False)
    auth: Auth = "none"
    folder: str | None = None

    def display(self) -> str:
        """The URL without its secret, as `senders list` shows it (parses back to the same)."""
        scheme = f"{self.kind}s" if self.security == "tls" else self.kind
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = f"/{quote(self.folder, safe='/')}" if self.kind == "imap" and self.folder else ""
        query = "?starttls=true" if self.security == "starttls" else ""
        return f"{scheme}://{user}{host}:{self.port}{path}{query}"


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine (clear-text logins are allowed only there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag_bool(value: str, flag: str, name: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise MailUrlError(f"{flag}: ?{name}={value!r} must be true or false")


def parse_mail_url(
    url: str, *, kind: Kind, flag: str, password: str | None = None, oauth_available: bool = False
) -> MailUrl:
    """Parse `url` as a `kind` connection; `password` comes from `--…-password-env`.

    With `oauth_available` (an OAuth refresh token was given), a URL without a password
    logs in with XOAUTH2. Raises `MailUrlError` naming `flag` and what is wrong.
    """
    text = url.strip()
    if not text:
        raise MailUrlError(f"{flag}: empty URL")
    if "#" in text:
        raise MailUrlError(f"{flag}: the URL contains '#'; percent-encode it in the password as %23")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or _SCHEMES[scheme][0] != kind:
        wanted = [s for s, (k, _) in _SCHEMES.items() if k == kind]
        raise MailUrlError(f"{flag}: scheme {parts.scheme or '(none)'!r} is not one of {', '.join(wanted)}")
    host, port = _location(parts, scheme, flag)
    query = _query(parts.query, flag)
    security = _security(query, kind, scheme, flag)
    if port is None:
        port = _DEFAULT_PORTS[(kind, security)]
    username = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password is not None else None
    if url_password is not None and password is not None:
        raise MailUrlError(f"{flag}: the URL has a password and so does {flag}-password-env; give one")
    secret = url_password if url_password is not None else password
    if secret == "":
        raise MailUrlError(f"{flag}: the password is empty")
    auth = _auth(query, secret, oauth_available, flag)
    if auth != "none" and not username:
        raise MailUrlError(f"{flag}: a login needs a user name ({scheme}://user:password@{host})")
    if auth == "none" and kind == "imap":
        raise MailUrlError(
            f"{flag}: no password; give imaps://user:password@host, {flag}-password-env VAR, or ?auth=xoauth2"
        )
    if auth == "password" and security == "plain" and not is_loopback(host):
        fix = "imaps://" if kind == "imap" else "smtps:// or ?starttls=true"
        raise MailUrlError(f"{flag}: the password would cross the network in clear text to {host}; use {fix}")
    path = unquote(parts.path).strip("/")
    if kind == "smtp" and path:
        raise MailUrlError(f"{flag}: an SMTP URL has no path (got /{path})")
    return MailUrl(
        kind=kind,
        host=host,
        port=port,
        security=security,
        username=username,
        password=secret,
        auth=auth,
        folder=(path or "INBOX") if kind == "imap" else None,
    )


_DEFAULT_PORTS: dict[tuple[Kind, Security], int] = {
    ("smtp", "tls"): 465,
    ("smtp", "starttls"): 587,
    ("smtp", "plain"): 25,
    ("imap", "tls"): 993,
    ("imap", "plain"): 143,
}


def _location(parts: SplitResult, scheme: str, flag: str) -> tuple[str, int | None]:
    host = parts.hostname or ""
    if not parts.netloc or not host:
        raise MailUrlError(f"{flag}: no host (expected {scheme}://user:password@host:port)")
    try:
        port = parts.port
    except ValueError:
        raise MailUrlError(
            f"{flag}: the port is not a number from 1 to 65535 "
            "(a password with ':', '/', '?' or '@' must be percent-encoded)"
        ) from None
    if port == 0:
        raise MailUrlError(f"{flag}: port 0 is not a port")
    return host, port


def _query(raw: str, flag: str) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True):
        if name in query:
            raise MailUrlError(f"{flag}: ?{name}= is given twice")
        query[name] = value
    unknown = sorted(set(query) - {"starttls", "auth"})
    if unknown:
        raise MailUrlError(f"{flag}: unknown option ?{unknown[0]}= (use starttls=true or auth=xoauth2)")
    return query


def _security(query: dict[str, str], kind: Kind, scheme: str, flag: str) -> Security:
    implicit_tls = _SCHEMES[scheme][1]
    starttls = _flag_bool(query["starttls"], flag, "starttls") if "starttls" in query else False
    if starttls and kind == "imap":
        raise MailUrlError(f"{flag}: STARTTLS is not supported for IMAP; use imaps:// (port 993)")
    if starttls and implicit_tls:
        raise MailUrlError(f"{flag}: {scheme}:// is already TLS; ?starttls=true is for {kind}://")
    return "tls" if implicit_tls else ("starttls" if starttls else "plain")


def _auth(query: dict[str, str], secret: str | None, oauth_available: bool, flag: str) -> Auth:
    requested = query.get("auth", "").strip().lower()
    if requested in {"xoauth2", "oauth2", "oauth"}:
        if secret is not None:
            raise MailUrlError(f"{flag}: ?auth=xoauth2 logs in with OAuth; remove the password")
        return "xoauth2"
    if requested == "" and secret is None and oauth_available:
        return "xoauth2"
    if requested in {"", "password", "plain", "login"}:
        return "password" if secret is not None else "none"
    raise MailUrlError(f"{flag}: ?auth={query['auth']!r} must be password or xoauth2")


@dataclass(frozen=True)
class OAuthInput:
    """The OAuth settings given to `senders add` (None: the setting's default)."""

    refresh_token: str = field(repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    token_url: str | None = None
    scope: str | None = None


@dataclass(frozen=True)
class ConnectionFlags:
    """What the `senders add` connection flags amount to."""

    smtp: MailUrl | None
    imap: MailUrl | None
    oauth: OAuthInput | None
    remove: frozenset[str]


def _from_env(env: Mapping[str, str], var: str | None, flag: str) -> str | None:
    if var is None:
        return None
    name = var.strip()
    if not name:
        raise MailUrlError(f"{flag}: give the name of an environment variable")
    value = env.get(name)
    if value is None:
        raise MailUrlError(f"{flag}: environment variable {name} is not set")
    if not value:
        raise MailUrlError(f"{flag}: environment variable {name} is empty")
    return value


def connection_flags(
    env: Mapping[str, str],
    *,
    smtp: str | None = None,
    imap: str | None = None,
    smtp_password_env: str | None = None,
    imap_password_env: str | None = None,
    oauth_refresh_token_env: str | None = None,
    oauth_client_id: str | None = None,
    oauth_client_secret_env: str | None = None,
    oauth_token_url: str | None = None,
    oauth_scope: str | None = None,
    no_smtp: bool = False,
    no_imap: bool = False,
) -> ConnectionFlags:
    """Turn the connection flags of `senders add` into settings (pure; `env` is os.environ).

    Raises `MailUrlError` naming the flag at fault.
    """
    from services.oauth import resolve_token_url

    if no_smtp and smtp is not None:
        raise MailUrlError("--no-smtp and --smtp contradict each other")
    if no_imap and imap is not None:
        raise MailUrlError("--no-imap and --imap contradict each other")
    if smtp_password_env is not None and smtp is None:
        raise MailUrlError("--smtp-password-env needs --smtp")
    if imap_password_env is not None and imap is None:
        raise MailUrlError("--imap-password-env needs --imap")
    refresh = _from_env(env, oauth_refresh_token_env, "--oauth-refresh-token-env")
    oauth_extras = {
        "--oauth-client-id": oauth_client_id,
        "--oauth-client-secret-env": oauth_client_secret_env,
        "--oauth-token-url": oauth_token_url,
        "--oauth-scope": oauth_scope,
    }
    if refresh is None:
        given = [flag for flag, value in oauth_extras.items() if value is not None]
        if given:
            raise MailUrlError(f"{given[0]} needs --oauth-refresh-token-env")
    oauth: OAuthInput | None = None
    if refresh is not None:
        try:
            token_url = resolve_token_url(oauth_token_url) if oauth_token_url is not None else None
        except ValueError as err:
            raise MailUrlError(str(err)) from None
        oauth = OAuthInput(
            refresh_token=refresh,
            client_id=(oauth_client_id or "").strip() or None,
            client_secret=_from_env(env, oauth_client_secret_env, "--oauth-client-secret-env"),
            token_url=token_url,
            scope=(oauth_scope or "").strip() or None,
        )
    smtp_url = (
        parse_mail_url(
            smtp,
            kind="smtp",
            flag="--smtp",
            password=_from_env(env, smtp_password_env, "--smtp-password-env"),
            oauth_available=oauth is not None,
        )
        if smtp is not None
        else None
    )
    imap_url = (
        parse_mail_url(
            imap,
            kind="imap",
            flag="--imap",
            password=_from_env(env, imap_password_env, "--imap-password-env"),
            oauth_available=oauth is not None,
        )
        if imap is not None
        else None
    )
    uses_oauth = any(u is not None and u.auth == "xoauth2" for u in (smtp_url, imap_url))
    if uses_oauth and oauth is None:
        raise MailUrlError("?auth=xoauth2 needs --oauth-refresh-token-env VAR (the OAuth refresh token)")
    if oauth is not None and not uses_oauth:
        raise MailUrlError(
            "--oauth-refresh-token-env: no --smtp/--imap URL logs in with OAuth (leave the password out of the URL)"
        )
    remove = frozenset(k for k, flag in (("smtp", no_smtp), ("imap", no_imap)) if flag)
    return ConnectionFlags(smtp=smtp_url, imap=imap_url, oauth=oauth, remove=remove)

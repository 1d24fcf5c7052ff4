"""Local mail servers for tests: the SMTP sink, SMTP with AUTH (and XOAUTH2), a token endpoint.

- `smtp_server` (fixture, per test): an aiosmtpd sink on loopback that records what it
  accepts (`SmtpRecorder`) and can be told to answer with failures first.
- `AuthSmtp`: an aiosmtpd server that requires AUTH, records the raw credentials each
  login carried (PLAIN/LOGIN pairs, the decoded XOAUTH2 initial response) and the raw
  bytes of every message; implicit TLS, STARTTLS or plain on loopback.
- `TokenEndpoint`: an OAuth 2.0 token endpoint (a real HTTP server on loopback) that
  exchanges known refresh tokens for access tokens and records every form it received.
- `make_tls_pair`: a self-signed certificate for 127.0.0.1 and the client context trusting it
  (the `tls` fixture: one per session); `settings_for(tokens)`: harness settings with the OAuth
  client of a token endpoint.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from activities.channels.email import EmailChannel, SmtpPool
from activities.channels.sender_smtp import SenderSmtpPools
from db.session import SessionFactory
from devstack.factories import add_email_sender
from devstack.postgres import free_port
from settings import Settings
from tests.engine_harness import harness_settings


@dataclass
class SmtpRecorder:
    """What the test SMTP server received, and how it should answer."""

    host: str
    port: int
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    fail_codes: list[str] = field(default_factory=list)
    reject_rcpt: dict[str, str] = field(default_factory=dict)
    connections: int = 0
    #: The final reply to an accepted message (an ESP relay names its own message id here).
    accept_reply: str = "250 Message accepted for delivery"

    def parsed(self) -> list[Message]:
        """Every accepted message, parsed."""
        return [message_from_bytes(raw, policy=policy.default) for _, _, raw in self.messages]


class _Handler:
    def __init__(self, rec: SmtpRecorder) -> None:
        self.rec = rec

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address in self.rec.reject_rcpt:
            return self.rec.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.rec.fail_codes:
            return self.rec.fail_codes.pop(0)
        self.rec.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return self.rec.accept_reply


@pytest.fixture
def smtp_server() -> Iterator[SmtpRecorder]:
    """A real aiosmtpd server on 127.0.0.1 that records what it accepts."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    rec = SmtpRecorder(host="127.0.0.1", port=free_port())

    class CountingSMTP(SMTP):
        def connection_made(self, transport):
            rec.connections += 1
            super().connection_made(transport)

    class CountingController(Controller):
        def factory(self):
            return CountingSMTP(self.handler, **self.SMTP_kwargs)

    ctl = CountingController(_Handler(rec), hostname=rec.host, port=rec.port)
    ctl.start()
    yield rec
    ctl.stop()


@dataclass(frozen=True)
class TlsPair:
    """Files of a self-signed certificate for 127.0.0.1, and contexts for both sides."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def make_tls_pair(folder: Path) -> TlsPair:
    """A fresh self-signed certificate valid for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsPair(cert_path, key_path)


@dataclass
class AuthSmtp:
    """What one AUTH-requiring SMTP server saw."""

    host: str
    port: int
    #: (mechanism, raw credentials): (b"login", b"password") pairs or the XOAUTH2 bytes.
    logins: list[tuple[str, Any]] = field(default_factory=list)
    refused: list[tuple[str, Any]] = field(default_factory=list)
    #: (MAIL FROM, RCPT TOs, raw message bytes, the login of the session that sent it)
    messages: list[tuple[str, list[str], bytes, Any]] = field(default_factory=list)
    connections: int = 0
    #: login -> the password it is accepted with (change it while running: `accept`).
    passwords: dict[bytes, bytes] = field(default_factory=dict)

    def accept(self, login: str, password: str) -> None:
        """From now on `login` logs in with `password` (a fixed account)."""
        self.passwords[login.encode()] = password.encode()

    def settings(self, username: str, password: str) -> dict[str, Any]:
        """SMTP_* settings (for `wired(settings=...)`) that send through this server as `username`."""
        return {
            "smtp_host": self.host,
            "smtp_port": self.port,
            "smtp_username": username,
            "smtp_password": SecretStr(password),
        }


class _AuthHandler:
    def __init__(self, rec: AuthSmtp, tokens: dict[bytes, bytes]) -> None:
        self.rec = rec
        self.tokens = tokens

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        pair = (bytes(data.login), bytes(data.password))
        if self.rec.passwords.get(pair[0]) == pair[1]:
            self.rec.logins.append((mechanism, pair))
            return AuthResult(success=True, auth_data=data)
        self.rec.refused.append((mechanism, pair))
        return AuthResult(success=False, handled=False)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        """RFC-less but documented (Google/Microsoft): `AUTH XOAUTH2 <base64 initial response>`."""
        if len(args) < 2:
            raw = await server.challenge_auth("", encode_to_b64=False)
            if not isinstance(raw, bytes):
                return AuthResult(success=False, handled=True)
        else:
            raw = base64.b64decode(args[1], validate=True)
        fields = dict(part.split(b"=", 1) for part in raw.split(b"\x01") if b"=" in part)
        user, bearer = fields.get(b"user", b""), fields.get(b"auth", b"")
        if bearer.startswith(b"Bearer ") and self.tokens.get(user) == bearer[7:]:
            self.rec.logins.append(("XOAUTH2", raw))
            return AuthResult(success=True, auth_data=LoginPassword(user, b""))
        self.rec.refused.append(("XOAUTH2", raw))
        # Google's behaviour: a 334 challenge with a JSON error, then 535 after the empty reply.
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"})
        await server.challenge_auth(error)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        login = getattr(session.auth_data, "login", None)
        self.rec.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content, login))
        return "250 accepted"


@contextmanager
def auth_smtp(
    *,
    passwords: dict[bytes, bytes] | None = None,
    tokens: dict[bytes, bytes] | None = None,
    tls: TlsPair | None = None,
    implicit_tls: bool = False,
) -> Iterator[AuthSmtp]:
    """An aiosmtpd server requiring AUTH (XOAUTH2 offered only when `tokens` is given)."""
    rec = AuthSmtp("127.0.0.1", free_port(), passwords=dict(passwords or {}))
    handler = _AuthHandler(rec, tokens or {})
    kwargs: dict[str, Any] = {"auth_required": True, "authenticator": handler.authenticate}
    if not tokens:
        kwargs["auth_exclude_mechanism"] = ["XOAUTH2"]
    if tls is not None and not implicit_tls:
        kwargs.update(tls_context=tls.server_context(), require_starttls=True, auth_require_tls=True)
    else:
        kwargs["auth_require_tls"] = False

    class Counting(SMTP):
        def connection_made(self, transport: Any) -> None:
            rec.connections += 1
            super().connection_made(transport)

    class Ctl(Controller):
        def factory(self) -> SMTP:
            return Counting(self.handler, **self.SMTP_kwargs)

    ssl_context = tls.server_context() if (tls is not None and implicit_tls) else None
    ctl = Ctl(handler, hostname=rec.host, port=rec.port, ssl_context=ssl_context, **kwargs)
    ctl.start()
    try:
        yield rec
    finally:
        ctl.stop()


@dataclass
class TokenEndpoint:
    """An OAuth token endpoint on loopback: refresh token -> access token."""

    url: str
    grants: dict[str, str]
    forms: list[dict[str, str]] = field(default_factory=list)
    rotate: dict[str, str] = field(default_factory=dict)
    issued: int = 0


@contextmanager
def token_endpoint(grants: dict[str, str], *, rotate: dict[str, str] | None = None) -> Iterator[TokenEndpoint]:
    """Serve `POST /token`: a known refresh token gets its access token, others `invalid_grant`."""
    port = free_port()
    state = TokenEndpoint(f"http://127.0.0.1:{port}/token", dict(grants), rotate=dict(rotate or {}))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(parse_qsl(self.rfile.read(length).decode()))
            state.forms.append(form)
            token = state.grants.get(form.get("refresh_token", ""))
            if self.path != "/token" or form.get("grant_type") != "refresh_token" or token is None:
                body: dict[str, Any] = {"error": "invalid_grant", "error_description": "Token has been revoked."}
                status = 400
            else:
                state.issued += 1
                body = {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
                if form["refresh_token"] in state.rotate:
                    body["refresh_token"] = state.rotate[form["refresh_token"]]
                status = 200
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def oauth_settings(tokens: TokenEndpoint | None = None) -> dict[str, Any]:
    """OAUTH_* settings for the token endpoint `tokens` (none: no OAuth client)."""
    return {
        "oauth_token_url": tokens.url if tokens else "",
        "oauth_client_id": "client-1" if tokens else "",
        "oauth_client_secret": SecretStr("client-secret-1" if tokens else ""),
    }


def settings_for(tokens: TokenEndpoint | None = None) -> Settings:
    """The harness settings (its SECRETS_KEY) with the OAuth client of `tokens`."""
    return harness_settings(None, None, None, **oauth_settings(tokens))


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsPair:
    """A self-signed certificate for 127.0.0.1 (servers' side) and the client context trusting it."""
    return make_tls_pair(tmp_path_factory.mktemp("tls"))


async def add_oauth_sender(
    sf: SessionFactory,
    settings: Settings,
    server: AuthSmtp,
    refresh_token: str,
    *,
    address: str = "bob@b.example.org",
    **flags: Any,
) -> int:
    """An email sender logging in to `server` (STARTTLS) with XOAUTH2 and this refresh token; its id."""
    return await add_email_sender(
        sf,
        settings,
        address,
        env={"RT": refresh_token},
        smtp=f"smtp://{address}@127.0.0.1:{server.port}?starttls=true",
        oauth_refresh_token_env="RT",
        **flags,
    )


@asynccontextmanager
async def sender_channel(
    sf: SessionFactory, settings: Settings, relay: Any, tls: TlsPair | None, **pools: Any
) -> AsyncIterator[EmailChannel]:
    """The email channel: senders' own SMTP (trusting `tls`) first, else the `relay` server; closed after."""
    options: dict[str, Any] = {"size": 1, "timeout": 5, **pools}
    if tls is not None:
        options["tls_context"] = tls.client_context()
    channel = EmailChannel(
        SmtpPool(relay.host, relay.port, size=1, timeout=5), senders=SenderSmtpPools(sf, settings, **options)
    )
    try:
        yield channel
    finally:
        await channel.aclose()

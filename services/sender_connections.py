"""A sender's own SMTP and IMAP connections: stored encrypted, handed out decrypted.

Why a module of its own: `senders add` writes connections, the SMTP pool registry and
the mailbox watcher read them, `senders list/test` show and check them. Secrets
(password, OAuth refresh token and client secret) are encrypted at rest with
SECRETS_KEY (services/secret_box.py) and decrypted only here, into `MailConnection`
objects whose repr never shows them. A missing or wrong key is a `ConnectionConfigError`
that names the sender and the connection.

API for readers (the SMTP registry, the IMAP watcher):

- `await load_connection(session_factory, settings, sender_id, "imap")` -> `MailConnection | None`
  (None: the sender has no such connection; SMTP then goes through the global relay).
- `await imap_connection(...)` / `await smtp_connection(...)`: the same, per kind.
- `await mailbox_sender_ids(session_factory)`: active email senders with an IMAP connection.
- `await set_connection_status(session_factory, sender_id, "imap", "error", "login refused: …")`.
- `token_cache(session_factory, settings)`: the `TokenCache` to log in with (one per worker);
  it stores rotated refresh tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.session import SessionFactory
from db.tables import SenderAccount, SenderConnection
from services.mail_urls import MailUrl, OAuthInput
from services.oauth import OAuthCredentials, TokenCache
from services.secret_box import SecretBox, SecretKeyError
from settings import Settings

Kind = Literal["smtp", "imap"]


class ConnectionConfigError(ValueError):
    """A stored connection cannot be used (key missing or wrong, OAuth endpoint unset)."""


@dataclass(frozen=True)
class MailConnection:
    """One decrypted connection of one sender; secrets are hidden from repr."""

    id: int
    sender_id: int
    address: str
    kind: Kind
    host: str
    port: int
    security: Literal["tls", "starttls", "plain"]
    username: str | None
    auth: Literal["password", "xoauth2", "none"]
    password: str | None = field(default=None, repr=False)
    oauth: OAuthCredentials | None = field(default=None, repr=False)
    folder: str | None = None
    #: Changes whenever the row is rewritten (pools rebuild when it moves).
    version: str = ""

    @property
    def implicit_tls(self) -> bool:
        """TLS from the first byte (smtps/imaps)."""
        return self.security == "tls"

    @property
    def starttls(self) -> bool:
        """Plain connect, then STARTTLS before logging in."""
        return self.security == "starttls"

    @property
    def what(self) -> str:
        """How errors name this connection: `sender 3 (a@b.c) imap`."""
        return f"sender {self.sender_id} ({self.address}) {self.kind}"

    def display(self) -> str:
        """Where it connects, without any secret."""
        url = MailUrl(
            kind=self.kind,
            host=self.host,
            port=self.port,
            security=self.security,
            username=self.username,
            auth=self.auth,
            folder=self.folder,
        ).display()
        return f"{url} ({self.auth})" if self.auth != "none" else f"{url} (no login)"


def _box(settings: Settings, what: str) -> SecretBox:
    try:
        return SecretBox.from_settings(settings)
    except SecretKeyError as err:
        raise ConnectionConfigError(f"{what}: {err}") from err


def _encrypt(box: SecretBox, text: str, what: str) -> str:
    try:
        return box.encrypt(text, what=what)
    except SecretKeyError as err:
        raise ConnectionConfigError(f"{what}: {err}") from err


def _decrypt(box: SecretBox, token: str, what: str) -> str:
    try:
        return box.decrypt(token, what=what)
    except SecretKeyError as err:
        raise ConnectionConfigError(f"{what}: {err}") from err


async def save_connection(
    session: AsyncSession,
    sender: SenderAccount,
    url: MailUrl,
    *,
    settings: Settings,
    oauth: OAuthInput | None = None,
) -> SenderConnection:
    """Create or replace the sender's `url.kind` connection in the caller's transaction."""
    what = f"sender {sender.address} {url.kind}"
    box = _box(settings, what)
    if url.auth == "xoauth2":
        if oauth is None:
            raise ValueError(f"--{url.kind}: ?auth=xoauth2 needs --oauth-refresh-token-env")
        if not (oauth.token_url or settings.oauth_token_url):
            raise ValueError("--oauth-token-url is required (or set OAUTH_TOKEN_URL)")
        if not (oauth.client_id or settings.oauth_client_id):
            raise ValueError("--oauth-client-id is required (or set OAUTH_CLIENT_ID)")
    row = (
        await session.execute(
            select(SenderConnection).where(SenderConnection.sender_id == sender.id, SenderConnection.kind == url.kind)
        )
    ).scalar_one_or_none()
    if row is None:
        row = SenderConnection(sender_id=sender.id, kind=url.kind)
        session.add(row)
    row.host, row.port, row.security = url.host, url.port, url.security
    row.username, row.auth, row.folder = url.username, url.auth, url.folder
    row.secret = None
    row.oauth_token_url = row.oauth_client_id = row.oauth_client_secret = row.oauth_scope = None
    if url.auth == "password" and url.password is not None:
        row.secret = _encrypt(box, url.password, f"{what} password")
    elif url.auth == "xoauth2" and oauth is not None:
        row.secret = _encrypt(box, oauth.refresh_token, f"{what} refresh token")
        row.oauth_token_url = oauth.token_url
        row.oauth_client_id = oauth.client_id
        row.oauth_scope = oauth.scope
        if oauth.client_secret:
            row.oauth_client_secret = _encrypt(box, oauth.client_secret, f"{what} OAuth client secret")
    row.status, row.status_reason, row.status_at = None, None, None
    row.updated_at = datetime.now(UTC)
    await session.flush()
    return row


async def remove_connection(session: AsyncSession, sender_id: int, kind: Kind) -> bool:
    """Delete the sender's `kind` connection (its sends go back to the global relay)."""
    row = (
        await session.execute(
            select(SenderConnection).where(SenderConnection.sender_id == sender_id, SenderConnection.kind == kind)
        )
    ).scalar_one_or_none()
    if row is None:
        return False
    await session.delete(row)
    await session.flush()
    return True


def decrypt_connection(row: SenderConnection, address: str, settings: Settings) -> MailConnection:
    """The usable connection for a stored row (raises `ConnectionConfigError`)."""
    what = f"sender {row.sender_id} ({address}) {row.kind}"
    box = _box(settings, what)
    password: str | None = None
    oauth: OAuthCredentials | None = None
    if row.auth == "password" and row.secret:
        password = _decrypt(box, row.secret, f"{what} password")
    elif row.auth == "xoauth2" and row.secret:
        token_url = row.oauth_token_url or settings.oauth_token_url
        if not token_url:
            raise ConnectionConfigError(f"{what}: no OAuth token endpoint (set OAUTH_TOKEN_URL or re-add the sender)")
        client_secret = (
            _decrypt(box, row.oauth_client_secret, f"{what} OAuth client secret")
            if row.oauth_client_secret
            else (settings.oauth_client_secret.get_secret_value() or None)
        )
        oauth = OAuthCredentials(
            token_url=token_url,
            client_id=row.oauth_client_id or settings.oauth_client_id or None,
            refresh_token=_decrypt(box, row.secret, f"{what} refresh token"),
            client_secret=client_secret,
            scope=row.oauth_scope,
            connection_id=row.id,
        )
    kind: Kind = "imap" if row.kind == "imap" else "smtp"
    return MailConnection(
        id=row.id,
        sender_id=row.sender_id,
        address=address,
        kind=kind,
        host=row.host,
        port=row.port,
        security=row.security,  # type: ignore[arg-type]
        username=row.username,
        auth=row.auth,  # type: ignore[arg-type]
        password=password,
        oauth=oauth,
        folder=row.folder,
        version=connection_version(row),
    )


def connection_version(row: SenderConnection) -> str:
    """A fingerprint of the stored settings (not of the status columns)."""
    fields = (
        row.id,
        row.host,
        row.port,
        row.security,
        row.username,
        row.auth,
        row.secret,
        row.folder,
        row.oauth_token_url,
        row.oauth_client_id,
        row.oauth_client_secret,
        row.oauth_scope,
    )
    return hashlib.sha256(repr(fields).encode("utf-8")).hexdigest()[:16]


async def load_connection(
    session_factory: SessionFactory, settings: Settings, sender_id: int, kind: Kind
) -> MailConnection | None:
    """The sender's decrypted `kind` connection, or None when it has none."""
    async with session_factory() as session:
        found = (
            await session.execute(
                select(SenderConnection, SenderAccount.address)
                .join(SenderAccount, SenderAccount.id == SenderConnection.sender_id)
                .where(SenderConnection.sender_id == sender_id, SenderConnection.kind == kind)
            )
        ).one_or_none()
    if found is None:
        return None
    row, address = found
    return decrypt_connection(row, address, settings)


async def imap_connection(session_factory: SessionFactory, settings: Settings, sender_id: int) -> MailConnection | None:
    """The sender's decrypted IMAP connection (host, port, TLS, user, secret or OAuth, folder)."""
    return await load_connection(session_factory, settings, sender_id, "imap")


async def smtp_connection(session_factory: SessionFactory, settings: Settings, sender_id: int) -> MailConnection | None:
    """The sender's decrypted SMTP connection, or None (it sends through the global relay)."""
    return await load_connection(session_factory, settings, sender_id, "smtp")


async def connection_rows(session_factory: SessionFactory, sender_ids: Sequence[int]) -> list[SenderConnection]:
    """The stored (encrypted) connections of these senders, for listings."""
    if not sender_ids:
        return []
    async with session_factory() as session:
        return list(
            (
                await session.execute(select(SenderConnection).where(SenderConnection.sender_id.in_(list(sender_ids))))
            ).scalars()
        )


async def mailbox_sender_ids(session_factory: SessionFactory) -> list[int]:
    """Active email senders that have an IMAP connection (the mailboxes to watch)."""
    async with session_factory() as session:
        rows = await session.execute(
            select(SenderConnection.sender_id)
            .join(SenderAccount, SenderAccount.id == SenderConnection.sender_id)
            .where(SenderConnection.kind == "imap", SenderAccount.channel == "email", SenderAccount.active.is_(True))
            .order_by(SenderConnection.sender_id)
        )
        return [int(r) for r in rows.scalars()]


async def set_connection_status(
    session_factory: SessionFactory, sender_id: int, kind: Kind, status: str, reason: str | None = None
) -> None:
    """Record the last outcome of a check or of the watcher (`ok`, `error`, `polling`, …)."""
    async with session_factory() as session, session.begin():
        await session.execute(
            update(SenderConnection)
            .where(SenderConnection.sender_id == sender_id, SenderConnection.kind == kind)
            .values(status=status[:32], status_reason=reason, status_at=datetime.now(UTC))
        )


async def store_rotated_refresh_token(
    session_factory: SessionFactory, settings: Settings, connection_id: int, old: str, new: str
) -> None:
    """Replace a refresh token the provider rotated (only if it is still the stored one)."""
    async with session_factory() as session, session.begin():
        row = await session.get(SenderConnection, connection_id, with_for_update=True)
        if row is None or row.auth != "xoauth2" or row.secret is None:
            return
        what = f"sender {row.sender_id} {row.kind} refresh token"
        box = _box(settings, what)
        if _decrypt(box, row.secret, what) != old:
            return
        row.secret = _encrypt(box, new, what)


def token_cache(session_factory: SessionFactory, settings: Settings, **kwargs: Any) -> TokenCache:
    """A `TokenCache` that stores a refresh token the provider rotated (encrypted, in its row)."""

    async def on_rotate(creds: OAuthCredentials, new: str) -> None:
        if creds.connection_id is not None:
            await store_rotated_refresh_token(session_factory, settings, creds.connection_id, creds.refresh_token, new)

    return TokenCache(on_rotate=on_rotate, **kwargs)

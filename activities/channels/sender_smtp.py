"""Per-sender SMTP: a pool for each sender that has its own mailbox connection.

Why: a sender connected to Gmail or Microsoft 365 must send through its own mailbox
(its own login, its own Sent folder, its own reputation), while senders without an SMTP
connection keep using the global `SMTP_*` relay. `SenderSmtpPools` is the registry:
keyed by sender id, each pool built on the first send (decrypting the secret only then),
rebuilt when `senders add` changed the connection, and closed with the worker.

The connection row is read on every send (one primary-key join): a re-added or removed
connection takes effect at the next send without a worker restart. A connection that
cannot be used (SECRETS_KEY missing or wrong, OAuth endpoint unset) is a transient error
naming the sender, so the send waits for the fix instead of failing the lead.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiosmtplib

from activities.channels.base import SenderConfigError
from activities.channels.email import SmtpPool
from db.session import SessionFactory
from services.oauth import OAuthCredentials, OAuthError, TokenCache
from services.sender_connections import ConnectionConfigError, MailConnection, smtp_connection, token_cache
from settings import Settings

#: How long a send waits before retrying when a sender's connection is misconfigured.
CONFIG_RETRY_SECONDS = 300.0


@dataclass
class _Entry:
    version: str
    pool: SmtpPool
    oauth: OAuthCredentials | None = None


class SenderSmtpPools:
    """Registry of per-sender `SmtpPool`s (lazily built; `aclose` on worker shutdown)."""

    def __init__(
        self,
        session_factory: SessionFactory,
        settings: Settings,
        *,
        tokens: TokenCache | None = None,
        tls_context: ssl.SSLContext | None = None,
        size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.tls_context = tls_context
        self.size = size or settings.smtp_pool_size
        self.timeout = timeout or settings.smtp_timeout_seconds
        self._own_tokens = tokens is None
        self.tokens = tokens or token_cache(session_factory, settings)
        self._pools: dict[int, _Entry] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._closed = False

    def pools(self) -> dict[int, SmtpPool]:
        """The pools built so far, by sender id (for tests and status)."""
        return {sender_id: entry.pool for sender_id, entry in self._pools.items()}

    async def pool_for(self, sender_id: int) -> SmtpPool | None:
        """The sender's own pool, or None when it has no SMTP connection (global relay)."""
        if self._closed:
            raise RuntimeError("SenderSmtpPools is closed")
        try:
            conn = await smtp_connection(self.session_factory, self.settings, sender_id)
        except ConnectionConfigError as err:
            # Our configuration (a secret we cannot decrypt, a refused refresh token): the
            # delivery pauses the sender (services/sender_breaker.py), the lead waits.
            raise SenderConfigError(f"cannot use its own SMTP connection: {err}", code="sender_config") from err
        lock = self._locks.setdefault(sender_id, asyncio.Lock())
        async with lock:
            entry = self._pools.get(sender_id)
            if conn is None:
                if entry is not None:
                    del self._pools[sender_id]
                    await entry.pool.aclose()
                return None
            if entry is not None and entry.version == conn.version:
                return entry.pool
            if entry is not None:  # the connection changed: new sends use a new pool
                await entry.pool.aclose()
            pool = self._build(conn)
            self._pools[sender_id] = _Entry(conn.version, pool, conn.oauth if conn.auth == "xoauth2" else None)
            return pool

    def login_refused(self, sender_id: int) -> None:
        """The server refused the sender's login: the next connection asks for a new token."""
        entry = self._pools.get(sender_id)
        if entry is not None and entry.oauth is not None:
            self.tokens.forget(entry.oauth)

    def _build(self, conn: MailConnection) -> SmtpPool:
        oauth = conn.oauth
        token_source = None
        if conn.auth == "xoauth2" and oauth is not None:

            async def token_source() -> str:
                try:
                    return await self.tokens.access_token(oauth, what=conn.what)
                except OAuthError as err:
                    # Raised inside aiosmtplib's connect. A refused grant is a refused login
                    # (retried minutes later, code "auth"); an unreachable endpoint a connect error.
                    if err.permanent:
                        raise aiosmtplib.SMTPAuthenticationError(535, f"XOAUTH2 not attempted: {err}") from err
                    raise aiosmtplib.SMTPException(f"XOAUTH2 login not possible: {err}") from err

        return SmtpPool(
            conn.host,
            conn.port,
            username=conn.username if conn.auth != "none" else None,
            password=conn.password if conn.auth == "password" else None,
            starttls=conn.starttls,
            use_tls=conn.implicit_tls,
            size=self.size,
            timeout=self.timeout,
            tls_context=self.tls_context,
            oauth_token=token_source,
        )

    async def aclose(self) -> None:
        """Close every pool (worker shutdown) and the token client if it is ours."""
        self._closed = True
        entries, self._pools = list(self._pools.values()), {}
        for entry in entries:
            await entry.pool.aclose()
        if self._own_tokens:
            await self.tokens.aclose()

"""Log in to a sender's mailbox (IMAP) and SMTP server, and say clearly why not.

Why here: `senders test` and the mailbox watcher open the same IMAP connection the same
way (implicit TLS or plain on loopback, LOGIN or XOAUTH2 with a fresh access token), and
a user fixing a mailbox needs the reason in words: unreachable, TLS handshake failed,
login refused (with the server's text), token endpoint refused, folder missing, no IDLE.

- `await open_imap(conn, tokens)` -> a logged-in `aioimaplib.IMAP4` (call `logout()`), or
  `MailboxError` whose `stage` says where it failed (`connect`, `tls`, `login`, `oauth`).
- `await check_sender(session_factory, settings, sender_id)` -> the `CheckResult`s of
  `senders test` (SMTP: its own or the global relay; IMAP: login, IDLE, folder).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aioimaplib
import aiosmtplib

from db.session import SessionFactory
from db.tables import SenderAccount
from services.oauth import OAuthError, TokenCache
from services.sender_connections import ConnectionConfigError, MailConnection, load_connection, token_cache
from settings import Settings


class MailboxError(Exception):
    """A connection or login failed; `stage` is connect, tls, login, oauth or folder."""

    def __init__(self, message: str, *, stage: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        #: A person must act (wrong password, revoked token); retrying will not help.
        self.permanent = permanent


@dataclass
class CheckResult:
    """One line of `senders test`: what was checked, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str
    #: Works, but not as well as it could (no IDLE: polling instead of push).
    warning: bool = False


def _server_text(lines: Sequence[bytes | bytearray | str]) -> str:
    texts = [x.decode("utf-8", "replace") if isinstance(x, bytes | bytearray) else str(x) for x in lines]
    return " ".join(t.strip() for t in texts if t.strip()) or "(no reason given)"


async def _access_token(conn: MailConnection, tokens: TokenCache) -> str:
    if conn.oauth is None:
        raise MailboxError(f"{conn.what}: XOAUTH2 without OAuth credentials", stage="oauth", permanent=True)
    try:
        return await tokens.access_token(conn.oauth, what=conn.what)
    except OAuthError as err:
        raise MailboxError(str(err), stage="oauth", permanent=err.permanent) from err


async def open_imap(
    conn: MailConnection,
    tokens: TokenCache,
    *,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = 15.0,
) -> aioimaplib.IMAP4:
    """Connect and log in (LOGIN or XOAUTH2); capabilities are refreshed after login."""
    if conn.kind != "imap":
        raise ValueError(f"open_imap: {conn.what} is not an IMAP connection")
    where = f"{conn.host}:{conn.port}"
    client: aioimaplib.IMAP4
    if conn.implicit_tls:
        client = aioimaplib.IMAP4_SSL(conn.host, conn.port, timeout=timeout, ssl_context=tls_context)
    else:
        client = aioimaplib.IMAP4(conn.host, conn.port, timeout=timeout)
    try:
        await client.wait_hello_from_server()
    except ssl.SSLError as err:
        _close(client)
        raise MailboxError(f"{conn.what}: TLS handshake with {where} failed: {err}", stage="tls") from err
    except (OSError, TimeoutError) as err:
        _close(client)
        reason = str(err) or type(err).__name__
        raise MailboxError(f"{conn.what}: cannot connect to {where}: {reason}", stage="connect") from err
    except Exception as err:  # aioimaplib raises its own Error/Abort for bad greetings
        _close(client)
        raise MailboxError(f"{conn.what}: {where} did not greet as an IMAP server: {err}", stage="connect") from err
    try:
        if conn.auth == "xoauth2":
            token = await _access_token(conn, tokens)
            response = await client.xoauth2(conn.username or "", token)
            method = "XOAUTH2"
        else:
            response = await client.login(conn.username or "", conn.password or "")
            method = "LOGIN"
    except MailboxError:
        _close(client)
        raise
    except (OSError, TimeoutError) as err:
        _close(client)
        raise MailboxError(f"{conn.what}: {where} dropped the connection during login: {err}", stage="login") from err
    if response.result != "OK":
        _close(client)
        if conn.auth == "xoauth2" and conn.oauth is not None:
            tokens.forget(conn.oauth)
        raise MailboxError(
            f"{conn.what}: {where} refused the {method} login of {conn.username}: {_server_text(response.lines)}",
            stage="login",
            permanent=True,
        )
    try:
        await client.protocol.capability()
    except Exception:  # noqa: S110 - capabilities from the greeting remain
        pass
    return client


def _close(client: aioimaplib.IMAP4) -> None:
    transport = getattr(client.protocol, "transport", None)
    if transport is not None:
        transport.close()


async def check_imap(
    conn: MailConnection, tokens: TokenCache, *, tls_context: ssl.SSLContext | None = None, timeout: float = 15.0
) -> list[CheckResult]:
    """IMAP login, IDLE support and the folder, as `senders test` reports them."""
    where = f"{conn.host}:{conn.port}"
    results: list[CheckResult] = []
    try:
        client = await open_imap(conn, tokens, tls_context=tls_context, timeout=timeout)
    except MailboxError as err:
        return [CheckResult("imap login", False, str(err))]
    try:
        method = "XOAUTH2" if conn.auth == "xoauth2" else "password"
        results.append(CheckResult("imap login", True, f"{conn.username} at {where} ({method})"))
        if client.has_capability("IDLE"):
            results.append(CheckResult("imap idle", True, "the server supports IDLE: replies arrive by push"))
        else:
            results.append(
                CheckResult(
                    "imap idle",
                    True,
                    "the server does not offer IDLE: the watcher falls back to polling with NOOP",
                    warning=True,
                )
            )
        folder = conn.folder or "INBOX"
        try:
            selected = await client.select(folder)
        except (OSError, TimeoutError) as err:
            results.append(CheckResult("imap folder", False, f"SELECT {folder} failed: {err}"))
        else:
            if selected.result == "OK":
                results.append(CheckResult("imap folder", True, f"{folder} can be opened"))
            else:
                results.append(
                    CheckResult("imap folder", False, f"cannot open {folder}: {_server_text(selected.lines)}")
                )
    finally:
        try:
            await client.logout()
        except Exception:  # noqa: S110 - closing anyway
            pass
        _close(client)
    return results


async def check_smtp(
    *,
    host: str,
    port: int,
    implicit_tls: bool,
    starttls: bool,
    username: str | None,
    password: str | None,
    oauth: MailConnection | None,
    tokens: TokenCache,
    label: str,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = 15.0,
) -> CheckResult:
    """Connect, secure, log in and QUIT; `oauth` is the connection when it uses XOAUTH2."""
    where = f"{host}:{port}"
    token_source = None
    if oauth is not None:
        conn = oauth

        async def token_source() -> str:
            return await _access_token(conn, tokens)

    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        username=username,
        password=password if token_source is None else None,
        use_tls=implicit_tls,
        start_tls=starttls,
        timeout=timeout,
        tls_context=tls_context,
        oauth_token_generator=token_source,
    )
    security = "TLS" if implicit_tls else ("STARTTLS" if starttls else "no TLS")
    try:
        await client.connect()
    except MailboxError as err:
        return CheckResult("smtp login", False, str(err))
    except aiosmtplib.SMTPAuthenticationError as err:
        if oauth is not None and oauth.oauth is not None:
            tokens.forget(oauth.oauth)
        return CheckResult(
            "smtp login", False, f"{label}: {where} refused the login of {username}: {err.code} {err.message}"
        )
    except aiosmtplib.SMTPResponseException as err:
        return CheckResult("smtp login", False, f"{label}: {where} answered {err.code} {err.message}")
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as err:
        return CheckResult("smtp login", False, f"{label}: cannot connect to {where} ({security}): {err}")
    try:
        who = f"logged in as {username}" if username else "no login (relay)"
        method = " with XOAUTH2" if token_source is not None else ""
        return CheckResult("smtp login", True, f"{where} ({security}), {who}{method}")
    finally:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


async def check_sender(
    session_factory: SessionFactory,
    settings: Settings,
    sender_id: int,
    *,
    tls_context: ssl.SSLContext | None = None,
    tokens: TokenCache | None = None,
    timeout: float = 15.0,
) -> list[CheckResult]:
    """Every check of `senders test` for one sender (LookupError if there is no such sender)."""
    async with session_factory() as session:
        sender = await session.get(SenderAccount, sender_id)
    if sender is None:
        raise LookupError(f"no sender with id {sender_id} (see `senders list`)")
    if sender.channel != "email":
        raise LookupError(f"sender {sender_id} is a {sender.channel} sender: only email senders have mailboxes")
    own_tokens = tokens is None
    cache = tokens or token_cache(session_factory, settings, timeout=timeout)
    results: list[CheckResult] = []
    try:
        try:
            smtp = await load_connection(session_factory, settings, sender_id, "smtp")
        except ConnectionConfigError as err:
            results.append(CheckResult("smtp login", False, str(err)))
        else:
            if smtp is None:
                relay = f"the global relay SMTP_HOST {settings.smtp_host}:{settings.smtp_port}"
                result = await check_smtp(
                    host=settings.smtp_host,
                    port=settings.smtp_port,
                    implicit_tls=False,
                    starttls=settings.smtp_starttls,
                    username=settings.smtp_username or None,
                    password=settings.smtp_password.get_secret_value() or None,
                    oauth=None,
                    tokens=cache,
                    label=relay,
                    tls_context=tls_context,
                    timeout=timeout,
                )
                result.detail = f"no own SMTP, sends through {relay}: {result.detail}"
                results.append(result)
            else:
                results.append(
                    await check_smtp(
                        host=smtp.host,
                        port=smtp.port,
                        implicit_tls=smtp.implicit_tls,
                        starttls=smtp.starttls,
                        username=smtp.username if smtp.auth != "none" else None,
                        password=smtp.password,
                        oauth=smtp if smtp.auth == "xoauth2" else None,
                        tokens=cache,
                        label=smtp.what,
                        tls_context=tls_context,
                        timeout=timeout,
                    )
                )
        try:
            imap = await load_connection(session_factory, settings, sender_id, "imap")
        except ConnectionConfigError as err:
            results.append(CheckResult("imap login", False, str(err)))
        else:
            if imap is None:
                results.append(
                    CheckResult(
                        "imap",
                        True,
                        "no mailbox connected: replies reach it only through webhooks (add one with --imap)",
                        warning=True,
                    )
                )
            else:
                results.extend(await check_imap(imap, cache, tls_context=tls_context, timeout=timeout))
    finally:
        if own_tokens:
            await cache.aclose()
    return results

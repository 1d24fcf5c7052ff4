"""OAuth 2.0 for mailboxes: refresh-token exchange and the XOAUTH2 SASL string.

Why: Gmail and Microsoft 365 accept XOAUTH2 (a bearer access token instead of a password)
for SMTP and IMAP. Access tokens live about an hour; what a sender stores is the
long-lived refresh token, exchanged at the provider's token endpoint (RFC 6749 section 6)
whenever a connection is opened. `TokenCache` reuses an access token until a minute
before it expires, so a pool opening four connections asks the endpoint once.

Failures are classified for the callers: `OAuthError.permanent` means the grant itself
was refused (`invalid_grant`, `invalid_client`, `unauthorized_client`: revoked or wrong
credentials, a person must act); anything else (endpoint unreachable, 5xx, 429) is
temporary.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import httpx

#: Token endpoints of the two big mailbox providers (`--oauth-token-url google`).
TOKEN_URL_PRESETS = {
    "google": "https://oauth2.googleapis.com/token",
    "microsoft": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
}
_PERMANENT_ERRORS = {"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type"}


class OAuthError(Exception):
    """The token endpoint did not give an access token; `permanent` if it refused the grant."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class OAuthCredentials:
    """What a sender stores to obtain access tokens (secrets hidden from repr)."""

    token_url: str
    client_id: str | None
    refresh_token: str = field(repr=False)
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None
    #: The stored connection these came from (where a rotated refresh token is saved).
    connection_id: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AccessToken:
    """An access token and when it stops working (`time.monotonic()` seconds)."""

    token: str = field(repr=False)
    expires_at: float
    #: A new refresh token, when the provider rotated it (Microsoft does).
    refresh_token: str | None = field(default=None, repr=False)


def resolve_token_url(value: str) -> str:
    """A token endpoint URL from a flag value (`google`, `microsoft` or an http(s) URL)."""
    text = value.strip()
    if text.lower() in TOKEN_URL_PRESETS:
        return TOKEN_URL_PRESETS[text.lower()]
    parsed = httpx.URL(text) if text else None
    if parsed is None or parsed.scheme not in {"https", "http"} or not parsed.host:
        raise ValueError(f"--oauth-token-url: {value!r} is not an http(s) URL, google or microsoft")
    if parsed.scheme == "http" and parsed.host not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"--oauth-token-url: {value!r} must be https (http only on loopback)")
    return text


def xoauth2_string(user: str, access_token: str) -> str:
    """The base64 XOAUTH2 initial response: `user=U^Aauth=Bearer T^A^A`."""
    raw = f"user={user}\x01auth=Bearer {access_token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


async def exchange_refresh_token(
    http: httpx.AsyncClient,
    creds: OAuthCredentials,
    *,
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> AccessToken:
    """POST the refresh-token grant to the token endpoint; raise `OAuthError` naming `what`."""
    form = {"grant_type": "refresh_token", "refresh_token": creds.refresh_token}
    if creds.client_id:
        form["client_id"] = creds.client_id
    if creds.client_secret:
        form["client_secret"] = creds.client_secret
    if creds.scope:
        form["scope"] = creds.scope
    started = clock()
    try:
        response = await http.post(creds.token_url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as err:
        raise OAuthError(f"{what}: token endpoint {creds.token_url} unreachable: {err}", permanent=False) from err
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200:
        code = str(body.get("error") or "")
        detail = str(body.get("error_description") or "").strip()
        reason = f"{response.status_code} {code}".strip() + (f": {detail}" if detail else "")
        permanent = code in _PERMANENT_ERRORS or (response.status_code in {400, 401, 403} and not code)
        hint = " (the refresh token was revoked or expired: authorize again)" if code == "invalid_grant" else ""
        raise OAuthError(f"{what}: token endpoint refused the refresh token: {reason}{hint}", permanent=permanent)
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise OAuthError(f"{what}: token endpoint answered without an access_token", permanent=False)
    try:
        lifetime = float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    rotated = body.get("refresh_token")
    return AccessToken(
        token=token,
        expires_at=started + lifetime,
        refresh_token=rotated if isinstance(rotated, str) and rotated != creds.refresh_token else None,
    )


class TokenCache:
    """Access tokens per credentials, reused until `margin` seconds before they expire.

    `on_rotate(creds, new_refresh_token)` is awaited when the endpoint hands out a new
    refresh token, so the caller can store it (encrypted).
    """

    def __init__(
        self,
        http: httpx.AsyncClient | None = None,
        *,
        margin: float = 60.0,
        timeout: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        on_rotate: Callable[[OAuthCredentials, str], Awaitable[None]] | None = None,
    ) -> None:
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self.margin = margin
        self.clock = clock
        self.on_rotate = on_rotate
        self._tokens: dict[str, AccessToken] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Exchanges made (for tests and metrics).
        self.exchanges = 0

    @staticmethod
    def _key(creds: OAuthCredentials) -> str:
        raw = "\x00".join([creds.token_url, creds.client_id or "", creds.refresh_token, creds.scope or ""])
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    async def access_token(self, creds: OAuthCredentials, *, what: str) -> str:
        """A valid access token for `creds` (cached or freshly exchanged)."""
        key = self._key(creds)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at - self.margin > self.clock():
                return cached.token
            grant = await exchange_refresh_token(self._http, creds, what=what, clock=self.clock)
            self.exchanges += 1
            self._tokens[key] = grant
            if grant.refresh_token:
                # The next lookup comes with the rotated token: it finds this access token.
                self._tokens[self._key(replace(creds, refresh_token=grant.refresh_token))] = grant
                if self.on_rotate is not None:
                    await self.on_rotate(creds, grant.refresh_token)
            return grant.token

    def forget(self, creds: OAuthCredentials) -> None:
        """Drop a cached token (the server refused it: ask the endpoint again next time)."""
        self._tokens.pop(self._key(creds), None)

    async def aclose(self) -> None:
        """Close the HTTP client if this cache made it."""
        if self._own_http:
            await self._http.aclose()

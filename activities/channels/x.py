"""X (Twitter) through its public HTTP API v2: DM a participant, follow, unfollow, look up a handle.

Why a thin client over an injected `httpx.AsyncClient`: the worker owns one client (one
connection pool, base URL `X_API_BASE_URL`, bearer token `X_API_TOKEN`), tests point the
same code at a local HTTP app, and the only logic that matters here is the mapping of X's
answers to the ledger's outcomes:

- 429 → transient, not before `x-rate-limit-reset` (epoch seconds) or `retry-after`
  (the rate limiter refused the request before anything was done);
- 5xx or 408 to a request that creates something (a DM, a follow) → uncertain: X's front
  end may time out or fail after the back end performed it, and a retry would DM the
  person twice; to reads (the handle lookup) and to the idempotent unfollow → transient;
- connection refused, connect/pool timeouts → transient (nothing was sent);
- 401 → the sender's token was refused: `SenderConfigError` (the sender is paused, the
  lead waits);
- 400/403/404/… → permanent, with X's own error detail (never a bounce: X does not
  tell a deleted account from a closed DM inbox reliably);
- a 404 that does not carry X's JSON error body did not come from X's API (a wrong
  `X_API_BASE_URL`, a proxy): transient, retried no sooner than 10 minutes, with a message
  that says so, so a configuration mistake is not taken for an unknown handle or a
  refused send (the send retry policy still ends a lead after its 12 attempts);
- a read timeout or a dropped connection after the request was written → uncertain.

X has no idempotency header, so the ledger's claim-before-send is what prevents doubles.

`resolve_username` turns a handle into the numeric user id the actions need
(`GET /2/users/by/username/{username}`, app bearer token). It is a read, so a timeout is
transient rather than uncertain; an unknown or suspended account (HTTP 404, or X's usual
HTTP 200 whose `errors` say "Could not find user" / resource-not-found) is a permanent,
bounce-like "invalid recipient"; 429/5xx/other 4xx are classified as for the actions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

from activities.channels.base import (
    BeforeWrite,
    OutboundMessage,
    PermanentChannelError,
    SenderConfigError,
    SendResult,
    TransientChannelError,
    UncertainChannelError,
    no_hook,
)

if TYPE_CHECKING:
    from settings import Settings

#: X's limit on a DM's text.
_MAX_DM_CHARS = 10_000
#: What X accepts as a username (without the @).
_USERNAME = re.compile(r"^[A-Za-z0-9_]{1,15}$")
_NOT_FOUND_TYPE = "https://api.twitter.com/2/problems/resource-not-found"


@runtime_checkable
class XUserResolver(Protocol):
    """Something that turns an X handle into the account's numeric user id."""

    async def resolve_username(self, username: str) -> str:
        """The numeric user id of `username`; raise a classified `ChannelError` on failure."""
        ...


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` given a `Retry-After` value (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _error_detail(response: httpx.Response) -> str:
    """X's error text: `detail`/`title` (problem JSON) or `errors[].message`."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        parts: list[str] = []
        for key in ("title", "detail"):
            if isinstance(body.get(key), str):
                parts.append(body[key])
        errors = body.get("errors")
        if isinstance(errors, list):
            for err in errors[:3]:
                if isinstance(err, dict):
                    text = err.get("message") or err.get("detail")
                    if isinstance(text, str):
                        parts.append(text)
        if parts:
            return ": ".join(parts)
    return str(body)[:500]


#: How long to wait before retrying after an answer that did not come from X's API.
NOT_X_RETRY_SECONDS = 600.0


def _is_x_error(response: httpx.Response) -> bool:
    """Whether the body is X's error JSON (problem `title`/`detail`/`type`, or `errors`)."""
    try:
        body: Any = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and any(key in body for key in ("errors", "title", "detail", "type"))


def _user_id(value: str, what: str) -> str:
    if not value.isdigit():
        raise PermanentChannelError(
            f"x: {what} {value!r} is not a numeric X user id (resolve a handle with resolve_username first)",
            code="invalid_user_id",
            bounce=what == "recipient",
        )
    return value


class XChannel:
    """The `x` channel: SEND_TWITTER_DM, FOLLOW_ON_TWITTER, UNFOLLOW_ON_TWITTER."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        sender_tokens: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`client` carries base_url and the default bearer token.

        `sender_tokens` maps a sender account (X user id) to its own user-context token,
        for sequences that rotate several X accounts; others use the client's token.
        """
        self.client = client
        self.sender_tokens = dict(sender_tokens or {})
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = 30.0) -> XChannel:
        """A channel on `X_API_BASE_URL` with the `X_API_TOKEN` bearer token."""
        return cls(make_x_client(settings.x_api_base_url, settings.x_api_token.get_secret_value(), timeout=timeout))

    async def send(self, msg: OutboundMessage, before_write: BeforeWrite = no_hook) -> SendResult:
        """Perform the action on X; raise a classified `ChannelError` on failure."""
        if msg.channel != "x":
            raise PermanentChannelError(
                f"x channel cannot perform {msg.channel}/{msg.action}", code="unsupported_action"
            )
        target = _user_id(msg.to, "recipient")
        if msg.action == "SEND_TWITTER_DM":
            text = msg.text or ""
            if not text.strip():
                raise PermanentChannelError("x: the DM text is empty", code="invalid_message")
            if len(text) > _MAX_DM_CHARS:
                raise PermanentChannelError(
                    f"x: the DM text has {len(text)} characters, more than {_MAX_DM_CHARS}",
                    code="invalid_message",
                )
            response = await self._request(
                msg.sender,
                "POST",
                f"/2/dm_conversations/with/{quote(target, safe='')}/messages",
                json={"text": text},
                before_write=before_write,
                creates=True,
            )
            data = self._data(response)
            event_id = data.get("dm_event_id")
            return SendResult(provider_message_id=str(event_id) if event_id else None)
        source = _user_id(msg.sender, "sender")
        if msg.action == "FOLLOW_ON_TWITTER":
            response = await self._request(
                msg.sender,
                "POST",
                f"/2/users/{quote(source, safe='')}/following",
                json={"target_user_id": target},
                before_write=before_write,
                creates=True,
            )
            self._data(response)
            return SendResult(provider_message_id=None)
        if msg.action == "UNFOLLOW_ON_TWITTER":
            response = await self._request(
                msg.sender,
                "DELETE",
                f"/2/users/{quote(source, safe='')}/following/{quote(target, safe='')}",
                before_write=before_write,
            )
            self._data(response)
            return SendResult(provider_message_id=None)
        raise PermanentChannelError(f"x channel cannot perform {msg.action}", code="unsupported_action")

    def _data(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        data = body.get("data") if isinstance(body, dict) else None
        return data if isinstance(data, dict) else {}

    async def resolve_username(self, username: str) -> str:
        """The numeric user id of the account `@username` (the app's bearer token).

        Raises:
            TransientChannelError: 429 (not before the reset), 5xx, unreachable, no answer.
            PermanentChannelError: `invalid_recipient` with `bounce=True` for an unknown or
                suspended account or a malformed handle; other 4xx with `bounce=False`.
        """
        handle = (username or "").strip().removeprefix("@")
        if not _USERNAME.match(handle):
            raise PermanentChannelError(
                f"x: {username!r} is not a valid X handle (1-15 letters, digits or _)",
                code="invalid_recipient",
                bounce=True,
            )
        path = f"/2/users/by/username/{quote(handle, safe='')}"
        response = await self._request(None, "GET", path, read_only=True, accept=(404,))
        if response.status_code == 404:
            raise PermanentChannelError(
                f"x: invalid recipient: no X user @{handle} (404 on GET {path}: {_error_detail(response)})",
                code="invalid_recipient",
                bounce=True,
            )
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        data = body.get("data") if isinstance(body, dict) else None
        user_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(user_id, str) and user_id.isdigit():
            return user_id
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors:
            detail = _error_detail(response)
            not_found = any(
                isinstance(e, dict)
                and (
                    e.get("type") == _NOT_FOUND_TYPE
                    or "could not find user" in str(e.get("detail", "")).lower()
                    or "suspended" in str(e.get("detail", "")).lower()
                )
                for e in errors
            )
            if not_found:
                raise PermanentChannelError(
                    f"x: invalid recipient: no X user @{handle} ({detail})",
                    code="invalid_recipient",
                    bounce=True,
                )
            raise PermanentChannelError(f"x: looking up @{handle} failed: {detail}", code="lookup_error")
        raise PermanentChannelError(
            f"x: looking up @{handle} gave no numeric user id: {str(body)[:300]}", code="lookup_error"
        )

    async def _request(
        self,
        sender: str | None,
        method: str,
        path: str,
        json: Any = None,
        *,
        read_only: bool = False,
        accept: tuple[int, ...] = (),
        before_write: BeforeWrite = no_hook,
        creates: bool = False,
    ) -> httpx.Response:
        """Send one request; `read_only` requests have no effect, so no answer is transient.

        A request that `creates` something answered 5xx/408 may have been performed: uncertain.
        """
        headers: dict[str, str] = {}
        token = self.sender_tokens.get(sender) if sender else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        await before_write()
        try:
            response = await self.client.request(method, path, json=json, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
            raise TransientChannelError(
                f"x: could not reach the API ({type(err).__name__}: {err})", code="connect"
            ) from err
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as err:
            if read_only:
                raise TransientChannelError(
                    f"x: no answer to {method} {path} ({type(err).__name__}: {err})", code="no_response"
                ) from err
            raise UncertainChannelError(
                f"x: no answer after the request was sent ({type(err).__name__}: {err}); X may have performed it",
                code="no_response",
            ) from err
        if response.status_code == 404 and not _is_x_error(response):
            raise TransientChannelError(
                f"x: 404 on {method} {response.request.url} did not come from X's API (no X error body: "
                f"{response.text[:200]!r}); check X_API_BASE_URL; retrying in {NOT_X_RETRY_SECONDS / 60:.0f} min",
                code="not_x_api",
                retry_after=NOT_X_RETRY_SECONDS,
            )
        if response.status_code in accept:
            return response
        return self._check(response, creates=creates)

    def _check(self, response: httpx.Response, *, creates: bool = False) -> httpx.Response:
        status = response.status_code
        if 200 <= status < 300:
            return response
        detail = _error_detail(response)
        where = f"{response.request.method} {response.request.url.path}"
        now = self.clock()
        if status == 429:
            retry_after: float | None = None
            reset = response.headers.get("x-rate-limit-reset")
            if reset:
                try:
                    retry_after = max(0.0, float(reset) - now)
                except ValueError:
                    retry_after = None
            if retry_after is None:
                retry_after = parse_retry_after(response.headers.get("retry-after"), now)
            raise TransientChannelError(f"x: rate limited on {where}: {detail}", code="429", retry_after=retry_after)
        if status == 401:
            raise SenderConfigError(
                f"x: 401 on {where}: {detail} (the sender's X token was refused; fix X_API_TOKEN or the "
                "sender's token, then `senders resume`)",
                code="401",
            )
        if (status >= 500 or status == 408) and creates:
            raise UncertainChannelError(
                f"x: {status} on {where} ({detail}); X may have performed it, so it is not sent again",
                code=str(status),
            )
        if status >= 500 or status == 408:
            raise TransientChannelError(
                f"x: server error {status} on {where}: {detail}",
                code=str(status),
                retry_after=parse_retry_after(response.headers.get("retry-after"), now),
            )
        raise PermanentChannelError(f"x: {status} on {where}: {detail}", code=str(status), bounce=False)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()


def make_x_client(base_url: str, token: str, *, timeout: float = 30.0) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for the X API: base URL, bearer token, JSON, timeouts."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"X_API_BASE_URL {base_url!r} must start with http:// or https://")
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
    )

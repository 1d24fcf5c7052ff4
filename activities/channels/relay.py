"""LinkedIn and XMTP through a generic, signed HTTP relay (the user's own automation).

Why a relay: LinkedIn has no public API for connection requests or DMs and XMTP needs a
wallet-holding client, so both are done by a service the user runs (a browser
automation, an XMTP bot). Sequencer speaks one small documented JSON protocol to it
(docs/relay.md): `POST {RELAY_URL}/v1/actions` with `RELAY_TOKEN` as bearer token, signed
with `RELAY_SIGNING_KEY` (HMAC-SHA256 over `"{timestamp}.{body}"`) and carrying the
ledger's idempotency key, so that a relay can deduplicate retries itself and answer 409
for an action it already performed.

Answers map to the ledger's outcomes: 200/201/202 and 409 (already done) → sent;
429 and 5xx → transient (honouring Retry-After: unlike X, the relay deduplicates by the
idempotency key and answers 409 to a repeat, so retrying an action it may have performed
is safe); 401 → our RELAY_TOKEN was refused (`SenderConfigError`: the sender pauses, the
lead waits); other 4xx → permanent, a bounce when
the relay says `"code": "invalid_recipient"`; no answer after the request was written →
uncertain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from activities.channels.x import parse_retry_after

if TYPE_CHECKING:
    from settings import Settings

#: Actions the relay performs, by channel.
RELAY_ACTIONS: dict[str, frozenset[str]] = {
    "linkedin": frozenset({"SEND_CONNECTION_REQUEST", "SEND_LINKEDIN_DM"}),
    "xmtp": frozenset({"SEND_XMTP_DM"}),
}
#: Error codes a relay may return that mean "this recipient identity is bad".
BOUNCE_CODES = frozenset({"invalid_recipient"})
SIGNATURE_VERSION = "v1"


def sign(key: str, timestamp: int, body: bytes) -> str:
    """The `X-Relay-Signature` value: `v1=<hex HMAC-SHA256(key, "{timestamp}.{body}")>`."""
    mac = hmac.new(key.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(key: str, timestamp: str, body: bytes, signature: str, *, now: float, window: float = 300.0) -> bool:
    """Check a relay request's signature and timestamp (for relay implementers and tests)."""
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return False  # also keeps a 5,000-digit timestamp away from float arithmetic
    ts = int(timestamp)
    if abs(int(now) - ts) > window:
        return False
    return hmac.compare_digest(sign(key, ts, body), signature.strip())


def relay_payload(msg: OutboundMessage) -> dict[str, Any]:
    """The JSON body for one action (documented in docs/relay.md)."""
    payload: dict[str, Any] = {
        "idempotency_key": msg.idempotency_key,
        "channel": msg.channel,
        "action": msg.action,
        "sender": msg.sender,
        "to": msg.to,
        "text": msg.text,
    }
    if msg.subject is not None:
        payload["subject"] = msg.subject
    return payload


def _body_json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class RelayChannel:
    """The `linkedin` and `xmtp` channels, through the relay."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        token: str,
        signing_key: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`client` has base_url=RELAY_URL; `token` is RELAY_TOKEN (the bearer token) and
        `signing_key` RELAY_SIGNING_KEY (the HMAC key): a leaked Authorization header
        alone cannot sign a request."""
        if not token:
            raise ValueError("RelayChannel: RELAY_TOKEN must not be empty")
        if not signing_key:
            raise ValueError("RelayChannel: RELAY_SIGNING_KEY must not be empty")
        self.client = client
        self.token = token
        self.signing_key = signing_key
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = 30.0) -> RelayChannel:
        """A channel on `RELAY_URL`, with `RELAY_TOKEN` and `RELAY_SIGNING_KEY`."""
        if not settings.relay_url.startswith(("http://", "https://")):
            raise ValueError(f"RELAY_URL {settings.relay_url!r} must start with http(s)://")
        client = httpx.AsyncClient(
            base_url=settings.relay_url.rstrip("/"),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        return cls(client, settings.relay_token.get_secret_value(), settings.relay_signing_key.get_secret_value())

    async def send(self, msg: OutboundMessage, before_write: BeforeWrite = no_hook) -> SendResult:
        """Ask the relay to perform the action; raise a classified `ChannelError`."""
        allowed = RELAY_ACTIONS.get(msg.channel, frozenset())
        if msg.action not in allowed:
            raise PermanentChannelError(f"relay cannot perform {msg.channel}/{msg.action}", code="unsupported_action")
        if msg.action != "SEND_CONNECTION_REQUEST" and not (msg.text or "").strip():
            raise PermanentChannelError(f"relay: the {msg.action} text is empty", code="invalid_message")
        body = json.dumps(relay_payload(msg), separators=(",", ":"), ensure_ascii=False).encode()
        timestamp = int(self.clock())
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Idempotency-Key": msg.idempotency_key,
            "X-Relay-Timestamp": str(timestamp),
            "X-Relay-Signature": sign(self.signing_key, timestamp, body),
        }
        await before_write()
        try:
            response = await self.client.post("/v1/actions", content=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
            raise TransientChannelError(
                f"relay: could not reach {self.client.base_url} ({type(err).__name__}: {err})",
                code="connect",
            ) from err
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as err:
            raise UncertainChannelError(
                f"relay: no answer after the request was sent ({type(err).__name__}: {err}); "
                "the relay may have performed it",
                code="no_response",
            ) from err
        return self._result(response)

    def _result(self, response: httpx.Response) -> SendResult:
        status = response.status_code
        data = _body_json(response)
        provider_id = data.get("id")
        provider_id = str(provider_id) if provider_id not in (None, "") else None
        if 200 <= status < 300:
            return SendResult(provider_message_id=provider_id)
        if status == 409:
            # Already performed for this idempotency key: the earlier send succeeded.
            return SendResult(provider_message_id=provider_id)
        error = data.get("error") if isinstance(data.get("error"), str) else None
        detail = error or response.text[:500] or response.reason_phrase
        code = data.get("code") if isinstance(data.get("code"), str) else None
        if status == 401:
            raise SenderConfigError(
                f"relay: 401: {detail} (RELAY_TOKEN was refused; fix it, then `senders resume`)", code="401"
            )
        if status == 429 or status == 408 or status >= 500:
            raise TransientChannelError(
                f"relay: {status}: {detail}",
                code=str(status),
                retry_after=parse_retry_after(response.headers.get("retry-after"), self.clock()),
            )
        raise PermanentChannelError(
            f"relay: {status}: {detail}",
            code=code or str(status),
            bounce=code in BOUNCE_CODES,
        )

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()

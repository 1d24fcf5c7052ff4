"""What every provider adapter produces: normalized events, or a refusal that says why.

An adapter is two pure steps: *verify* (the provider's own signature over the raw
bytes; failure is `ProviderAuthError`, answered 401) and *parse* (the provider's body
into `ProviderEvent`s; a body that is not the provider's format is `ProviderFormatError`,
answered 400 naming the field). Nothing here touches the database or the network, so
each provider's rules can be tested with its documented payloads alone.
"""

from __future__ import annotations

import base64
import hmac
from datetime import UTC, datetime
from typing import Any

from models.provider_events import EventKind, ProviderEvent

__all__ = [
    "DELIVERY_KEY_ARG",
    "EventKind",
    "ProviderAuthError",
    "ProviderEvent",
    "ProviderFormatError",
    "basic_auth_ok",
    "require",
]

#: The custom-data key every relay tag carries: the deliveries ledger's idempotency key.
DELIVERY_KEY_ARG = "sequencer_key"


class ProviderAuthError(Exception):
    """Missing or bad signature, wrong credentials, expired timestamp, replayed token: a 401."""


class ProviderFormatError(Exception):
    """A body that is not the provider's format: a 400 naming the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def require(obj: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """`obj[key]` of the expected type, or a ProviderFormatError naming `where.key`."""
    field = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise ProviderFormatError(where or "body", "expected a JSON object")
    if key not in obj or obj[key] is None:
        raise ProviderFormatError(field, "is missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProviderFormatError(field, f"expected {names}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ProviderFormatError(field, "is empty")
    return value


def require_id(obj: Any, key: str, where: str) -> str:
    """A provider's event id: a non-empty string of at most 280 characters."""
    value = str(require(obj, key, where, (str, int)))
    if len(value) > 280:
        raise ProviderFormatError(f"{where}.{key}" if where else key, "longer than 280 characters")
    return value


def optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return str(value) if value not in (None, "") else None


def from_unix(value: Any, field: str) -> datetime:
    """A unix time (int, float or digits) as an aware datetime."""
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise ProviderFormatError(field, f"expected a unix time, got {value!r}") from None


def from_iso(value: Any, field: str) -> datetime:
    """An ISO 8601 time (a trailing Z accepted) as an aware datetime."""
    if not isinstance(value, str):
        raise ProviderFormatError(field, "expected an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ProviderFormatError(field, f"expected an ISO 8601 time, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def check_fresh(timestamp: Any, now: float, window_seconds: int, what: str) -> int:
    """The timestamp as an int, or ProviderAuthError when outside the replay window."""
    try:
        stamp = int(float(str(timestamp).strip()))
    except (TypeError, ValueError):
        raise ProviderAuthError(f"{what} is not a unix time") from None
    if abs(now - stamp) > window_seconds:
        raise ProviderAuthError(f"{what} is outside the {window_seconds}s replay window")
    return stamp


def basic_auth_ok(header: str | None, allowed: list[str]) -> None:
    """Check an `Authorization: Basic` header against "user:password" entries (constant time)."""
    if not allowed:
        raise ProviderAuthError("no credentials are configured for this provider")
    if not header or not header.lower().startswith("basic "):
        raise ProviderAuthError("missing basic authentication (Authorization: Basic …)")
    try:
        given = base64.b64decode(header[6:].strip(), validate=True)
    except ValueError:
        raise ProviderAuthError("malformed basic authentication") from None
    ok = False
    for entry in allowed:
        ok |= hmac.compare_digest(given, entry.encode())
    if not ok:
        raise ProviderAuthError("bad credentials")


def bare_message_id(value: str | None) -> str | None:
    """A Message-ID without its angle brackets and spaces (None when empty)."""
    if not value:
        return None
    bare = value.strip().strip("<>").strip()
    return bare or None

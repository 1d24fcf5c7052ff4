"""Durations as users write them in files and flags: `30s`, `15m`, `4h`, `3d`, `1w`."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_PART = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """Parse `90s`, `15m`, `4h`, `3d`, `1w` or combinations such as `1d12h`.

    Raises:
        ValueError: naming the text when it is not a duration.
    """
    if not isinstance(text, str):
        raise ValueError(f"malformed duration {text!r}: write e.g. 30s, 15m, 4h, 3d or 1w")
    raw = text.strip().lower()
    pos = 0
    total = 0
    for match in _PART.finditer(raw):
        if raw[pos : match.start()].strip():
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not raw or pos == 0 or raw[pos:].strip():
        raise ValueError(f"malformed duration {text!r}: write e.g. 30s, 15m, 4h, 3d or 1w")
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """The shortest spelling that parses back to the same value."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


def _coerce(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"malformed duration {value!r}: a duration cannot be negative")
        return timedelta(seconds=value)
    if isinstance(value, timedelta) and value < timedelta(0):
        raise ValueError(f"malformed duration {value!r}: a duration cannot be negative")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]

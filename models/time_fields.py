"""Typed time-zone and time-of-day fields, read and written in the files' own text format.

`TimeZone` is a `zoneinfo.ZoneInfo` (validated when the sequence is loaded: an unknown
zone is an error naming the value and the field), `ZoneName` the same check on a name kept
as text (a person row's column), `ClockTime` a `datetime.time` written as "HH:MM".
Each serializes to exactly the string it was read from ("Europe/Berlin", "09:00"), so a
sequence saved in the database and every workflow history already recorded read the same.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import time
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["ClockTime", "TimeZone", "ZoneName", "clock", "to_zone"]

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def to_zone(value: Any) -> zoneinfo.ZoneInfo:
    """An IANA zone from its name; ValueError naming the value otherwise."""
    if isinstance(value, zoneinfo.ZoneInfo):
        return value
    if not isinstance(value, str):
        raise ValueError(f"time zone {value!r} is not a name such as Europe/Berlin")
    try:
        return zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}: use an IANA name such as Europe/Berlin or UTC") from None


def _zone_name(value: str) -> str:
    to_zone(value)
    return value


def _clock(value: Any) -> time:
    if isinstance(value, time):
        if value.second or value.microsecond or value.tzinfo is not None:
            raise ValueError(f"time {value.isoformat()!r} must be whole minutes, without a zone")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 17:30 as the base-60 number 1050.
        raise ValueError(f'time {value!r} is not HH:MM (24-hour); quote it in YAML, e.g. "17:30"')
    if not isinstance(value, str) or not _HHMM.match(value):
        raise ValueError(f"time {value!r} is not HH:MM (24-hour)")
    return time.fromisoformat(value)


def clock(value: time) -> str:
    """A time of day as written in sequence files: "HH:MM"."""
    return value.strftime("%H:%M")


#: An IANA time zone, read from and written as its name.
TimeZone = Annotated[
    zoneinfo.ZoneInfo,
    BeforeValidator(to_zone),
    PlainSerializer(lambda z: z.key, return_type=str),
    WithJsonSchema({"type": "string", "description": "IANA time zone name, e.g. Europe/Berlin"}),
]
#: An IANA time zone name kept as text (a column of people rows).
ZoneName = Annotated[str, AfterValidator(_zone_name)]
#: A local time of day, read from and written as "HH:MM" (24-hour).
ClockTime = Annotated[
    time,
    BeforeValidator(_clock),
    PlainSerializer(clock, return_type=str),
    WithJsonSchema({"type": "string", "pattern": _HHMM.pattern}),
]

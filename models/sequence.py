"""The sequence graph: steps are actions, edges are triggers.

This is the format of DESIGN.md's sequence file (the schema); the graph checks live in
models/sequence_checks.py. A definition is validated once, when a version is created
(`validate_definition`), never while enrollments run; a validated
definition travels inside every enrollment workflow's input, so a running enrollment
never depends on the database copy of its version.
"""

from __future__ import annotations

import zoneinfo
from datetime import datetime, time
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.durations import Duration
from models.time_fields import ClockTime, TimeZone, clock, to_zone


class Action(StrEnum):
    """What a step does."""

    SEND_CONNECTION_REQUEST = "SEND_CONNECTION_REQUEST"
    SEND_TWITTER_DM = "SEND_TWITTER_DM"
    SEND_LINKEDIN_DM = "SEND_LINKEDIN_DM"
    SEND_XMTP_DM = "SEND_XMTP_DM"
    FOLLOW_ON_TWITTER = "FOLLOW_ON_TWITTER"
    UNFOLLOW_ON_TWITTER = "UNFOLLOW_ON_TWITTER"
    CHECK_FOR_REPLY = "CHECK_FOR_REPLY"
    SEND_EMAIL = "SEND_EMAIL"
    WAIT = "WAIT"


class Trigger(StrEnum):
    """What moves a lead along an edge."""

    REPLIED = "REPLIED"
    NOT_REPLIED = "NOT_REPLIED"
    CONNECTION_ACCEPTED = "CONNECTION_ACCEPTED"
    CONNECTION_NOT_ACCEPTED = "CONNECTION_NOT_ACCEPTED"
    FOLLOWED_BACK = "FOLLOWED_BACK"
    NOT_FOLLOWED_BACK = "NOT_FOLLOWED_BACK"
    END = "END"
    NORMAL_EDGE = "NORMAL_EDGE"
    REPLIED_TO_NOTE = "REPLIED_TO_NOTE"


class Channel(StrEnum):
    """Outbound channels; each has its own sender accounts and limits."""

    EMAIL = "email"
    X = "x"
    LINKEDIN = "linkedin"
    XMTP = "xmtp"


#: Triggers that fire on a signal.
EVENT_TRIGGERS = frozenset(
    {Trigger.REPLIED, Trigger.CONNECTION_ACCEPTED, Trigger.FOLLOWED_BACK, Trigger.REPLIED_TO_NOTE}
)
#: Negative twins: they fire when their wait (`after`) ends before the event arrives.
NEGATIVE_OF = {
    Trigger.NOT_REPLIED: Trigger.REPLIED,
    Trigger.CONNECTION_NOT_ACCEPTED: Trigger.CONNECTION_ACCEPTED,
    Trigger.NOT_FOLLOWED_BACK: Trigger.FOLLOWED_BACK,
}

ACTION_CHANNEL: dict[Action, Channel | None] = {
    Action.SEND_EMAIL: Channel.EMAIL,
    Action.SEND_TWITTER_DM: Channel.X,
    Action.FOLLOW_ON_TWITTER: Channel.X,
    Action.UNFOLLOW_ON_TWITTER: Channel.X,
    Action.SEND_CONNECTION_REQUEST: Channel.LINKEDIN,
    Action.SEND_LINKEDIN_DM: Channel.LINKEDIN,
    Action.SEND_XMTP_DM: Channel.XMTP,
    Action.CHECK_FOR_REPLY: None,
    Action.WAIT: None,
}

#: Actions that put a message in front of the person (these count as touches).
MESSAGE_ACTIONS = frozenset(
    {
        Action.SEND_EMAIL,
        Action.SEND_TWITTER_DM,
        Action.SEND_LINKEDIN_DM,
        Action.SEND_XMTP_DM,
        Action.SEND_CONNECTION_REQUEST,
    }
)

_REPLY = {Trigger.REPLIED, Trigger.NOT_REPLIED}
_ALWAYS = {Trigger.NORMAL_EDGE, Trigger.END}
ALLOWED_TRIGGERS: dict[Action, frozenset[Trigger]] = {
    Action.SEND_EMAIL: frozenset(_ALWAYS | _REPLY),
    Action.SEND_TWITTER_DM: frozenset(_ALWAYS | _REPLY),
    Action.SEND_LINKEDIN_DM: frozenset(_ALWAYS | _REPLY),
    Action.SEND_XMTP_DM: frozenset(_ALWAYS | _REPLY),
    Action.CHECK_FOR_REPLY: frozenset(_ALWAYS | _REPLY),
    Action.FOLLOW_ON_TWITTER: frozenset(_ALWAYS | {Trigger.FOLLOWED_BACK, Trigger.NOT_FOLLOWED_BACK}),
    Action.UNFOLLOW_ON_TWITTER: frozenset(_ALWAYS),
    Action.SEND_CONNECTION_REQUEST: frozenset(
        _ALWAYS | _REPLY | {Trigger.CONNECTION_ACCEPTED, Trigger.CONNECTION_NOT_ACCEPTED, Trigger.REPLIED_TO_NOTE}
    ),
    Action.WAIT: frozenset(_ALWAYS),
}

#: A day of the week as sequence files write it (longer names such as "Monday" are accepted).
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS: tuple[Weekday, ...] = get_args(Weekday)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Edge(_Model):
    """A trigger leading to another step (`to`), or END."""

    trigger: Trigger
    to: str | None = None
    after: Duration | None = None
    at: datetime | None = None


class Variant(_Model):
    """One A/B variant of a step's content."""

    name: str
    weight: float = Field(default=1.0, gt=0)
    subject: str | None = None
    body: str | None = None
    html: str | None = None
    text: str | None = None


class Step(_Model):
    """One node: an action, optional content and timing, and its outgoing edges."""

    id: str = Field(min_length=1, max_length=200)
    action: Action
    subject: str | None = None
    body: str | None = None
    html: str | None = None
    text: str | None = None
    variants: list[Variant] = Field(default_factory=list)
    delay: Duration | None = None
    at: datetime | None = None
    edges: list[Edge] = Field(default_factory=list)

    @property
    def channel(self) -> Channel | None:
        """The channel this step's action uses, if any."""
        return ACTION_CHANNEL[self.action]


class SendWindow(_Model):
    """Days and local hours (in the person's time zone) when actions may run.

    `start` and `end` are times of day, written "HH:MM" in files and in saved histories.
    """

    days: list[Weekday] = Field(default_factory=lambda: list(_DAYS[:5]))
    start: ClockTime = time(9, 0)
    end: ClockTime = time(17, 30)

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value  # pydantic names the type it expected
        bad = [d for d in value if not isinstance(d, str) or d.strip().lower()[:3] not in _DAYS]
        if bad:
            raise ValueError(f"unknown day(s) {bad}: use mon, tue, wed, thu, fri, sat, sun")
        if not value:
            raise ValueError("send window has no days")
        return [d.strip().lower()[:3] for d in value]

    def weekday_numbers(self) -> set[int]:
        """Days as `datetime.weekday()` numbers."""
        return {_DAYS.index(d) for d in self.days}

    def start_time(self) -> time:
        """The window's opening time of day."""
        return self.start

    def end_time(self) -> time:
        """The window's closing time of day."""
        return self.end

    def hours(self) -> str:
        """The hours as written, e.g. "09:00-17:30"."""
        return f"{clock(self.start)}-{clock(self.end)}"


class Timeline(_Model):
    """A campaign's start and end: nothing runs before start; enrollments end at end."""

    start: datetime | None = None
    end: datetime | None = None


class SequenceDefinition(_Model):
    """A whole sequence file."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str | None = None
    #: The zone of people without one of their own (a name in files, a ZoneInfo here).
    timezone: TimeZone = zoneinfo.ZoneInfo("UTC")
    timezone_field: str = "timezone"
    send_window: SendWindow | None = None
    timeline: Timeline | None = None
    stop_on_reply: bool = True
    allow_concurrent: bool = False
    hold_company_on_reply: bool = False
    track_opens: bool = False
    #: Links in the HTML part go through `/c/{token}` (one `clicked` event per delivery and link).
    track_clicks: bool = False
    #: Also rewrite bare URLs in the text part (off: the text keeps the links as written).
    track_clicks_in_text: bool = False
    senders: dict[Channel, list[str]] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    def step(self, step_id: str) -> Step:
        """The step with this id (KeyError if none)."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    @property
    def first_step(self) -> Step:
        """Where every enrollment starts."""
        return self.steps[0]


def aware(value: datetime) -> datetime:
    """`value` with UTC attached when it has no zone."""
    return value if value.tzinfo else value.replace(tzinfo=zoneinfo.ZoneInfo("UTC"))


def zone(name: str | None, fallback: str | zoneinfo.ZoneInfo = "UTC") -> zoneinfo.ZoneInfo:
    """A ZoneInfo for a person's zone name, falling back when it is missing or unknown."""
    for candidate in (name, fallback, "UTC"):
        if candidate:
            try:
                return to_zone(candidate)
            except ValueError:
                continue
    return zoneinfo.ZoneInfo("UTC")


def is_timezone(name: str) -> bool:
    """True when `name` is a known IANA zone."""
    try:
        to_zone(name)
    except ValueError:
        return False
    return True


__all__ = [
    "Action",
    "Trigger",
    "Channel",
    "Edge",
    "Step",
    "Variant",
    "SendWindow",
    "Weekday",
    "Timeline",
    "SequenceDefinition",
    "is_timezone",
    "zone",
]

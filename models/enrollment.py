"""Inputs, outputs, signals and queries of the enrollment and audience workflows."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field, model_validator

from models.sequence import SequenceDefinition


class EnrollmentStatus(StrEnum):
    """Where an enrollment stands; terminal ones end the workflow."""

    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    REPLIED = "replied"
    STOPPED = "stopped"
    UNSUBSCRIBED = "unsubscribed"
    SUPPRESSED = "suppressed"
    FAILED = "failed"
    EXPIRED = "expired"


class Stage(StrEnum):
    """Where the walk is within the current step: one transition each, in this order.

    begin (log the step, pick its variant) -> act (the step's action at its time, through
    the governor and ledger) -> wait (for the first of its edges); leaving moves to the next
    step's begin, or ends the enrollment.
    """

    BEGIN = "begin"
    ACT = "act"
    WAIT = "wait"


class Phase(StrEnum):
    """What the enrollment is doing right now (the `status` query and the Web UI)."""

    STARTING = "starting"
    DELAY = "delay"  # a WAIT or CHECK_FOR_REPLY step's own delay
    SCHEDULED = "scheduled"  # waiting for the step's time (delay, `at`, window, return date)
    WAITING_FOR_SLOT = "waiting for send slot"
    WAITING_FOR_PAUSED_SENDER = "waiting for paused sender"
    SENDING = "sending"
    WAITING = "waiting"  # for the first of the step's edges
    PAUSED = "paused"
    FINISHED = "finished"


class SequenceRef(BaseModel):
    """Identifies the sequence version an enrollment runs on."""

    sequence_id: int
    sequence_name: str
    version_id: int
    version: int


class PathEntry(BaseModel):
    """One visited step: when it started, how it was left, and the outcome."""

    step: str
    visit: int = 1
    started_at: datetime
    outcome: str | None = None
    left_by: str | None = None
    left_at: datetime | None = None


class ReceivedEvent(BaseModel):
    """A signal the workflow has accepted (deduplicated by event id)."""

    kind: str
    event_id: str
    received_at: datetime
    channel: str | None = None
    classification: str | None = None
    consumed: bool = False


class EnrollmentState(BaseModel):
    """Everything carried across continue-as-new."""

    current_step: str
    visits: dict[str, int] = Field(default_factory=dict)
    path: list[PathEntry] = Field(default_factory=list)
    variants: dict[str, str] = Field(default_factory=dict)
    seen_event_ids: list[str] = Field(default_factory=list)
    events: list[ReceivedEvent] = Field(default_factory=list)
    paused: bool = False
    not_before: datetime | None = None
    senders: dict[str, int] = Field(default_factory=dict)
    thread_message_ids: list[str] = Field(default_factory=list)
    stage: Stage | None = None
    """Where the walk is in the current step (None only in states written before stages)."""
    step_started: bool = False
    """Superseded by `stage`; read from states written before it."""
    action_done: bool = False
    """Superseded by `stage`; read from states written before it."""
    step_started_at: datetime | None = None
    wait_started_at: datetime | None = None
    paused_for_seconds: float = 0.0
    runs: int = 1
    via: str | None = None
    reached_via: str | None = None
    """The person's own event that led to the current step ("TRIGGER:event id"), or None:
    such a step is a response, not held by the person's touch cap."""
    skipped: bool = False
    paused_at: datetime | None = None
    """When the current pause began (kept across continue-as-new, so the held time counts)."""

    @model_validator(mode="after")
    def _stage_from_flags(self) -> EnrollmentState:
        """A state from before stages: its two flags say the stage."""
        if self.stage is None:
            self.stage = Stage.BEGIN if not self.step_started else Stage.ACT if not self.action_done else Stage.WAIT
        return self


class EnrollmentInput(BaseModel):
    """Start (or continue) one person's walk through one sequence version."""

    enrollment_id: int
    person_id: int
    person_timezone: str | None = None
    sequence: SequenceRef
    definition: SequenceDefinition
    state: EnrollmentState | None = None
    max_steps_per_run: int = 500
    first_step_recorded: bool = False
    patch_baseline: int = 0
    """How many of the workflow's patches (workflows/patches.py) the code that started this run
    already had: those take their newer path without a marker. 0 for runs from before."""


class EnrollmentResult(BaseModel):
    """How an enrollment ended."""

    status: EnrollmentStatus
    last_step: str | None = None
    path: list[PathEntry] = Field(default_factory=list)
    reason: str | None = None


class InboundSignal(BaseModel):
    """A reply, acceptance, follow-back or note reply from the person.

    Ids and the classification only: the text stays in PostgreSQL (`inbound_events`, by
    `inbound_event_id`), so that workflow histories hold no personal text.
    """

    event_id: str
    channel: str | None = None
    #: Never set any more; kept so that histories written before can still be decoded.
    text: str | None = None
    occurred_at: datetime | None = None
    classification: str | None = None
    inbound_event_id: int | None = None


class OutOfOfficeSignal(BaseModel):
    """An auto-reply: not a reply; the next action waits until `until` (or a default)."""

    event_id: str
    until: datetime | None = None
    default_delay_seconds: float = 7 * 86400


class ControlSignal(BaseModel):
    """Pause, resume, stop or unsubscribe, with who asked and why."""

    reason: str = ""
    source: str = "cli"


class StatusView(BaseModel):
    """The answer to the `status` query."""

    enrollment_id: int
    person_id: int
    sequence: SequenceRef
    status: EnrollmentStatus
    current_step: str
    phase: Phase
    waiting_for: list[str] = Field(default_factory=list)
    until: datetime | None = None
    paused: bool = False
    variants: dict[str, str] = Field(default_factory=dict)
    path: list[PathEntry] = Field(default_factory=list)
    last_delivery_status: str | None = None


class AudienceInput(BaseModel):
    """Enroll every member of a segment, in bounded pages, durably."""

    sequence_name: str
    segment_name: str
    page_size: int = Field(default=500, ge=1)
    pages_per_run: int = 40
    pages_per_activity: int = Field(default=8, ge=1)
    after_person_id: int = 0
    started: int = 0
    already: int = 0
    refused: int = 0
    total: int | None = None
    refusals: list[str] = Field(default_factory=list)


class AudienceProgress(BaseModel):
    """The answer to the audience workflow's `progress` query, and its result."""

    total: int | None = None
    started: int = 0
    already: int = 0
    refused: int = 0
    done: bool = False
    refusals: list[str] = Field(default_factory=list)

"""Inputs and outputs of every activity (one model in, one model out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from models.enrollment import SequenceRef
from models.outcomes import DeliveryStatus, EnrollmentStatus, EventType
from models.sequence import SendWindow, Step, Timeline


class EnrollmentRef(BaseModel):
    """Who and where: passed to every enrollment activity."""

    enrollment_id: int
    person_id: int
    sequence: SequenceRef
    workflow_id: str = ""


class RecordEventInput(BaseModel):
    """Append one event to the log."""

    ref: EnrollmentRef
    type: EventType
    step_id: str | None = None
    variant: str | None = None
    channel: str | None = None
    occurred_at: datetime | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    dedup_key: str | None = None
    enrollment_status: EnrollmentStatus | None = None
    current_step: str | None = None


class RecordEventOutput(BaseModel):
    """Whether the event was new (False when its dedup key was already logged)."""

    recorded: bool


class ReserveSlotInput(BaseModel):
    """Ask the channel's governor for a send time."""

    ref: EnrollmentRef
    step_id: str
    attempt: int
    round: int = 0
    action: str
    channel: str
    now: datetime
    not_before: datetime
    preferred_sender_id: int | None = None
    allowed_senders: list[str] = Field(default_factory=list)
    send_window: SendWindow | None = None
    """The step's send window, read in `timezone`: the slot is granted inside it."""
    timeline: Timeline | None = None
    """The campaign's timeline: no slot before its start; none at all after its end."""
    timezone: str | None = None
    """The person's IANA zone (the window's zone)."""
    response: bool = False
    """The step answers the person's own event (a reply, an acceptance): no person cap."""


class ReserveSlotOutput(BaseModel):
    """The granted sender and time (`sender_id` None: no sender account for the channel).

    `ended`: the campaign timeline ends before any slot; nothing was booked.
    """

    sender_id: int | None
    slot_at: datetime
    reason: str | None = None
    ended: bool = False


class DeliverInput(BaseModel):
    """Perform one step's action through its channel, exactly once."""

    ref: EnrollmentRef
    step: Step
    attempt: int
    sender_id: int | None
    variant: str | None = None
    thread_message_ids: list[str] = Field(default_factory=list)
    track_opens: bool = False
    now: datetime
    slot_at: datetime | None = None
    """The granted slot. When set, the moment-of-send gate runs: a send that is late for its
    slot or outside `send_window`/`timeline` (in `timezone`) returns `reschedule` unsent."""
    send_window: SendWindow | None = None
    timeline: Timeline | None = None
    timezone: str | None = None
    round: int = 0


class DeliverOutput(BaseModel):
    """What happened: sent, suppressed, failed, bounced, uncertain, skipped; or `reschedule`:
    nothing was sent nor recorded in the ledger, the send asks the governor for a new slot."""

    status: DeliveryStatus
    delivery_id: int | None = None
    message_id: str | None = None
    provider_message_id: str | None = None
    error: str | None = None
    duplicate: bool = False
    failed_attempts: int = 0
    """With `reschedule`: attempts of this `deliver` that had failed (a transient error) first."""


class FinishInput(BaseModel):
    """Mark the enrollment row finished."""

    ref: EnrollmentRef
    status: EnrollmentStatus
    last_step: str | None = None
    reason: str | None = None


class FinishOutput(BaseModel):
    """Nothing to return but an acknowledgement."""

    ok: bool = True


class SendStepInput(BaseModel):
    """Reserve the step's slot and, when it is due now, send at once: one activity, not two.

    `deliver` is the send as `deliver` would get it (its `sender_id` and `slot_at` are filled
    from the slot). `started`: the step's `step_started` event, written first (idempotent by
    its key). `finish`: the enrollment's end, recorded with the outcome when the outcome ends
    the walk (`sent`, `uncertain`, `skipped` on a step whose only edge is END).
    """

    reserve: ReserveSlotInput
    deliver: DeliverInput
    started: RecordEventInput | None = None
    finish: FinishInput | None = None


class SendStepOutput(BaseModel):
    """The slot, and the send's outcome when it went at once.

    `slot` None: the governor could not answer now (no sender unpaused, no slot within a year):
    the workflow asks through `reserve_send_slot`, which retries for as long as it takes.
    `delivered` None: the slot is later; the workflow waits for it and calls `deliver`.
    `finished`: `finish` was recorded.
    """

    slot: ReserveSlotOutput | None = None
    delivered: DeliverOutput | None = None
    finished: bool = False


class EnrollPageInput(BaseModel):
    """Start enrollments for up to `pages` pages of `limit` people, after a person id cursor."""

    sequence_name: str
    segment_name: str
    after_person_id: int
    limit: int = Field(ge=1)
    count_total: bool = False
    pages: int = Field(default=1, ge=1)


class EnrollPageOutput(BaseModel):
    """What the pages did; also the activity's heartbeat, so a retry resumes after the last page.

    `next_after` is the cursor after the last page done, None when the segment is exhausted.
    """

    next_after: int | None
    started: int = 0
    already: int = 0
    refused: int = 0
    refusals: list[str] = Field(default_factory=list)
    total: int | None = None
    pages_done: int = 0

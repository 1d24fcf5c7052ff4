"""What every part of the enrollment workflow shares: its state, how it ends, how it waits.

`EnrollmentCore` holds the attributes the workflow sets up in its `__init__` and the
helpers both the state machine (workflows/enrollment.py) and the send loop
(workflows/sending.py) use: the status, the Web UI's search attributes, the event log,
and durable waits that hold on pause and wake on stop, a reply or an out-of-office.
Workflow code only: deterministic, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from models.activities import EnrollmentRef, FinishInput, RecordEventInput
    from models.enrollment import (
        EnrollmentInput,
        EnrollmentState,
        EnrollmentStatus,
        Phase,
        ReceivedEvent,
    )
    from models.sequence import SequenceDefinition, Step, Trigger
    from workflows import activity_calls as calls
    from workflows.search_attributes import (
        CURRENT_STEP,
        ENROLLMENT_STATUS,
        NEXT_ACTION_AT,
        PERSON_ID,
        SEQUENCE_NAME,
        SEQUENCE_VERSION,
    )


class Terminal(Exception):
    """Raised inside the walk when the enrollment must end now."""

    def __init__(self, status: EnrollmentStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class EnrollmentCore:
    """The enrollment's state and shared helpers (the workflow's `__init__` sets these)."""

    inp: EnrollmentInput
    defn: SequenceDefinition
    state: EnrollmentState
    terminal: Terminal | None
    phase: Phase
    waiting_for: list[str]
    until: datetime | None
    last_delivery_status: str | None
    tz: ZoneInfo
    ref: EnrollmentRef
    #: The step's `step_started`, held to be written by `send_step` with the send (patch `send-step`).
    started_event: RecordEventInput | None
    #: `send_step` recorded the enrollment's end with the send: `_finish` need not.
    end_recorded: bool

    def _woken(self, seen: int, also: Callable[[], bool] | None = None) -> Callable[[], bool]:
        """A wait condition: stop/unsubscribe, a pause, a new event since `seen` (or `also`)."""
        return lambda: (
            self.terminal is not None
            or self.state.paused
            or len(self.state.events) != seen
            or (also is not None and also())
        )

    def _status(self) -> EnrollmentStatus:
        """The one answer to "what is this enrollment's status" (query and search attributes)."""
        if self.terminal is not None:
            return self.terminal.status
        return EnrollmentStatus.PAUSED if self.state.paused else EnrollmentStatus.ACTIVE

    def _check_terminal(self) -> None:
        if self.terminal is not None:
            raise self.terminal

    def _upsert(self, *, first: bool = False, next_at: datetime | None = None) -> None:
        """Keep the Web UI's search attributes current, writing only what changed."""
        status = self._status()
        wanted: list[tuple[SearchAttributeKey[Any], Any]] = [
            (CURRENT_STEP, self.state.current_step),
            (ENROLLMENT_STATUS, str(status)),
            (NEXT_ACTION_AT, next_at),
        ]
        if first:
            wanted += [
                (SEQUENCE_NAME, self.inp.sequence.sequence_name),
                (SEQUENCE_VERSION, self.inp.sequence.version),
                (PERSON_ID, str(self.inp.person_id)),
            ]
        current = workflow.info().typed_search_attributes
        updates: list[SearchAttributeUpdate[Any]] = [
            key.value_set(value) if value is not None else key.value_unset()
            for key, value in wanted
            if current.get(key) != value
        ]
        if updates:
            workflow.upsert_search_attributes(updates)

    def _event(self, type_: str, step: Step | None, **data: object) -> RecordEventInput:
        """An event of this enrollment at the workflow's now, keyed by step and visit (logged once)."""
        visit = self.state.visits.get(step.id, 0) if step else 0
        return RecordEventInput(
            ref=self.ref,
            type=type_,
            step_id=step.id if step else None,
            variant=self.state.variants.get(step.id) if step else None,
            channel=str(step.channel) if step and step.channel else None,
            occurred_at=workflow.now(),
            data=dict(data),
            dedup_key=f"{self.ref.enrollment_id}:{type_}:{step.id if step else ''}:{visit}",
            current_step=self.state.current_step,
        )

    def _end_input(self, status: EnrollmentStatus, reason: str) -> FinishInput:
        """How the enrollment ended, for its row and the event log."""
        return FinishInput(ref=self.ref, status=str(status), last_step=self.state.current_step, reason=reason)

    async def _record(self, type_: str, step: Step | None, **data: object) -> None:
        await calls.record_event(self._event(type_, step, **data))

    async def _record_started(self) -> None:
        """Write the step's `step_started` if it is still held for the send (see `Sending`)."""
        event, self.started_event = self.started_event, None
        if event is not None:
            await calls.record_event(event)

    async def _hold_while_paused(self) -> None:
        if self.state.paused:
            self.phase = Phase.PAUSED
            self.waiting_for = ["resume"]
            self.until = None
            self._upsert()
            await workflow.wait_condition(lambda: not self.state.paused or self.terminal is not None)
            self._check_terminal()

    def _pending_reply_stops(self, step: Step, *, waiting_on_edges: bool) -> bool:
        if not self.defn.stop_on_reply:
            return False
        if waiting_on_edges and any(e.trigger == Trigger.REPLIED for e in step.edges):
            return False
        return any(e.kind == "replied" and not e.consumed for e in self._events_for_step())

    def _events_for_step(self) -> list[ReceivedEvent]:
        since = self.state.step_started_at
        return [e for e in self.state.events if since is None or e.received_at >= since]

    async def _sleep_until(
        self, when: datetime, phase: Phase, step: Step, *, reply_stops: bool = True, replan: bool = False
    ) -> bool:
        """Wait until `when` (a durable timer), holding on pause and waking on stop/reply.

        With `replan`, an out-of-office that moves `not_before` past `when` ends the wait
        early and returns False: the caller plans the send again from the return date.
        """

        def moved() -> bool:
            return replan and self.state.not_before is not None and self.state.not_before > when

        while True:
            self._check_terminal()
            await self._hold_while_paused()
            if reply_stops and self._pending_reply_stops(step, waiting_on_edges=False):
                raise Terminal(EnrollmentStatus.REPLIED, "replied before the next action")
            if moved():
                return False
            now = workflow.now()
            if when <= now:
                return True
            self.phase = phase
            self.waiting_for = [phase]
            self.until = when
            self._upsert(next_at=when)
            seen = len(self.state.events)
            try:
                await workflow.wait_condition(self._woken(seen, moved), timeout=when - now)
            except TimeoutError:
                pass

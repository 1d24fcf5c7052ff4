"""The enrollment workflow: one person walking one sequence version.

This replaces v1's 6-hour cron. Each enrollment waits on durable timers and reacts to
signals (replies, acceptances, follow-backs, unsubscribes) the moment they arrive.
Side effects happen only in activities; this module is orchestration and can be read
without reading any I/O code.

Semantics worth knowing (also in the README):

* A signal that arrives before the run starts or while an action runs is kept and
  counts for the step being run: an event counts for a step when it arrives at or
  after that step started. Event ids are deduplicated.
* Pause stops the clock. An edge timer with 2 days left when paused still has 2 days
  left after resume; a pending action waits for resume; nothing is ever skipped.
  Events that arrive while paused take effect on resume.
* `stop_on_reply` (default true): a reply ends the enrollment as `replied` unless the
  step being waited on branches on REPLIED.
* A permanent send failure (bounce, invalid recipient, refused by the provider) ends
  the enrollment as `failed`: the dead-letter state, visible in status and stats.
  A suppressed person ends as `suppressed`. A person with no identity on a step's
  channel (no X account, say) skips that step: its timed edge (NOT_* or NORMAL_EDGE)
  is taken at once, since the awaited event cannot come. An uncertain delivery (the provider may
  have accepted it) is never re-sent; the lead continues as if it was sent.
* A step reached through the person's own event (`state.reached_via`) is a response: the
  governor does not hold it by the person's touch cap (sender caps and the window do).
* The governor grants slots inside the send window and timeline. If the send still
  cannot go at its slot (paused past it, a retry backlog), `deliver` answers `reschedule`
  without sending and the step asks for a new slot: a new round, which releases the old.

The run is a state machine over `state.stage`: begin (log the step, pick its variant) →
act (the action at its time: workflows/sending.py) → wait (the first of the step's edges)
→ leave (on to the next step, or the end). Shared state and waits: workflows/enrollment_core.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from models.activities import EnrollmentRef, RecordEventInput
    from models.enrollment import (
        ControlSignal,
        EnrollmentInput,
        EnrollmentResult,
        EnrollmentState,
        EnrollmentStatus,
        InboundSignal,
        OutOfOfficeSignal,
        PathEntry,
        Phase,
        ReceivedEvent,
        Stage,
        StatusView,
    )
    from models.outcomes import EventType
    from models.schedule import as_aware, choose_variant
    from models.sequence import EVENT_TRIGGERS, Edge, Step, Trigger, zone
    from workflows import activity_calls as calls
    from workflows.enrollment_core import Terminal
    from workflows.patches import BASELINE, patched, refuse_newer_baseline
    from workflows.sending import Sending

#: Signal kind for each event trigger.
TRIGGER_KIND = {
    Trigger.REPLIED: "replied",
    Trigger.CONNECTION_ACCEPTED: "connection_accepted",
    Trigger.FOLLOWED_BACK: "followed_back",
    Trigger.REPLIED_TO_NOTE: "replied_to_note",
}
NEGATIVE_TWIN = {
    Trigger.NOT_REPLIED: Trigger.REPLIED,
    Trigger.CONNECTION_NOT_ACCEPTED: Trigger.CONNECTION_ACCEPTED,
    Trigger.NOT_FOLLOWED_BACK: Trigger.FOLLOWED_BACK,
}
SEEN_IDS_KEPT = 2000


def workflow_id_for(sequence_name: str, person_id: int) -> str:
    """The business key: one enrollment per (sequence, person)."""
    return f"enroll:{sequence_name}:{person_id}"


@workflow.defn(name="Enrollment")
class EnrollmentWorkflow(Sending):
    """Walks the sequence graph for one person."""

    @workflow.init
    def __init__(self, inp: EnrollmentInput) -> None:
        self.inp = inp
        self.patch_baseline = inp.patch_baseline  # read by workflows/patches.py
        self.defn = inp.definition
        self.state = inp.state or EnrollmentState(current_step=inp.definition.first_step.id)
        self.terminal: Terminal | None = None
        self.phase = Phase.STARTING
        self.waiting_for: list[str] = []
        self.until: datetime | None = None
        self.last_delivery_status: str | None = None
        self.started_event: RecordEventInput | None = None
        self.end_recorded = False
        self.tz = zone(inp.person_timezone, inp.definition.timezone)
        self.ref = EnrollmentRef(
            enrollment_id=inp.enrollment_id,
            person_id=inp.person_id,
            sequence=inp.sequence,
            workflow_id=workflow.info().workflow_id,
        )

    # ------------------------------------------------------------------ signals
    def _accept(self, kind: str, event_id: str, channel: str | None, classification: str | None) -> None:
        if event_id in self.state.seen_event_ids:
            return
        self.state.seen_event_ids.append(event_id)
        del self.state.seen_event_ids[:-SEEN_IDS_KEPT]
        self.state.events.append(
            ReceivedEvent(
                kind=kind,
                event_id=event_id,
                received_at=workflow.now(),
                channel=channel,
                classification=classification,
            )
        )

    @workflow.signal
    def replied(self, sig: InboundSignal) -> None:
        """The person replied on some channel."""
        self._accept("replied", sig.event_id, sig.channel, sig.classification)

    @workflow.signal
    def connection_accepted(self, sig: InboundSignal) -> None:
        """The person accepted a LinkedIn connection request."""
        self._accept("connection_accepted", sig.event_id, sig.channel, sig.classification)

    @workflow.signal
    def followed_back(self, sig: InboundSignal) -> None:
        """The person followed our X account back."""
        self._accept("followed_back", sig.event_id, sig.channel, sig.classification)

    @workflow.signal
    def replied_to_note(self, sig: InboundSignal) -> None:
        """The person replied to a connection request's note."""
        self._accept("replied_to_note", sig.event_id, sig.channel, sig.classification)

    @workflow.signal
    def out_of_office(self, sig: OutOfOfficeSignal) -> None:
        """An auto-reply: not a reply; the next action moves after the return date."""
        if sig.event_id in self.state.seen_event_ids:
            return
        self.state.seen_event_ids.append(sig.event_id)
        until = sig.until or workflow.now() + timedelta(seconds=sig.default_delay_seconds)
        if self.state.not_before is None or until > self.state.not_before:
            self.state.not_before = until

    @workflow.signal
    def pause(self, sig: ControlSignal) -> None:
        """Hold the lead where it is (the clock stops)."""
        if not self.state.paused:
            self.state.paused = True
            self.state.paused_at = workflow.now()

    @workflow.signal
    def resume(self, sig: ControlSignal) -> None:
        """Continue from where the lead was held."""
        if self.state.paused:
            self.state.paused = False
            if self.state.paused_at is not None:
                held = (workflow.now() - self.state.paused_at).total_seconds()
                self.state.paused_for_seconds += held
            self.state.paused_at = None

    @workflow.signal
    def stop(self, sig: ControlSignal) -> None:
        """End the enrollment now (no further actions)."""
        if self.terminal is None:
            self.terminal = Terminal(EnrollmentStatus.STOPPED, sig.reason or "stopped")

    @workflow.signal
    def unsubscribe(self, sig: ControlSignal) -> None:
        """The person unsubscribed: end now; the suppression list guards every send."""
        if self.terminal is None:
            self.terminal = Terminal(EnrollmentStatus.UNSUBSCRIBED, sig.reason or "unsubscribed")

    # ------------------------------------------------------------------ query
    @workflow.query
    def status(self) -> StatusView:
        """Where the lead is, what it waits for and until when, and the path so far."""
        status = self._status()
        return StatusView(
            enrollment_id=self.inp.enrollment_id,
            person_id=self.inp.person_id,
            sequence=self.inp.sequence,
            status=status,
            current_step=self.state.current_step,
            phase=self.phase,
            waiting_for=list(self.waiting_for),
            until=self.until,
            paused=self.state.paused,
            variants=dict(self.state.variants),
            path=list(self.state.path),
            last_delivery_status=self.last_delivery_status,
        )

    # ------------------------------------------------------------------ run
    @workflow.run
    async def run(self, inp: EnrollmentInput) -> EnrollmentResult:
        """Walk the graph until END, a terminal signal, or a permanent failure."""
        refuse_newer_baseline(inp.patch_baseline)  # a rolling deploy: leave it to a newer worker
        self._upsert(first=True)
        steps_this_run = 0
        try:
            while True:
                self._check_terminal()
                step = self.defn.step(self.state.current_step)
                if self.state.stage == Stage.BEGIN:  # log the step, pick its variant
                    await self._begin(step)
                    self.state.stage = Stage.ACT
                if self.state.stage == Stage.ACT:  # the action, at its time
                    await self._perform(step)
                    self.state.stage = Stage.WAIT
                    self.state.wait_started_at = workflow.now()
                    self.state.paused_for_seconds = 0.0
                edge = await self._choose_edge(step)  # wait: the first of its edges
                self._leave(edge)
                if edge is None or edge.trigger == Trigger.END or not edge.to:
                    raise Terminal(EnrollmentStatus.COMPLETED, "reached END")
                self.state.current_step = edge.to  # leave: on to the next step's begin
                self.state.stage = Stage.BEGIN
                steps_this_run += 1
                if workflow.info().is_continue_as_new_suggested() or steps_this_run >= inp.max_steps_per_run:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    self.state.runs += 1
                    now = workflow.now()
                    self.state.events = [e for e in self.state.events if not e.consumed and e.received_at >= now]
                    workflow.continue_as_new(
                        EnrollmentInput(
                            enrollment_id=inp.enrollment_id,
                            person_id=inp.person_id,
                            person_timezone=inp.person_timezone,
                            sequence=inp.sequence,
                            definition=inp.definition,
                            state=self.state,
                            max_steps_per_run=inp.max_steps_per_run,
                            patch_baseline=BASELINE,  # the next run starts on this code
                        )
                    )
        except Terminal as end:
            self.terminal = end
        return await self._finish(self.terminal)

    # ------------------------------------------------------------------ stages
    async def _begin(self, step: Step) -> None:
        visit = self.state.visits.get(step.id, 0) + 1
        self.state.visits[step.id] = visit
        self.state.step_started_at = workflow.now()
        if step.variants and step.id not in self.state.variants:
            chosen = choose_variant(step.variants, key=f"{self.inp.person_id}:{step.id}")
            if chosen is not None:
                self.state.variants[step.id] = chosen.name
        self.state.path.append(PathEntry(step=step.id, visit=visit, started_at=workflow.now()))
        self._upsert()
        via, self.state.via = self.state.via, None
        self.state.reached_via = via
        if visit == 1 and step.id == self.defn.first_step.id and self.inp.first_step_recorded:
            return  # the enrolling activity logged it with the enrollment, in bulk
        started = self._event(EventType.STEP_STARTED, step, action=str(step.action), visit=visit, via=via)
        if step.channel is not None and patched(calls.SEND_STEP_PATCH):
            self.started_event = started  # written by the send (or before the send waits)
            return
        await calls.record_event(started)

    def _leave(self, edge: Edge | None) -> None:
        if self.state.path:
            entry = self.state.path[-1]
            entry.left_by = str(edge.trigger) if edge else "END"
            entry.left_at = workflow.now()

    async def _choose_edge(self, step: Step) -> Edge | None:
        """Wait for the first of the step's edges: an event, or a timer running out."""
        if not step.edges or any(e.trigger == Trigger.END for e in step.edges):
            return None
        if self.state.skipped:  # no identity on this channel: no event can come, take the timed way on
            self.state.skipped = False
            timed_edges = [e for e in step.edges if e.trigger not in EVENT_TRIGGERS]
            timed_edges.sort(key=lambda e: e.after or timedelta(0))
            return timed_edges[0] if timed_edges else None
        base = self.state.wait_started_at or workflow.now()
        wanted = {TRIGGER_KIND[e.trigger]: e for e in step.edges if e.trigger in EVENT_TRIGGERS}
        timed = [e for e in step.edges if e.trigger not in EVENT_TRIGGERS]
        while True:
            self._check_terminal()
            await self._hold_while_paused()
            for event in self._events_for_step():
                if not event.consumed and event.kind in wanted:
                    event.consumed = True
                    self.state.via = f"{wanted[event.kind].trigger}:{event.event_id}"
                    return wanted[event.kind]
            if self._pending_reply_stops(step, waiting_on_edges=True):
                raise Terminal(EnrollmentStatus.REPLIED, "replied")
            pause_shift = timedelta(seconds=self.state.paused_for_seconds)
            deadlines: list[tuple[datetime, Edge]] = []
            for edge in timed:
                if edge.at is not None:
                    deadlines.append((as_aware(edge.at, self.tz), edge))
                else:
                    deadlines.append((base + (edge.after or timedelta(0)) + pause_shift, edge))
            deadlines.sort(key=lambda pair: pair[0])
            now = workflow.now()
            if deadlines and deadlines[0][0] <= now:
                return deadlines[0][1]
            self.phase = Phase.WAITING
            self.waiting_for = [str(e.trigger) for e in step.edges]
            self.until = deadlines[0][0] if deadlines else None
            self._upsert(next_at=self.until)
            seen = len(self.state.events)
            try:
                await workflow.wait_condition(
                    self._woken(seen),
                    timeout=(self.until - now) if self.until else None,
                )
            except TimeoutError:
                pass

    async def _finish(self, end: Terminal | None) -> EnrollmentResult:
        end = end or Terminal(EnrollmentStatus.COMPLETED, "reached END")
        self.phase = Phase.FINISHED
        self.waiting_for = []
        self.until = None
        self._upsert()
        await self._record_started()  # a step that ended before its send still logs that it started
        if not (self.end_recorded and end.status == EnrollmentStatus.COMPLETED):  # else `send_step` did
            await calls.finish_enrollment(self._end_input(end.status, end.reason))
        await workflow.wait_condition(workflow.all_handlers_finished)
        return EnrollmentResult(
            status=end.status,
            last_step=self.state.current_step,
            path=self.state.path,
            reason=end.reason,
        )


__all__ = ["EnrollmentWorkflow", "workflow_id_for"]

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
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from models.activities import (
        DeliverInput,
        DeliverOutput,
        EnrollmentRef,
        FinishInput,
        RecordEventInput,
        ReserveSlotInput,
        ReserveSlotOutput,
    )
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
    from models.schedule import as_aware, choose_variant, earliest_action_time
    from models.sequence import (
        EVENT_TRIGGERS,
        Action,
        Channel,
        Edge,
        Step,
        Trigger,
        zone,
    )
    from workflows import activity_calls as calls
    from workflows.search_attributes import (
        CURRENT_STEP,
        ENROLLMENT_STATUS,
        NEXT_ACTION_AT,
        PERSON_ID,
        SEQUENCE_NAME,
        SEQUENCE_VERSION,
    )

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
#: Deliver runs the moment-of-send gate and may answer `reschedule` (issue 11).
SEND_GATE_PATCH = "send-gate-reschedule"
RESCHEDULE = "reschedule"
#: A send whose attempts keep failing across rescheduled rounds (an outage that does not end)
#: ends as failed after this long, as `deliver`'s own retries would: rounds never loop forever.
FAILING_ROUNDS_GIVE_UP = timedelta(hours=4)
FAILING_ROUNDS_FIRST_BACKOFF = timedelta(minutes=5)
FAILING_ROUNDS_MAX_BACKOFF = timedelta(hours=1)

#: How often a lead whose sender is paused asks again once `deliver`'s retries ran out.
SENDER_PAUSED_RECHECK = timedelta(minutes=1)


def workflow_id_for(sequence_name: str, person_id: int) -> str:
    """The business key: one enrollment per (sequence, person)."""
    return f"enroll:{sequence_name}:{person_id}"


class _Terminal(Exception):
    """Raised inside the walk when the enrollment must end now."""

    def __init__(self, status: EnrollmentStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@workflow.defn(name="Enrollment")
class EnrollmentWorkflow:
    """Walks the sequence graph for one person."""

    @workflow.init
    def __init__(self, inp: EnrollmentInput) -> None:
        self.inp = inp
        self.defn = inp.definition
        self.state = inp.state or EnrollmentState(current_step=inp.definition.first_step.id)
        self.terminal: _Terminal | None = None
        self.phase = Phase.STARTING
        self.waiting_for: list[str] = []
        self.until: datetime | None = None
        self.last_delivery_status: str | None = None
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
            self.terminal = _Terminal(EnrollmentStatus.STOPPED, sig.reason or "stopped")

    @workflow.signal
    def unsubscribe(self, sig: ControlSignal) -> None:
        """The person unsubscribed: end now; the suppression list guards every send."""
        if self.terminal is None:
            self.terminal = _Terminal(EnrollmentStatus.UNSUBSCRIBED, sig.reason or "unsubscribed")

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
                    raise _Terminal(EnrollmentStatus.COMPLETED, "reached END")
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
                        )
                    )
        except _Terminal as end:
            self.terminal = end
        return await self._finish(self.terminal)

    # ------------------------------------------------------------------ helpers
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

    async def _record(self, type_: str, step: Step | None, **data: object) -> None:
        variant = self.state.variants.get(step.id) if step else None
        visit = self.state.visits.get(step.id, 0) if step else 0
        await calls.record_event(
            RecordEventInput(
                ref=self.ref,
                type=type_,
                step_id=step.id if step else None,
                variant=variant,
                channel=str(step.channel) if step and step.channel else None,
                occurred_at=workflow.now(),
                data=dict(data),
                dedup_key=f"{self.ref.enrollment_id}:{type_}:{step.id if step else ''}:{visit}",
                current_step=self.state.current_step,
            )
        )

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
        await self._record("step_started", step, action=str(step.action), visit=visit, via=via)

    def _leave(self, edge: Edge | None) -> None:
        if self.state.path:
            entry = self.state.path[-1]
            entry.left_by = str(edge.trigger) if edge else "END"
            entry.left_at = workflow.now()

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
                raise _Terminal(EnrollmentStatus.REPLIED, "replied before the next action")
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

    async def _perform(self, step: Step) -> None:
        """Run the step's action at the right time, through the governor and ledger."""
        desired = workflow.now()
        if step.delay:
            desired = (self.state.step_started_at or desired) + step.delay
        if step.at is not None:
            desired = max(desired, as_aware(step.at, self.tz))
        if self.state.not_before is not None:
            desired = max(desired, self.state.not_before)
        channel = step.channel
        if channel is None:  # WAIT / CHECK_FOR_REPLY: only timing; replies count for the edges
            await self._sleep_until(desired, Phase.DELAY, step, reply_stops=False)
            self.state.not_before = None
            return
        attempt = self.state.visits.get(step.id, 1)
        round_ = 0
        # Since this patch an out-of-office that arrives while the send waits (for its time or
        # for its slot) moves it past the return date: the wait wakes and the send is planned again.
        replan = workflow.patched("ooo-replans-send")
        failing_since: datetime | None = None
        failing_rounds = 0
        while True:  # a `reschedule` from the moment-of-send gate comes back here for a new slot
            slot, round_ = await self._book_slot(step, channel, desired, attempt, round_, replan)
            out = await self._send(step, slot, attempt, round_)
            if out.status != RESCHEDULE:
                break
            failing_since = (failing_since or workflow.now()) if out.failed_attempts else None
            if failing_since is not None and workflow.now() - failing_since >= FAILING_ROUNDS_GIVE_UP:
                out = await self._give_up(step, attempt, slot.sender_id, out.error)
                break
            # Late or off-window at the moment of sending: nothing went out; a new round
            # asks the governor again (and releases this round's slot): from now, or after a
            # backoff that keeps growing while the attempts keep failing (an outage).
            backoff = timedelta(0)
            if failing_since is not None:
                failing_rounds += 1
                backoff = min(FAILING_ROUNDS_FIRST_BACKOFF * 2 ** (failing_rounds - 1), FAILING_ROUNDS_MAX_BACKOFF)
            else:
                failing_rounds = 0
            desired = workflow.now() + backoff
            round_ += 1
        self.last_delivery_status = out.status
        if self.state.path:
            self.state.path[-1].outcome = out.status
        if out.status in ("sent", "uncertain") and out.message_id and step.action == Action.SEND_EMAIL:
            self.state.thread_message_ids.append(out.message_id)
        if out.status == "suppressed":
            raise _Terminal(EnrollmentStatus.SUPPRESSED, out.error or "suppressed")
        if out.status in ("failed", "bounced"):
            raise _Terminal(EnrollmentStatus.FAILED, out.error or out.status)
        self.state.skipped = out.status == "skipped"

    async def _book_slot(
        self, step: Step, channel: Channel, desired: datetime, attempt: int, round_: int, replan: bool
    ) -> tuple[ReserveSlotOutput, int]:
        """Wait for the send's time, reserve a slot and wait for it; the slot and its round."""
        response = self.state.reached_via is not None
        while True:
            if replan and self.state.not_before is not None:
                desired = max(desired, self.state.not_before)
            when = earliest_action_time(desired, self.defn.send_window, self.defn.timeline, self.tz)
            if when is None:
                raise _Terminal(EnrollmentStatus.EXPIRED, "campaign timeline ended")
            if not await self._sleep_until(when, Phase.SCHEDULED, step, replan=replan):
                continue
            slot = await calls.reserve_send_slot(
                ReserveSlotInput(
                    ref=self.ref,
                    step_id=step.id,
                    attempt=attempt,
                    round=round_,
                    action=str(step.action),
                    channel=str(channel),
                    now=workflow.now(),
                    not_before=when,
                    preferred_sender_id=self.state.senders.get(str(channel)),
                    allowed_senders=list(self.defn.senders.get(channel, [])),
                    send_window=self.defn.send_window,
                    timeline=self.defn.timeline,
                    timezone=self.tz.key,
                    response=response,
                )
            )
            if slot.ended:
                raise _Terminal(EnrollmentStatus.EXPIRED, "campaign timeline ended before a send slot")
            if slot.sender_id is None:
                await self._record("failed", step, error=f"no active {channel} sender account")
                raise _Terminal(EnrollmentStatus.FAILED, f"no active {channel} sender account")
            self.state.senders[str(channel)] = slot.sender_id
            if not await self._sleep_until(slot.slot_at, Phase.WAITING_FOR_SLOT, step, replan=replan):
                round_ += 1  # a new reservation from the return date (it releases the old slot)
                continue
            again = earliest_action_time(slot.slot_at, self.defn.send_window, self.defn.timeline, self.tz)
            if again == slot.slot_at:
                return slot, round_
            if again is None:
                raise _Terminal(EnrollmentStatus.EXPIRED, "campaign timeline ended")
            desired = again  # the slot fell outside the window: ask again from its opening
            round_ += 1

    async def _send(self, step: Step, slot: ReserveSlotOutput, attempt: int, round_: int) -> DeliverOutput:
        """Send at the slot (through the ledger); the outcome, or `reschedule` from the send gate."""
        self.state.not_before = None
        await self._hold_while_paused()
        self._check_terminal()
        self.phase = Phase.SENDING
        self.waiting_for = []
        self.until = None
        return await self._deliver(step, attempt, slot.sender_id, slot=slot, round_=round_)

    async def _deliver(
        self, step: Step, attempt: int, sender_id: int | None, *, slot: ReserveSlotOutput, round_: int
    ) -> DeliverOutput:
        """`deliver`, or the dead letter once its retries ran out.

        Since patch `send-gate-reschedule`, `deliver` gets the slot, window and timeline and
        may answer `reschedule` (late or off-window at the moment of sending).

        Since patch `sender-paused-waits`, retries that ran out because the sender's circuit
        breaker holds it (`SenderPaused`) are not the lead's failure: the lead waits a
        minute (a durable timer; pause and stop still apply) and asks again, as long as it takes.
        """
        while True:
            request = DeliverInput(
                ref=self.ref,
                step=step,
                attempt=attempt,
                sender_id=sender_id,
                variant=self.state.variants.get(step.id),
                thread_message_ids=list(self.state.thread_message_ids),
                track_opens=self.defn.track_opens,
                now=workflow.now(),
            )
            if workflow.patched(SEND_GATE_PATCH):  # histories from before the gate send as they did
                request.slot_at = slot.slot_at
                request.send_window = self.defn.send_window
                request.timeline = self.defn.timeline
                request.timezone = self.tz.key
                request.round = round_
            try:
                return await calls.deliver(request)
            except ActivityError as err:
                paused = isinstance(err.cause, ApplicationError) and err.cause.type == "SenderPaused"
                if paused and workflow.patched("sender-paused-waits"):
                    recheck = workflow.now() + SENDER_PAUSED_RECHECK
                    await self._sleep_until(recheck, Phase.WAITING_FOR_PAUSED_SENDER, step)
                    self.phase = Phase.SENDING
                    continue
                return await self._give_up(step, attempt, sender_id, str(err.cause or err))

    async def _give_up(self, step: Step, attempt: int, sender_id: int | None, error: str | None) -> DeliverOutput:
        """The dead letter: `give_up_delivery` marks the ledger row failed (uncertain if it was sending)."""
        out = await calls.give_up_delivery(
            DeliverInput(
                ref=self.ref,
                step=step,
                attempt=attempt,
                sender_id=sender_id,
                variant=self.state.variants.get(step.id),
                now=workflow.now(),
            )
        )
        out.error = out.error or error
        return out

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
                raise _Terminal(EnrollmentStatus.REPLIED, "replied")
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

    async def _finish(self, end: _Terminal | None) -> EnrollmentResult:
        end = end or _Terminal(EnrollmentStatus.COMPLETED, "reached END")
        self.phase = Phase.FINISHED
        self.waiting_for = []
        self.until = None
        self._upsert()
        await calls.finish_enrollment(
            FinishInput(
                ref=self.ref,
                status=str(end.status),
                last_step=self.state.current_step,
                reason=end.reason,
            )
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return EnrollmentResult(
            status=end.status,
            last_step=self.state.current_step,
            path=self.state.path,
            reason=end.reason,
        )


__all__ = ["EnrollmentWorkflow", "workflow_id_for"]

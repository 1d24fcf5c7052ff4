"""The send loop of one step: its time, a governor slot, the moment-of-send gate, the ledger.

`Sending._perform` runs a step's action: it waits for the step's time (delay, send
window, timeline, an out-of-office's return date), asks the governor for a slot and waits
for it, and calls `deliver`. A `reschedule` from the moment-of-send gate (late or
off-window when the send was due) asks the governor again, a new round that releases the
old slot; attempts that keep failing across rounds back off and end as failed after
`FAILING_ROUNDS_GIVE_UP`; `deliver`'s retries running out is the dead letter
(`give_up_delivery`). Workflow code only.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from models.activities import (
        DeliverInput,
        DeliverOutput,
        ReserveSlotInput,
        ReserveSlotOutput,
        SendStepInput,
        SendStepOutput,
    )
    from models.enrollment import EnrollmentStatus, Phase
    from models.outcomes import DeliveryStatus, EventType
    from models.schedule import as_aware, earliest_action_time
    from models.sequence import Action, Channel, Step, Trigger
    from workflows import activity_calls as calls
    from workflows.enrollment_core import EnrollmentCore, Terminal
    from workflows.patches import patched

#: Deliver runs the moment-of-send gate and may answer `reschedule` (issue 11).
SEND_GATE_PATCH = "send-gate-reschedule"
#: A send whose attempts keep failing across rescheduled rounds (an outage that does not end)
#: ends as failed after this long, as `deliver`'s own retries would: rounds never loop forever.
FAILING_ROUNDS_GIVE_UP = timedelta(hours=4)
FAILING_ROUNDS_FIRST_BACKOFF = timedelta(minutes=5)
FAILING_ROUNDS_MAX_BACKOFF = timedelta(hours=1)

#: How often a lead whose sender is paused asks again once `deliver`'s retries ran out.
SENDER_PAUSED_RECHECK = timedelta(minutes=1)


class Sending(EnrollmentCore):
    """The send loop, mixed into the enrollment workflow."""

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
        replan = patched("ooo-replans-send")
        failing_since: datetime | None = None
        failing_rounds = 0
        while True:  # a `reschedule` from the moment-of-send gate comes back here for a new slot
            slot, round_, sent = await self._book_slot(step, channel, desired, attempt, round_, replan)
            out = sent or await self._send(step, slot, attempt, round_)
            if out.status != DeliveryStatus.RESCHEDULE:
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
        if (
            out.status in (DeliveryStatus.SENT, DeliveryStatus.UNCERTAIN)
            and out.message_id
            and step.action == Action.SEND_EMAIL
        ):
            self.state.thread_message_ids.append(out.message_id)
        if out.status == DeliveryStatus.SUPPRESSED:
            raise Terminal(EnrollmentStatus.SUPPRESSED, out.error or "suppressed")
        if out.status in (DeliveryStatus.FAILED, DeliveryStatus.BOUNCED):
            raise Terminal(EnrollmentStatus.FAILED, out.error or out.status)
        self.state.skipped = out.status == DeliveryStatus.SKIPPED

    async def _book_slot(
        self, step: Step, channel: Channel, desired: datetime, attempt: int, round_: int, replan: bool
    ) -> tuple[ReserveSlotOutput, int, DeliverOutput | None]:
        """Wait for the send's time, reserve a slot and wait for it; the slot, its round and,
        when `send_step` sent at once (patch `send-step`), the outcome."""
        response = self.state.reached_via is not None
        at_once = patched(calls.SEND_STEP_PATCH)
        while True:
            if replan and self.state.not_before is not None:
                desired = max(desired, self.state.not_before)
            when = earliest_action_time(desired, self.defn.send_window, self.defn.timeline, self.tz)
            if when is None:
                raise Terminal(EnrollmentStatus.EXPIRED, "campaign timeline ended")
            if when > workflow.now() or self.state.paused:  # it waits first: log that it started now
                await self._record_started()
            if not await self._sleep_until(when, Phase.SCHEDULED, step, replan=replan):
                continue
            request = ReserveSlotInput(
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
            found = await self._send_at_once(step, request) if at_once else None
            if found is not None and found.slot is not None and found.delivered is not None:
                return found.slot, round_, found.delivered
            slot = (found.slot if found else None) or await calls.reserve_send_slot(request)
            if slot.ended:
                raise Terminal(EnrollmentStatus.EXPIRED, "campaign timeline ended before a send slot")
            if slot.sender_id is None:
                await self._record(EventType.FAILED, step, error=f"no active {channel} sender account")
                raise Terminal(EnrollmentStatus.FAILED, f"no active {channel} sender account")
            self.state.senders[str(channel)] = slot.sender_id
            if not await self._sleep_until(slot.slot_at, Phase.WAITING_FOR_SLOT, step, replan=replan):
                round_ += 1  # a new reservation from the return date (it releases the old slot)
                continue
            again = earliest_action_time(slot.slot_at, self.defn.send_window, self.defn.timeline, self.tz)
            if again == slot.slot_at:
                return slot, round_, None
            if again is None:
                raise Terminal(EnrollmentStatus.EXPIRED, "campaign timeline ended")
            desired = again  # the slot fell outside the window: ask again from its opening
            round_ += 1

    async def _send_at_once(self, step: Step, request: ReserveSlotInput) -> SendStepOutput:
        """`send_step`: the slot and, when it is due now, the send in the same activity.

        It also writes the step's held `step_started`, and records the enrollment's end with a
        send after which the walk ends (the step's only edge is END). A slot that is later comes
        back for the durable wait; nothing booked (`slot` None) falls back to `reserve_send_slot`.
        """
        self.state.not_before = None  # as `_send` does: this send is planned past it
        self.phase = Phase.SENDING
        self.waiting_for = []
        self.until = None
        ends = not step.edges or any(e.trigger == Trigger.END for e in step.edges)
        started, self.started_event = self.started_event, None
        work = SendStepInput(
            reserve=request,
            deliver=self._deliver_input(step, request.attempt, None, None, request.round),
            started=started,
            finish=self._end_input(EnrollmentStatus.COMPLETED, "reached END") if ends else None,
        )
        try:
            found = await calls.send_step(work)
        except ActivityError as err:  # its retries ran out: the dead letter, as for `deliver`
            self.started_event = started
            await self._record_started()
            out = await self._give_up(step, request.attempt, request.preferred_sender_id, str(err.cause or err))
            return SendStepOutput(slot=ReserveSlotOutput(sender_id=None, slot_at=request.now), delivered=out)
        if found.slot is None:  # nothing done: the started event too is written here
            self.started_event = started
            await self._record_started()
        elif found.slot.sender_id is not None:
            self.state.senders[request.channel] = found.slot.sender_id
        self.end_recorded = found.finished
        return found

    def _deliver_input(
        self, step: Step, attempt: int, sender_id: int | None, slot_at: datetime | None, round_: int
    ) -> DeliverInput:
        """`deliver`'s request for this step (`slot_at` and `round` for the moment-of-send gate)."""
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
        if patched(SEND_GATE_PATCH):  # histories from before the gate send as they did
            request.slot_at = slot_at
            request.send_window = self.defn.send_window
            request.timeline = self.defn.timeline
            request.timezone = self.tz.key
            request.round = round_
        return request

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
            request = self._deliver_input(step, attempt, sender_id, slot.slot_at, round_)
            try:
                return await calls.deliver(request)
            except ActivityError as err:
                paused = isinstance(err.cause, ApplicationError) and err.cause.type == "SenderPaused"
                if paused and patched("sender-paused-waits"):
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

"""Record workflow histories for the replay tests (run on purpose, then commit the JSON).

`python -m tests.histories.generate` runs a few enrollments on the time-skipping
server with stand-in activities (their results are in the history, so replay needs
no database) and saves each history here. Regenerate only when a change is meant to
be incompatible and is guarded by `workflow.patched`; the point of the saved files is
that a change which breaks determinism for workflows already running fails CI.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.activities import (
    DeliverInput,
    DeliverOutput,
    EnrollPageInput,
    EnrollPageOutput,
    FinishInput,
    FinishOutput,
    RecordEventInput,
    RecordEventOutput,
    ReserveSlotInput,
    ReserveSlotOutput,
    SendStepInput,
    SendStepOutput,
)
from models.enrollment import (
    AudienceInput,
    ControlSignal,
    EnrollmentInput,
    InboundSignal,
    OutOfOfficeSignal,
    SequenceRef,
)
from models.sequence import Channel
from models.sequence_checks import validate_definition
from models.task_queues import channel_queue
from workflows.audience import AudienceWorkflow
from workflows.enrollment import EnrollmentWorkflow
from workflows.patches import BASELINE
from workflows.search_attributes import register_search_attributes

HERE = Path(__file__).parent
SEQUENCE = {
    "name": "replay-demo",
    "send_window": {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"},
    "steps": [
        {
            "id": "follow",
            "action": "FOLLOW_ON_TWITTER",
            "edges": [
                {"trigger": "FOLLOWED_BACK", "to": "dm"},
                {"trigger": "NOT_FOLLOWED_BACK", "after": "3d", "to": "email"},
            ],
        },
        {
            "id": "dm",
            "action": "SEND_TWITTER_DM",
            "text": "Hi {{ first_name }}",
            "edges": [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": "2d", "to": "email"}],
        },
        {
            "id": "email",
            "action": "SEND_EMAIL",
            "variants": [{"name": "A", "subject": "A", "body": "a"}, {"name": "B", "subject": "B", "body": "b"}],
            "edges": [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": "4d", "to": "done"}],
        },
        {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
    ],
}


@activity.defn(name="record_event")
async def record_event(inp: RecordEventInput) -> RecordEventOutput:
    return RecordEventOutput(recorded=True)


@activity.defn(name="finish_enrollment")
async def finish_enrollment(inp: FinishInput) -> FinishOutput:
    return FinishOutput()


@activity.defn(name="reserve_send_slot")
async def reserve_send_slot(inp: ReserveSlotInput) -> ReserveSlotOutput:
    return ReserveSlotOutput(sender_id=1, slot_at=inp.not_before + timedelta(minutes=2))


_PAUSED_ONCE: set[str] = set()


@activity.defn(name="deliver")
async def deliver(inp: DeliverInput) -> DeliverOutput:
    if inp.ref.person_id == 6 and inp.step.id not in _PAUSED_ONCE:  # the sender's breaker holds it once
        _PAUSED_ONCE.add(inp.step.id)
        raise ApplicationError("sender 1 paused (auth)", type="SenderPaused", non_retryable=True)
    if inp.ref.workflow_id == "replay-7" and inp.slot_at is not None and inp.round == 0:
        return DeliverOutput(status="reschedule", error="late for its slot")  # the send gate, once per step
    return DeliverOutput(status="sent", delivery_id=1, message_id=f"<{inp.step.id}@replay.test>")


@activity.defn(name="send_step")
async def send_step(inp: SendStepInput) -> SendStepOutput:
    """Since patch send-step: the slot 2 minutes on (the workflow waits, then `deliver`), except
    for the `replay-send-step` leads, whose slot is now and whose send goes at once (but the
    demo's email step, which comes back for the durable wait)."""
    if (
        activity.info().is_local
        and inp.reserve.ref.workflow_id == "replay-send-step-15"
        and inp.reserve.step_id == "mail1"
    ):
        raise ApplicationError("SMTP connection refused", type="TransientChannelError")  # the activity takes over
    at_once = inp.reserve.ref.workflow_id.startswith("replay-send-step") and inp.reserve.step_id != "email"
    if not at_once:
        return SendStepOutput(slot=await reserve_send_slot(inp.reserve))
    slot = ReserveSlotOutput(sender_id=1, slot_at=inp.reserve.now)
    out = await deliver(inp.deliver.model_copy(update={"sender_id": 1, "slot_at": slot.slot_at}))
    return SendStepOutput(slot=slot, delivered=out, finished=inp.finish is not None)


@activity.defn(name="give_up_delivery")
async def give_up_delivery(inp: DeliverInput) -> DeliverOutput:
    return DeliverOutput(status="failed")


@activity.defn(name="enroll_page")
async def enroll_page(inp: EnrollPageInput) -> EnrollPageOutput:
    nxt = inp.after_person_id + inp.limit
    return EnrollPageOutput(next_after=nxt if nxt < 30 else None, started=inp.limit, total=30)


#: Two emails an hour apart, no send window: both sent at once by `send_step`, the second
#: one recording the end with its send.
TWO_EMAILS = {
    "name": "replay-two",
    "steps": [
        {
            "id": "mail1",
            "action": "SEND_EMAIL",
            "subject": "Hi",
            "body": "a",
            "edges": [{"trigger": "NORMAL_EDGE", "after": "1h", "to": "mail2"}],
        },
        {"id": "mail2", "action": "SEND_EMAIL", "subject": "Again", "body": "b", "edges": [{"trigger": "END"}]},
    ],
}


def _input(
    person: int, max_steps: int = 500, sequence: dict[str, Any] = SEQUENCE, baseline: int = 0
) -> EnrollmentInput:
    return EnrollmentInput(
        patch_baseline=baseline,
        enrollment_id=person,
        person_id=person,
        person_timezone="Europe/Berlin",
        sequence=SequenceRef(sequence_id=1, sequence_name=sequence["name"], version_id=1, version=1),
        definition=validate_definition(sequence),
        max_steps_per_run=max_steps,
    )


async def _until(env: WorkflowEnvironment, handle: Any, step: str) -> None:
    """Advance time in small steps until the enrollment waits on `step`'s edges."""
    for _ in range(500):
        view = await handle.query(EnrollmentWorkflow.status)
        if view.current_step == step and view.phase == "waiting":
            return
        await env.sleep(timedelta(minutes=20))
    raise RuntimeError(f"never reached {step}")


async def main(only: set[str] | None = None) -> None:
    """Record every history, or only the files named in `only` (stems, e.g. `audience`)."""

    def save(name: str, text: str) -> None:
        if only is None or name in only:
            (HERE / f"{name}.json").write_text(text)

    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=str(Path(sys.executable).parent / "temporal-test-server"),
    )
    await register_search_attributes(env.client)
    acts: list[Any] = [
        record_event,
        finish_enrollment,
        reserve_send_slot,
        deliver,
        send_step,
        give_up_delivery,
        enroll_page,
    ]
    # since patch deliver-channel-queue each channel's sends run on their own queue
    sends = [
        Worker(env.client, task_queue=channel_queue("replay", c), activities=[deliver, send_step]) for c in Channel
    ]
    async with (
        Worker(env.client, task_queue="replay", workflows=[EnrollmentWorkflow, AudienceWorkflow], activities=acts),
        AsyncExitStack() as stack,
    ):
        for w in sends:
            await stack.enter_async_context(w)
        # 1. follow-back → DM → reply (signals while waiting) → done
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(1), id="replay-1", task_queue="replay")
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-1", channel="x"))
        await _until(env, h, "dm")
        await h.signal(EnrollmentWorkflow.replied, InboundSignal(event_id="r-1", channel="x"))
        await h.result()
        save("enrollment_reply", (await h.fetch_history()).to_json())
        # 2. timeouts all the way, with a pause and resume in the middle
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(2), id="replay-2", task_queue="replay")
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.pause, ControlSignal(reason="replay"))
        await env.sleep(timedelta(days=1))
        await h.signal(EnrollmentWorkflow.resume, ControlSignal())
        await h.result()
        save("enrollment_timeouts_pause", (await h.fetch_history()).to_json())
        # 3. continue-as-new every step (first run's history)
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run, _input(3, max_steps=1), id="replay-3", task_queue="replay"
        )
        await h.result()
        first = env.client.get_workflow_handle("replay-3", run_id=h.first_execution_run_id)
        save("enrollment_continue_as_new", (await first.fetch_history()).to_json())
        # 4. the audience workflow paging
        a = await env.client.start_workflow(
            AudienceWorkflow.run,
            AudienceInput(sequence_name="replay-demo", segment_name="s", page_size=10),
            id="replay-audience",
            task_queue="replay",
        )
        await a.result()
        save("audience", (await a.fetch_history()).to_json())
        # 5. since patch deliver-heartbeat-retry: deliver with a heartbeat timeout and fast retries
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(5), id="replay-5", task_queue="replay")
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-5", channel="x"))
        await h.result()
        save("enrollment_deliver_heartbeat", (await h.fetch_history()).to_json())
        # 6. since patch sender-paused-waits: deliver failed on a paused sender, the lead waited and asked again
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(6), id="replay-6", task_queue="replay")
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-6", channel="x"))
        await h.result()
        save("enrollment_sender_paused_waits", (await h.fetch_history()).to_json())
        # 8. since patch ooo-replans-send: an out-of-office while the send waits (for the window or
        #    its slot) wakes the wait and plans the send again after the return date (recorded as
        #    id replay-6 before the ids were made unique)
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(6), id="replay-8", task_queue="replay")
        for _ in range(200):
            view = await h.query(EnrollmentWorkflow.status)
            if view.phase in ("scheduled", "waiting for send slot"):
                break
            await asyncio.sleep(0.05)
        back = (view.until or datetime.now(UTC)) + timedelta(days=2)
        await h.signal(EnrollmentWorkflow.out_of_office, OutOfOfficeSignal(event_id="ooo-6", until=back))
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-6", channel="x"))
        await h.result()
        save("enrollment_ooo_replans_send", (await h.fetch_history()).to_json())
        # 7. since patch send-gate-reschedule: each send is rescheduled once by the gate, then sent
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(7), id="replay-7", task_queue="replay")
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-7", channel="x"))
        await h.result()
        save("enrollment_send_gate", (await h.fetch_history()).to_json())
        # 9. since the Stage enum: a pause and resume, then continue-as-new after every step (the
        #    state carried across runs has `stage` and `paused_at`; the first run's history)
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run, _input(9, max_steps=1), id="replay-9", task_queue="replay"
        )
        await h.signal(EnrollmentWorkflow.pause, ControlSignal(reason="replay"))
        await env.sleep(timedelta(days=1))
        await h.signal(EnrollmentWorkflow.resume, ControlSignal())
        await h.result()
        first = env.client.get_workflow_handle("replay-9", run_id=h.first_execution_run_id)
        save("enrollment_stages_pause_can", (await first.fetch_history()).to_json())
        # 10. since patch deliver-channel-queue: the follow and the DM on `replay-x`, the email on
        #     `replay-email` (the workflow and its bookkeeping stay on `replay`)
        h = await env.client.start_workflow(EnrollmentWorkflow.run, _input(10), id="replay-10", task_queue="replay")
        await _until(env, h, "follow")
        await _until(env, h, "email")
        await h.result()
        save("enrollment_channel_queues", (await h.fetch_history()).to_json())
        # 11. since patch send-step: the follow and the DM reserved and sent by one `send_step` each
        #     (their step_started written by it, or before the window's wait), the email's slot
        #     later (a durable wait, then `deliver`); the events and the end as local activities
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run, _input(11), id="replay-send-step-11", task_queue="replay"
        )
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-11", channel="x"))
        await h.result()
        save("enrollment_send_step", (await h.fetch_history()).to_json())
        # 12. since patch send-step: two emails an hour apart, each sent at once by `send_step`; the
        #     second writes the step's start and records the end with its send (no finish activity)
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run, _input(12, sequence=TWO_EMAILS), id="replay-send-step-12", task_queue="replay"
        )
        await h.result()
        save("enrollment_send_step_two_emails", (await h.fetch_history()).to_json())
        # 13. since the patch baseline (workflows/patches.py): a lead started with every patch
        #     records no patch marker: the demo (X follow and DM sent at once, the email's slot
        #     later), continuing as new after each step (the first run's history)
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run,
            _input(13, max_steps=2, baseline=BASELINE),
            id="replay-send-step-13",
            task_queue="replay",
        )
        await _until(env, h, "follow")
        await h.signal(EnrollmentWorkflow.followed_back, InboundSignal(event_id="fb-13", channel="x"))
        await h.result()
        first = env.client.get_workflow_handle("replay-send-step-13", run_id=h.first_execution_run_id)
        save("enrollment_patch_baseline", (await first.fetch_history()).to_json())
        # 14. since email sends run on the workflows' queue (models/task_queues.py): two emails an
        #     hour apart, each `send_step` scheduled on `replay` itself (eager dispatch), none on
        #     `replay-email`; started with the patch baseline
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run,
            _input(14, sequence=TWO_EMAILS, baseline=BASELINE),
            id="replay-send-step-14",
            task_queue="replay",
        )
        await h.result()
        save("enrollment_email_beside_workflow", (await h.fetch_history()).to_json())
        # 15. since patch send-step-local: two emails an hour apart, each `send_step` first run as
        #     a local activity; the first one fails there and `send_step` as an activity sends it,
        #     the second is sent by the local activity (a marker, no activity task)
        h = await env.client.start_workflow(
            EnrollmentWorkflow.run,
            _input(15, sequence=TWO_EMAILS, baseline=BASELINE),
            id="replay-send-step-15",
            task_queue="replay",
        )
        await h.result()
        save("enrollment_send_step_local", (await h.fetch_history()).to_json())
    await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main(set(sys.argv[1:]) or None))

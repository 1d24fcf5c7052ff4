"""Typed calls of the enrollment's activities: one function per activity.

Each facade owns its activity's name, timeouts, retry policy and result type, so the
workflow reads as `await calls.deliver(request)` and a change of options happens in one
place. Workflow code only (it runs inside the workflow sandbox): the options must stay
exactly what saved histories recorded, and `deliver`'s depend on patches.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import CancelledError, FailureError

with workflow.unsafe.imports_passed_through():
    from models.activities import (
        DeliverInput,
        DeliverOutput,
        FinishInput,
        RecordEventInput,
        ReserveSlotInput,
        ReserveSlotOutput,
        SendStepInput,
        SendStepOutput,
    )
    from models.sequence import Channel
    from models.task_queues import BESIDE_WORKFLOWS, channel_queue
    from workflows.patches import patched

__all__ = [
    "DELIVER_HEARTBEAT_TIMEOUT",
    "LOCAL_SEND_PATCH",
    "QUICK",
    "SEND_RETRY",
    "SEND_RETRY_FAST",
    "channel_task_queue",
    "deliver",
    "finish_enrollment",
    "give_up_delivery",
    "record_event",
    "reserve_send_slot",
    "send_step",
]

#: Bookkeeping (events, slots, the end): quick retries, forever.
QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
#: `deliver` before patch `deliver-heartbeat-retry`.
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=30),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(hours=1),
    maximum_attempts=12,
    non_retryable_error_types=["PermanentChannelError", "TemplateError"],
)
#: Since patch `deliver-heartbeat-retry`: `deliver` heartbeats, so a send held by a dead
#: worker moves to another one within seconds, and connection-level transient errors are
#: retried after 1 s, 2 s, 4 s … up to 10 minutes (a provider's reset header still sets the
#: delay: `next_retry_delay`); 30 attempts span about three and a half hours.
DELIVER_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
SEND_RETRY_FAST = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=30,
    non_retryable_error_types=["PermanentChannelError", "TemplateError"],
)
BOOKKEEPING_TIMEOUT = timedelta(seconds=30)
DELIVER_TIMEOUT = timedelta(minutes=2)


def _deliver_options() -> dict[str, Any]:
    """`deliver`'s heartbeat and retry options (the old ones for histories before the patch)."""
    if patched("deliver-heartbeat-retry"):
        return {"heartbeat_timeout": DELIVER_HEARTBEAT_TIMEOUT, "retry_policy": SEND_RETRY_FAST}
    return {"retry_policy": SEND_RETRY}


#: Since this patch a step's send runs on its channel's task queue (models/task_queues.py),
#: so a slow provider on one channel cannot take the activity slots of another's sends.
CHANNEL_QUEUE_PATCH = "deliver-channel-queue"


def channel_task_queue(channel: Channel | str | None) -> dict[str, Any]:
    """`task_queue=` for a send activity of `channel` (nothing: the workflow's own queue).

    Histories from before patch `deliver-channel-queue` keep scheduling on the workflow's
    queue, whose worker still serves every activity. Email sends run there too (models/
    task_queues.py: eager dispatch); a replay does not compare an activity's task queue, so
    runs that sent email on `<queue>-email` before replay unchanged (the patch call stays).
    """
    if channel is None or not patched(CHANNEL_QUEUE_PATCH) or Channel(channel) in BESIDE_WORKFLOWS:
        return {}
    return {"task_queue": channel_queue(workflow.info().task_queue, channel)}


#: Since this patch a step's reservation and its send are one activity (`send_step`) when the
#: slot is due at once, the step's events are written by it, and the bookkeeping activities
#: (events, the end) run as local activities: no server round trip of their own.
SEND_STEP_PATCH = "send-step"


async def _bookkeeping(name: str, inp: RecordEventInput | FinishInput) -> None:
    """A short idempotent write: a local activity since patch `send-step` (no server round trip)."""
    if patched(SEND_STEP_PATCH):
        await workflow.execute_local_activity(name, inp, start_to_close_timeout=BOOKKEEPING_TIMEOUT, retry_policy=QUICK)
        return
    await workflow.execute_activity(name, inp, start_to_close_timeout=BOOKKEEPING_TIMEOUT, retry_policy=QUICK)


async def record_event(inp: RecordEventInput) -> None:
    """Append one event to the log (deduplicated by its key)."""
    await _bookkeeping("record_event", inp)


async def reserve_send_slot(inp: ReserveSlotInput) -> ReserveSlotOutput:
    """A sender and a time from the governor."""
    return await workflow.execute_activity(
        "reserve_send_slot",
        inp,
        result_type=ReserveSlotOutput,
        start_to_close_timeout=BOOKKEEPING_TIMEOUT,
        retry_policy=QUICK,
    )


async def deliver(inp: DeliverInput) -> DeliverOutput:
    """The send, through the ledger (raises ActivityError once its retries ran out)."""
    return await workflow.execute_activity(
        "deliver",
        inp,
        result_type=DeliverOutput,
        start_to_close_timeout=DELIVER_TIMEOUT,
        **_deliver_options(),
        **channel_task_queue(inp.step.channel),
    )


#: Since this patch an email step's `send_step` runs first as a local activity, inside the
#: workflow task that asks for it: no activity task and no second workflow task (bench/
#: RESULTS.md: the dev server's CPU per email 26.6 -> 16.5 ms). It is tried once; when it
#: fails, `send_step` as an activity takes over with its heartbeat and long retries. A
#: workflow task that fails after it ran (a dead worker) runs it again on replay: the ledger
#: finds the row sent, takes a `claimed` one over, or records a `sending` one as uncertain.
LOCAL_SEND_PATCH = "send-step-local"
LOCAL_SEND_ONCE = RetryPolicy(maximum_attempts=1)


async def send_step(inp: SendStepInput) -> SendStepOutput:
    """The slot and, when it is due now, the send (`deliver`'s options and channel queue)."""
    channel = inp.deliver.step.channel
    if channel is not None and Channel(channel) in BESIDE_WORKFLOWS and patched(LOCAL_SEND_PATCH):
        try:
            return await workflow.execute_local_activity(
                "send_step",
                inp,
                result_type=SendStepOutput,
                start_to_close_timeout=DELIVER_TIMEOUT,
                retry_policy=LOCAL_SEND_ONCE,
            )
        except FailureError as err:  # its error (a local activity's is not wrapped) or its timeout
            if isinstance(err, CancelledError):
                raise
            workflow.logger.info("send_step as a local activity failed (%s); as an activity now", err)
    return await workflow.execute_activity(
        "send_step",
        inp,
        result_type=SendStepOutput,
        start_to_close_timeout=DELIVER_TIMEOUT,
        heartbeat_timeout=DELIVER_HEARTBEAT_TIMEOUT,
        retry_policy=SEND_RETRY_FAST,
        **channel_task_queue(inp.deliver.step.channel),
    )


async def give_up_delivery(inp: DeliverInput) -> DeliverOutput:
    """The dead letter: the ledger row ends failed (uncertain if it was sending)."""
    return await workflow.execute_activity(
        "give_up_delivery",
        inp,
        result_type=DeliverOutput,
        start_to_close_timeout=BOOKKEEPING_TIMEOUT,
        retry_policy=QUICK,
    )


async def finish_enrollment(inp: FinishInput) -> None:
    """Record the end in the enrollments table and the event log."""
    await _bookkeeping("finish_enrollment", inp)

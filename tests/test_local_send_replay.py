"""A workflow task that fails after its local send ran: the replay sends nothing twice.

Since patch send-step-local an email's `send_step` is a local activity, recorded only with
its workflow task's completion. When that task fails or times out instead (a worker that
dies or loses the server right after the send), the task is retried and replayed from the
last completed one, so the send runs again, with the same activity id and attempt. Here a
worker interceptor fails the first workflow task right after the local send returned; the
production worker, real PostgreSQL, aiosmtpd and the time-skipping server do the rest. What
the SMTP server received is the verdict.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from temporalio.worker import (
    Interceptor,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from tests.engine_harness import Sequencer, deliveries_of, events_of
from tests.history_text import local_activities
from tests.test_delivery import email_sequence

#: Workflow tasks failed so far (the workflow sandbox passes this module through: one counter).
FAILED_TASKS: list[str] = []


class _FailAfterLocalSend(WorkflowOutboundInterceptor):
    def start_local_activity(self, input: StartLocalActivityInput) -> Any:
        handle = super().start_local_activity(input)
        if input.activity != "send_step" or FAILED_TASKS:
            return handle

        async def fail_the_task() -> Any:
            await handle
            FAILED_TASKS.append(input.activity)
            raise RuntimeError("the worker died after its local send")  # fails the workflow task

        return asyncio.create_task(fail_the_task())


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_FailAfterLocalSend(outbound))


class FailFirstTaskAfterLocalSend(Interceptor):
    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _Inbound


async def test_a_workflow_task_failing_after_its_local_send_replays_without_sending_again(
    sequencer_stack: Sequencer,
) -> None:
    stack = sequencer_stack
    FAILED_TASKS.clear()
    async with stack.worker(interceptors=[FailFirstTaskAfterLocalSend()]):
        handle = await stack.start(email_sequence(1), await stack.person())
        result = await handle.result()
    assert FAILED_TASKS == ["send_step"], "the first workflow task failed after the send"
    assert result.status == EnrollmentStatus.COMPLETED and result.path[0].outcome == "sent"
    assert len(stack.smtp.messages) == 1, "the replay's send found the row sent"
    [delivery] = await deliveries_of(stack.sf)
    assert delivery.status == "sent" and delivery.attempts_made == 1
    assert [e.type for e in await events_of(stack.sf, EventType.SENT)] == ["sent"]
    history = await handle.fetch_history()
    failed = [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]
    assert len(failed) == 1
    assert local_activities(history) == ["send_step"]  # only the replay's run is recorded...
    [marker] = [
        e.marker_recorded_event_attributes
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
        and e.marker_recorded_event_attributes.marker_name == "core_local_activity"
    ]
    recorded = json.loads(marker.details["result"].payloads[0].data)
    assert recorded["delivered"] == recorded["delivered"] | {
        "status": "sent",
        "duplicate": True,
    }  # ...which found it sent

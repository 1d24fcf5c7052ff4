"""The audience workflow: enroll every member of a segment, durably, in bounded pages.

`starter.py enroll` starts one of these instead of looping over people itself, so an
audience of 100,000 survives CLI exits and worker restarts. It pages by person id,
continues as new before its history grows large, and answers a `progress` query that
the CLI turns into a progress bar.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from models.activities import EnrollPageInput, EnrollPageOutput
    from models.enrollment import AudienceInput, AudienceProgress


def audience_workflow_id(sequence_name: str, segment_name: str) -> str:
    """One audience run per (sequence, segment) at a time."""
    return f"audience:{sequence_name}:{segment_name}"


@workflow.defn(name="Audience")
class AudienceWorkflow:
    """Pages through a segment and starts enrollments."""

    @workflow.init
    def __init__(self, inp: AudienceInput) -> None:
        self.inp = inp
        self.progress_state = AudienceProgress(
            total=inp.total,
            started=inp.started,
            already=inp.already,
            refused=inp.refused,
            refusals=list(inp.refusals),
        )

    @workflow.query
    def progress(self) -> AudienceProgress:
        """How many people were started, already enrolled, refused, out of the total."""
        return self.progress_state

    @workflow.run
    async def run(self, inp: AudienceInput) -> AudienceProgress:
        """Enroll page after page until the segment is exhausted."""
        cursor = inp.after_person_id
        p = self.progress_state
        for _ in range(inp.pages_per_run):
            out: EnrollPageOutput = await workflow.execute_activity(
                "enroll_page",
                EnrollPageInput(
                    sequence_name=inp.sequence_name,
                    segment_name=inp.segment_name,
                    after_person_id=cursor,
                    limit=inp.page_size,
                    count_total=p.total is None,
                    pages=inp.pages_per_activity,
                ),
                result_type=EnrollPageOutput,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(minutes=5),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=2),
                    maximum_interval=timedelta(minutes=2),
                    non_retryable_error_types=["NotFound"],
                ),
            )
            if out.total is not None:
                p.total = out.total
            p.started += out.started
            p.already += out.already
            p.refused += out.refused
            p.refusals = (p.refusals + out.refusals)[:200]
            if out.next_after is None:
                p.done = True
                return p
            cursor = out.next_after
            if workflow.info().is_continue_as_new_suggested():
                break
        workflow.continue_as_new(
            AudienceInput(
                sequence_name=inp.sequence_name,
                segment_name=inp.segment_name,
                page_size=inp.page_size,
                pages_per_run=inp.pages_per_run,
                pages_per_activity=inp.pages_per_activity,
                after_person_id=cursor,
                started=p.started,
                already=p.already,
                refused=p.refused,
                total=p.total,
                refusals=p.refusals,
            )
        )

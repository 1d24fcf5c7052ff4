"""Baseline workflows for the benchmarks: raw starts and bare signal round trips.

Kept in their own module with no imports beyond temporalio, so the workflow sandbox
validates them as quickly as anything can be.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey

NEXT_ACTION_AT = SearchAttributeKey.for_datetime("NextActionAt")


@workflow.defn(name="BenchNoop")
class NoopWorkflow:
    """A workflow that does nothing: the raw start baseline."""

    @workflow.run
    async def run(self) -> None:
        return None


@workflow.defn(name="BenchTimer")
class TimerWorkflow:
    """Sets one search attribute and waits on a 30-day timer: what an enrollment must do at least."""

    @workflow.run
    async def run(self) -> None:
        workflow.upsert_search_attributes([NEXT_ACTION_AT.value_set(workflow.now() + timedelta(days=30))])
        await workflow.sleep(timedelta(days=30))


@workflow.defn(name="BenchSignal")
class SignalWorkflow:
    """Waits for a signal and records it: the bare signal round trip baseline."""

    def __init__(self) -> None:
        self.got = 0

    @workflow.signal
    def ping(self) -> None:
        self.got += 1

    @workflow.query
    def seen(self) -> int:
        return self.got

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.got > 0, timeout=timedelta(hours=1))


@workflow.defn(name="BenchHandSender")
class HandSenderWorkflow:
    """What a developer would write by hand: one workflow per email, one activity that sends it.

    The baseline of the send benchmark (bench/send.py): no governor, ledger, template or
    event log, just the Temporal round trips every send needs at least.
    """

    @workflow.run
    async def run(self, recipient: str) -> None:
        await workflow.execute_activity(
            "bench_send_email",
            recipient,
            start_to_close_timeout=timedelta(seconds=60),
        )

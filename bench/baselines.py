"""Baseline workflows for the benchmarks: raw starts and bare signal round trips.

Kept in their own module with no imports beyond temporalio, so the workflow sandbox
validates them as quickly as anything can be.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow


@workflow.defn(name="BenchNoop")
class NoopWorkflow:
    """A workflow that does nothing: the raw start baseline."""

    @workflow.run
    async def run(self) -> None:
        return None


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

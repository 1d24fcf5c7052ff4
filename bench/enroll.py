"""Enrollment throughput: the audience workflow and its activity vs raw no-op workflow starts (target >= 0.8x)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.worker import Worker

from bench.baselines import NoopWorkflow, TimerWorkflow
from bench.common import (
    engine_worker,
    gather_bounded,
    seed_people,
    sequence_file,
)
from bench.stack import Stack
from workflows.search_attributes import PERSON_ID, SEQUENCE_NAME


async def bench_enroll(stack: Stack, people: int, tmp: Path, baseline: int | None = None) -> dict[str, Any]:
    """Audience enrollment vs raw no-op workflow starts (`baseline` of them, default as many)."""
    from operations.enrolling import start_audience
    from services.sequence_store import create_version
    from settings import Settings

    client: Client = stack.env.client

    base_n = baseline or people

    async def raw_starts() -> float:
        raw_q = f"raw-{uuid.uuid4().hex[:6]}"
        async with Worker(client, task_queue=raw_q, workflows=[NoopWorkflow], max_concurrent_workflow_tasks=200):
            t0 = time.perf_counter()
            await gather_bounded(
                base_n,
                64,
                lambda i: client.start_workflow(NoopWorkflow.run, id=f"{raw_q}-{i}", task_queue=raw_q),
            )
            return base_n / (time.perf_counter() - t0)

    async def timer_starts() -> float:
        # Context, not the target's baseline: the least an open enrollment costs the server
        # (a workflow that stays open on a timer, with the search attributes the UI needs).
        timer_q = f"timer-{uuid.uuid4().hex[:6]}"
        async with Worker(client, task_queue=timer_q, workflows=[TimerWorkflow], max_concurrent_workflow_tasks=200):
            t0 = time.perf_counter()
            await gather_bounded(
                base_n,
                64,
                lambda i: client.start_workflow(
                    TimerWorkflow.run,
                    id=f"{timer_q}-{i}",
                    task_queue=timer_q,
                    search_attributes=TypedSearchAttributes(
                        [SearchAttributePair(SEQUENCE_NAME, timer_q), SearchAttributePair(PERSON_ID, str(i))]
                    ),
                ),
            )
            return base_n / (time.perf_counter() - t0)

    name = f"bench-enroll-{uuid.uuid4().hex[:6]}"
    await seed_people(stack.session_factory, people, name, tag=name)
    await create_version(
        stack.session_factory,
        sequence_file(
            tmp,
            name,
            [
                {
                    "id": "wait",
                    "action": "WAIT",
                    "edges": [{"trigger": "NORMAL_EDGE", "after": "30d", "to": "end"}],
                },
                {"id": "end", "action": "WAIT", "edges": [{"trigger": "END"}]},
            ],
        ),
    )
    q = f"eng-{uuid.uuid4().hex[:6]}"
    settings = Settings(temporal_address=stack.env.client.service_client.config.target_host, temporal_task_queue=q)
    # The server slows as it holds more open workflows, so the raw baseline is measured
    # before and after the enrollments and averaged: neither side gets the fresher server.
    raw_before = await raw_starts()
    async with engine_worker(stack, q):
        t0 = time.perf_counter()
        progress = await start_audience(stack.session_factory, settings, name, name, page_size=500)
        eng_s = time.perf_counter() - t0
    assert progress is not None and progress.started == people, progress
    raw_after = await raw_starts()
    timer_rate = await timer_starts()
    raw_rate, eng_rate = (raw_before + raw_after) / 2, people / eng_s
    sizes = f" (baselines of {base_n})" if base_n != people else ""
    return {
        "name": "enroll",
        "line": f"enroll {people}{sizes}: raw starts {raw_rate:.0f}/s "
        f"({raw_before:.0f} before, {raw_after:.0f} after), "
        f"enrollments {eng_rate:.0f}/s, ratio {eng_rate / raw_rate:.2f}x (target >= 0.8x); for context, starts of "
        f"a bare workflow that stays open on a timer with search attributes {timer_rate:.0f}/s "
        f"(measured last, on the fullest server)",
    }

"""Send throughput to one SMTP sink, caps off: the engine against what it must beat.

Three lines, measured in the same run on the same dev server, PostgreSQL and sink:
- raw pooled aiosmtplib sends (no Temporal at all): the ceiling;
- a hand-written Temporal sender (bench/baselines.py: one workflow per email, one activity
  that sends through a pooled connection): the baseline, target engine >= 0.8x of it;
- the engine: enroll, governor, ledger, gate, render, SMTP, events — with a one-step
  sequence and with a two-step one (two emails per lead, a short wait between).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench.common import (
    add_sender,
    child_pid,
    engine_worker,
    gather_bounded,
    process_cpu_seconds,
    seed_people,
    sequence_file,
)
from bench.stack import Stack


@dataclass
class CpuMeter:
    """CPU seconds used by the three parties of a send: this process (the worker and the SMTP
    sink), the dev server and PostgreSQL (the postmaster and its backends).

    On 2 cores every side is CPU bound, so CPU per email says where a rate goes.
    """

    stack: Stack

    def read(self) -> tuple[float, float, float]:
        server = child_pid("start-dev")
        return (
            time.process_time(),
            process_cpu_seconds(server) if server else 0.0,
            self._postgres(),
        )

    def _postgres(self) -> float:
        try:
            root = int((self.stack.cluster.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if pid == root or ppid == root:
                    total += process_cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
        return total

    @staticmethod
    def per_email(before: tuple[float, float, float], after: tuple[float, float, float], emails: int) -> str:
        parts = zip(("worker process", "dev server", "PostgreSQL"), before, after, strict=True)
        costs = [f"{name} {(b - a) * 1000 / max(emails, 1):.1f}" for name, a, b in parts]
        total = sum(b - a for a, b in zip(before, after, strict=True)) * 1000 / max(emails, 1)
        return f"CPU ms per email: {', '.join(costs)}; total {total:.1f}"


#: Send slots on both sides (activities; for the engine's due emails local activities), as
#: `python worker.py` gives them by default.
SLOTS = 100
#: Emails each side sends before the measured runs (not counted).
WARM_UP = 100
#: Workflows whose histories are counted for the round trips per email.
SAMPLE = 50


async def hand_written(stack: Stack, n: int) -> tuple[float, str, str]:
    """Emails per second through the hand-written one-activity Temporal sender, its round trips
    and its CPU per email."""
    from temporalio import activity
    from temporalio.worker import Worker

    from activities.channels.email import SmtpPool
    from bench.baselines import HandSenderWorkflow
    from settings import Settings
    from worker import WORKFLOW_RUNNER

    pool = SmtpPool(stack.sink.host, stack.sink.port, size=8)

    @activity.defn(name="bench_send_email")
    async def send_email(recipient: str) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "bench@bench.test", recipient, "Hi"
        msg.set_content("Quick question")
        await pool.send(msg, "bench@bench.test", [recipient])

    q = f"hand-{uuid.uuid4().hex[:6]}"
    client = stack.env.client
    async with Worker(  # tuned as the engine's worker is (bench/common.py: engine_worker)
        client,
        task_queue=q,
        workflows=[HandSenderWorkflow],
        activities=[send_email],
        workflow_runner=WORKFLOW_RUNNER,
        max_cached_workflows=Settings().worker_max_cached_workflows,
        max_concurrent_activities=SLOTS,
        max_concurrent_workflow_tasks=200,
    ):
        before = stack.sink.count
        meter = CpuMeter(stack)
        cpu0 = meter.read()
        t0 = time.perf_counter()
        handles = await gather_bounded(
            n,
            32,
            lambda i: client.start_workflow(
                HandSenderWorkflow.run, f"hand{i}@leads.bench", id=f"{q}-{i}", task_queue=q
            ),
        )
        # timed as the engine is: until the sink has every message (no result polls meanwhile)
        while stack.sink.count - before < n:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = meter.per_email(cpu0, meter.read(), n)
        await gather_bounded(len(handles), 64, lambda i: handles[i].result())  # each one completed
        assert stack.sink.count - before == n
        costs = await round_trips(client, [h.id for h in handles[:SAMPLE]], 1)
    await pool.aclose()
    return n / elapsed, costs, cpu


async def round_trips(client: Client, workflow_ids: list[str], emails: int) -> str:
    """Per email, from the histories of a sample: activities, local activities, workflow tasks, timers."""
    from temporalio.api.enums.v1 import EventType

    counted = {
        EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activities",
        EventType.EVENT_TYPE_MARKER_RECORDED: "markers",
        EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED: "workflow tasks",
        EventType.EVENT_TYPE_TIMER_STARTED: "timers",
    }
    totals = dict.fromkeys(counted.values(), 0)
    for wid in workflow_ids:
        async for event in client.get_workflow_handle(wid).fetch_history_events():
            if event.event_type in counted:
                totals[counted[event.event_type]] += 1
    per = max(len(workflow_ids) * emails, 1)
    return ", ".join(f"{v / per:.1f} {k}" for k, v in totals.items())


async def engine_rate(stack: Stack, n: int, tmp: Path, *, steps: int) -> tuple[float, str, str]:
    """Emails per second through the engine, `steps` emails per lead (a 1-second wait between),
    its round trips and its CPU per email."""
    from operations.enrolling import start_audience
    from services.sequence_store import create_version
    from settings import Settings
    from workflows.enrollment import workflow_id_for

    name = f"bench-send{steps}-{uuid.uuid4().hex[:6]}"
    people = await seed_people(stack.session_factory, n, name, tag=name)
    await add_sender(stack.session_factory, f"{name}@bench.test", 10**6, 10**7)
    seq: list[dict[str, Any]] = []
    for k in range(steps):
        last = k == steps - 1
        onward = {"trigger": "NORMAL_EDGE", "after": "1s", "to": f"mail{k + 1}"}
        seq.append(
            {
                "id": f"mail{k}",
                "action": "SEND_EMAIL",
                "subject": f"Hi {{{{ first_name }}}} ({k})",
                "body": "Quick question",
                "edges": [{"trigger": "END"}] if last else [onward],
            }
        )
    await create_version(stack.session_factory, sequence_file(tmp, name, seq))
    q = f"send-{uuid.uuid4().hex[:6]}"
    settings = Settings(temporal_address=stack.env.client.service_client.config.target_host, temporal_task_queue=q)
    # as many sends in flight as the hand-written sender: activities, and local ones (email)
    async with engine_worker(stack, q, max_concurrent_activities=SLOTS, max_concurrent_local_activities=SLOTS):
        before = stack.sink.count
        meter = CpuMeter(stack)
        cpu0 = meter.read()
        t0 = time.perf_counter()
        await start_audience(stack.session_factory, settings, name, name, page_size=500)
        while stack.sink.count - before < n * steps:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = meter.per_email(cpu0, meter.read(), n * steps)
        await asyncio.sleep(2)  # a duplicate would arrive after the last expected message
        assert stack.sink.count - before == n * steps, f"{stack.sink.count - before - n * steps} sent twice"
        wids = [workflow_id_for(name, p) for p in people[:SAMPLE]]
        costs = await round_trips(stack.env.client, wids, steps)
    return n * steps / elapsed, costs, cpu


async def bench_send(stack: Stack, n: int, tmp: Path) -> dict[str, Any]:
    """Raw SMTP, the hand-written Temporal sender and the engine (one and two steps), one run."""
    from activities.channels.email import SmtpPool

    pool = SmtpPool(stack.sink.host, stack.sink.port, size=8)
    before = stack.sink.count

    async def raw(i: int) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "bench@bench.test", f"raw{i}@leads.bench", "Hi"
        msg.set_content("Quick question")
        await pool.send(msg, "bench@bench.test", [f"raw{i}@leads.bench"])

    t0 = time.perf_counter()
    await gather_bounded(n, 32, raw)
    raw_rate = n / (time.perf_counter() - t0)
    await pool.aclose()
    assert stack.sink.count - before == n
    # warm-up, not counted: both sides' first workflows, imports, pools and statement caches
    await hand_written(stack, WARM_UP)
    await engine_rate(stack, WARM_UP, tmp, steps=1)
    hand_before, hand_costs, hand_cpu = await hand_written(stack, n)
    one, one_costs, one_cpu = await engine_rate(stack, n, tmp, steps=1)
    two, two_costs, two_cpu = await engine_rate(stack, n // 2, tmp, steps=2)
    hand_after, _, hand_cpu_after = await hand_written(stack, n)
    hand = (hand_before + hand_after) / 2
    return {
        "name": "send",
        "line": f"send {n} emails, caps off, {SLOTS} send slots on both sides (the engine's email: local "
        f"activity slots): raw pooled aiosmtplib "
        f"{raw_rate:.0f}/s; hand-written one-activity Temporal sender {hand:.1f}/s (before {hand_before:.1f}, "
        f"after {hand_after:.1f}); engine one step {one:.1f}/s = {one / hand:.2f}x the hand-written sender "
        f"(target >= 0.8x); engine two steps ({n // 2} leads x 2 emails) {two:.1f}/s = {two / hand:.2f}x; "
        f"engine vs raw SMTP {one / raw_rate:.3f}x; per email (histories of {SAMPLE} workflows): hand-written "
        f"{hand_costs}; engine one step {one_costs}; two steps {two_costs}; {WARM_UP} emails per side "
        f"warmed up first, not counted. Hand-written before: {hand_cpu}. Engine one step: {one_cpu}. "
        f"Two steps: {two_cpu}. Hand-written after: {hand_cpu_after}",
    }

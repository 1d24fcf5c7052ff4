"""Helpers shared by the benchmarks: seeding (devstack/factories.py, as the tests do), the worker, percentiles."""

from __future__ import annotations

import asyncio
import os
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from temporalio.client import Client
from temporalio.worker import Worker

from bench.baselines import SignalWorkflow
from bench.stack import Stack
from db.session import SessionFactory
from devstack import factories
from devstack.factories import sequence_file

if TYPE_CHECKING:
    from worker import Workers

RESULTS = Path(__file__).parent / "RESULTS.md"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) in milliseconds."""
    ordered = sorted(values)
    idx = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))
    return ordered[idx] * 1000


async def gather_bounded(n: int, limit: int, fn: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run fn(0..n-1) with at most `limit` in flight."""
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> Any:
        async with sem:
            return await fn(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def seed_people(sf: SessionFactory, n: int, segment: str, *, tag: str) -> list[int]:
    """n people (500 companies) with an email identity each at leads.bench, and a static segment of them."""
    return await factories.seed_people(sf, n, segment, email_prefix=f"{tag}-", domain="leads.bench", companies=500)


async def add_sender(sf: SessionFactory, address: str, per_hour: int, per_day: int, spacing: float = 0.0) -> None:
    """An email sender account."""
    await factories.make_sender(sf, "email", address, per_hour=per_hour, per_day=per_day, spacing=spacing)


async def scalar(sf: SessionFactory, sql: str, **params: Any) -> Any:
    """One value from one SQL query."""
    async with sf() as session:
        return (await session.execute(text(sql), params)).scalar()


async def ledger_of(sf: SessionFactory, sequence: str) -> list[tuple[str, str | None]]:
    """(status, Message-ID) of every ledger row of `sequence`'s enrollments."""
    async with sf() as session:
        sql = text(
            "SELECT d.status, d.message_id FROM deliveries d JOIN enrollments e ON e.id = d.enrollment_id "
            "JOIN sequences s ON s.id = e.sequence_id WHERE s.name = :n"
        )
        return [(status, mid) for status, mid in (await session.execute(sql, {"n": sequence})).all()]


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    """A live process's resident set size, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_pid(match: str) -> int | None:
    """The pid of a child process of this one whose command line contains `match` (e.g. the dev server)."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == me and match in cmdline:
            return int(stat.parent.name)
    return None


async def wait_for_pollers(client: Client, queue: str, n: int, *, activities: bool = False, limit: float = 120) -> None:
    """Until `n` distinct workers poll `queue` (its workflow tasks, or its activity tasks)."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    kind = TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY if activities else TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
    tq = TaskQueue(name=queue)
    request = DescribeTaskQueueRequest(namespace=client.namespace, task_queue=tq, task_queue_type=kind)
    deadline = time.monotonic() + limit
    while True:
        pollers = (await client.workflow_service.describe_task_queue(request)).pollers
        if len({p.identity for p in pollers}) >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pollers)} of {n} workers poll {queue} after {limit:.0f} s (see their logs)")
        await asyncio.sleep(0.2)  # start-up poll


def engine_worker(stack: Stack, task_queue: str, **kw: Any) -> Workers:
    """The production worker wired to the bench stack (email to the sink), built as `python
    worker.py` builds it (`worker.worker_deps`: every sender's own SMTP pool looked up, the
    breaker, the secrets box); caps are off for throughput (person touch cap 0)."""
    from settings import Settings
    from worker import build_worker, worker_deps

    settings = Settings(
        sequencer_env="dev",
        smtp_host=stack.sink.host,
        smtp_port=stack.sink.port,
        smtp_pool_size=8,
        public_base_url="https://links.bench.test",
        postal_address="Bench Inc, 1 Loop Road",
        person_daily_touch_cap=0,
    )
    deps = worker_deps(settings, stack.session_factory)
    options: dict[str, Any] = {
        "max_concurrent_activities": 200,
        "max_concurrent_workflow_tasks": 200,
        "max_cached_workflows": settings.worker_max_cached_workflows,  # as worker.py runs it
        "max_concurrent_local_activities": settings.worker_max_concurrent_local_activities,
    }
    return build_worker(stack.env.client, task_queue, deps, **(options | kw))


# ---------------------------------------------------------------- benchmarks


async def round_trip_baseline(client: Client, n: int) -> list[float]:
    q = f"sig-{uuid.uuid4().hex[:6]}"
    out = []
    async with Worker(client, task_queue=q, workflows=[SignalWorkflow]):
        handles = [await client.start_workflow(SignalWorkflow.run, id=f"{q}-{i}", task_queue=q) for i in range(n)]
        for h in handles:
            await h.query(SignalWorkflow.seen)
        for h in handles:
            t0 = time.perf_counter()
            await h.signal(SignalWorkflow.ping)
            while await h.query(SignalWorkflow.seen) == 0:
                pass
            out.append(time.perf_counter() - t0)
    return out


async def waiting_leads(stack: Stack, tmp: Path, q: str, n: int, *, with_email: bool) -> tuple[str, list[int]]:
    """n enrollments waiting on REPLIED (after an email when with_email)."""
    from operations.enrolling import start_audience
    from services.sequence_store import create_version
    from settings import Settings

    name = f"bench-wait-{uuid.uuid4().hex[:6]}"
    ids = await seed_people(stack.session_factory, n, name, tag=name)
    first: dict[str, Any] = (
        {
            "id": "ask",
            "action": "SEND_EMAIL",
            "subject": "Hi {{ first_name }}",
            "body": "Quick question",
        }
        if with_email
        else {"id": "ask", "action": "CHECK_FOR_REPLY"}
    )
    first["edges"] = [
        {"trigger": "REPLIED", "to": "done"},
        {"trigger": "NOT_REPLIED", "after": "2d", "to": "nudge"},
    ]
    steps = [
        first,
        {
            "id": "nudge",
            "action": "SEND_EMAIL",
            "subject": "Nudge",
            "body": "Again",
            "edges": [{"trigger": "END"}],
        },
        {
            "id": "done",
            "action": "WAIT",
            "edges": [{"trigger": "NORMAL_EDGE", "after": "30d", "to": "end"}],
        },
        {"id": "end", "action": "WAIT", "edges": [{"trigger": "END"}]},
    ]
    await create_version(stack.session_factory, sequence_file(tmp, name, steps))
    settings = Settings(temporal_address=stack.env.client.service_client.config.target_host, temporal_task_queue=q)
    await start_audience(stack.session_factory, settings, name, name, page_size=500)
    return name, ids


async def wait_phase(client: Client, wids: list[str], phase: str = "waiting") -> None:
    from temporalio.service import RPCError

    from workflows.enrollment import EnrollmentWorkflow

    async def one(wid: str) -> None:
        # Back off, and take a query that times out for "not yet": a worker busy
        # sending to thousands of leads answers queries late, and polling it hard
        # only adds to its load (an evicted workflow replays its history per query).
        h = client.get_workflow_handle(wid)
        delay, deadline = 0.05, time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if (await h.query(EnrollmentWorkflow.status)).phase == phase:
                    return
            except RPCError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise RuntimeError(f"{wid} never reached {phase}")

    await gather_bounded(len(wids), 20, lambda i: one(wids[i]))


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def record(lines: list[str], path: Path = RESULTS) -> None:
    """Append one block of result lines with the date and machine."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"\n## {stamp} — {machine()}\n\n" + "".join(f"- {line}\n" for line in lines)
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by `make bench` (bench/run.py).\n")
    with path.open("a") as fh:
        fh.write(block)

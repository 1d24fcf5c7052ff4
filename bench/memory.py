"""Memory at scale: worker RSS with 1,000 and 50,000 sleeping enrollments, bounded by its cache.

A sleeping enrollment is one waiting on a long timer (a WAIT step, 30 days): the state a
campaign of millions spends nearly all its time in. One `python worker.py` process, its
workflow cache at 1,000, enrolls 1,000 leads through the bulk enroll path (the audience
workflow), then 49,000 more, while this samples its RSS, the dev server's RSS and start
rate, and the dev server's SQLite file (in WAL mode, as `make run` keeps it). A second
worker with a cache larger than its enrollments (every one cached) enrolls 10,000: the
difference is what each cached enrollment costs, and what the cache bound saves. The
per-enrollment costs (worker memory per cached run, history bytes, SQLite bytes,
PostgreSQL bytes) are what the 1M-enrollment deployment in bench/RESULTS.md is sized from.

Its own stack (the dev server on a SQLite file); run it niced: `nice -n 10 flock
/work/coord/bench.lock make bench BENCH_ARGS="--only memory"`.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    child_pid,
    process_rss_bytes,
    scalar,
    seed_people,
    sequence_file,
    wait_for_pollers,
)
from bench.fault import WorkerProcess
from bench.stack import Stack, bench_stack

MIB = 1024 * 1024
SLEEP = [
    {"id": "sleep", "action": "WAIT", "edges": [{"trigger": "NORMAL_EDGE", "after": "30d", "to": "end"}]},
    {"id": "end", "action": "WAIT", "edges": [{"trigger": "END"}]},
]


@dataclass
class Sample:
    """One look at the processes while enrolling."""

    at: float
    started: int
    worker_rss: int
    server_rss: int


@dataclass
class Phase:
    """Enrolling `n` more leads: how fast, and the processes at the end."""

    n: int
    seconds: float
    worker_rss: int
    server_rss: int
    sqlite_bytes: int
    pg_bytes: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.n / self.seconds


class Probe:
    """The worker, the dev server and the databases, measured together."""

    def __init__(self, stack: Stack, worker: WorkerProcess) -> None:
        self.stack = stack
        self.worker = worker
        # the dev server on this stack's SQLite file (run.py's own stack has another one)
        self.server_pid = child_pid(str(stack.temporal_db)) if stack.temporal_db else None

    def worker_rss(self) -> int:
        return process_rss_bytes(self.worker.proc.pid) if self.worker.proc else 0

    def server_rss(self) -> int:
        return process_rss_bytes(self.server_pid) if self.server_pid else 0

    def sqlite_bytes(self) -> int:
        db = self.stack.temporal_db
        if db is None:
            return 0
        return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))

    async def pg_bytes(self) -> int:
        return int(await scalar(self.stack.session_factory, "SELECT pg_database_size(current_database())"))


async def _sleeping(stack: Stack, name: str) -> int:
    """Enrollments of `name` whose first task ran (its search attributes say: waiting on `sleep`)."""
    q = f"SequenceName = '{name}' AND CurrentStep = 'sleep' AND ExecutionStatus = 'Running'"
    return (await stack.env.client.count_workflows(q)).count


async def _started(stack: Stack, name: str) -> int:
    """Enrollment workflows of `name` the dev server has started (its visibility store)."""
    q = f"WorkflowType = 'Enrollment' AND TaskQueue = '{name}-q'"  # the workflow's registered name
    return (await stack.env.client.count_workflows(q)).count


async def _enroll(stack: Stack, probe: Probe, settings: Any, name: str, segment: str, total: int) -> Phase:
    """Enroll `segment` into `name` and wait until `total` enrollments of `name` sleep."""
    from operations.enrolling import start_audience

    samples: list[Sample] = []
    t0 = time.perf_counter()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            started = await _started(stack, name)
            samples.append(Sample(time.perf_counter() - t0, started, probe.worker_rss(), probe.server_rss()))
            try:
                await asyncio.wait_for(done.wait(), 2.0)  # the sampling period
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    before = await _started(stack, name)
    try:
        await start_audience(stack.session_factory, settings, name, segment, page_size=500)
        deadline = time.monotonic() + 3600
        while await _sleeping(stack, name) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not every enrollment reached its timer within the hour")
            await asyncio.sleep(0.5)  # progress poll
        seconds = time.perf_counter() - t0
    finally:
        done.set()
        await sampler
    return Phase(
        n=total - before,
        seconds=seconds,
        worker_rss=probe.worker_rss(),
        server_rss=probe.server_rss(),
        sqlite_bytes=probe.sqlite_bytes(),
        pg_bytes=await probe.pg_bytes(),
        samples=samples,
    )


def _worker(stack: Stack, tmp: Path, queue: str, cache: int) -> WorkerProcess:
    env = {
        **os.environ,
        "SEQUENCER_ENV": "dev",
        "DATABASE_URL": stack.cluster.url(),
        "TEMPORAL_ADDRESS": stack.env.client.service_client.config.target_host,
        "TEMPORAL_TASK_QUEUE": queue,
        "PUBLIC_BASE_URL": "https://links.bench.test",
        "WORKER_MAX_CACHED_WORKFLOWS": str(cache),
        "WORKER_GRACEFUL_SHUTDOWN_SECONDS": "5",
    }
    return WorkerProcess(env, tmp / f"{queue}.log")


async def _history_bytes(stack: Stack, name: str) -> tuple[int, int]:
    """Events and protobuf bytes of one sleeping enrollment's history."""
    async for wf in stack.env.client.list_workflows(f"SequenceName = '{name}'", limit=1):
        history = await stack.env.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        return len(history.events), sum(e.ByteSize() for e in history.events)
    return 0, 0


async def _campaign(stack: Stack, tmp: Path, sizes: list[int]) -> tuple[str, list[str]]:
    """A sleeping sequence and one segment of fresh leads per size."""
    from services.sequence_store import create_version

    name = f"bench-mem-{uuid.uuid4().hex[:6]}"
    segments = []
    for k, n in enumerate(sizes):
        segment = f"{name}-{k}"
        await seed_people(stack.session_factory, n, segment, tag=segment)
        segments.append(segment)
    await create_version(stack.session_factory, sequence_file(tmp, name, SLEEP))
    return name, segments


@dataclass
class WorkerRun:
    """One worker process enrolling phase after phase."""

    cache: int
    idle_rss: int = 0
    sqlite_before: int = 0
    pg_before: int = 0
    phases: list[Phase] = field(default_factory=list)
    history: tuple[int, int] = (0, 0)


async def _run_worker(stack: Stack, tmp: Path, cache: int, sizes: list[int]) -> WorkerRun:
    """One worker process with `cache`, enrolling `sizes` in turn (each into the same sequence)."""
    from settings import Settings

    name, segments = await _campaign(stack, tmp, sizes)
    queue = f"{name}-q"
    worker = _worker(stack, tmp, queue, cache)
    probe = Probe(stack, worker)
    run = WorkerRun(cache, sqlite_before=probe.sqlite_bytes(), pg_before=await probe.pg_bytes())
    worker.start()
    try:
        await wait_for_pollers(stack.env.client, queue, 1)
        run.idle_rss = probe.worker_rss()
        address = stack.env.client.service_client.config.target_host
        settings = Settings(temporal_address=address, temporal_task_queue=queue)
        total = 0
        for segment, n in zip(segments, sizes, strict=True):
            total += n
            run.phases.append(await _enroll(stack, probe, settings, name, segment, total))
            print(
                f"    cache {cache}: {total} sleeping, worker RSS {run.phases[-1].worker_rss / MIB:.0f} MiB", flush=True
            )
        run.history = await _history_bytes(stack, name)
    finally:
        worker.stop()
    return run


async def bench_memory(tmp: Path, *, small: int = 1000, large: int = 50_000, cached: int = 10_000) -> dict[str, Any]:
    """Worker RSS at `small` and `large` sleeping enrollments (cache 1,000), and `cached` all cached."""
    async with bench_stack(temporal_file=True) as stack:
        bounded = await _run_worker(stack, tmp, 1000, [small, large - small])
        every = await _run_worker(stack, tmp, cached * 5, [small, cached - small])
    one, many = bounded.phases
    c_small, c_all = every.phases
    per_cached = (c_all.worker_rss - c_small.worker_rss) / (cached - small)
    sqlite_per = (many.sqlite_bytes - bounded.sqlite_before) / large
    pg_per = (many.pg_bytes - bounded.pg_before) / large
    events, hist = bounded.history
    peak_worker = max(s.worker_rss for s in many.samples)
    peak_server = max(s.server_rss for s in [*one.samples, *many.samples])
    line = (
        f"memory: sleeping enrollments (WAIT 30d), one worker process. Cache 1,000: idle "
        f"{bounded.idle_rss / MIB:.0f} MiB, {small:,} sleeping {one.worker_rss / MIB:.0f} MiB, {large:,} sleeping "
        f"{many.worker_rss / MIB:.0f} MiB (peak while enrolling {peak_worker / MIB:.0f} MiB; by enrollments "
        f"started: {_trajectory(many.samples)}). Cache {every.cache:,} (every one cached): idle "
        f"{every.idle_rss / MIB:.0f} MiB, {small:,} {c_small.worker_rss / MIB:.0f} MiB, {cached:,} "
        f"{c_all.worker_rss / MIB:.0f} MiB = {per_cached / 1024:.0f} KiB per cached enrollment. Dev server "
        f"(SQLite file, WAL): enrolled {one.rate:.0f}/s for the first {small:,}, {many.rate:.0f}/s for the next "
        f"{large - small:,} (until every one sleeps; starts per 2 s sample: {_rates(many.samples)}); its RSS "
        f"{many.server_rss / MIB:.0f} MiB at {large:,} (peak {peak_server / MIB:.0f} MiB); SQLite "
        f"{many.sqlite_bytes / MIB:.0f} MiB (+{sqlite_per / 1024:.1f} KiB per enrollment); one sleeping "
        f"enrollment's history {events} events, {hist:,} bytes; PostgreSQL +{pg_per / 1024:.1f} KiB per "
        "enrollment (row, first event, indexes; the person and identity rows seeded before are not counted)"
    )
    return {"name": "memory", "line": line}


def _trajectory(samples: list[Sample]) -> str:
    """Worker RSS at a few points of the run (the first sample at or past each)."""
    if not samples:
        return "n/a"
    top = samples[-1].started
    marks = sorted({top * k // 5 for k in range(1, 6)})
    points = [next((s for s in samples if s.started >= m), samples[-1]) for m in marks]
    return ", ".join(f"{p.started:,} {p.worker_rss / MIB:.0f} MiB" for p in points)


def _rates(samples: list[Sample]) -> str:
    """Start rate over the run: the slowest, median and fastest 2-second sample, and the last."""
    rates = [(b.started - a.started) / (b.at - a.at) for a, b in zip(samples, samples[1:], strict=False) if b.at > a.at]
    rates = [r for r in rates if r > 0]
    if not rates:
        return "n/a"
    ordered = sorted(rates)
    return (
        f"min {ordered[0]:.0f}/s, median {ordered[len(ordered) // 2]:.0f}/s, max {ordered[-1]:.0f}/s, "
        f"last {rates[-1]:.0f}/s"
    )

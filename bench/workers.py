"""Several worker processes side by side: the send bench with 1, 2 and 4 `python worker.py`.

Every process is the production worker (all its queues: workflows and each channel's
sends) against one dev server, one PostgreSQL and one SMTP sink. Per process count, two
runs on fresh leads:

- caps off: 1,000 emails from one sender whose caps are out of reach (as bench/send.py),
  emails per second from enrolling to the last message at the sink;
- caps on: 1,000 leads, three senders with the caps `senders add` gives by default (50/h,
  400/day, 60 s apart plus up to 30 s of jitter) and the default person cap (1 a day): how
  fast every lead gets its slot, and whether the governor's slots keep every cap while
  several processes book them at once.

Both runs check what the other side saw: each Message-ID at the sink (its raw bytes)
once, each `sent` row of the ledger at the sink, nothing at the sink the ledger lacks.
The machine has 2 cores: more processes contend with the dev server and PostgreSQL for
them, so more processes may not be faster; the figures record what happened.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from sqlalchemy import text

from bench.common import (
    add_sender,
    ledger_of,
    process_cpu_seconds,
    scalar,
    seed_people,
    sequence_file,
    wait_for_pollers,
)
from bench.fault import FlakySmtp, WorkerProcess
from bench.stack import Stack
from db.session import SessionFactory
from devstack.postgres import free_port

COUNTS = (1, 2, 4)


@dataclass
class Run:
    """One run's figures and findings."""

    processes: int
    caps: bool
    leads: int
    seconds: float = 0.0
    accepted: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0
    slots: int = 0
    cap_report: str = ""

    @property
    def rate(self) -> float:
        done = self.slots if self.caps else self.accepted
        return done / self.seconds if self.seconds else 0.0


async def _campaign(sf: SessionFactory, tmp: Path, n: int, *, caps: bool) -> tuple[str, list[str]]:
    """Fresh leads, the run's own senders and a one-email sequence restricted to them."""
    from services.senders import add_sender as add_default_sender
    from services.sequence_store import create_version

    name = f"bench-w{'cap' if caps else 'free'}-{uuid.uuid4().hex[:6]}"
    await seed_people(sf, n, name, tag=name)
    senders = [f"{name}-{k}@sequencer-bench.com" for k in range(3 if caps else 1)]
    for address in senders:
        if caps:  # the caps and pacing `senders add` gives
            await add_default_sender(sf, channel="email", address=address)
        else:
            await add_sender(sf, address, 10**6, 10**7)
    step: dict[str, Any] = {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi {{ first_name }}"}
    step |= {"body": "Quick question", "edges": [{"trigger": "END"}]}
    await create_version(sf, sequence_file(tmp, name, [step], senders={"email": senders}))
    return name, senders


async def _run(stack: Stack, tmp: Path, n: int, processes: int, *, caps: bool) -> Run:
    from operations.enrolling import start_audience
    from settings import Settings

    sf = stack.session_factory
    run = Run(processes, caps, n)
    name, senders = await _campaign(sf, tmp, n, caps=caps)
    sink = FlakySmtp("127.0.0.1", free_port(), 0.0)
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    address = stack.env.client.service_client.config.target_host
    queue = f"{name}-q"
    env = {
        **os.environ,
        "SEQUENCER_ENV": "dev",
        "DATABASE_URL": stack.cluster.url(),
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_TASK_QUEUE": queue,
        "SMTP_HOST": sink.host,
        "SMTP_PORT": str(sink.port),
        "SMTP_POOL_SIZE": "8",  # as bench/send.py's worker
        "PUBLIC_BASE_URL": "https://links.bench.test",
        "WORKER_GRACEFUL_SHUTDOWN_SECONDS": "20",
    }
    workers = [WorkerProcess(env, tmp / f"{name}-worker{i}.log") for i in range(processes)]
    try:
        for w in workers:
            w.start()
        await wait_for_pollers(stack.env.client, queue, processes)
        await wait_for_pollers(stack.env.client, f"{queue}-email", processes, activities=True)
        settings = Settings(temporal_address=address, temporal_task_queue=queue)
        t0 = time.perf_counter()
        await start_audience(sf, settings, name, name, page_size=500)
        if caps:
            run.slots = await _until(lambda: _slots(sf, senders), n)
        else:
            await _until(lambda: len(sink.accepted), n)
        run.seconds = time.perf_counter() - t0
        if not caps:
            await _until(lambda: _finished(sf, name), n)
        run.cpu_seconds = sum(process_cpu_seconds(w.proc.pid) for w in workers if w.proc is not None)
    finally:
        for w in workers:
            w.stop()
        controller.stop()
    await _judge(sf, name, sink, run)
    if caps:
        run.cap_report = await _check_caps(sf, senders, run)
    return run


async def _until(count: Callable[[], Any], n: int, *, limit: float = 1800.0) -> int:
    """Poll `count()` (a number, or an awaitable of one) until it reaches n (a progress poll, bounded)."""
    deadline = time.monotonic() + limit
    while True:
        got = count()
        got = await got if inspect.isawaitable(got) else got
        if got >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {got} of {n} after {limit:.0f} s")
        await asyncio.sleep(0.05)
    return int(got)


async def _slots(sf: SessionFactory, senders: list[str]) -> int:
    return int(
        await scalar(
            sf,
            "SELECT count(*) FROM send_slots s JOIN sender_accounts a ON a.id = s.sender_id "
            "WHERE a.address = ANY(:senders) AND s.released_at IS NULL",
            senders=senders,
        )
    )


async def _finished(sf: SessionFactory, name: str) -> int:
    return int(
        await scalar(
            sf,
            "SELECT count(*) FROM enrollments e JOIN sequences s ON s.id = e.sequence_id "
            "WHERE s.name = :n AND e.finished_at IS NOT NULL",
            n=name,
        )
    )


async def _judge(sf: SessionFactory, name: str, sink: FlakySmtp, run: Run) -> None:
    """The sink's Message-IDs against the ledger: each once, each `sent` row there, no stranger."""
    at_sink = sink.message_ids()
    run.accepted = sum(at_sink.values())
    run.duplicates = sum(k - 1 for k in at_sink.values() if k > 1)
    rows = await ledger_of(sf, name)
    statuses = Counter(status for status, _ in rows)
    sent = {mid.encode() for status, mid in rows if status == "sent" and mid}
    if statuses["sent"] != len(sent):
        run.problems.append(f"{statuses['sent'] - len(sent)} sent rows share a Message-ID or have none")
    if missing := sent - set(at_sink):
        run.problems.append(f"{len(missing)} sent in the ledger, never at the sink")
    if strangers := set(at_sink) - sent:
        run.problems.append(f"{len(strangers)} at the sink without a sent ledger row")
    if not run.caps and statuses["sent"] != run.leads:
        run.problems.append(f"ledger: {dict(statuses)} for {run.leads} leads")


async def _check_caps(sf: SessionFactory, senders: list[str], run: Run) -> str:
    """The governor's live slots against each sender's caps and the person cap, across processes."""
    async with sf() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT a.address, a.per_hour, a.per_day, a.min_spacing_seconds, s.slot_at, s.person_id "
                    "FROM send_slots s JOIN sender_accounts a ON a.id = s.sender_id "
                    "WHERE a.address = ANY(:senders) AND s.released_at IS NULL ORDER BY s.slot_at"
                ),
                {"senders": senders},
            )
        ).all()
    by_sender: dict[str, list[datetime]] = defaultdict(list)
    caps: dict[str, tuple[int, int, float]] = {}
    people: dict[int, list[datetime]] = defaultdict(list)
    for address, per_hour, per_day, spacing, slot_at, person_id in rows:
        by_sender[address].append(slot_at)
        caps[address] = (per_hour, per_day, spacing)
        people[person_id].append(slot_at)
    hour_max = day_max = 0
    gap_min = float("inf")
    for address, slots in by_sender.items():
        per_hour, per_day, spacing = caps[address]
        busiest_hour = _busiest(slots, timedelta(hours=1))
        busiest_day = max(Counter(s.date() for s in slots).values())  # the senders' zone is UTC
        gap = min(((b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)), default=spacing)
        hour_max, day_max, gap_min = max(hour_max, busiest_hour), max(day_max, busiest_day), min(gap_min, gap)
        if busiest_hour > per_hour or busiest_day > per_day or gap < spacing:
            run.problems.append(
                f"{address}: busiest hour {busiest_hour}/{per_hour}, day {busiest_day}/{per_day}, "
                f"closest gap {gap:.0f} s/{spacing:.0f} s"
            )
    person_max = max((_busiest(sorted(v), timedelta(hours=24)) for v in people.values()), default=0)
    if person_max > 1:
        run.problems.append(f"a person got {person_max} touches in 24 hours (cap 1)")
    per_hour, per_day, spacing = next(iter(caps.values()))
    return (
        f"{len(by_sender)} senders, busiest rolling hour {hour_max} (cap {per_hour}), busiest day {day_max} "
        f"(cap {per_day}), closest slots {gap_min:.0f} s apart (min {spacing:.0f} s), "
        f"most touches per person in 24 h {person_max} (cap 1)"
    )


def _busiest(ordered: list[datetime], window: timedelta) -> int:
    """The most items in any window of `window` (two pointers over sorted times)."""
    worst = j = 0
    for i, t in enumerate(ordered):
        while ordered[j] <= t - window:
            j += 1
        worst = max(worst, i - j + 1)
    return worst


async def bench_workers(stack: Stack, n: int, tmp: Path) -> dict[str, Any]:
    """1, 2 and 4 worker processes: caps off (emails/s) and caps on (slots/s, caps checked)."""
    await _run(stack, tmp, max(n // 10, 1), 1, caps=False)  # warm-up (the dev server's first workflows), not counted
    runs = []
    for processes in COUNTS:
        for caps in (False, True):
            run = await _run(stack, tmp, n, processes, caps=caps)
            print(f"    {_describe(run)}", flush=True)
            runs.append(run)
    problems = [p for r in runs for p in r.problems]
    free = {r.processes: r.rate for r in runs if not r.caps}
    verdict = "no duplicate, every sent row at the sink, no cap exceeded" if not problems else "; ".join(problems)
    return {
        "name": "workers",
        "line": f"workers: {n} emails caps off with 1/2/4 worker processes: "
        + ", ".join(f"{p} -> {rate:.1f}/s ({rate / free[1]:.2f}x)" for p, rate in free.items())
        + "; caps on (3 default senders, person cap 1): "
        + ", ".join(f"{r.processes} -> {r.rate:.1f} slots/s" for r in runs if r.caps)
        + f"; {sum(r.duplicates for r in runs)} duplicates in {sum(r.accepted for r in runs)} accepted; {verdict}. "
        + " | ".join(_describe(r) for r in runs),
    }


def _describe(run: Run) -> str:
    what = (
        f"{run.slots} slots booked at {run.rate:.1f}/s, {run.accepted} sent so far; {run.cap_report}"
        if run.caps
        else f"{run.accepted} emails at {run.rate:.1f}/s"
    )
    return (
        f"{run.processes} process(es), caps {'on' if run.caps else 'off'}: {what}; "
        f"{run.duplicates} duplicates; worker CPU {run.cpu_seconds:.0f} s in {run.seconds:.0f} s"
        + (f"; PROBLEMS: {'; '.join(run.problems)}" if run.problems else "")
    )

"""The fault run: a campaign while the worker is SIGKILLed and restarted, SMTP answers 451 to a
share of messages, and (in the bench) the Temporal dev server restarts once.

Why a module of its own: the same run is a test in the suite (tests/test_fault_run.py, ≥100
leads, a few kills, asserted) and the full `make bench` run (several hundred leads, ~30
kills, one server restart, recorded in bench/RESULTS.md). The worker is the real
`python worker.py` in a subprocess, so a kill is a real SIGKILL: no `finally`, no graceful
shutdown, a send cut wherever it was. What the SMTP server accepted (raw bytes, grouped by
their Message-ID header) is the verdict:

- duplicates: a Message-ID accepted more than once (target 0);
- unrecorded losses: a lead whose message is not at the server and whose ledger row does not
  say why (`uncertain`, `failed`, `bounced`), or a `sent` row without its message (target 0);
- seconds from the last fault (kill, 451, server restart) to the campaign finished (target
  within 60 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from sqlalchemy import text

from bench.common import ledger_of, scalar
from db.session import SessionFactory
from devstack.postgres import free_port
from models.outcomes import DeliveryStatus

ROOT = Path(__file__).resolve().parent.parent
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


@dataclass
class FlakySmtp:
    """An SMTP server that answers 451 to a share of messages and records the rest, raw."""

    host: str
    port: int
    fail_share: float
    seed: int = 11
    accepted: list[bytes] = field(default_factory=list)
    refused: int = 0
    last_refused_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            if self.rng.random() < self.fail_share:
                self.refused += 1
                self.last_refused_at = time.monotonic()
                return "451 4.3.0 Temporary failure, try again later"
            self.accepted.append(bytes(envelope.content))
        return "250 2.0.0 Accepted"

    def message_ids(self) -> Counter[bytes]:
        """How often each Message-ID was accepted."""
        with self.lock:
            found = [_MESSAGE_ID.search(raw) for raw in self.accepted]
        return Counter(m.group(1) for m in found if m)


@dataclass
class FaultReport:
    """What the run did and what came out of it."""

    leads: int
    messages_expected: int
    kills: int = 0
    refused_451: int = 0
    server_restarts: int = 0
    accepted: int = 0
    duplicates: int = 0
    uncertain: int = 0
    failed: int = 0
    unrecorded: int = 0
    unfinished: int = 0
    seconds_after_last_fault: float | None = None
    seconds_total: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        after = f"{self.seconds_after_last_fault:.1f} s" if self.seconds_after_last_fault is not None else "never"
        return (
            f"fault run: {self.leads} leads x {self.messages_expected // max(self.leads, 1)} emails, "
            f"{self.kills} SIGKILLs, {self.refused_451} SMTP 451s, {self.server_restarts} Temporal restart(s): "
            f"{self.accepted} accepted, {self.duplicates} duplicates, {self.uncertain} uncertain, "
            f"{self.failed} failed, {self.unrecorded} unrecorded losses, {self.unfinished} unfinished; "
            f"finished {after} after the last fault ({self.seconds_total:.0f} s in all; "
            "targets: 0 duplicates, 0 unrecorded, <= 60 s)"
        )


class WorkerProcess:
    """`python worker.py` in a subprocess, restartable, killable with SIGKILL."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - our own worker, our own interpreter
            [sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=self.env, stdout=log, stderr=log
        )
        log.close()
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


async def run_fault_campaign(
    *,
    session_factory: SessionFactory,
    database_url: str,
    temporal_address: str,
    tmp: Path,
    leads: int,
    emails: int = 1,
    kills: int,
    kill_every: tuple[float, float] = (2.0, 4.0),
    fail_share: float = 0.2,
    restart_server: Callable[[], Awaitable[None]] | None = None,
    restart_after_kill: int | None = None,
    deadline_seconds: float = 300.0,
    seed: int = 7,
) -> FaultReport:
    """Run the campaign under faults and report; never raises for a bad outcome (the caller judges)."""
    from bench.common import add_sender, seed_people, sequence_file
    from operations.enrolling import start_audience
    from services.sequence_store import create_version
    from settings import Settings

    rng = random.Random(seed)
    started = time.monotonic()
    report = FaultReport(leads=leads, messages_expected=leads * emails)
    smtp = FlakySmtp("127.0.0.1", free_port(), fail_share)
    controller = Controller(smtp, hostname=smtp.host, port=smtp.port)
    controller.start()
    name = f"fault-{uuid.uuid4().hex[:6]}"
    queue = f"{name}-q"
    await add_sender(session_factory, f"{name}@acme.test", per_hour=100_000, per_day=1_000_000)
    await seed_people(session_factory, leads, name, tag=name)
    steps: list[dict[str, Any]] = []
    for i in range(emails):
        last = i + 1 == emails
        steps.append(
            {
                "id": f"m{i}",
                "action": "SEND_EMAIL",
                "subject": f"Mail {i} for {{{{ first_name }}}}",
                "body": f"Body {i}",
                "edges": [{"trigger": "END"}]
                if last
                else [{"trigger": "NORMAL_EDGE", "after": "2s", "to": f"m{i + 1}"}],
            }
        )
    await create_version(session_factory, sequence_file(tmp, name, steps))
    env = {
        **os.environ,
        "SEQUENCER_ENV": "dev",
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "TEMPORAL_TASK_QUEUE": queue,
        "SMTP_HOST": smtp.host,
        "SMTP_PORT": str(smtp.port),
        "SMTP_POOL_SIZE": "8",
        "PUBLIC_BASE_URL": "https://links.fault.test",
        "WORKER_GRACEFUL_SHUTDOWN_SECONDS": "5",
        # the default person cap (1 a day) would hold a second email for 24 hours
        "PERSON_DAILY_TOUCH_CAP": "1" if emails == 1 else "0",
    }
    worker = WorkerProcess(env, tmp / f"{name}-worker.log")
    worker.start()
    last_fault = time.monotonic()
    try:
        settings = Settings(temporal_address=temporal_address, temporal_task_queue=queue)
        await start_audience(session_factory, settings, name, name, page_size=100, wait=True)
        deadline = time.monotonic() + deadline_seconds
        for k in range(kills):
            await asyncio.sleep(rng.uniform(*kill_every))  # the fault schedule, not a wait for a timer
            worker.kill()
            report.kills += 1
            last_fault = time.monotonic()
            if restart_server is not None and restart_after_kill is not None and k + 1 == restart_after_kill:
                await restart_server()
                report.server_restarts += 1
                last_fault = time.monotonic()
            worker.start()
        finished_at: float | None = None
        while time.monotonic() < deadline:
            if not worker.alive():  # it may exit on its own while the server is away
                worker.start()
            done = await scalar(
                session_factory,
                "SELECT count(*) FROM enrollments e JOIN sequences s ON s.id = e.sequence_id "
                "WHERE s.name = :n AND e.finished_at IS NOT NULL",
                n=name,
            )
            if done == leads:
                finished_at = time.monotonic()
                break
            await asyncio.sleep(0.5)  # progress poll
        report.refused_451 = smtp.refused
        if smtp.last_refused_at > last_fault:
            last_fault = smtp.last_refused_at
        if finished_at is not None:
            report.seconds_after_last_fault = max(0.0, finished_at - last_fault)
    finally:
        worker.stop()
        controller.stop()
    report.seconds_total = time.monotonic() - started
    await _judge(session_factory, name, smtp, report)
    return report


async def _judge(sf: SessionFactory, name: str, smtp: FlakySmtp, report: FaultReport) -> None:
    """Compare what the server accepted with the ledger and the enrollments."""
    counts = smtp.message_ids()
    report.accepted = sum(counts.values())
    report.duplicates = sum(n - 1 for n in counts.values() if n > 1)
    rows = await ledger_of(sf, name)
    async with sf() as session:
        report.unfinished = (
            await session.execute(
                text(
                    "SELECT count(*) FROM enrollments e JOIN sequences s ON s.id = e.sequence_id "
                    "WHERE s.name = :n AND e.finished_at IS NULL"
                ),
                {"n": name},
            )
        ).scalar_one()
    recorded = {DeliveryStatus.UNCERTAIN, DeliveryStatus.FAILED, DeliveryStatus.BOUNCED}
    report.uncertain = sum(1 for status, _ in rows if status == DeliveryStatus.UNCERTAIN)
    report.failed = sum(1 for status, _ in rows if status in (DeliveryStatus.FAILED, DeliveryStatus.BOUNCED))
    at_server = set(counts)
    for status, message_id in rows:
        there = message_id is not None and message_id.encode() in at_server
        if status == DeliveryStatus.SENT and not there:
            report.unrecorded += 1
            report.problems.append(f"ledger says sent, server never accepted {message_id}")
        elif status not in recorded and status != DeliveryStatus.SENT:
            report.unrecorded += 1
            report.problems.append(f"delivery left {status} ({message_id})")
    missing_rows = report.messages_expected - len(rows)
    if missing_rows > 0 and report.unfinished:
        report.problems.append(f"{missing_rows} deliveries never reached the ledger")
    ours = {row[1].encode() for row in rows if row[1]}
    strangers = [m for m in at_server if m not in ours]
    if strangers:
        report.problems.append(f"{len(strangers)} accepted messages match no ledger row")


async def bench_fault(args: Any, tmp: Path) -> dict[str, Any]:
    """`make bench`: several hundred leads, ~30 kills, one Temporal dev-server restart.

    Runs on its own PostgreSQL and a dev server it can restart (state in a SQLite file on a
    fixed port), not on the shared bench stack.
    """
    from alembic import command
    from alembic.config import Config
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    from db.session import make_engine, make_session_factory
    from devstack.postgres import Cluster
    from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

    cluster = Cluster(tmp / "fault-pg", free_port())
    cluster.init()
    cluster.start(fast=True)
    cluster.ensure_database()
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", cluster.url())
    cfg.attributes["configure_logger"] = False
    await asyncio.to_thread(command.upgrade, cfg, "head")
    engine = make_engine(cluster.url(), pool_size=10)
    port = free_port()
    db_file = tmp / "fault-temporal.db"

    async def start() -> WorkflowEnvironment:
        return await WorkflowEnvironment.start_local(
            data_converter=pydantic_data_converter,
            dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
            search_attributes=ALL_SEARCH_ATTRIBUTES if not db_file.exists() else (),
            ui=False,
            port=port,
            dev_server_log_level="error",
            dev_server_extra_args=["--db-filename", str(db_file)],
        )

    holder = {"env": await start()}

    async def restart() -> None:
        await holder["env"].shutdown()
        holder["env"] = await start()

    try:
        report = await run_fault_campaign(
            session_factory=make_session_factory(engine),
            database_url=cluster.url(),
            temporal_address=f"127.0.0.1:{port}",
            tmp=tmp,
            leads=getattr(args, "fault_leads", 300),
            emails=2,
            kills=30,
            kill_every=(3.0, 8.0),
            fail_share=0.2,
            restart_server=restart,
            restart_after_kill=15,
            deadline_seconds=900,
        )
    finally:
        await holder["env"].shutdown()
        await engine.dispose()
        cluster.stop()
    for problem in report.problems[:10]:
        print("  problem:", problem, flush=True)
    return {"line": report.line(), "report": report}

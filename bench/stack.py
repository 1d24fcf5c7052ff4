"""A throwaway stack for benchmarks: PostgreSQL, the Temporal dev server, an SMTP sink.

Benchmarks compare the engine against a baseline measured in the same run on the same
servers, so both sides share this stack.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from alembic import command
from alembic.config import Config
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory, make_engine, make_session_factory
from devstack.postgres import Cluster, free_port
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sink:
    """An SMTP server that counts what it accepts (and when)."""

    host: str
    port: int
    count: int = 0
    recipients: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        import time

        with self.lock:
            self.count += 1
            for rcpt in envelope.rcpt_tos:
                self.recipients.append((time.time(), rcpt))
        return "250 OK"


@dataclass
class Stack:
    """Handles to everything a benchmark needs."""

    env: WorkflowEnvironment
    session_factory: SessionFactory
    sink: Sink
    cluster: Cluster
    #: The dev server's SQLite file (with `temporal_file`; None in memory).
    temporal_db: Path | None = None


@asynccontextmanager
async def bench_stack(*, temporal_file: bool = False) -> AsyncIterator[Stack]:
    """Start PostgreSQL (migrated), the dev server and an SMTP sink; stop them after.

    `temporal_file` keeps the dev server's state in a SQLite file in WAL mode, as `make run`
    does, instead of in memory (for capacity runs that hold many open workflows).
    """
    tmp = Path(tempfile.mkdtemp(prefix="sequencer-bench-"))
    cluster = Cluster(tmp / "pg", free_port())
    cluster.init()
    cluster.start(fast=True)
    cluster.ensure_database()
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", cluster.url())
    cfg.attributes["configure_logger"] = False
    await asyncio.to_thread(command.upgrade, cfg, "head")  # env.py runs its own event loop
    engine = make_engine(cluster.url(), pool_size=20)
    sink = Sink("127.0.0.1", free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        search_attributes=ALL_SEARCH_ATTRIBUTES,
        ui=False,
        dev_server_log_level="error",
        dev_server_extra_args=(
            [
                "--db-filename",
                str(tmp / "temporal.db"),
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
            ]
            if temporal_file
            else []
        ),
    )
    try:
        yield Stack(env, make_session_factory(engine), sink, cluster, tmp / "temporal.db" if temporal_file else None)
    finally:
        await env.shutdown()
        controller.stop()
        await engine.dispose()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)

"""Send throughput: the engine to an SMTP sink with caps off vs raw pooled aiosmtplib sends to the same sink."""

from __future__ import annotations

import asyncio
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from bench.common import (
    add_sender,
    engine_worker,
    gather_bounded,
    seed_people,
    sequence_file,
)
from bench.stack import Stack


async def bench_send(stack: Stack, n: int, tmp: Path) -> dict[str, Any]:
    """Engine email throughput (caps off) vs raw pooled aiosmtplib sends."""
    from activities.channels.email import SmtpPool
    from services.enrolling import start_audience
    from services.sequence_store import create_version
    from settings import Settings

    pool = SmtpPool(stack.sink.host, stack.sink.port, size=8)
    before = stack.sink.count

    async def raw(i: int) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "bench@bench.test", f"raw{i}@leads.bench", "Hi"
        msg.set_content("Quick question")
        await pool.send(msg, "bench@bench.test", [f"raw{i}@leads.bench"])

    t0 = time.perf_counter()
    await gather_bounded(n, 32, raw)
    raw_s = time.perf_counter() - t0
    await pool.aclose()
    assert stack.sink.count - before == n
    name = f"bench-send-{uuid.uuid4().hex[:6]}"
    await seed_people(stack.session_factory, n, name, tag=name)
    await add_sender(stack.session_factory, f"{name}@bench.test", 10**6, 10**7)
    await create_version(
        stack.session_factory,
        sequence_file(
            tmp,
            name,
            [
                {
                    "id": "mail",
                    "action": "SEND_EMAIL",
                    "subject": "Hi {{ first_name }}",
                    "body": "Quick question",
                    "edges": [{"trigger": "END"}],
                }
            ],
        ),
    )
    q = f"send-{uuid.uuid4().hex[:6]}"
    settings = Settings(temporal_address=stack.env.client.service_client.config.target_host, temporal_task_queue=q)
    async with engine_worker(stack, q):
        before = stack.sink.count
        t0 = time.perf_counter()
        await start_audience(stack.session_factory, settings, name, name, page_size=500)
        while stack.sink.count - before < n:
            await asyncio.sleep(0.05)
        eng_s = time.perf_counter() - t0
    raw_rate, eng_rate = n / raw_s, n / eng_s
    return {
        "name": "send",
        "line": f"send {n} emails: raw pooled aiosmtplib {raw_rate:.0f}/s, engine {eng_rate:.0f}/s "
        f"(enroll + claim + render + send + ledger), ratio {eng_rate / raw_rate:.2f}x",
    }

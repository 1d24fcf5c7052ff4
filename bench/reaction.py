"""Reaction: reply signal to branch taken (p50/p99) vs a bare signal round trip (target p99 <= 1.5x)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    engine_worker,
    pct,
    round_trip_baseline,
    wait_phase,
    waiting_leads,
)
from bench.stack import Stack


async def bench_reaction(stack: Stack, n: int, tmp: Path) -> dict[str, Any]:
    """Reply signal → branch taken, vs a bare signal round trip."""
    from models.enrollment import InboundSignal
    from workflows.enrollment import EnrollmentWorkflow, workflow_id_for

    client = stack.env.client
    base = await round_trip_baseline(client, n)
    q = f"react-{uuid.uuid4().hex[:6]}"
    async with engine_worker(stack, q):
        name, ids = await waiting_leads(stack, tmp, q, n, with_email=False)
        wids = [workflow_id_for(name, i) for i in ids]
        await wait_phase(client, wids)
        lat = []
        for wid in wids:
            h = client.get_workflow_handle(wid)
            t0 = time.perf_counter()
            await h.signal(
                EnrollmentWorkflow.replied,
                InboundSignal(event_id=uuid.uuid4().hex, channel="email"),
            )
            while (await h.query(EnrollmentWorkflow.status)).current_step != "done":
                pass
            lat.append(time.perf_counter() - t0)
    return {
        "name": "reaction",
        "line": f"reaction ({n} leads): branch p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms; "
        f"bare signal p50 {pct(base, 50):.1f} ms p99 {pct(base, 99):.1f} ms; "
        f"p99 ratio {pct(lat, 99) / pct(base, 99):.2f}x (target <= 1.5x)",
    }

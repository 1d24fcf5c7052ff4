"""Governor: slots granted for one capped sender, four workers at once, vs the configured cap (target >= 0.95x)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import (
    add_sender,
    gather_bounded,
)
from bench.stack import Stack


async def bench_governed(stack: Stack, n: int) -> dict[str, Any]:
    """Governor grants vs the configured cap, four workers at once."""
    from activities.governor import SendGovernor
    from db.session import make_engine, make_session_factory

    per_hour = 120
    spacing = 3600 / per_hour  # an even pace: the cap without bursts
    address = f"gov-{uuid.uuid4().hex[:6]}@bench.test"
    await add_sender(stack.session_factory, address, per_hour, per_hour * 24, spacing=spacing)
    engines = [make_engine(stack.cluster.url(), pool_size=4) for _ in range(4)]
    governors = [SendGovernor(make_session_factory(e)) for e in engines]
    now = datetime.now(UTC).replace(microsecond=0)

    async def one(i: int) -> datetime:
        r = await governors[i % 4].reserve(
            delivery_key=f"{address}:{i}",
            channel="email",
            person_id=None,
            now=now,
            not_before=now,
            allowed_senders=[address],
            counts_as_touch=False,
        )
        return r.slot_at

    t0 = time.perf_counter()
    slots = sorted(await gather_bounded(n, 16, one))
    took = time.perf_counter() - t0
    for e in engines:
        await e.dispose()
    span_h = ((slots[-1] - slots[0]).total_seconds() + spacing) / 3600  # the last slot's own share
    achieved = len(slots) / span_h
    worst = 0
    j = 0
    for i, s in enumerate(slots):
        while slots[j] <= s - timedelta(hours=1):
            j += 1
        worst = max(worst, i - j + 1)
    return {
        "name": "governed",
        "line": f"governed {n} slots, 4 workers: {achieved:.1f}/h granted vs cap {per_hour}/h, "
        f"ratio {achieved / per_hour:.3f}x (target >= 0.95x); busiest rolling hour {worst} "
        f"(cap {per_hour}); {n / took:.0f} reservations/s",
    }

"""Webhook: signed reply received to workflow branched (p50/p99) with waiting leads vs a bare signal round trip."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.common import (
    add_sender,
    engine_worker,
    pct,
    round_trip_baseline,
    wait_phase,
    waiting_leads,
)
from bench.stack import Stack


async def bench_webhook(stack: Stack, leads: int, replies: int, tmp: Path) -> dict[str, Any]:
    """Signed webhook → branched at 20/s with many waiting leads; sends after reply."""
    import json

    import httpx
    import uvicorn

    from services.classify import get_classifier
    from settings import Settings
    from webhooks.app import create_app
    from webhooks.signature import sign
    from workflows.enrollment import EnrollmentWorkflow, workflow_id_for

    client = stack.env.client
    base = await round_trip_baseline(client, min(replies, 200))
    q = f"hook-{uuid.uuid4().hex[:6]}"
    secret = "bench-secret"
    settings = Settings(webhook_secret=SecretStr(secret), temporal_task_queue=q)
    app = create_app(settings, session_factory=stack.session_factory, client=client)
    port = __import__("devstack.postgres", fromlist=["free_port"]).free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    serve = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    _ = get_classifier
    async with engine_worker(stack, q):
        await add_sender(stack.session_factory, f"{q}@bench.test", 10**6, 10**7)
        name, ids = await waiting_leads(stack, tmp, q, leads, with_email=True)
        wids = {i: workflow_id_for(name, i) for i in ids}
        await wait_phase(client, list(wids.values()))
        chosen = ids[:replies]
        print(f"  {len(wids)} leads waiting; replying to {len(chosen)} at 20/s", flush=True)
        posted_at: dict[int, float] = {}
        answer: list[float] = []
        replied_at: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def reply(k: int, pid: int) -> None:
                await asyncio.sleep(k / 20)  # 20 replies per second
                body = json.dumps(
                    {
                        "event_id": uuid.uuid4().hex,
                        "type": "reply",
                        "from": f"{name}-{pid}@leads.bench",
                        "text": "Sounds good, let's talk",
                    }
                ).encode()
                replied_at[f"{name}-{pid}@leads.bench"] = posted_at[pid] = time.time()
                t0 = time.perf_counter()
                r = await http.post(
                    "/webhooks/email",
                    content=body,
                    headers={
                        "X-Signature": sign(secret, body, int(time.time()), channel="email"),
                        "Content-Type": "application/json",
                    },
                )
                answer.append(time.perf_counter() - t0)
                assert r.status_code == 202, r.text

            await asyncio.gather(*(reply(k, pid) for k, pid in enumerate(chosen)))
        # When each lead branched is the workflow's own clock at the task that took the REPLIED
        # edge (the start of the next step), read once per lead afterwards: polling 200 leads
        # with queries while they branch would be a load of its own.
        lat: list[float] = []
        for pid in chosen:
            h = client.get_workflow_handle(wids[pid])
            for _ in range(3000):
                view = await h.query(EnrollmentWorkflow.status)
                if view.current_step == "done":
                    break
                await asyncio.sleep(0.01)
            started = next(p.started_at for p in view.path if p.step == "done")
            lat.append(started.timestamp() - posted_at[pid])
        sends_after = sum(1 for t, rcpt in stack.sink.recipients if rcpt in replied_at and t > replied_at[rcpt])
    server.should_exit = True
    await serve
    return {
        "name": "webhook",
        "line": f"webhook ({leads} waiting, {replies} replies at 20/s): received→branched p50 {pct(lat, 50):.1f} ms "
        f"p99 {pct(lat, 99):.1f} ms (webhook answered p50 {pct(answer, 50):.1f} ms p99 {pct(answer, 99):.1f} ms); "
        f"bare signal p50 {pct(base, 50):.1f} ms p99 {pct(base, 99):.1f} ms; "
        f"p99 ratio {pct(lat, 99) / pct(base, 99):.2f}x; sends after a reply: {sends_after} (must be 0)",
    }

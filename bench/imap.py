"""IMAP: reply appended to the sender's mailbox to workflow branched (p50/p99), vs the signed webhook, same run.

2,000 leads wait on REPLIED; replies from 200 of them are APPENDed to a
real IMAP server (pymap, in-memory backend: new mail is pushed to IDLE at once) at 20 per
second while the mailbox watcher holds IDLE; then 200 others reply through the signed
webhook at 20 per second, on the same stack, the same worker and the same leads' sequence.
Latency is the workflow's own clock at the task that took the REPLIED edge minus the time
the reply was handed to the server (APPEND sent / POST sent). Targets (issue 13): IMAP p99
under 1 s and at most 1.5x the webhook path.

The leads wait at a CHECK_FOR_REPLY step (`after_email=False`, the default): both paths
find the person by the reply's From, the pipeline's first lookup, and the setup does not
depend on 2,000 emails going out first on a loaded machine. `after_email=True` mails each
lead first and threads the replies under that email (In-Reply-To / References).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import add_sender, engine_worker, pct, wait_phase, waiting_leads
from bench.stack import Stack


async def _branched_at(client: Any, wid: str) -> float:
    from workflows.enrollment import EnrollmentWorkflow

    h = client.get_workflow_handle(wid)
    view = None
    for _ in range(6000):
        view = await h.query(EnrollmentWorkflow.status)
        if view.current_step == "done":
            break
        await asyncio.sleep(0.01)
    assert view is not None and view.current_step == "done", f"{wid} never branched: {view}"
    return next(p.started_at for p in view.path if p.step == "done").timestamp()


async def bench_imap(stack: Stack, leads: int, replies: int, tmp: Path, *, after_email: bool = False) -> dict[str, Any]:
    """Replies by IMAP APPEND and by signed webhook, 20/s each, to leads waiting among `leads`."""
    import aioimaplib
    import httpx
    import uvicorn
    from pydantic import SecretStr
    from sqlalchemy import select

    from db.tables import Delivery, Enrollment, InboundEvent, SenderAccount
    from devstack.imap_server import ImapServer
    from devstack.postgres import free_port
    from operations.mailbox_watchers import start_watcher
    from services.sender_connections import MailConnection
    from settings import Settings
    from webhooks.app import create_app
    from webhooks.signature import sign
    from worker import WorkerDeps, build_worker
    from workflows.enrollment import workflow_id_for

    client = stack.env.client
    sf = stack.session_factory
    q = f"imap-{uuid.uuid4().hex[:6]}"
    address = f"{q}@bench.test"
    imap = ImapServer.start(free_port(), backend="dict", user=address, password="bench-imap")
    secret = "bench-secret"
    settings = Settings(sequencer_env="dev", webhook_secret=SecretStr(secret), temporal_task_queue=q)
    app = create_app(settings, session_factory=sf, client=client)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    serve = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        await add_sender(sf, address, 10**6, 10**7)
        async with sf() as s:
            sender_id = int(
                (await s.execute(select(SenderAccount.id).where(SenderAccount.address == address))).scalar_one()
            )

        async def connection(sid: int) -> MailConnection:
            return MailConnection(
                id=1,
                sender_id=sid,
                address=address,
                kind="imap",
                host=imap.host,
                port=imap.port,
                security="plain",
                username=address,
                auth="password",
                password=imap.password,
                folder="INBOX",
            )

        from activities.delivery import DeliveryConfig

        watcher_deps = WorkerDeps(
            session_factory=sf,
            channels={},
            delivery=DeliveryConfig(
                public_base_url="https://links.bench.test", link_secret="bench", postal_address="x"
            ),
            settings=settings,
            mailbox_connections=connection,
        )
        mail_q = f"{q}-mail"
        async with engine_worker(stack, q), build_worker(client, mail_q, watcher_deps):
            name, ids = await waiting_leads(stack, tmp, q, leads, with_email=after_email)
            wids = {i: workflow_id_for(name, i) for i in ids}
            await wait_phase(client, list(wids.values()))
            await start_watcher(client, sender_id, mail_q)
            for _ in range(3000):  # until the watcher holds IDLE
                async with sf() as s:
                    from db.tables import MailboxState

                    st = await s.get(MailboxState, sender_id)
                if st is not None and st.status == "watching":
                    break
                await asyncio.sleep(0.02)
            async with sf() as s:
                rows = (
                    await s.execute(
                        select(Enrollment.person_id, Delivery.message_id)
                        .join(Delivery, Delivery.enrollment_id == Enrollment.id)
                        .where(Enrollment.person_id.in_(ids[: 2 * replies]), Delivery.message_id.is_not(None))
                    )
                ).all()
            ours = {int(r.person_id): str(r.message_id) for r in rows}
            threads = {pid: f"In-Reply-To: {mid}\r\nReferences: {mid}\r\n" for pid, mid in ours.items()}
            by_imap = ids[:replies]
            by_hook = ids[replies : 2 * replies]
            print(f"  {len(wids)} leads waiting; {replies} replies by IMAP, then {replies} by webhook, at 20/s")

            # ---- IMAP: one connection APPENDs at 20/s (as a mail server delivering them)
            appended_at: dict[int, float] = {}
            mids: dict[int, str] = {}
            appender = aioimaplib.IMAP4(host=imap.host, port=imap.port, timeout=30)
            await appender.wait_hello_from_server()
            await appender.login(imap.user, imap.password)
            start = time.perf_counter()
            for k, pid in enumerate(by_imap):
                delay = start + k / 20 - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                mids[pid] = f"<r{pid}.{uuid.uuid4().hex[:8]}@leads.bench>"
                raw = (
                    f"From: <{name}-{pid}@leads.bench>\r\nTo: <{address}>\r\nSubject: Re: Hi\r\n"
                    f"Message-ID: {mids[pid]}\r\n"
                    f"{threads.get(pid, '')}\r\nSounds good, let's talk\r\n"
                ).encode()
                appended_at[pid] = time.time()
                await appender.append(raw, mailbox="INBOX")
            await appender.logout()
            imap_done = {pid: await _branched_at(client, wids[pid]) for pid in by_imap}
            imap_lat = [imap_done[pid] - appended_at[pid] for pid in by_imap]
            print(
                f"  IMAP: appended→branched p50 {pct(imap_lat, 50):.1f} ms p99 {pct(imap_lat, 99):.1f} ms", flush=True
            )

            # ---- the signed webhook, same leads' sequence, same worker, at 20/s
            posted_at: dict[int, float] = {}
            eids: dict[int, str] = {}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:

                async def reply(k: int, pid: int) -> None:
                    await asyncio.sleep(k / 20)
                    eids[pid] = uuid.uuid4().hex
                    body = json.dumps(
                        {
                            "event_id": eids[pid],
                            "type": "reply",
                            "from": f"{name}-{pid}@leads.bench",
                            "text": "Sounds good, let's talk",
                        }
                    ).encode()
                    posted_at[pid] = time.time()
                    r = await http.post(
                        "/webhooks/email",
                        content=body,
                        headers={
                            "X-Signature": sign(secret, body, int(time.time()), channel="email"),
                            "Content-Type": "application/json",
                        },
                    )
                    assert r.status_code == 202, r.text

                await asyncio.gather(*(reply(k, pid) for k, pid in enumerate(by_hook)))
            hook_done = {pid: await _branched_at(client, wids[pid]) for pid in by_hook}
            hook_lat = [hook_done[pid] - posted_at[pid] for pid in by_hook]
            # Per hop: handed over -> claimed by the pipeline (the watcher read it / the POST
            # reached the app), claimed -> the workflow's task that took the REPLIED edge.
            async with sf() as s:
                claimed = {
                    str(r.provider_event_id): r.received_at.timestamp()
                    for r in (
                        await s.execute(
                            select(InboundEvent.provider_event_id, InboundEvent.received_at).where(
                                InboundEvent.provider_event_id.in_([*mids.values(), *eids.values()])
                            )
                        )
                    ).all()
                }
            hops = {
                "imap read": [claimed[mids[p]] - appended_at[p] for p in by_imap],
                "imap pipeline+workflow": [imap_done[p] - claimed[mids[p]] for p in by_imap],
                "webhook read": [claimed[eids[p]] - posted_at[p] for p in by_hook],
                "webhook pipeline+workflow": [hook_done[p] - claimed[eids[p]] for p in by_hook],
            }
            hop_text = "; ".join(f"{k} p50 {pct(v, 50):.0f} ms p99 {pct(v, 99):.0f} ms" for k, v in hops.items())
            print(f"  per hop: {hop_text}", flush=True)
            await client.get_workflow_handle(f"mailbox:{sender_id}").terminate("bench over")
    finally:
        server.should_exit = True
        await serve
        imap.stop()
    ms, hs = imap_lat, hook_lat  # seconds; pct() answers in milliseconds
    return {
        "name": "imap",
        "line": f"imap ({leads} waiting, {replies} replies APPENDed at 20/s, pymap IDLE): appended→branched "
        f"p50 {pct(ms, 50):.1f} ms p99 {pct(ms, 99):.1f} ms; signed webhook same run p50 {pct(hs, 50):.1f} ms "
        f"p99 {pct(hs, 99):.1f} ms; p99 ratio {pct(ms, 99) / pct(hs, 99):.2f}x (targets: p99 < 1000 ms, <= 1.5x); "
        f"per hop: {hop_text}",
    }

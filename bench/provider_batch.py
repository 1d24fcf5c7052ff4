"""Provider batch: 1,000 signed SendGrid events answered in one pass vs the same events one per request.

What is measured, on the same PostgreSQL and the same app:
- batch: one POST /webhooks/providers/sendgrid of 1,000 events (ECDSA verified, parsed,
  deduplicated, matched to 1,000 ledger rows and recorded in one transaction), timed
  from send to answer;
- replay: the same body again (every event a duplicate);
- baseline: 200 new events posted one per request (what a per-event webhook costs),
  compared per event.
The target of issue 15 is "under a second" for the batch; the bench prints, never asserts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from bench.stack import Stack
from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Event, Person, Sequence, SequenceVersion
from devstack.postgres import free_port
from models.outcomes import DeliveryStatus, EnrollmentStatus


async def seed_sent(sf: SessionFactory, n: int, tag: str) -> list[str]:
    """n sent deliveries (one enrollment each, no workflows); their Message-IDs."""
    async with sf() as session, session.begin():
        seq = Sequence(name=f"bench-provider-{tag}")
        session.add(seq)
        await session.flush()
        version = SequenceVersion(
            sequence_id=seq.id, version=1, content_hash=tag, definition={"name": seq.name}, source="{}"
        )
        session.add(version)
        await session.flush()
        people = (
            (
                await session.execute(
                    insert(Person)
                    .values([{"first_name": f"p{i}", "fields": {}} for i in range(n)])
                    .returning(Person.id)
                )
            )
            .scalars()
            .all()
        )
        enrollments = (
            (
                await session.execute(
                    insert(Enrollment)
                    .values(
                        [
                            {
                                "sequence_id": seq.id,
                                "sequence_version_id": version.id,
                                "person_id": p,
                                "workflow_id": f"bench-{tag}-{p}",
                                "status": EnrollmentStatus.ACTIVE,
                            }
                            for p in people
                        ]
                    )
                    .returning(Enrollment.id)
                )
            )
            .scalars()
            .all()
        )
        ids = [f"<{tag}.{e}@bench.test>" for e in enrollments]
        await session.execute(
            insert(Delivery).values(
                [
                    {
                        "idempotency_key": f"{e}:m0:1",
                        "enrollment_id": e,
                        "step_id": "m0",
                        "attempt": 1,
                        "channel": "email",
                        "action": "SEND_EMAIL",
                        "status": DeliveryStatus.SENT,
                        "message_id": mid,
                    }
                    for e, mid in zip(enrollments, ids, strict=True)
                ]
            )
        )
    return ids


def sendgrid_batch(ids: list[str], tag: str) -> list[dict[str, Any]]:
    """One SendGrid event per Message-ID: delivered, open, click, deferred in turn."""
    kinds = ["delivered", "open", "click", "deferred"]
    out = []
    for i, mid in enumerate(ids):
        kind = kinds[i % len(kinds)]
        event: dict[str, Any] = {
            "email": f"p{i}@bench.test",
            "timestamp": 1700000000 + i,
            "smtp-id": mid,
            "event": kind,
            "sg_event_id": f"{tag}-{i}",
            "sg_message_id": f"sg{tag}{i}.filter0",
        }
        if kind == "click":
            event["url"] = f"https://acme.test/{i % 7}"
        out.append(event)
    return out


async def bench_provider_batch(stack: Stack, n: int = 1000, baseline: int = 200) -> dict[str, Any]:
    """Batch of n SendGrid events vs `baseline` single-event requests (rates compared per event)."""
    from settings import Settings
    from webhooks.app import create_app

    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()

    def headers(body: bytes) -> dict[str, str]:
        stamp = str(int(time.time()))
        sig = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
            "Content-Type": "application/json",
        }

    settings = Settings(sequencer_env="dev", sendgrid_webhook_public_keys=[public])
    app = create_app(settings, session_factory=stack.session_factory, client=stack.env.client)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    tag = uuid.uuid4().hex[:6]
    try:
        batch_ids = await seed_sent(stack.session_factory, n, f"b{tag}")
        single_ids = await seed_sent(stack.session_factory, n, f"s{tag}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            warm = json.dumps(sendgrid_batch(batch_ids[:1], f"w{tag}")).encode()
            await http.post("/webhooks/providers/sendgrid", content=warm, headers=headers(warm))
            body = json.dumps(sendgrid_batch(batch_ids, f"b{tag}")).encode()
            started = time.perf_counter()
            resp = await http.post("/webhooks/providers/sendgrid", content=body, headers=headers(body))
            batch_s = time.perf_counter() - started
            summary = resp.json()
            started = time.perf_counter()
            replay = await http.post("/webhooks/providers/sendgrid", content=body, headers=headers(body))
            replay_s = time.perf_counter() - started
            singles = sendgrid_batch(single_ids, f"s{tag}")
            started = time.perf_counter()
            for event in singles[:baseline]:
                one = json.dumps([event]).encode()
                await http.post("/webhooks/providers/sendgrid", content=one, headers=headers(one))
            single_s = time.perf_counter() - started
        async with stack.session_factory() as session:
            recorded = (
                await session.execute(
                    select(func.count()).select_from(Event).where(Event.data["provider"].astext == "sendgrid")
                )
            ).scalar_one()
    finally:
        server.should_exit = True
        await serving
    line = (
        f"provider batch ({n} SendGrid events, {len(body) // 1024} KiB): one signed POST answered in "
        f"{batch_s * 1000:.0f} ms (status {resp.status_code}, recorded {summary.get('recorded')}, "
        f"duplicates {summary.get('duplicates')}; target < 1 s); replay of the same body {replay_s * 1000:.0f} ms "
        f"(duplicates {replay.json().get('duplicates')}); baseline {baseline} one-event POSTs {single_s:.2f} s "
        f"({baseline / single_s:.0f} events/s); per event the batch is {(single_s / baseline) / (batch_s / n):.1f}x "
        "faster; "
        f"{recorded} provider events in the log"
    )
    return {"line": line, "batch_s": batch_s, "single_s": single_s, "replay_s": replay_s}

"""Statistics: the funnel per version, step and variant, and the campaign counters.

Why: users steer campaigns by these numbers, so they must equal what really happened.
The event log and the deliveries ledger here are produced by real enrollments: rule
segments enrolled through the audience workflow by the production worker on the
time-skipping Temporal server, email to a real aiosmtpd (which accepts, bounces or
refuses per recipient), replies classified and signalled by the inbound processor, an
open recorded by the webhook app's tracking pixel, and a crash after the SMTP server
accepted (uncertain). Then every number of `sequence_stats` is asserted exactly, and
`starter.py stats --json` must print the same numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from db.events import append_event
from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Sequence, SequenceVersion, Suppression
from models.activities import EnrollmentRef
from models.enrollment import AudienceInput, EnrollmentResult, EnrollmentStatus, SequenceRef
from models.outcomes import EventType
from models.schedule import choose_variant
from models.sequence import SequenceDefinition
from services.classify import get_classifier
from services.inbound_pipeline import InboundPipeline
from services.segments import create_rule_segment
from services.stats import FUNNEL, as_json, sequence_stats
from settings import Settings
from tests.engine_harness import (
    LINK_SECRET,
    Wired,
    make_person,
    make_sender,
    store_version,
    wait_for_status,
)
from tests.eventually import eventually
from webhooks.app import create_app
from webhooks.payload import InboundPayload
from workflows.audience import AudienceWorkflow, audience_workflow_id
from workflows.enrollment import workflow_id_for

ROOT = Path(__file__).resolve().parent.parent


def _sequence(name: str, *, subject: str, follow_up: bool) -> dict[str, Any]:
    intro_next = "follow" if follow_up else "done"
    steps: list[dict[str, Any]] = [
        {
            "id": "intro",
            "action": "SEND_EMAIL",
            "variants": [
                # an html part: activities/delivery.py adds the open pixel only to an html template
                {"name": "A", "weight": 1, "subject": f"{subject} A", "body": "Hi A", "html": "<p>Hi A</p>"},
                {"name": "B", "weight": 1, "subject": f"{subject} B", "body": "Hi B", "html": "<p>Hi B</p>"},
            ],
            "edges": [
                {"trigger": "REPLIED", "to": "done"},
                {"trigger": "NOT_REPLIED", "after": "2d", "to": intro_next},
            ],
        }
    ]
    if follow_up:
        steps.append(
            {
                "id": "follow",
                "action": "SEND_EMAIL",
                "subject": "Following up",
                "body": "Any thoughts?",
                "edges": [
                    {"trigger": "REPLIED", "to": "done"},
                    {"trigger": "NOT_REPLIED", "after": "2d", "to": "done"},
                ],
            }
        )
    steps.append({"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]})
    return {"name": name, "track_opens": True, "steps": steps}


class ArmableCrash:
    """Simulates the worker dying right after the SMTP server accepted, once, when armed."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = 0

    def __call__(self, where: str) -> None:
        if self.armed and where == "after_send":
            self.armed = False
            self.fired += 1
            raise RuntimeError("simulated crash after_send")


async def _enroll_segment(client: Client, task_queue: str, sequence: str, segment: str) -> None:
    """Run the audience workflow for a rule segment; wait for it without skipping time.

    (A handle from start_workflow skips time in `result()`, which would fire the enrollments'
    timers too; time is skipped explicitly with `temporal_env.sleep` instead.)"""
    wid = audience_workflow_id(sequence, segment)
    await client.start_workflow(
        AudienceWorkflow.run,
        AudienceInput(sequence_name=sequence, segment_name=segment, page_size=50),
        id=wid,
        task_queue=task_queue,
    )
    plain = client.get_workflow_handle(wid)

    async def ended() -> WorkflowExecutionStatus | None:
        status = (await plain.describe()).status
        return None if status == WorkflowExecutionStatus.RUNNING else status

    assert await eventually(ended, f"{wid} to end") == WorkflowExecutionStatus.COMPLETED


async def _reply(processor: InboundPipeline, sender: str, text: str) -> str:
    payload = InboundPayload.model_validate(
        {"event_id": uuid.uuid4().hex, "type": "reply", "from": sender, "text": text}
    )
    result = await processor.process(payload.to_event("email"))
    assert result.status in ("signalled", "unsubscribed"), result
    return str(result.classification)


def _enrollment(client: Client, workflow_id: str) -> WorkflowHandle[Any, EnrollmentResult]:
    return client.get_workflow_handle(workflow_id, result_type=EnrollmentResult)


def _variant(defn: SequenceDefinition, person_id: int) -> str:
    step = next(s for s in defn.steps if s.id == "intro")
    chosen = choose_variant(step.variants, key=f"{person_id}:intro")
    assert chosen is not None
    return chosen.name


def _pixel_token(messages: list[Any], to: str) -> str:
    [msg] = [m for m in messages if m["To"] == to]
    html = msg.get_body(preferencelist=("html",)).get_content()
    match = re.search(r"/o/([^\"'/\s]+)\"", html)
    assert match, html
    return match.group(1)


Expected = dict[tuple[int, str | None, str | None], Counter[str]]


def _rows(stats: Any) -> dict[tuple[int, str | None, str | None], dict[str, int]]:
    return {(r.version, r.step, r.variant): r.counts for r in stats.rows}


def _expected_rows(expected: Expected) -> dict[tuple[int, str | None, str | None], dict[str, int]]:
    out: dict[tuple[int, str | None, str | None], dict[str, int]] = {}
    for key, counts in expected.items():
        row = dict.fromkeys(FUNNEL, 0)
        row.update(counts)
        row["delivered"] = row["sent"]  # nothing here bounced after it was accepted
        out[key] = row
    return out


async def test_funnel_and_counters_from_real_enrollments(
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    wired: Wired,
    database_url: str,
) -> None:
    sf = session_factory
    client: Client = temporal_env.client
    name = f"stats-{uuid.uuid4().hex[:8]}"
    await make_sender(sf, "email", "sales@acme.test")
    ref1, defn1 = await store_version(sf, _sequence(name, subject="Hello", follow_up=True))

    roles = ["positive", "bounce", "failure", "silent", "unsubscribe", "suppressed", "opened_negative"]
    v1: dict[str, int] = {}
    for role in roles:
        v1[role] = await make_person(sf, email=f"{role}@lead.test", first_name=role.title(), fields={"cohort": "v1"})
    smtp_server.reject_rcpt["bounce@lead.test"] = "550 5.1.1 No such user"
    smtp_server.reject_rcpt["failure@lead.test"] = "550 5.5.1 Protocol error (not about the recipient)"
    async with sf() as s, s.begin():
        s.add(Suppression(person_id=v1["suppressed"], reason="manual", source="test"))
    await create_rule_segment(sf, "cohort-v1", "cohort = 'v1'")

    crash = ArmableCrash()
    processor = InboundPipeline(sf, client, get_classifier())
    settings = Settings(link_secret=LINK_SECRET, database_url=database_url)
    app = create_app(settings, session_factory=sf, client=client)
    async with wired(client=client, fault=crash):
        # ---- version 1: seven people, every outcome
        await _enroll_segment(client, task_queue, name, "cohort-v1")
        handles = {r: _enrollment(client, workflow_id_for(name, pid)) for r, pid in v1.items()}
        for role in ("positive", "silent", "unsubscribe", "opened_negative"):
            await wait_for_status(handles[role], lambda v: v.phase == "waiting" and v.current_step == "intro")
        for role in ("bounce", "failure", "suppressed"):
            await wait_for_status(handles[role], lambda v: v.status != EnrollmentStatus.ACTIVE)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://webhooks.test") as http:
                token = _pixel_token(smtp_server.parsed(), "opened_negative@lead.test")
                for _ in range(2):  # a second load of the pixel is the same open
                    assert (await http.get(f"/o/{token}")).status_code == 200
        assert await _reply(processor, "positive@lead.test", "Yes, let's talk. Does Thursday work?") == "positive"
        assert await _reply(processor, "unsubscribe@lead.test", "Please remove me from your list.") == ("unsubscribe")
        assert await _reply(processor, "opened_negative@lead.test", "Not interested, thanks.") == "negative"
        await temporal_env.sleep(timedelta(days=5))  # past every timer of version 1
        outcomes = {role: (await h.result()).status for role, h in handles.items()}
        assert outcomes == {
            "positive": EnrollmentStatus.COMPLETED,  # the REPLIED edge leads to the end
            "bounce": EnrollmentStatus.FAILED,
            "failure": EnrollmentStatus.FAILED,
            "silent": EnrollmentStatus.COMPLETED,
            "unsubscribe": EnrollmentStatus.UNSUBSCRIBED,
            "suppressed": EnrollmentStatus.SUPPRESSED,
            "opened_negative": EnrollmentStatus.COMPLETED,
        }

        # ---- version 2: an uncertain send that then times out, and a lead still waiting
        ref2, defn2 = await store_version(sf, _sequence(name, subject="Hey", follow_up=False))
        assert ref2.version == 2
        uncertain = await make_person(sf, email="uncertain@lead.test", fields={"cohort": "v2a"})
        waiting = await make_person(sf, email="waiting@lead.test", fields={"cohort": "v2b"})
        await create_rule_segment(sf, "cohort-v2a", "cohort = 'v2a'")
        await create_rule_segment(sf, "cohort-v2b", "cohort = 'v2b'")
        crash.armed = True
        await _enroll_segment(client, task_queue, name, "cohort-v2a")
        uncertain_handle = _enrollment(client, workflow_id_for(name, uncertain))
        await temporal_env.sleep(timedelta(days=3))  # past the retry after the crash, and its NOT_REPLIED timer
        assert (await uncertain_handle.result()).status == EnrollmentStatus.COMPLETED
        assert crash.fired == 1
        await _enroll_segment(client, task_queue, name, "cohort-v2b")
        waiting_handle = _enrollment(client, workflow_id_for(name, waiting))
        await wait_for_status(waiting_handle, lambda v: v.phase == "waiting" and v.last_delivery_status == "sent")

        stats = await sequence_stats(sf, name)
        await waiting_handle.terminate(reason="test over")

    # ---------------------------------------------------------------- the funnel
    va = {role: _variant(defn1, pid) for role, pid in v1.items()}
    expected: Expected = defaultdict(Counter)
    expected[(1, None, None)]["enrolled"] = 7
    for role in ("positive", "silent", "unsubscribe", "opened_negative"):
        expected[(1, "intro", va[role])]["sent"] += 1
    expected[(1, "follow", None)]["sent"] = 1  # the silent lead's follow-up
    expected[(1, "intro", va["positive"])]["replied"] += 1
    expected[(1, "intro", va["positive"])]["positive"] += 1
    expected[(1, "intro", va["opened_negative"])]["replied"] += 1
    expected[(1, "intro", va["opened_negative"])]["opened"] += 1
    expected[(1, "intro", va["unsubscribe"])]["unsubscribed"] += 1
    expected[(1, "intro", va["bounce"])]["bounced"] += 1
    expected[(1, "intro", va["failure"])]["failed"] += 1
    expected[(1, "intro", va["suppressed"])]["suppressed"] += 1
    expected[(1, "done", None)]["completed"] = 3  # silent, positive and negative; the others ended otherwise
    vb_uncertain = _variant(defn2, uncertain)
    vb_waiting = _variant(defn2, waiting)
    expected[(2, None, None)]["enrolled"] = 2
    expected[(2, "intro", vb_uncertain)]["uncertain"] += 1
    expected[(2, "intro", vb_waiting)]["sent"] += 1
    expected[(2, "done", None)]["completed"] = 1
    assert _rows(stats) == _expected_rows(expected)
    assert [(r.version, r.step or "", r.variant or "") for r in stats.rows] == sorted(
        (v, s or "", var or "") for v, s, var in expected
    )

    totals = dict.fromkeys(FUNNEL, 0)
    totals.update(
        enrolled=9, sent=6, delivered=6, opened=1, replied=2, positive=1, bounced=1, unsubscribed=1,
        failed=1, uncertain=1, suppressed=1, completed=4,
    )  # fmt: skip
    assert stats.totals == totals

    # ---------------------------------------------------------------- the campaign counters
    c = stats.campaign
    assert (c.total, c.pending, c.queued, c.sent, c.failed, c.bounced, c.uncertain) == (9, 1, 0, 6, 1, 1, 1)
    assert c.by_status == {
        "active": 1,  # the waiting lead (terminated in Temporal after the numbers were taken)
        "completed": 4,
        "failed": 2,
        "unsubscribed": 1,
        "suppressed": 1,
    }

    # ---------------------------------------------------------------- JSON, and the command line
    data = as_json(stats)
    assert json.loads(json.dumps(data)) == data
    assert data["totals"] == totals and data["campaign"]["sent"] == 6 and data["sequence"] == name
    assert {(r["version"], r["step"], r["variant"]): r["counts"] for r in data["rows"]} == _expected_rows(expected)

    env = {**os.environ, "DATABASE_URL": database_url}
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "starter.py", "stats", "--sequence", name, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == data

    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "starter.py", "stats", "--sequence", name],
        cwd=ROOT,
        env={**env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    assert "campaign: total 9, pending 1, queued 0, sent 6, failed 1, bounced 1, uncertain 1" in table.stdout


async def test_unknown_sequence_is_a_clear_error(session_factory: SessionFactory, database_url: str) -> None:
    await store_version(session_factory, _sequence("known-one", subject="Hi", follow_up=False))
    with pytest.raises(LookupError, match=r"unknown sequence 'nope' \(known: known-one\)"):
        await sequence_stats(session_factory, "nope")
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "starter.py", "stats", "--sequence", "nope", "--json"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2
    assert cli.stdout == ""
    assert "unknown sequence 'nope'" in cli.stderr


async def test_ledger_counters_and_late_bounces(session_factory: SessionFactory) -> None:
    """Rows written with the ORM, for what a live run only shows in passing: sends claimed but
    not yet answered (queued), and a bounce reported by webhook after the send was accepted."""
    sf = session_factory
    ref, _ = await store_version(sf, _sequence("ledger", subject="Hi", follow_up=False))
    people = [await make_person(sf, email=f"p{i}@lead.test") for i in range(5)]
    async with sf() as s, s.begin():
        enrollments = []
        for i, pid in enumerate(people):
            e = Enrollment(
                sequence_id=ref.sequence_id,
                sequence_version_id=ref.version_id,
                person_id=pid,
                workflow_id=f"wf-{i}",
                status=["active", "active", "paused", "completed", "failed"][i],
            )
            s.add(e)
            enrollments.append(e)
        await s.flush()
        for i, (e, status) in enumerate(
            zip(enrollments, ["claimed", "sending", "sent", "sent", "bounced"], strict=True)
        ):
            s.add(
                Delivery(
                    idempotency_key=f"k{i}",
                    enrollment_id=e.id,
                    step_id="intro",
                    channel="email",
                    action="SEND_EMAIL",
                    variant="A",
                    status=status,
                )
            )
        await s.flush()
        deliveries = {d.idempotency_key: d for d in (await s.execute(select(Delivery))).scalars()}
        seq_ref = SequenceRef(
            sequence_id=ref.sequence_id, sequence_name="ledger", version_id=ref.version_id, version=ref.version
        )

        def eref(e: Enrollment) -> EnrollmentRef:
            return EnrollmentRef(enrollment_id=e.id, person_id=e.person_id, sequence=seq_ref, workflow_id=e.workflow_id)

        for e in enrollments:
            await append_event(s, type_=EventType.ENROLLED, ref=eref(e), dedup_key=f"{e.id}:enrolled")
        for key, e in (("k2", enrollments[2]), ("k3", enrollments[3])):
            await append_event(
                s,
                type_=EventType.SENT,
                ref=eref(e),
                step_id="intro",
                variant="A",
                channel="email",
                delivery_id=deliveries[key].id,
                dedup_key=f"{key}:sent",
            )
        # a synchronous SMTP rejection: bounced without ever being sent
        await append_event(
            s,
            type_=EventType.BOUNCED,
            ref=eref(enrollments[4]),
            step_id="intro",
            variant="A",
            channel="email",
            delivery_id=deliveries["k4"].id,
            dedup_key="k4:bounced",
        )
        # a bounce notification by webhook after k3 had been accepted (no delivery id, as the inbound pipeline logs it)
        await append_event(
            s,
            type_=EventType.BOUNCED,
            ref=eref(enrollments[3]),
            step_id="intro",
            variant="A",
            channel="email",
            dedup_key="bounced:email:evt-1",
            data={"via": "webhook"},
        )
        # an event of another sequence must not count
        other = Sequence(name="other")
        s.add(other)
        await s.flush()
        other_version = SequenceVersion(sequence_id=other.id, version=1, content_hash="x", definition={}, source="")
        s.add(other_version)
        await s.flush()
        other_ref = SequenceRef(sequence_id=other.id, sequence_name="other", version_id=other_version.id, version=1)
        await append_event(
            s,
            type_=EventType.SENT,
            ref=EnrollmentRef(enrollment_id=999, person_id=people[0], sequence=other_ref, workflow_id="x"),
            step_id="intro",
            dedup_key="other:sent",
        )
    stats = await sequence_stats(sf, "ledger")
    rows = _rows(stats)
    assert rows[(1, None, None)]["enrolled"] == 5
    intro = rows[(1, "intro", "A")]
    assert (intro["sent"], intro["bounced"], intro["delivered"]) == (2, 2, 1)
    assert stats.totals["delivered"] == 1 and stats.totals["sent"] == 2
    c = stats.campaign
    assert (c.total, c.pending, c.queued, c.sent, c.failed, c.bounced) == (5, 3, 2, 2, 0, 1)
    assert json.loads(json.dumps(as_json(stats)))["campaign"]["queued"] == 2

"""X steps for people known only by their handle: resolved once, stored, then acted on.

Real parts throughout: the fake X API (tests/fakes.py) served over HTTP counts every
`GET /2/users/by/username/{username}`, PostgreSQL holds the identities and the ledger,
and enrollments run on the time-skipping Temporal server with the production worker.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Identity, Person, Suppression
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from operations.enrolling import dry_run
from services.classify import get_classifier
from services.identities import IdentityOwnedError, attach_identity, find_person_by_identity
from services.inbound_pipeline import InboundPipeline
from services.people_import import import_people
from tests.engine_harness import (
    Crash,
    Sequencer,
    deliveries_of,
    events_of,
    make_person,
    store_version,
    wait_for_status,
)
from webhooks.payload import InboundPayload

X_SENDER = "900"  # the X sender account all_senders() creates


async def _person(sf: SessionFactory, *, handle: str | None = None, x: str | None = None) -> int:
    """Ada with a fresh email address, an X handle and/or a numeric X id."""
    email = f"{uuid.uuid4().hex[:8]}@lead.test"
    return await make_person(sf, email=email, x=x, identities={"x_handle": handle} if handle else None)


async def _identities(sf: SessionFactory, person_id: int) -> dict[str, str]:
    async with sf() as s:
        rows = (await s.execute(select(Identity.channel, Identity.value).where(Identity.person_id == person_id))).all()
    return {c: v for c, v in rows}


def _dm_only(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "steps": [
            {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi {{ first_name }}", "edges": [{"trigger": "END"}]}
        ],
    }


def _follow_then_dm(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "steps": [
            {"id": "follow", "action": "FOLLOW_ON_TWITTER",
             "edges": [{"trigger": "NORMAL_EDGE", "after": "1h", "to": "dm"}]},
            {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi {{ first_name }}, thanks!",
             "edges": [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": "2d", "to": "done"}]},
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }  # fmt: skip


async def test_handle_only_person_is_followed_and_dmd_at_the_resolved_id_looked_up_once(
    sequencer_stack: Sequencer,
) -> None:
    sequencer_stack.x.add_user("Ada_L", "777000111")
    pid = await _person(sequencer_stack.sf, handle="ada_l")
    async with sequencer_stack.worker():
        handle = await sequencer_stack.start(_follow_then_dm(f"xh-{uuid.uuid4().hex[:6]}"), pid)
        await wait_for_status(handle, lambda v: v.phase == "waiting")  # after the follow
        await sequencer_stack.env.sleep(timedelta(hours=1, minutes=5))  # skip past the 1 h NORMAL_EDGE
        await wait_for_status(handle, lambda v: v.current_step == "dm" and v.phase == "waiting")
        # An inbound reply from the numeric id (as X webhooks send it) now reaches the person.
        processor = InboundPipeline(sequencer_stack.sf, sequencer_stack.env.client, get_classifier())
        inbound = await processor.process(
            InboundPayload.model_validate(
                {"event_id": f"x-{uuid.uuid4().hex}", "type": "reply", "from": "777000111", "text": "Sure, let's talk"}
            ).to_event("x"),
        )
        result = await handle.result()
    assert (inbound.status, inbound.person_id) == ("signalled", pid)
    assert result.status == EnrollmentStatus.COMPLETED
    assert [(p.step, p.left_by) for p in result.path] == [("follow", "NORMAL_EDGE"), ("dm", "REPLIED"), ("done", "END")]
    assert sequencer_stack.x.following == {(X_SENDER, "777000111")}
    assert [(d["participant_id"], d["text"]) for d in sequencer_stack.x.dms] == [("777000111", "Hi Ada, thanks!")]
    assert sequencer_stack.x.lookups == ["ada_l"], "two X steps, one lookup: the id is cached in PostgreSQL"
    stored = await _identities(sequencer_stack.sf, pid)
    assert sorted(stored) == ["email", "x", "x_handle"]
    assert (stored["x"], stored["x_handle"]) == ("777000111", "ada_l")
    async with sequencer_stack.sf() as s:
        owner = await find_person_by_identity(s, "x", "777000111")
    assert owner is not None and owner.id == pid
    [resolved] = await events_of(sequencer_stack.sf, EventType.IDENTITY_RESOLVED)
    assert resolved.data["x_handle"] == "ada_l" and resolved.data["x_user_id"] == "777000111"
    assert resolved.person_id == pid and resolved.step_id == "follow"
    assert [(d.step_id, d.status, d.attempts_made) for d in await deliveries_of(sequencer_stack.sf)] == [
        ("follow", "sent", 1),
        ("dm", "sent", 1),
    ]


async def test_a_second_sequence_uses_the_cached_id_and_an_id_wins_over_a_handle(sequencer_stack: Sequencer) -> None:
    sequencer_stack.x.add_user("grace_h", "4040")
    grace = await _person(sequencer_stack.sf, handle="grace_h")
    both = await _person(sequencer_stack.sf, handle="both_h", x="424242")  # a stored id: never looked up
    async with sequencer_stack.worker():
        first = await sequencer_stack.start(_dm_only(f"a-{uuid.uuid4().hex[:6]}"), grace)
        assert (await first.result()).status == EnrollmentStatus.COMPLETED
        raw = dict(_dm_only(f"b-{uuid.uuid4().hex[:6]}"), allow_concurrent=True)
        second = await sequencer_stack.start(raw, grace)
        third = await sequencer_stack.start(_dm_only(f"c-{uuid.uuid4().hex[:6]}"), both)
        assert (await second.result()).status == EnrollmentStatus.COMPLETED
        assert (await third.result()).status == EnrollmentStatus.COMPLETED
    assert sequencer_stack.x.lookups == ["grace_h"]
    assert sorted(d["participant_id"] for d in sequencer_stack.x.dms) == ["4040", "4040", "424242"]
    assert len(await events_of(sequencer_stack.sf, EventType.IDENTITY_RESOLVED)) == 1


async def test_unknown_handle_fails_the_step_permanently_without_a_dm(sequencer_stack: Sequencer) -> None:
    pid = await _person(sequencer_stack.sf, handle="ghost_h")  # X answers "Could not find user"
    async with sequencer_stack.worker():
        handle = await sequencer_stack.start(_dm_only(f"u-{uuid.uuid4().hex[:6]}"), pid)
        result = await handle.result()
    assert result.status == EnrollmentStatus.FAILED
    assert sequencer_stack.x.dms == [] and sequencer_stack.x.following == set()
    assert sequencer_stack.x.lookups == ["ghost_h"], "a permanent answer is not retried"
    [delivery] = await deliveries_of(sequencer_stack.sf)
    assert delivery.status == "bounced" and delivery.attempts_made == 0
    assert delivery.error is not None
    assert "@ghost_h" in delivery.error and "invalid recipient" in delivery.error
    assert "Could not find user with username: [ghost_h]" in delivery.error
    assert result.path[0].outcome == "bounced"
    assert "x" not in await _identities(sequencer_stack.sf, pid)
    async with sequencer_stack.sf() as s:
        [sup] = (await s.execute(select(Suppression))).scalars().all()
        bounced = await s.get(Identity, sup.identity_id)
    assert sup.reason == "bounce" and bounced is not None
    assert (bounced.channel, bounced.value) == ("x_handle", "ghost_h")
    [bounce_event] = await events_of(sequencer_stack.sf, EventType.BOUNCED)
    assert "Could not find user" in bounce_event.data["error"]


async def test_429_on_the_lookup_is_retried_after_the_reset(sequencer_stack: Sequencer) -> None:
    sequencer_stack.x.add_user("busy_h", "8080")
    sequencer_stack.x.fail_next(
        429, {"x-rate-limit-reset": str(int(time.time()) + 900)}, {"title": "Too Many Requests"}
    )
    pid = await _person(sequencer_stack.sf, handle="busy_h")
    async with sequencer_stack.worker():
        handle = await sequencer_stack.start(_dm_only(f"r-{uuid.uuid4().hex[:6]}"), pid)
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert sequencer_stack.x.lookups == ["busy_h", "busy_h"]
    assert [d["participant_id"] for d in sequencer_stack.x.dms] == ["8080"]
    [delivery] = await deliveries_of(sequencer_stack.sf)
    assert delivery.status == "sent" and delivery.attempts_made == 1
    history = await handle.fetch_history()
    sends = ("deliver", "send_step")  # send_step: the slot and the send in one activity (patch send-step)
    scheduled = next(e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
                     and e.activity_task_scheduled_event_attributes.activity_type.name in sends)  # fmt: skip
    started = next(
        e
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.scheduled_event_id == scheduled.event_id
    )
    attrs = started.activity_task_started_event_attributes
    assert attrs.attempt == 2
    # The retry waited for X's reset (workflow time, skipped by the test server), not the 30 s backoff.
    waited = started.event_time.ToDatetime() - scheduled.event_time.ToDatetime()
    assert waited >= timedelta(minutes=10)


async def test_resolved_id_owned_by_another_person_is_reported_not_sent(sequencer_stack: Sequencer) -> None:
    owner = await _person(sequencer_stack.sf, x="5555")
    twin = await _person(sequencer_stack.sf, handle="twin_h")
    sequencer_stack.x.add_user("twin_h", "5555")  # the same X account, imported as two people
    async with sequencer_stack.worker():
        handle = await sequencer_stack.start(_dm_only(f"o-{uuid.uuid4().hex[:6]}"), twin)
        result = await handle.result()
    assert result.status == EnrollmentStatus.FAILED
    assert sequencer_stack.x.dms == [] and sequencer_stack.x.lookups == ["twin_h"]
    [delivery] = await deliveries_of(sequencer_stack.sf)
    assert delivery.status == "failed" and delivery.error is not None
    assert f"@twin_h resolves to X user id 5555, which already belongs to person {owner}" in delivery.error
    assert "nothing was sent" in delivery.error
    assert "x" not in await _identities(sequencer_stack.sf, twin)
    assert (await _identities(sequencer_stack.sf, owner))["x"] == "5555"
    async with sequencer_stack.sf() as s:
        assert (await s.execute(select(Suppression))).scalars().all() == []


async def test_attach_identity_is_idempotent_and_names_the_owner(session_factory: SessionFactory) -> None:
    ada = await _person(session_factory)
    bob = await _person(session_factory)
    async with session_factory() as s, s.begin():
        row, created = await attach_identity(s, ada, "x", "123")
        again, created_again = await attach_identity(s, ada, "x", " 123 ")
    assert created and not created_again and row.id == again.id
    with pytest.raises(IdentityOwnedError, match=f"'123' already belongs to person {ada}, not person {bob}"):
        async with session_factory() as s, s.begin():
            await attach_identity(s, bob, "x", "123")
    assert "x" not in await _identities(session_factory, bob)


async def test_crash_after_resolution_sends_once_without_a_second_lookup(sequencer_stack: Sequencer) -> None:
    sequencer_stack.x.add_user("crash_h", "6060")
    pid = await _person(sequencer_stack.sf, handle="crash_h")
    crash = Crash("after_resolve")
    async with sequencer_stack.worker(fault=crash):
        handle = await sequencer_stack.start(_dm_only(f"c-{uuid.uuid4().hex[:6]}"), pid)
        result = await handle.result()
    assert crash.fired == 1
    assert result.status == EnrollmentStatus.COMPLETED
    assert sequencer_stack.x.lookups == ["crash_h"]
    assert [d["participant_id"] for d in sequencer_stack.x.dms] == ["6060"]
    [delivery] = await deliveries_of(sequencer_stack.sf)
    assert delivery.status == "sent" and delivery.attempts_made == 1


async def test_dry_run_does_not_warn_about_x_steps_for_a_handle(
    session_factory: SessionFactory, tmp_path: Path
) -> None:
    name = f"dry-{uuid.uuid4().hex[:6]}"
    csv = tmp_path / "people.csv"
    csv.write_text(
        "email,first_name,x_user_id,x_handle\n"
        "ada@lead.example,Ada,,@Ada_L\n"
        "bob@lead.example,Bob,,\n"
        "cy@lead.example,Cy,31337,\n"
    )
    report = await import_people(session_factory, csv, name)
    assert report.errors == [] and report.members == 3
    await store_version(session_factory, _dm_only(name))
    dry = await dry_run(session_factory, name, name)
    async with session_factory() as s:
        ids = {p.first_name: p.id for p in (await s.execute(select(Person))).scalars()}
    assert dry.warnings == [f"person {ids['Bob']}, step 'dm': no x or x_handle identity: this step would be skipped"]
    assert {p.person_id: p.to for p in dry.previews} == {ids["Ada"]: "ada_l", ids["Bob"]: None, ids["Cy"]: "31337"}


async def test_dev_stand_in_resolves_handles_like_x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import devstack.providers as providers
    from activities.channels.base import PermanentChannelError
    from activities.channels.x import XChannel, make_x_client
    from tests.fakes import run_app

    monkeypatch.setattr(providers, "LOG", tmp_path / "calls.jsonl")
    with run_app(providers.app) as url:
        channel = XChannel(make_x_client(url, "dev-token", timeout=5.0))
        try:
            first = await channel.resolve_username("Ada_L")
            again = await channel.resolve_username("ada_l")
            with pytest.raises(PermanentChannelError) as caught:
                await channel.resolve_username("unknown_person")
        finally:
            await channel.aclose()
    assert first == again == providers.stand_in_user_id("ada_l") and first.isdigit()
    assert caught.value.bounce is True and "Could not find user" in str(caught.value)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [(c["kind"], c["method"], c["body"].get("found", True)) for c in calls] == [
        ("x.lookup", "GET", True),
        ("x.lookup", "GET", True),
        ("x.lookup", "GET", False),
    ]

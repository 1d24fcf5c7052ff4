"""The webhook app served for real: signatures, bodies, dedup, identity matching, pixel, health.

`webhooks.app:create_app` runs under a real uvicorn server on a free loopback port, in the
test's event loop, with its lifespan: it makes its own engine on the test's PostgreSQL
database and connects to the time-skipping Temporal server by address, as in production.
The production worker (tests/engine_harness.py) runs the enrollment workflows, so signals
really reach them; email goes to the aiosmtpd `smtp_server`. The `hook` fixture and its
helpers are tests/webhook_harness.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import socket
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from temporalio.testing import WorkflowEnvironment

from db.tables import InboundEvent
from devstack.postgres import free_port
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from services.tokens import make_token
from settings import Settings
from tests.engine_harness import LINK_SECRET, events_of, make_sender, wait_for_status
from tests.webhook_harness import (
    TOUCH_CAP_OFF,
    WEBHOOK_SECRET,
    Hook,
    app_settings,
    email_sequence,
    serve,
    signals_in_history,
    signed,
    temporal_address,
)
from webhooks import signature
from webhooks.app import PIXEL, create_app
from webhooks.signature import sign, sign_v1

# --------------------------------------------------------------------------- signatures


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signature.hmac, "compare_digest", spy)
    body = b'{"x": 1}'
    signature.verify("s3cret", sign("s3cret", body, 1000, channel="x"), body, channel="x", now=1000)
    with pytest.raises(signature.SignatureError, match="bad signature"):
        signature.verify("other", sign("s3cret", body, 1000, channel="x"), body, channel="x", now=1000)
    assert len(calls) == 2


async def test_valid_signature_is_accepted(hook: Hook) -> None:
    resp = await hook.post("email", {"event_id": "e-valid", "type": "reply", "from": "nobody@else.test", "text": "hi"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "unknown_sender"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong secret", "bad signature"),
        ("expired", "replay window"),
        ("future", "replay window"),
        ("missing", "missing"),
        ("garbage", "malformed"),
        ("no timestamp", "malformed"),
        ("no mac", "malformed"),
        ("t not a number", "malformed"),
        ("mac not hex", "malformed"),
        ("body changed", "bad signature"),
        ("other channel", "bad signature"),
        ("link secret", "bad signature"),
        ("v1 without channel", "v1 signatures"),
        ("absurd t", "malformed"),
        ("negative t", "malformed"),
        ("float t", "malformed"),
    ],
)
async def test_bad_signatures_are_refused_and_write_nothing(hook: Hook, case: str, expected: str) -> None:
    payload = {"event_id": f"e-{case}", "type": "reply", "from": "nobody@else.test", "text": "hi"}
    body = json.dumps(payload).encode()
    now = int(time.time())
    good = sign(WEBHOOK_SECRET, body, now, channel="email")
    headers = {
        "wrong secret": signed(body, secret="not-the-secret"),
        "expired": signed(body, at=now - 301),
        "future": signed(body, at=now + 301),
        "missing": {"Content-Type": "application/json"},
        "garbage": {"X-Signature": "garbage"},
        "no timestamp": {"X-Signature": good.split(",", 1)[1]},
        "no mac": {"X-Signature": f"t={now}"},
        "t not a number": {"X-Signature": good.replace(f"t={now}", "t=yesterday")},
        "mac not hex": {"X-Signature": f"t={now},v2=" + "zz" * 32},
        "body changed": {"X-Signature": sign(WEBHOOK_SECRET, body + b" ", now, channel="email")},
        "other channel": signed(body, channel="x"),
        "link secret": signed(body, secret=LINK_SECRET),
        "v1 without channel": {"X-Signature": sign_v1(WEBHOOK_SECRET, body, now)},
        "absurd t": {"X-Signature": good.replace(f"t={now}", "t=" + "9" * 400)},
        "negative t": {"X-Signature": good.replace(f"t={now}", f"t=-{now}")},
        "float t": {"X-Signature": good.replace(f"t={now}", "t=1e308")},
    }[case]
    resp = await hook.post("email", body, headers=headers)
    assert resp.status_code == 401, resp.text
    assert expected in resp.json()["error"]
    assert await hook.count(InboundEvent) == 0


async def test_non_ascii_signature_is_refused_not_a_server_error(hook: Hook) -> None:
    body = b'{"event_id": "e-1", "type": "reply", "from": "a@b.test"}'
    mac = "\u00e9" * 64
    raw = f"t={int(time.time())},v1={mac}".encode("latin-1")
    resp = await hook.http.post("/webhooks/email", content=body, headers=[(b"X-Signature", raw)])
    assert resp.status_code == 401
    assert await hook.count(InboundEvent) == 0


async def test_a_signature_near_the_window_edge_is_still_accepted(hook: Hook) -> None:
    for i, offset in enumerate((-290, 290)):  # clocks drift both ways
        payload = {"event_id": f"edge-{i}", "type": "reply", "from": "nobody@else.test"}
        resp = await hook.post("email", payload, at=int(time.time()) + offset)
        assert resp.status_code == 202, resp.text


async def test_a_rotated_secret_can_be_sent_alongside_the_old_one(hook: Hook) -> None:
    body = json.dumps({"event_id": "rot", "type": "reply", "from": "nobody@else.test"}).encode()
    now = int(time.time())
    old = sign("old-secret", body, now, channel="email").split("v2=")[1]
    new = sign(WEBHOOK_SECRET, body, now, channel="email").split("v2=")[1]
    resp = await hook.post("email", body, headers={"X-Signature": f"t={now},v2={old},v2={new}"})
    assert resp.status_code == 202


async def test_replayed_request_is_answered_as_a_duplicate_and_signals_once(hook: Hook) -> None:
    """The same signed request again (inside the window) is idempotent: 202 duplicate, no second signal."""
    pid = await hook.person(email="ada@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    body = json.dumps({"event_id": "rep-1", "type": "reply", "from": "ada@lead.test", "text": "Thanks!"}).encode()
    headers = signed(body)
    first = await hook.post("email", body, headers=headers)
    again = await hook.post("email", body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["status"] == "signalled"
    assert again.json() == {"status": "duplicate", "person_id": None, "enrollments": 0, "classification": None}
    result = await handle.result()
    assert [p.step for p in result.path] == ["m0", "done"]
    assert await signals_in_history(handle, "replied") == 1
    assert len(await events_of(hook.sf, EventType.REPLIED)) == 1
    assert await hook.count(InboundEvent) == 1
    # After the window the very same request is refused before dedup is even consulted.
    stale = signed(body, at=int(time.time()) - 600)
    assert (await hook.post("email", body, headers=stale)).status_code == 401


async def test_duplicate_event_id_with_a_fresh_signature_signals_once(hook: Hook) -> None:
    pid = await hook.person(email="dup@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    answers = []
    for text in ("Yes, let's talk", "Yes, let's talk (sent twice by the provider)"):
        resp = await hook.post("email", {"event_id": "dup-1", "type": "reply", "from": "dup@lead.test", "text": text})
        assert resp.status_code == 202
        answers.append(resp.json()["status"])
    assert answers == ["signalled", "duplicate"]
    result = await handle.result()
    assert result.path[0].left_by == "REPLIED"
    assert await signals_in_history(handle, "replied") == 1
    assert len(await events_of(hook.sf, EventType.REPLIED)) == 1
    assert len(await events_of(hook.sf, EventType.POSITIVE_REPLY)) == 1
    assert len(hook.smtp.messages) == 1
    # The same event id on another channel is another provider's event.
    other = await hook.post("x", {"event_id": "dup-1", "type": "reply", "from": "@nobody_here"})
    assert other.json()["status"] == "unknown_sender"


# --------------------------------------------------------------------------- bodies


async def test_malformed_json_is_400(hook: Hook) -> None:
    resp = await hook.post("email", b'{"event_id": "x", "type": ')
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid body"
    assert any("json" in f.lower() for f in resp.json()["fields"])


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"type": "reply", "from": "a@b.test"}, "event_id"),
        ({"event_id": "", "type": "reply", "from": "a@b.test"}, "event_id"),
        ({"event_id": "e", "from": "a@b.test"}, "type"),
        ({"event_id": "e", "type": "reply"}, "from"),
        ({"event_id": "e", "type": "reply", "from": ""}, "from"),
        ({"event_id": "e", "type": "reply", "from": "a@b.test", "occurred_at": "last tuesday"}, "occurred_at"),
        ({"event_id": "e", "type": "reply", "from": "a@b.test", "references": 5}, "references"),
        ({"event_id": ["e"], "type": "reply", "from": "a@b.test"}, "event_id"),
    ],
)
async def test_missing_or_invalid_fields_are_400_naming_the_field(
    hook: Hook, payload: dict[str, Any], field: str
) -> None:
    resp = await hook.post("email", payload)
    assert resp.status_code == 400, resp.text
    fields = resp.json()["fields"]
    assert any(f.startswith(f"{field}:") for f in fields), fields
    assert await hook.count(InboundEvent) == 0


async def test_unknown_type_is_400(hook: Hook) -> None:
    resp = await hook.post("email", {"event_id": "e", "type": "liked_post", "from": "a@b.test"})
    assert resp.status_code == 400
    [problem] = resp.json()["fields"]
    assert problem.startswith("type:") and "reply" in problem


async def test_a_json_array_is_400(hook: Hook) -> None:
    resp = await hook.post("email", b"[1, 2]")
    assert resp.status_code == 400


async def test_unknown_channel_is_404_after_authentication(hook: Hook) -> None:
    payload = {"event_id": "e", "type": "reply", "from": "a@b.test"}
    resp = await hook.post("myspace", payload)
    assert resp.status_code == 404
    assert "email, x, linkedin, xmtp" in resp.json()["error"]
    unsigned = await hook.post("myspace", payload, headers={})
    assert unsigned.status_code == 401  # nothing is revealed to an unauthenticated caller
    assert await hook.count(InboundEvent) == 0


async def _raw_request(base_url: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Write a request by hand, keep the connection open, and read what the server answers."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        rest = await asyncio.wait_for(reader.read(65536), timeout=10)
        return status_line + rest
    finally:
        writer.close()


async def test_oversized_declared_body_is_413_before_it_is_sent(hook: Hook) -> None:
    """Content-Length over the limit: answered 413 though only 100 of 1,000,000 bytes were sent."""
    head = (
        b"POST /webhooks/email HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"X-Signature: t=1,v1=00\r\nContent-Length: 1000000\r\n\r\n"
    )
    answer = await _raw_request(hook.base_url, head, [b"{" + b" " * 99])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"4096 bytes" in answer


async def test_oversized_chunked_body_is_413_without_reading_to_the_end(hook: Hook) -> None:
    """No Content-Length: the server stops at the limit; the final chunk is never sent."""
    head = (
        b"POST /webhooks/email HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 1024
    parts = [b"400\r\n" + chunk + b"\r\n" for _ in range(6)]  # 6 KiB > 4 KiB, and no terminating 0-chunk
    answer = await _raw_request(hook.base_url, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


async def test_a_body_at_the_limit_is_accepted(hook: Hook) -> None:
    payload = {"event_id": "big", "type": "reply", "from": "nobody@else.test", "text": ""}
    base = len(json.dumps(payload).encode())
    payload["text"] = "a" * (4096 - base)
    body = json.dumps(payload).encode()
    assert len(body) == 4096
    assert (await hook.post("email", body)).status_code == 202
    assert (await hook.post("email", body + b" ")).status_code == 413


# --------------------------------------------------------------------------- identity graph


async def test_unknown_sender_is_recorded_not_an_error(hook: Hook) -> None:
    resp = await hook.post(
        "linkedin", {"event_id": "li-9", "type": "connection_accepted", "from": "https://www.linkedin.com/in/stranger"}
    )
    assert resp.status_code == 202
    assert resp.json()["status"] == "unknown_sender"
    async with hook.sf() as s:
        [row] = (await s.execute(select(InboundEvent))).scalars().all()
    assert (row.channel, row.provider_event_id, row.type, row.status, row.person_id) == (
        "linkedin",
        "li-9",
        "connection_accepted",
        "unknown_sender",
        None,
    )
    assert row.from_value == "https://www.linkedin.com/in/stranger"
    assert await events_of(hook.sf) == []
    # A malformed identity value is just as unknown, not a 500.
    odd = await hook.post("x", {"event_id": "x-odd", "type": "reply", "from": "not a handle!"})
    assert odd.status_code == 202 and odd.json()["status"] == "unknown_sender"


async def test_a_reply_on_x_branches_the_email_sequence(hook: Hook) -> None:
    """Cross-channel: enrolled by email, replies on X by handle; the email after NOT_REPLIED never goes."""
    pid = await hook.person(email="grace@lead.test", x="31337")
    await hook.add_identity(pid, "x_handle", "grace_h")
    other = await hook.person(email="bystander@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    bystander = await hook.enroll(email_sequence(), other)
    await hook.waiting_at(handle)
    await hook.waiting_at(bystander)
    resp = await hook.post(
        "x", {"event_id": "dm-77", "type": "reply", "from": "@Grace_H", "text": "Sounds good, let's talk"}
    )
    assert resp.status_code == 202
    assert resp.json() == {"status": "signalled", "person_id": pid, "enrollments": 1, "classification": "positive"}
    view = await wait_for_status(handle, lambda v: v.current_step == "done" or v.status != EnrollmentStatus.ACTIVE)
    assert [(p.step, p.left_by) for p in view.path][:1] == [("m0", "REPLIED")]
    result = await handle.result()  # skips past the 2-day NOT_REPLIED timer had it still been pending
    assert result.status == EnrollmentStatus.COMPLETED
    assert [(p.step, p.left_by) for p in result.path] == [("m0", "REPLIED"), ("done", "END")]
    assert await bystander.result()  # the bystander's timer ran out: their follow-up did go
    assert [m["Subject"] for m in hook.mails_to("grace@lead.test")] == ["Hello Ada"]
    assert [m["Subject"] for m in hook.mails_to("bystander@lead.test")] == ["Hello Ada", "Again"]
    [replied] = await events_of(hook.sf, EventType.REPLIED)
    assert (replied.channel, replied.person_id, replied.step_id) == ("x", pid, "m0")
    # The numeric X user id resolves to the same person.
    by_id = await hook.post("x", {"event_id": "dm-78", "type": "reply", "from": "31337", "text": "again"})
    assert by_id.json()["person_id"] == pid


# touch cap off: one person in two sequences, both first emails at once
@pytest.mark.parametrize("hook", [TOUCH_CAP_OFF], indirect=True, ids=["touch-cap-off"])
async def test_a_reply_reaches_every_active_enrollment_of_the_person(hook: Hook) -> None:
    pid = await hook.person(email="multi@lead.test")
    first = await hook.enroll(email_sequence(allow_concurrent=True), pid)
    second = await hook.enroll(email_sequence(allow_concurrent=True), pid)
    await hook.waiting_at(first)
    await hook.waiting_at(second)
    resp = await hook.post(
        "email", {"event_id": "m-1", "type": "reply", "from": "Multi <MULTI@lead.test>", "text": "ok"}
    )
    assert resp.json()["enrollments"] == 2
    for h in (first, second):
        assert [p.step for p in (await h.result()).path] == ["m0", "done"]
        assert await signals_in_history(h, "replied") == 1
    assert len(hook.smtp.messages) == 2


async def test_a_reply_reaches_the_enrollment_the_touch_cap_holds_too(hook: Hook) -> None:
    """The twin above with the defaults: the second sequence's m0 waits a day for the person's
    cap; the reply reaches it as well, and its held mail never goes."""
    pid = await hook.person(email="capped@lead.test")
    first, held = await hook.enroll_held_by_the_touch_cap(
        email_sequence(allow_concurrent=True),
        email_sequence(allow_concurrent=True, subject="Held for the cap"),
        pid,
    )
    resp = await hook.post(
        "email", {"event_id": "m-cap", "type": "reply", "from": "Capped <CAPPED@lead.test>", "text": "ok"}
    )
    assert resp.json()["enrollments"] == 2
    assert [p.step for p in (await first.result()).path] == ["m0", "done"]
    # the held one replied before its m0 went out: it ends REPLIED at m0 (no "done" branch to take)
    ended = await held.result()  # would skip time to its slot and send, had the reply not stopped it
    assert ended.status == EnrollmentStatus.REPLIED
    assert [p.step for p in ended.path] == ["m0"]
    for h in (first, held):
        assert await signals_in_history(h, "replied") == 1
    await hook.env.sleep(timedelta(days=3))  # well past the held slot and both NOT_REPLIED timers
    # one mail, not two: the cap held the second sequence's, and the reply stopped it
    [(_, rcpt, raw)] = hook.smtp.messages
    assert rcpt == ["capped@lead.test"]
    assert b"Subject: Hello Ada" in raw and b"Held for the cap" not in raw


async def test_an_email_reply_from_an_unknown_address_matches_by_in_reply_to(hook: Hook) -> None:
    pid = await hook.person(email="lin@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    [sent] = hook.smtp.parsed()
    our_id = sent["Message-ID"]
    assert our_id.startswith("<") and our_id.endswith(">")
    unrelated = await hook.post(
        "email", {"event_id": "ir-0", "type": "reply", "from": "assistant@lin-corp.test", "in_reply_to": "<nope@x>"}
    )
    assert unrelated.json()["status"] == "unknown_sender"
    resp = await hook.post(
        "email",
        {
            "event_id": "ir-1",
            "type": "reply",
            "from": "Lin's Assistant <assistant@lin-corp.test>",
            "text": "Lin asked me to set up a call",
            "in_reply_to": our_id.strip("<>"),  # some providers drop the angle brackets
        },
    )
    assert resp.status_code == 202
    # Matched to the person, but From is not theirs: recorded, not acted on (tests/test_forged_replies.py).
    assert resp.json()["status"] == "unverified" and resp.json()["person_id"] == pid
    [shown] = await events_of(hook.sf, EventType.REPLY_UNVERIFIED)
    assert shown.person_id == pid and shown.enrollment_id is not None
    assert await signals_in_history(handle, "replied") == 0
    await handle.terminate("test over")


async def test_an_email_reply_matches_by_references_given_as_the_raw_header(hook: Hook) -> None:
    pid = await hook.person(email="ref@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    [sent] = hook.smtp.parsed()
    resp = await hook.post(
        "email",
        {
            "event_id": "rf-1",
            "type": "reply",
            "from": "forwarded@elsewhere.test",
            "text": "Forwarding this to the right person",
            "references": f"<older@thread.test> {sent['Message-ID']}",
        },
    )
    assert resp.json()["status"] == "unverified" and resp.json()["person_id"] == pid  # matched by References
    await handle.terminate("test over")


# --------------------------------------------------------------------------- pixel


async def test_open_pixel_records_one_open_per_delivery(hook: Hook) -> None:
    pid = await hook.person(email="reader@lead.test")
    handle = await hook.enroll(email_sequence(track_opens=True), pid)
    await hook.waiting_at(handle)
    [mail] = hook.smtp.parsed()
    html = next(p for p in mail.walk() if p.get_content_type() == "text/html").get_content()
    [token] = re.findall(r'src="https://links\.acme\.test/o/([^"]+)"', html)
    for _ in range(3):  # a mail client fetches the image again every time the message is opened
        resp = await hook.http.get(f"/o/{token}")
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "image/gif"
        assert resp.content == PIXEL and resp.content.startswith(b"GIF89a")
        assert "no-store" in resp.headers["cache-control"]
    [opened] = await events_of(hook.sf, EventType.OPENED)
    assert (opened.person_id, opened.step_id, opened.channel) == (pid, "m0", "email")
    assert opened.delivery_id is not None
    await handle.terminate("test over")


async def test_open_pixel_with_a_bad_token_still_returns_the_image_and_records_nothing(hook: Hook) -> None:
    forged_unknown = make_token(LINK_SECRET, "open", {"k": "no-such-delivery"})
    wrong_purpose = make_token(LINK_SECRET, "unsubscribe", {"k": "x"})
    other_secret = make_token("attacker", "open", {"k": "x"})
    for token in ("garbage", "a.b", forged_unknown, wrong_purpose, other_secret, forged_unknown[:-3] + "AAA"):
        resp = await hook.http.get(f"/o/{token}")
        assert resp.status_code == 200 and resp.content == PIXEL
    assert await events_of(hook.sf) == []


async def test_mail_without_tracking_has_no_pixel(hook: Hook) -> None:
    pid = await hook.person(email="private@lead.test")
    handle = await hook.enroll(email_sequence(), pid)
    await hook.waiting_at(handle)
    [mail] = hook.smtp.parsed()
    html = next(p for p in mail.walk() if p.get_content_type() == "text/html").get_content()
    assert "/o/" not in html
    await handle.terminate("test over")


# --------------------------------------------------------------------------- health


async def test_healthz_is_ok_when_both_are_up(hook: Hook) -> None:
    resp = await hook.http.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"postgres": "up", "temporal": "up", "status": "ok", "senders": {"paused": []}}


async def test_healthz_shows_a_paused_sender_with_its_reason(hook: Hook) -> None:
    from datetime import UTC, datetime

    from services.sender_breaker import set_paused

    sender_id = await make_sender(hook.sf, "email", "tired@acme.test", per_hour=5, per_day=10)
    await set_paused(hook.sf, sender_id, "DNS being fixed", datetime.now(UTC))
    resp = await hook.http.get("/healthz")
    assert resp.status_code == 200, "a paused sender is shown, the app itself is healthy"
    [paused] = resp.json()["senders"]["paused"]
    assert paused["id"] == sender_id and paused["kind"] == "manual" and paused["probe_after"] is None
    assert "tired@acme.test" not in resp.text and "DNS" not in resp.text, "no addresses or reasons in public"


async def test_healthz_names_postgres_when_the_database_is_down(temporal_env: WorkflowEnvironment) -> None:
    closed = free_port()
    app = create_app(app_settings(temporal_env, f"postgresql+asyncpg://nobody@127.0.0.1:{closed}/gone"))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await http.get("/healthz")
        assert resp.status_code == 503
        report = resp.json()
        assert report == {"postgres": "down", "temporal": "up", "status": "degraded"}
        assert str(closed) not in resp.text and "nobody" not in resp.text  # no addresses, no error texts
        # Everything else degrades cleanly: no 500s.
        pixel = await http.get(f"/o/{make_token(LINK_SECRET, 'open', {'k': 'some-delivery'})}")
        assert pixel.status_code == 200 and pixel.content == PIXEL
        unsub = await http.post(
            f"/u/{make_token(LINK_SECRET, 'unsubscribe', {'p': 1})}", content=b"List-Unsubscribe=One-Click"
        )
        assert unsub.status_code == 503 and "Please try again" in unsub.text
        body = json.dumps({"event_id": "db-down", "type": "reply", "from": "a@b.test"}).encode()
        inbound = await http.post("/webhooks/email", content=body, headers=signed(body))
        assert inbound.status_code == 503 and "retry later" in inbound.json()["error"]


async def _forward(listen: socket.socket, target: str) -> asyncio.Server:
    """A TCP forwarder: Temporal "comes up" at the listening port when this starts."""
    host, port = target.split(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, sock=listen)


async def test_healthz_names_temporal_when_it_is_down_and_recovers_when_it_comes_up(
    temporal_env: WorkflowEnvironment, database_url: str
) -> None:
    port = free_port()
    app = create_app(app_settings(temporal_env, database_url, temporal_address=f"127.0.0.1:{port}"))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        down = await http.get("/healthz")
        assert down.status_code == 503
        assert down.json() == {"postgres": "up", "temporal": "down", "status": "degraded", "senders": {"paused": []}}
        assert str(port) not in down.text
        body = json.dumps({"event_id": "while-down", "type": "reply", "from": "a@b.test"}).encode()
        queued = await http.post("/webhooks/email", content=body, headers=signed(body))
        assert queued.status_code == 503  # the provider retries later
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind(("127.0.0.1", port))
        forwarder = await _forward(listen, temporal_address(temporal_env))
        try:
            up = await http.get("/healthz")  # no restart needed: the app connects again
            assert up.status_code == 200, up.text
            assert up.json() == {"postgres": "up", "temporal": "up", "status": "ok", "senders": {"paused": []}}
            retry = await http.post("/webhooks/email", content=body, headers=signed(body))
            assert retry.status_code == 202 and retry.json()["status"] == "unknown_sender"
        finally:
            forwarder.close()


async def test_refusals_come_before_anything_waits_for_temporal(
    temporal_env: WorkflowEnvironment, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routes' dependencies run in order (size, signature, channel, body, link token) and
    only a request that passed them all makes the app try to reach a Temporal that is down."""
    import webhooks.deps

    attempts: list[str] = []

    async def unreachable(cfg: Settings) -> Any:
        attempts.append(cfg.temporal_address)
        raise OSError("connection refused")

    monkeypatch.setattr(webhooks.deps, "connect", unreachable)
    app = create_app(app_settings(temporal_env, database_url, temporal_address=f"127.0.0.1:{free_port()}"))
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        good = json.dumps({"event_id": "order", "type": "reply", "from": "a@b.test"}).encode()
        bad = json.dumps({"event_id": "order", "type": "fax", "from": "a@b.test"}).encode()
        refused = [
            (await http.post("/webhooks/email", content=b"x" * 5000, headers=signed(b"x" * 5000))).status_code,
            (await http.post("/webhooks/email", content=good, headers={"X-Signature": "t=1,v2=00"})).status_code,
            (await http.post("/webhooks/fax", content=good, headers=signed(good, channel="fax"))).status_code,
            (await http.post("/webhooks/email", content=bad, headers=signed(bad))).status_code,
            (await http.post("/u/not-a-token", content=b"List-Unsubscribe=One-Click")).status_code,
            (await http.get("/u/not-a-token")).status_code,
            (await http.post("/webhooks/providers/sendgrid", content=b"[]")).status_code,
            (await http.post("/webhooks/providers/nobody", content=b"[]")).status_code,
        ]
        assert refused == [413, 401, 404, 400, 400, 400, 401, 404]
        assert attempts == []
        queued = await http.post("/webhooks/email", content=good, headers=signed(good))
        assert queued.status_code == 503 and queued.json() == {"error": "Temporal is not reachable; retry later"}
        assert len(attempts) == 1

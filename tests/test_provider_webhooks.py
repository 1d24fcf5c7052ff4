"""Provider webhooks end to end: the provider's own body and signature, through the real
app (uvicorn), into PostgreSQL and the running enrollment workflows.

Each provider gets a test from webhook to the lead's status; the SES tests fetch the
SNS signing certificate from a local HTTPS server with its own CA (trustme), pointed at
by the allow-list and CA settings, as production points at sns.<region>.amazonaws.com.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr
from sqlalchemy import func, select
from temporalio.testing import WorkflowEnvironment

from activities.channels.relay_tags import RELAYS
from bench.provider_batch import seed_sent, sendgrid_batch
from db.tables import Delivery, Enrollment, Event, Identity, InboundEvent, Suppression, WebhookToken
from models.enrollment import EnrollmentStatus
from models.outcomes import EventType
from services.stats import sequence_stats
from services.tokens import make_token
from tests.engine_harness import LINK_SECRET, events_of, wait_for_status
from tests.provider_samples import (
    SendGridSigner,
    SnsSigner,
    mailgun_body,
    mailgun_event,
    new_whsec,
    sendgrid_event,
    ses_bounce,
    sns_notification,
    standard_headers,
    x_dm,
    x_follow,
    x_signature,
    xaa_follow,
)
from tests.webhook_harness import TOUCH_CAP_OFF, Hook, StartHook, app_settings, email_sequence, serve
from webhooks.app import create_app
from webhooks.providers import ses

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
PM_USER, PM_PASS = "postmark", "pm-secret-1"
MG_KEY = "key-mailgun-test"
X_SECRET = "x-consumer-secret"
OUR_X_ID = "4000"


@dataclass
class SnsServer:
    """A local HTTPS server standing in for sns.<region>.amazonaws.com."""

    base: str
    ca_file: str
    signer: SnsSigner
    confirmations: list[str] = field(default_factory=list)
    cert_requests: int = 0

    @property
    def cert_url(self) -> str:
        return f"{self.base}/SimpleNotificationService-test.pem"


@pytest.fixture
async def sns(tmp_path: Path) -> AsyncIterator[SnsServer]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_and_chain = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_and_chain))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    state = SnsServer("", str(ca_file), SnsSigner())
    app = FastAPI()

    @app.get("/SimpleNotificationService-test.pem")
    async def pem() -> Response:
        state.cert_requests += 1
        return Response(state.signer.pem, media_type="application/x-pem-file")

    @app.get("/")
    async def action(request: Request) -> Response:
        state.confirmations.append(str(request.url))
        return Response("<ConfirmSubscriptionResponse/>", media_type="text/xml")

    async with serve(app, ssl_certfile=str(key_and_chain), ssl_keyfile=str(key_and_chain)) as base:
        state.base = base
        yield state


@dataclass
class Providers:
    hook: Hook
    sendgrid: SendGridSigner
    resend_secret: str
    sns: SnsServer

    async def post(self, provider: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return await self.hook.http.post(f"/webhooks/providers/{provider}", content=body, headers=headers)

    async def post_sendgrid(self, events: list[dict[str, Any]]) -> httpx.Response:
        """A SendGrid event batch, signed with the current key."""
        body = json.dumps(events).encode()
        return await self.post("sendgrid", body, self.sendgrid.headers(body))

    async def post_x(self, payload: dict[str, Any], *, secret: str = X_SECRET) -> httpx.Response:
        """An X Account Activity event, signed with the consumer secret `secret`."""
        body = json.dumps(payload).encode()
        return await self.post("x", body, {"x-twitter-webhooks-signature": x_signature(secret, body)})

    async def sent(self, handle: Any) -> Delivery:
        await self.hook.waiting_at(handle)
        async with self.hook.sf() as s:
            return (await s.execute(select(Delivery).where(Delivery.status == "sent"))).scalars().one()

    async def inbound(self, provider: str) -> list[InboundEvent]:
        async with self.hook.sf() as s:
            rows = await s.execute(select(InboundEvent).where(InboundEvent.channel == provider))
            return list(rows.scalars())

    async def suppressions(self) -> list[Suppression]:
        async with self.hook.sf() as s:
            return list((await s.execute(select(Suppression))).scalars())

    async def enrollment_status(self, handle: Any) -> str:
        async with self.hook.sf() as s:
            return str(
                (await s.execute(select(Enrollment.status).where(Enrollment.workflow_id == handle.id))).scalar_one()
            )


@pytest.fixture
async def providers(start_hook: StartHook, sns: SnsServer, request: pytest.FixtureRequest) -> AsyncIterator[Providers]:
    signer = SendGridSigner()
    resend_secret = new_whsec()
    app = {
        "sendgrid_webhook_public_keys": [SendGridSigner().public_key, signer.public_key],  # an old key still listed
        "sendgrid_inbound_credentials": [SecretStr("parse:inbound-secret")],
        "postmark_webhook_credentials": [SecretStr(f"{PM_USER}:{PM_PASS}")],
        "mailgun_signing_keys": [SecretStr(MG_KEY)],
        "ses_topic_arns": [TOPIC],
        "sns_cert_host_pattern": r"^127\.0\.0\.1$",
        "sns_ca_file": sns.ca_file,
        "resend_webhook_secrets": [SecretStr(resend_secret)],
        "x_consumer_secrets": [SecretStr(X_SECRET)],
    }
    # every relay's custom-data header, as EMAIL_RELAY_TAGS does
    worker = {"email_relay_tags": list(RELAYS), **getattr(request, "param", {})}  # indirect param: more settings
    async with start_hook(app=app, worker=worker) as hook:
        yield Providers(hook, signer, resend_secret, sns)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


# --------------------------------------------------------------------------- SendGrid


async def test_sendgrid_batch_records_funnel_events_and_a_hard_bounce_ends_the_lead(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="bounce@lead.test")
    raw = email_sequence()
    handle = await p.hook.enroll(raw, pid)
    delivery = await p.sent(handle)
    mail_id = str(delivery.message_id)
    batch = [
        sendgrid_event("processed", "bounce@lead.test", 0, **{"smtp-id": mail_id}),
        sendgrid_event("delivered", "bounce@lead.test", 1, **{"smtp-id": mail_id}, response="250 OK"),
        sendgrid_event("open", "bounce@lead.test", 2, **{"smtp-id": mail_id}),
        sendgrid_event("open", "bounce@lead.test", 3, **{"smtp-id": mail_id}),  # a second open: one event
        sendgrid_event("click", "bounce@lead.test", 4, **{"smtp-id": mail_id}, url="https://acme.test/a"),
        sendgrid_event("deferred", "bounce@lead.test", 5, **{"smtp-id": mail_id}, response="451 later"),
        sendgrid_event("bounce", "bounce@lead.test", 6, **{"smtp-id": mail_id}, type="bounce", reason="550 no user"),
        sendgrid_event("delivered", "nobody@else.test", 7, **{"smtp-id": "<not-ours@x>"}),
    ]
    resp = await p.post_sendgrid(batch)
    assert resp.status_code == 200, resp.text
    summary = resp.json()
    assert (summary["received"], summary["recorded"], summary["unknown_message"], summary["ignored"]) == (8, 5, 1, 1)
    assert summary["pipeline"] == {"suppressed_identity": 1}
    assert [e.type for e in await events_of(p.hook.sf, EventType.DELIVERED)] == ["delivered"]
    assert len(await events_of(p.hook.sf, EventType.OPENED)) == 1
    [clicked] = await events_of(p.hook.sf, EventType.CLICKED)
    assert (clicked.delivery_id, clicked.data["url"]) == (delivery.id, "https://acme.test/a")
    assert len(await events_of(p.hook.sf, EventType.DEFERRED)) == 1
    totals = (await sequence_stats(p.hook.sf, raw["name"])).totals
    assert (totals["sent"], totals["delivered"], totals["opened"], totals["clicked"]) == (1, 1, 1, 1)
    # The hard bounce: the identity is suppressed, the ledger row says bounced, the lead ends.
    [sup] = await p.suppressions()
    assert (sup.reason, sup.person_id, sup.identity_id is not None) == ("bounce", None, True)
    result = await handle.result()
    assert result.status == EnrollmentStatus.STOPPED
    async with p.hook.sf() as s:
        assert (await s.get(Delivery, delivery.id)).status == "bounced"  # type: ignore[union-attr]
    assert [m["Subject"] for m in p.hook.mails_to("bounce@lead.test")] == ["Hello Ada"]  # no follow-up
    rows = {r.provider_event_id: r.status for r in await p.inbound("sendgrid")}
    assert rows["sg_event_id_delivered_7"] == "unknown_message"
    # A replay (same events, fresh signature) is a no-op.
    again = await p.post_sendgrid(batch)
    assert again.json()["duplicates"] == 8 and again.json()["recorded"] == 0
    assert len(await events_of(p.hook.sf, EventType.DELIVERED)) == 1


async def test_sendgrid_refuses_bad_signatures_and_names_bad_fields(providers: Providers) -> None:
    p = providers
    body = json.dumps([sendgrid_event("delivered", "a@lead.test")]).encode()
    forged = SendGridSigner().headers(body)
    assert (await p.post("sendgrid", body, forged)).status_code == 401
    expired = p.sendgrid.headers(body, at=1_000_000_000)
    resp = await p.post("sendgrid", body, expired)
    assert resp.status_code == 401 and "window" in resp.json()["error"]
    unsigned = await p.post("sendgrid", body, {"Content-Type": "application/json"})
    assert unsigned.status_code == 401
    bad = json.dumps([{"email": "a@lead.test", "event": "open", "timestamp": 1}]).encode()
    resp = await p.post("sendgrid", bad, p.sendgrid.headers(bad))
    assert resp.status_code == 400 and resp.json()["field"] == "[0].sg_event_id"
    too_long = json.dumps([sendgrid_event("open", "a@lead.test", sg_event_id="x" * 400)]).encode()
    resp = await p.post("sendgrid", too_long, p.sendgrid.headers(too_long))
    assert resp.status_code == 400 and resp.json()["field"] == "[0].sg_event_id"
    assert await p.inbound("sendgrid") == []
    assert (await p.hook.http.post("/webhooks/providers/nope", content=b"{}")).status_code == 404


async def test_sendgrid_inbound_parse_reply_branches_the_sequence(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="parse@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    boundary = "xYzZY"
    fields = {
        "from": "Parse Lead <parse@lead.test>",
        "to": "sales@acme.test",
        "subject": "Re: Hello Ada",
        "text": "Yes, interested - send times.\n\nOn Mon, Sales wrote:\n> First mail\n",
        "headers": f"Message-ID: <r1@lead.test>\nIn-Reply-To: {delivery.message_id}\n",
        "envelope": json.dumps({"to": ["sales@acme.test"], "from": "parse@lead.test"}),
    }
    body = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()
        ).encode()
        + f"--{boundary}--\r\n".encode()
    )
    ctype = f"multipart/form-data; boundary={boundary}"
    no_auth = await p.post("sendgrid-inbound", body, {"Content-Type": ctype})
    assert no_auth.status_code == 401
    auth = basic("parse", "inbound-secret")
    resp = await p.post("sendgrid-inbound", body, {**auth, "Content-Type": ctype})
    assert resp.status_code == 200, resp.text
    assert resp.json()["pipeline"] == {"signalled": 1}
    result = await handle.result()
    assert [(s.step, s.left_by) for s in result.path] == [("m0", "REPLIED"), ("done", "END")]
    [replied] = await events_of(p.hook.sf, EventType.REPLIED)
    assert replied.data["classification"] == "positive"


# --------------------------------------------------------------------------- Postmark


async def test_postmark_soft_bounce_is_recorded_and_a_complaint_stops_everything(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="pm@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    soft = {
        "RecordType": "Bounce",
        "ID": 11,
        "Type": "SoftBounce",
        "TypeCode": 4096,
        "MessageID": "pm-1",
        "Metadata": {"sequencer_key": delivery.idempotency_key},
        "Email": "pm@lead.test",
        "BouncedAt": "2019-11-05T16:33:54.9070259Z",
        "Description": "mailbox full",
    }
    body = json.dumps(soft).encode()
    assert (await p.post("postmark", body, basic(PM_USER, "wrong"))).status_code == 401
    resp = await p.post("postmark", body, basic(PM_USER, PM_PASS))
    assert resp.status_code == 200 and resp.json()["recorded"] == 1
    [soft_event] = await events_of(p.hook.sf, EventType.SOFT_BOUNCED)
    assert soft_event.delivery_id == delivery.id
    assert await p.suppressions() == []  # recorded only
    assert await p.enrollment_status(handle) == "active"
    complaint = {**soft, "RecordType": "SpamComplaint", "ID": 12, "Type": "SpamComplaint", "TypeCode": 512}
    resp = await p.post("postmark", json.dumps(complaint).encode(), basic(PM_USER, PM_PASS))
    assert resp.json()["pipeline"] == {"unsubscribed": 1}
    [sup] = await p.suppressions()
    assert (sup.person_id, sup.reason) == (pid, "complaint")
    assert (await handle.result()).status == EnrollmentStatus.UNSUBSCRIBED


async def test_postmark_inbound_reply_uses_the_stripped_text(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="pmreply@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    inbound = {
        "From": "pmreply@lead.test",
        "FromFull": {"Email": "pmreply@lead.test", "Name": "Lead"},
        "Subject": "Re: Hello Ada",
        "MessageID": "73e6d360-66eb-11e1-8e72-a8904824019b",
        "TextBody": "I am out of office.\n\nOn Mon wrote:\n> hi",
        "StrippedTextReply": "Please remove me from your list",
        "Headers": [{"Name": "In-Reply-To", "Value": delivery.message_id}],
    }
    resp = await p.post("postmark", json.dumps(inbound).encode(), basic(PM_USER, PM_PASS))
    assert resp.status_code == 200 and resp.json()["pipeline"] == {"unsubscribed": 1}
    assert (await handle.result()).status == EnrollmentStatus.UNSUBSCRIBED


# --------------------------------------------------------------------------- Mailgun


async def test_mailgun_temporary_is_a_deferral_permanent_a_bounce_and_tokens_are_single_use(
    providers: Providers,
) -> None:
    p = providers
    pid = await p.hook.person(email="mg@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    variables = {"user-variables": {"sequencer_key": delivery.idempotency_key}}
    temporary = mailgun_body(MG_KEY, mailgun_event("failed", "mg@lead.test", severity="temporary", **variables))
    resp = await p.post("mailgun", temporary, {"Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.json()["recorded"] == 1
    assert len(await events_of(p.hook.sf, EventType.DEFERRED)) == 1 and await p.suppressions() == []
    # The same token on another body is a replayed signature.
    token = json.loads(temporary)["signature"]
    forged = json.loads(mailgun_body(MG_KEY, mailgun_event("failed", "mg@lead.test", severity="permanent")))
    forged["signature"] = token
    forged["event-data"]["id"] = "another-event"
    resp = await p.post("mailgun", json.dumps(forged).encode(), {"Content-Type": "application/json"})
    assert resp.status_code == 401 and "already used" in resp.json()["error"]
    # The provider retrying the same event with the same token is a duplicate, not an error.
    assert (await p.post("mailgun", temporary, {})).json()["duplicates"] == 1
    wrong_key = mailgun_body("other", mailgun_event("failed", "mg@lead.test", severity="permanent"))
    assert (await p.post("mailgun", wrong_key, {})).status_code == 401
    async with p.hook.sf() as s, s.begin():  # a token from long ago, outside any replay window
        s.add(WebhookToken(provider="mailgun", token="ancient", seen_at=datetime.now(UTC) - timedelta(days=2)))
    permanent = mailgun_body(MG_KEY, mailgun_event("failed", "mg@lead.test", severity="permanent", **variables))
    resp = await p.post("mailgun", permanent, {})
    async with p.hook.sf() as s:
        tokens = set((await s.execute(select(WebhookToken.token))).scalars())
    assert "ancient" not in tokens and len(tokens) == 2  # forgotten; the recent ones are kept
    assert resp.json()["pipeline"] == {"suppressed_identity": 1}
    assert (await handle.result()).status == EnrollmentStatus.STOPPED


# --------------------------------------------------------------------------- SES via SNS


async def test_ses_subscription_is_confirmed_and_a_permanent_bounce_suppresses(providers: Providers) -> None:
    p = providers
    confirm = p.sns.signer.sign(
        {
            "Type": "SubscriptionConfirmation",
            "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
            "Token": "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a7",
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}.",
            "SubscribeURL": f"{p.sns.base}/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37",
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "SigningCertURL": p.sns.cert_url,
        },
        "1",
    )
    resp = await p.post("ses", json.dumps(confirm).encode(), {"x-amz-sns-message-type": "SubscriptionConfirmation"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "subscription confirmed"
    assert len(p.sns.confirmations) == 1 and "Action=ConfirmSubscription" in p.sns.confirmations[0]

    pid = await p.hook.person(email="ses@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    tags = {"sequencer_key": [ses.encode_key(delivery.idempotency_key)]}
    soft = p.sns.signer.sign(
        sns_notification(TOPIC, p.sns.cert_url, ses_bounce("ses@lead.test", "Transient", tags=tags), n=1), "2"
    )
    resp = await p.post("ses", json.dumps(soft).encode(), {})
    assert resp.status_code == 200 and resp.json()["recorded"] == 1
    hard = p.sns.signer.sign(
        sns_notification(TOPIC, p.sns.cert_url, ses_bounce("ses@lead.test", "Permanent", tags=tags), n=2), "1"
    )
    resp = await p.post("ses", json.dumps(hard).encode(), {})
    assert resp.json()["pipeline"] == {"suppressed_identity": 1}
    assert (await handle.result()).status == EnrollmentStatus.STOPPED
    assert p.sns.cert_requests == 1  # fetched once, then cached


async def test_ses_refuses_other_topics_hosts_and_tampering(providers: Providers) -> None:
    p = providers
    note = ses_bounce("x@lead.test")
    other_topic = p.sns.signer.sign(sns_notification("arn:aws:sns:us-east-1:1:other", p.sns.cert_url, note), "1")
    resp = await p.post("ses", json.dumps(other_topic).encode(), {})
    assert resp.status_code == 401 and "TopicArn" in resp.json()["error"]
    elsewhere = p.sns.signer.sign(sns_notification(TOPIC, "https://evil.test/cert.pem", note), "1")
    assert (await p.post("ses", json.dumps(elsewhere).encode(), {})).status_code == 401
    signed = p.sns.signer.sign(sns_notification(TOPIC, p.sns.cert_url, note), "2")
    tampered = {**signed, "Message": signed["Message"].replace("Permanent", "Transient")}
    resp = await p.post("ses", json.dumps(tampered).encode(), {})
    assert resp.status_code == 401 and "bad signature" in resp.json()["error"]
    other_key = SnsSigner().sign(sns_notification(TOPIC, p.sns.cert_url, note), "1")
    assert (await p.post("ses", json.dumps(other_key).encode(), {})).status_code == 401
    resp = await p.post("ses", json.dumps({"Type": "Notification"}).encode(), {})
    assert resp.status_code == 400 and resp.json()["field"] == "MessageId"
    assert p.sns.confirmations == []


# --------------------------------------------------------------------------- Resend (Standard Webhooks)


async def test_resend_reply_and_complaint(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="rs@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    received = {
        "type": "email.received",
        "created_at": "2024-02-22T23:41:12.126Z",
        "data": {
            "email_id": "e-1",
            "from": "rs@lead.test",
            "to": ["sales@acme.test"],
            "subject": "Re: Hello",
            "text": "Not interested, thanks",
            "headers": {"In-Reply-To": delivery.message_id},
        },
    }
    body = json.dumps(received).encode()
    bad = standard_headers(new_whsec(), body, "msg_bad")
    assert (await p.post("resend", body, bad)).status_code == 401
    resp = await p.post("resend", body, standard_headers(p.resend_secret, body, "msg_2Y0"))
    assert resp.status_code == 200 and resp.json()["pipeline"] == {"signalled": 1}
    result = await handle.result()
    assert result.path[0].left_by == "REPLIED"
    [replied] = await events_of(p.hook.sf, EventType.REPLIED)
    assert replied.data["classification"] == "negative"
    again = await p.post("resend", body, standard_headers(p.resend_secret, body, "msg_2Y0"))
    assert again.json()["duplicates"] == 1
    complained = {
        "type": "email.complained",
        "created_at": "2024-02-22T23:41:12.126Z",
        "data": {"email_id": "e-0", "to": ["rs@lead.test"], "from": "sales@acme.test"},
    }
    body = json.dumps(complained).encode()
    resp = await p.post("resend", body, standard_headers(p.resend_secret, body, "msg_2Y1"))
    assert resp.json()["pipeline"] == {"unsubscribed": 1}
    assert [s.reason for s in await p.suppressions()] == ["complaint"]


# --------------------------------------------------------------------------- X Account Activity


async def test_x_crc_follow_back_and_dm_reply(providers: Providers) -> None:
    p = providers
    crc = await p.hook.http.get("/webhooks/providers/x", params={"crc_token": "challenge-1"})
    assert crc.status_code == 200 and crc.json()["response_token"].startswith("sha256=")
    raw = {
        "name": f"xfollow-{uuid.uuid4().hex[:6]}",
        "steps": [
            {
                "id": "follow",
                "action": "FOLLOW_ON_TWITTER",
                "edges": [
                    {"trigger": "FOLLOWED_BACK", "to": "dm"},
                    {"trigger": "NOT_FOLLOWED_BACK", "after": "3d", "to": "mail"},
                ],
            },
            {
                "id": "dm",
                "action": "SEND_TWITTER_DM",
                "text": "Thanks {{ first_name }}",
                "edges": [
                    {"trigger": "REPLIED", "to": "done"},
                    {"trigger": "NOT_REPLIED", "after": "2d", "to": "mail"},
                ],
            },
            {"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]},
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }
    pid = await p.hook.person(email="xl@lead.test", x="5555")
    handle = await p.hook.enroll(raw, pid)
    await p.hook.waiting_at(handle, "follow")

    follow = x_follow(OUR_X_ID, "5555", OUR_X_ID)
    assert (await p.post_x(follow, secret="nope")).status_code == 401
    resp = await p.post_x(follow)
    assert resp.status_code == 200 and resp.json()["pipeline"] == {"signalled": 1}
    await wait_for_status(handle, lambda v: v.current_step == "dm" and v.phase == "waiting")
    assert (await p.post_x(x_dm(OUR_X_ID, OUR_X_ID, "Thanks Ada", "dm-ours"))).json()["ignored"] == 1
    assert (await p.post_x(x_dm(OUR_X_ID, "5555", "Sure, let's talk", "dm-theirs"))).json()["pipeline"] == {
        "signalled": 1
    }
    result = await handle.result()
    assert [(s.step, s.left_by) for s in result.path] == [
        ("follow", "FOLLOWED_BACK"),
        ("dm", "REPLIED"),
        ("done", "END"),
    ]
    assert p.hook.smtp.messages == []


# --------------------------------------------------------------------------- matching through relays


async def test_relay_tags_and_relay_ids_match_events_when_the_message_id_is_rewritten(providers: Providers) -> None:
    p = providers
    p.hook.smtp.accept_reply = "250 Ok: queued as 8kWqnSCeQZu5ZnMpTw3MTQ"  # SendGrid's SMTP answer
    pid = await p.hook.person(email="relay@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    key = delivery.idempotency_key
    assert delivery.provider_message_id == "8kWqnSCeQZu5ZnMpTw3MTQ"
    [(_, _, raw)] = p.hook.smtp.messages
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert f'X-SMTPAPI: {{"unique_args": {{"sequencer_key": "{key}"}}}}'.encode() in head
    assert f'X-Mailgun-Variables: {{"sequencer_key": "{key}"}}'.encode() in head
    assert f"X-PM-Metadata-sequencer_key: {key}".encode() in head
    assert f"X-SES-MESSAGE-TAGS: sequencer_key={ses.encode_key(key)}".encode() in head
    # SendGrid: Message-ID rewritten, no custom args; its sg_message_id starts with the queued-as id.
    sg = [
        sendgrid_event(
            "delivered",
            "relay@lead.test",
            1,
            **{"smtp-id": "<rewritten@sendgrid.net>"},
            sg_message_id="8kWqnSCeQZu5ZnMpTw3MTQ.filterdrecv-5645d9c87f-78xgx-1-5D0A3F5A-2.0",
        )
    ]
    assert (await p.post_sendgrid(sg)).json()["recorded"] == 1
    # Mailgun: only the variables it was given.
    event = mailgun_event("opened", "relay@lead.test", **{"user-variables": {"sequencer_key": key}})
    event["message"]["headers"]["message-id"] = "rewritten@mailgun.org"
    assert (await p.post("mailgun", mailgun_body(MG_KEY, event), {})).json()["recorded"] == 1
    # Postmark: Metadata from X-PM-Metadata-*.
    click = {
        "RecordType": "Click",
        "MessageID": "pm-rewritten",
        "Recipient": "relay@lead.test",
        "ReceivedAt": "2019-11-05T16:33:54Z",
        "OriginalLink": "https://acme.test/p",
        "Metadata": {"sequencer_key": key},
    }
    assert (await p.post("postmark", json.dumps(click).encode(), basic(PM_USER, PM_PASS))).json()["recorded"] == 1
    for type_ in (EventType.DELIVERED, EventType.OPENED, EventType.CLICKED):
        [event_row] = await events_of(p.hook.sf, type_)
        assert (event_row.delivery_id, event_row.person_id) == (delivery.id, pid)
    await handle.terminate("test over")


# --------------------------------------------------------------------------- click tracking


def _parts(raw: bytes) -> tuple[str, str]:
    from email import message_from_bytes, policy

    mail = message_from_bytes(raw, policy=policy.default)
    html = next(p for p in mail.walk() if p.get_content_type() == "text/html").get_content()
    text = next(p for p in mail.walk() if p.get_content_type() == "text/plain").get_content()
    return html, text


def click_sequence(**extra: Any) -> dict[str, Any]:
    raw = email_sequence(track_clicks=True, **extra)
    raw["steps"][0]["html"] = (
        '<p>See <a href="https://acme.test/pricing?a=1&amp;b=2">pricing</a>, '
        "<a href='http://acme.test/blog'>blog</a>, <a href=\"mailto:sales@acme.test\">mail us</a> "
        'and <a href="#top">top</a>.</p>'
    )
    raw["steps"][0]["body"] = "See https://acme.test/pricing?a=1&b=2 for prices."
    return raw


async def test_click_tracking_rewrites_html_links_records_once_per_link_and_redirects(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="clicker@lead.test")
    raw_seq = click_sequence()
    handle = await p.hook.enroll(raw_seq, pid)
    delivery = await p.sent(handle)
    [(_, _, raw)] = p.hook.smtp.messages
    html, text = _parts(raw)
    tokens = re.findall(r"""href=["']https://links\.acme\.test/c/([^"']+)["']""", html)
    assert len(tokens) == 2  # the two web links; mailto, the anchor and the unsubscribe link untouched
    assert 'href="mailto:sales@acme.test"' in html and 'href="#top"' in html and "/u/" in html
    assert "acme.test/pricing" not in html and "acme.test/blog" not in html  # the targets are sealed
    assert "https://acme.test/pricing?a=1&b=2" in text and "/c/" not in text  # text keeps its links
    for _ in range(3):
        resp = await p.hook.http.get(f"/c/{tokens[0]}", follow_redirects=False)
        assert resp.status_code == 302 and resp.headers["location"] == "https://acme.test/pricing?a=1&b=2"
    resp = await p.hook.http.get(f"/c/{tokens[1]}", follow_redirects=False)
    assert resp.headers["location"] == "http://acme.test/blog"
    clicks = await events_of(p.hook.sf, EventType.CLICKED)
    assert sorted(c.data["url"] for c in clicks) == ["http://acme.test/blog", "https://acme.test/pricing?a=1&b=2"]
    assert {(c.delivery_id, c.person_id, c.step_id) for c in clicks} == {(delivery.id, pid, "m0")}
    # The provider reporting the same click adds nothing.
    sg = [
        sendgrid_event(
            "click",
            "clicker@lead.test",
            1,
            **{"smtp-id": str(delivery.message_id)},
            url="https://acme.test/pricing?a=1&b=2",
        )
    ]
    assert (await p.post_sendgrid(sg)).status_code == 200
    assert len(await events_of(p.hook.sf, EventType.CLICKED)) == 2
    totals = (await sequence_stats(p.hook.sf, raw_seq["name"])).totals
    assert totals["clicked"] == 1  # one person clicked
    await handle.terminate("test over")


async def test_bad_click_tokens_are_a_404_page_and_never_redirect(providers: Providers) -> None:
    p = providers
    forged = [
        "not-a-token",
        make_token(LINK_SECRET, "open", {"k": "1:m0:1", "u": "https://acme.test/"}),  # another purpose
        make_token("another-deployment", "click", {"k": "1:m0:1", "u": "https://evil.test/"}),
        make_token(LINK_SECRET, "click", {"k": "1:m0:1", "u": "javascript:alert(1)"}),  # never a web link
    ]
    for token in forged:
        resp = await p.hook.http.get(f"/c/{token}", follow_redirects=False)
        assert resp.status_code == 404 and "location" not in resp.headers
        assert "Link not found" in resp.text
    assert await events_of(p.hook.sf, EventType.CLICKED) == []
    # A valid token for an unknown delivery still takes the person where the link said.
    unknown = make_token(LINK_SECRET, "click", {"k": "no-such-delivery", "u": "https://acme.test/x"})
    resp = await p.hook.http.get(f"/c/{unknown}", follow_redirects=False)
    assert resp.status_code == 302 and resp.headers["location"] == "https://acme.test/x"


async def test_track_clicks_in_text_rewrites_the_text_part_too(providers: Providers) -> None:
    p = providers
    pid = await p.hook.person(email="texter@lead.test")
    handle = await p.hook.enroll(click_sequence(track_clicks_in_text=True), pid)
    await p.sent(handle)
    [(_, _, raw)] = p.hook.smtp.messages
    _, text = _parts(raw)
    [token] = re.findall(r"https://links\.acme\.test/c/(\S+)", text)
    resp = await p.hook.http.get(f"/c/{token}", follow_redirects=False)
    assert resp.headers["location"] == "https://acme.test/pricing?a=1&b=2"
    await handle.terminate("test over")


# --------------------------------------------------------------------------- batches and retries


async def test_a_batch_of_1000_sendgrid_events_is_recorded_in_one_pass_and_replays_as_duplicates(
    providers: Providers,
) -> None:
    p = providers
    ids = await seed_sent(p.hook.sf, 1000, "t1k")
    events = sendgrid_batch(ids, "t1k")
    resp = await p.post_sendgrid(events)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["received"], resp.json()["recorded"], resp.json()["unknown_message"]) == (1000, 1000, 0)
    async with p.hook.sf() as s:
        by_type = dict((await s.execute(select(Event.type, func.count()).group_by(Event.type))).all())
        delivery_ids = (await s.execute(select(func.count(func.distinct(Event.delivery_id))))).scalar_one()
    assert by_type == {"delivered": 250, "opened": 250, "clicked": 250, "deferred": 250}
    assert delivery_ids == 1000  # each event matched its own delivery
    again = await p.post_sendgrid(events)
    assert again.json()["duplicates"] == 1000 and again.json()["recorded"] == 0
    async with p.hook.sf() as s:
        assert (await s.execute(select(func.count()).select_from(Event))).scalar_one() == 1000


async def test_a_batch_cut_short_by_an_outage_is_finished_by_the_retry(
    providers: Providers, temporal_env: WorkflowEnvironment, database_url: str
) -> None:
    """Records land, the bounce cannot be applied (Temporal unreachable): 503; the retry applies it once."""
    p = providers
    pid = await p.hook.person(email="retry@lead.test")
    handle = await p.hook.enroll(email_sequence(), pid)
    delivery = await p.sent(handle)
    mid = str(delivery.message_id)
    batch = [
        sendgrid_event("delivered", "retry@lead.test", 1, **{"smtp-id": mid}),
        sendgrid_event("bounce", "retry@lead.test", 2, **{"smtp-id": mid}, type="bounce", reason="550 gone"),
    ]
    body = json.dumps(batch).encode()
    cut_off = create_app(
        app_settings(
            temporal_env,
            database_url,
            temporal_address="127.0.0.1:1",  # nothing listens: Temporal is "down" for this app
            sendgrid_webhook_public_keys=[p.sendgrid.public_key],
        )
    )
    async with serve(cut_off) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        first = await http.post("/webhooks/providers/sendgrid", content=body, headers=p.sendgrid.headers(body))
    assert first.status_code == 503
    assert len(await events_of(p.hook.sf, EventType.DELIVERED)) == 1  # the records of the batch are kept
    assert await p.suppressions() == []  # the bounce is not half-applied
    rows = {r.provider_event_id: r.status for r in await p.inbound("sendgrid")}
    assert rows == {"sg_event_id_delivered_1": "recorded", "sg_event_id_bounce_2": "received"}
    retry = await p.post_sendgrid(batch)
    assert retry.status_code == 200
    assert (retry.json()["duplicates"], retry.json()["pipeline"]) == (1, {"suppressed_identity": 1})
    assert len(await events_of(p.hook.sf, EventType.DELIVERED)) == 1
    assert len(await p.suppressions()) == 1
    assert (await handle.result()).status == EnrollmentStatus.STOPPED


async def test_x_activity_api_follow_is_followed_back(providers: Providers) -> None:
    p = providers
    raw = {
        "name": f"xaa-{uuid.uuid4().hex[:6]}",
        "steps": [
            {
                "id": "follow",
                "action": "FOLLOW_ON_TWITTER",
                "edges": [
                    {"trigger": "FOLLOWED_BACK", "to": "done"},
                    {"trigger": "NOT_FOLLOWED_BACK", "after": "3d", "to": "done"},
                ],
            },
            {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
        ],
    }
    pid = await p.hook.person(email="xaa@lead.test", x="7777")
    handle = await p.hook.enroll(raw, pid)
    await p.hook.waiting_at(handle, "follow")
    resp = await p.post_x(xaa_follow(OUR_X_ID, "7777", OUR_X_ID))
    assert resp.status_code == 200 and resp.json()["pipeline"] == {"signalled": 1}
    path = [(s.step, s.left_by) for s in (await handle.result()).path]
    assert path == [("follow", "FOLLOWED_BACK"), ("done", "END")]


async def test_one_batch_with_consequences_for_several_leads_applies_each_once(providers: Providers) -> None:
    p = providers
    people = [await p.hook.person(email=f"many{i}@lead.test") for i in range(4)]
    handles = await p.hook.enroll_many(email_sequence(), people)
    for handle in handles:
        await p.hook.waiting_at(handle)
    async with p.hook.sf() as s:
        rows = await s.execute(
            select(Identity.value, Delivery.message_id).join(Identity, Identity.id == Delivery.identity_id)
        )
        mid = {str(value): str(message_id) for value, message_id in rows}
    batch = [
        sendgrid_event(
            "bounce",
            f"many{i}@lead.test",
            10 + i,
            type="bounce",
            reason="550 gone",
            **{"smtp-id": mid[f"many{i}@lead.test"]},
        )
        for i in range(3)
    ] + [sendgrid_event("spamreport", "many3@lead.test", 20, **{"smtp-id": mid["many3@lead.test"]})]
    resp = await p.post_sendgrid(batch)
    assert resp.status_code == 200, resp.text
    assert resp.json()["pipeline"] == {"suppressed_identity": 3, "unsubscribed": 1}
    statuses = [(await h.result()).status for h in handles]
    assert statuses == [EnrollmentStatus.STOPPED] * 3 + [EnrollmentStatus.UNSUBSCRIBED]
    assert sorted(s.reason for s in await p.suppressions()) == ["bounce", "bounce", "bounce", "complaint"]
    assert [m["Subject"] for m in p.hook.smtp.parsed()] == ["Hello Ada"] * 4  # no follow-up to anyone


# touch cap off: one person in two sequences, both first emails at once
@pytest.mark.parametrize("providers", [TOUCH_CAP_OFF], indirect=True, ids=["touch-cap-off"])
async def test_a_provider_side_unsubscribe_suppresses_the_person_and_stops_every_sequence(
    providers: Providers,
) -> None:
    p = providers
    pid = await p.hook.person(email="optout@lead.test", x="8888")
    email_lead = await p.hook.enroll(email_sequence(allow_concurrent=True), pid)
    other = await p.hook.enroll(email_sequence(gap="5d", allow_concurrent=True), pid)
    await p.hook.waiting_at(email_lead)
    await p.hook.waiting_at(other)
    body = mailgun_body(MG_KEY, mailgun_event("unsubscribed", "optout@lead.test"))  # no delivery key: by address
    resp = await p.post("mailgun", body, {})
    assert resp.status_code == 200 and resp.json()["pipeline"] == {"unsubscribed": 1}
    [sup] = await p.suppressions()
    assert (sup.person_id, sup.reason) == (pid, "unsubscribe")
    for handle in (email_lead, other):
        assert (await handle.result()).status == EnrollmentStatus.UNSUBSCRIBED
    assert len(await events_of(p.hook.sf, EventType.UNSUBSCRIBED)) == 2
    again = await p.post("mailgun", body, {})
    assert again.json()["duplicates"] == 1


async def test_a_provider_side_unsubscribe_stops_the_sequence_the_touch_cap_holds_too(providers: Providers) -> None:
    """The twin above with the defaults: the other sequence's m0 waits a day for the person's
    cap; the provider's unsubscribe ends it as well, and its held mail never goes."""
    p = providers
    pid = await p.hook.person(email="optout-cap@lead.test", x="8889")
    email_lead, other = await p.hook.enroll_held_by_the_touch_cap(
        email_sequence(allow_concurrent=True),
        email_sequence(gap="5d", allow_concurrent=True, subject="Held for the cap"),
        pid,
    )
    body = mailgun_body(MG_KEY, mailgun_event("unsubscribed", "optout-cap@lead.test"))  # no delivery key: by address
    resp = await p.post("mailgun", body, {})
    assert resp.status_code == 200 and resp.json()["pipeline"] == {"unsubscribed": 1}
    [sup] = await p.suppressions()
    assert (sup.person_id, sup.reason) == (pid, "unsubscribe")
    for handle in (email_lead, other):  # the held one's result would skip time to its slot, had it not ended
        assert (await handle.result()).status == EnrollmentStatus.UNSUBSCRIBED
    assert len(await events_of(p.hook.sf, EventType.UNSUBSCRIBED)) == 2
    again = await p.post("mailgun", body, {})
    assert again.json()["duplicates"] == 1
    await p.hook.env.sleep(timedelta(days=6))  # past the held slot and both NOT_REPLIED timers
    # one mail, not two: the cap held the other sequence's, and the unsubscribe stopped it
    [(_, rcpt, raw)] = p.hook.smtp.messages
    assert rcpt == ["optout-cap@lead.test"]
    assert b"Subject: Hello Ada" in raw and b"Held for the cap" not in raw

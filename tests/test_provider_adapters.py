"""Each provider adapter on its own: signatures made the way the provider makes them,
payloads shaped like the provider's documented samples, and precise mapping.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import pytest

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
)
from webhooks.providers import mailgun, postmark, sendgrid, ses, standard, x_activity
from webhooks.providers.base import ProviderAuthError, ProviderFormatError, basic_auth_ok
from webhooks.providers.replies import reply_text


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# --------------------------------------------------------------------------- SendGrid


def test_sendgrid_signature_verifies_with_the_console_key_and_rotation() -> None:
    old, new = SendGridSigner(), SendGridSigner()
    body = json.dumps([sendgrid_event("delivered", "a@x.test")]).encode()
    sendgrid.verify(
        [old.public_key, new.public_key], lower(new.headers(body)), body, now=time.time(), window_seconds=300
    )
    with pytest.raises(ProviderAuthError, match="bad signature"):
        sendgrid.verify([old.public_key], lower(new.headers(body)), body, now=time.time(), window_seconds=300)


@pytest.mark.parametrize("case", ["tampered", "missing", "expired", "not-base64", "no-key"])
def test_sendgrid_bad_signatures_are_refused(case: str) -> None:
    signer = SendGridSigner()
    body = json.dumps([sendgrid_event("delivered", "a@x.test")]).encode()
    headers = lower(signer.headers(body, at=int(time.time()) - 3600 if case == "expired" else None))
    keys = [signer.public_key]
    if case == "tampered":
        body = body.replace(b"delivered", b"bounce")
    elif case == "missing":
        del headers["x-twilio-email-event-webhook-signature"]
    elif case == "not-base64":
        headers["x-twilio-email-event-webhook-signature"] = "%%%"
    elif case == "no-key":
        keys = []
    with pytest.raises(ProviderAuthError):
        sendgrid.verify(keys, headers, body, now=time.time(), window_seconds=300)


def test_sendgrid_events_map_precisely() -> None:
    body = json.dumps(
        [
            sendgrid_event("processed", "a@x.test", 0),
            sendgrid_event("delivered", "a@x.test", 1, response="250 OK", sequencer_key="7:m0:1"),
            sendgrid_event("deferred", "a@x.test", 2, response="400 try again later", attempt="5"),
            sendgrid_event("bounce", "a@x.test", 3, reason="500 unknown recipient", status="5.0.0", type="bounce"),
            sendgrid_event("bounce", "a@x.test", 4, reason="blocked by policy", status="4.0.0", type="blocked"),
            sendgrid_event("open", "a@x.test", 5, useragent="Mozilla", ip="255.255.255.255"),
            sendgrid_event("click", "a@x.test", 6, url="https://acme.test/pricing", url_offset={"index": 0}),
            sendgrid_event("spamreport", "a@x.test", 7),
            sendgrid_event("unsubscribe", "a@x.test", 8),
            sendgrid_event("group_unsubscribe", "a@x.test", 9, asm_group_id=10),
            sendgrid_event("dropped", "a@x.test", 10, reason="Bounced Address"),
        ]
    ).encode()
    events = sendgrid.parse_events(body)
    got = [(e.kind, e.bounce) for e in events]
    assert got == [
        ("ignored", None),
        ("delivered", None),
        ("deferred", None),
        ("bounce", "hard"),
        ("bounce", "soft"),
        ("open", None),
        ("click", None),
        ("complaint", None),
        ("unsubscribe", None),
        ("unsubscribe", None),
        ("bounce", "hard"),
    ]
    delivered = events[1]
    assert delivered.delivery_key == "7:m0:1" and delivered.custom == {"sequencer_key": "7:m0:1"}
    assert "14c5d75ce93.dfd.64b469" in delivered.message_ids  # the X-Message-Id part of sg_message_id
    assert "14c5d75ce93.dfd.64b469@ismtpd-555" in delivered.message_ids  # smtp-id without brackets
    assert events[6].url == "https://acme.test/pricing"
    assert events[1].occurred_at == datetime.fromtimestamp(1513299570, UTC)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{}", "body"),
        (b"not json", "body"),
        (json.dumps([{"email": "a@x.test", "event": "open", "timestamp": 1}]).encode(), "[0].sg_event_id"),
        (json.dumps([{"sg_event_id": "e", "event": "open", "timestamp": 1}]).encode(), "[0].email"),
        (json.dumps([{"sg_event_id": "e", "email": "a@x.test", "timestamp": 1}]).encode(), "[0].event"),
        (
            json.dumps([{"sg_event_id": "e", "email": "a@x.test", "event": "open", "timestamp": "x"}]).encode(),
            "[0].timestamp",
        ),
    ],
)
def test_sendgrid_bad_bodies_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(ProviderFormatError) as err:
        sendgrid.parse_events(body)
    assert err.value.field == field


def test_sendgrid_inbound_parse_is_a_reply_with_threading() -> None:
    event = sendgrid.parse_inbound(
        {
            "from": "Ada <ada@lead.test>",
            "to": "sales@acme.test",
            "subject": "Re: Hello",
            "text": "Yes, interested!\n\nOn Mon, Nov 30, 2026 Sales <sales@acme.test> wrote:\n> First mail\n",
            "headers": "Message-ID: <reply-1@lead.test>\nIn-Reply-To: <abc.seq@acme.test>\n"
            "References: <abc.seq@acme.test>\n",
        }
    )
    assert (event.kind, event.sender, event.text) == ("reply", "Ada <ada@lead.test>", "Yes, interested!")
    assert event.in_reply_to == "<abc.seq@acme.test>" and event.references == ["<abc.seq@acme.test>"]
    assert event.event_id == "inbound:reply-1@lead.test"


# --------------------------------------------------------------------------- Postmark


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_accepts_any_configured_pair_and_nothing_else() -> None:
    basic_auth_ok(_basic("pm", "new"), ["pm:old", "pm:new"])
    for header in [None, "Bearer x", _basic("pm", "wrong"), "Basic %%%"]:
        with pytest.raises(ProviderAuthError):
            basic_auth_ok(header, ["pm:old", "pm:new"])
    with pytest.raises(ProviderAuthError, match="no credentials"):
        basic_auth_ok(_basic("pm", "new"), [])


POSTMARK_BOUNCE = {
    "RecordType": "Bounce",
    "MessageStream": "outbound",
    "ID": 4323372036854775807,
    "Type": "HardBounce",
    "TypeCode": 1,
    "Name": "Hard bounce",
    "Tag": "Test",
    "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
    "Metadata": {"sequencer_key": "7:m0:1"},
    "ServerID": 23,
    "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
    "Details": "Test bounce details",
    "Email": "john@example.com",
    "From": "sender@example.com",
    "BouncedAt": "2019-11-05T16:33:54.9070259Z",
    "DumpAvailable": True,
    "Inactive": True,
    "CanActivate": True,
    "Subject": "Test subject",
}


@pytest.mark.parametrize(
    ("type_", "kind", "bounce"),
    [
        ("HardBounce", "bounce", "hard"),
        ("SoftBounce", "bounce", "soft"),
        ("Transient", "bounce", "soft"),
        ("AutoResponder", "ignored", None),
        ("SpamComplaint", "complaint", None),
        ("BadEmailAddress", "bounce", "hard"),
    ],
)
def test_postmark_bounce_types(type_: str, kind: str, bounce: str | None) -> None:
    [event] = postmark.parse(json.dumps({**POSTMARK_BOUNCE, "Type": type_}).encode())
    assert (event.kind, event.bounce) == (kind, bounce)
    assert event.delivery_key == "7:m0:1" and event.message_ids == ["883953f4-6105-42a2-a16a-77a8eac79483"]


def test_postmark_other_record_types() -> None:
    base = {"MessageID": "m-1", "Recipient": "john@example.com", "Metadata": {}, "MessageStream": "outbound"}
    [delivered] = postmark.parse(
        json.dumps(
            {
                **base,
                "RecordType": "Delivery",
                "DeliveredAt": "2019-11-05T16:33:54Z",
                "Details": "Test delivery webhook details",
            }
        ).encode()
    )
    [opened] = postmark.parse(
        json.dumps({**base, "RecordType": "Open", "FirstOpen": True, "ReceivedAt": "2019-11-05T16:33:54Z"}).encode()
    )
    [clicked] = postmark.parse(
        json.dumps(
            {
                **base,
                "RecordType": "Click",
                "ClickLocation": "HTML",
                "OriginalLink": "https://example.com",
                "ReceivedAt": "2019-11-05T16:33:54Z",
            }
        ).encode()
    )
    [unsub] = postmark.parse(
        json.dumps(
            {
                **base,
                "RecordType": "SubscriptionChange",
                "ChangedAt": "2020-02-01T10:53:34Z",
                "SuppressSending": True,
                "SuppressionReason": "ManualSuppression",
            }
        ).encode()
    )
    [reactivated] = postmark.parse(
        json.dumps(
            {
                **base,
                "RecordType": "SubscriptionChange",
                "ChangedAt": "2020-02-01T10:53:34Z",
                "SuppressSending": False,
                "SuppressionReason": None,
            }
        ).encode()
    )
    assert [e.kind for e in (delivered, opened, clicked, unsub, reactivated)] == [
        "delivered",
        "open",
        "click",
        "unsubscribe",
        "ignored",
    ]
    assert clicked.url == "https://example.com"


def test_postmark_inbound_uses_the_stripped_reply_and_threading_headers() -> None:
    [event] = postmark.parse(
        json.dumps(
            {
                "FromName": "Postmarkapp Support",
                "From": "support@postmarkapp.com",
                "FromFull": {"Email": "support@postmarkapp.com", "Name": "Postmarkapp Support", "MailboxHash": ""},
                "To": '"Firstname Lastname" <yourhash+SampleHash@inbound.postmarkapp.com>',
                "Subject": "Test subject",
                "MessageID": "73e6d360-66eb-11e1-8e72-a8904824019b",
                "ReplyTo": "replyto@postmarkapp.com",
                "MailboxHash": "SampleHash",
                "Date": "Fri, 1 Aug 2014 16:45:32 -04:00",
                "TextBody": "This is a test text body.\n\nOn Thu wrote:\n> old",
                "HtmlBody": "<html><body><p>This is a test html body.</p></body></html>",
                "StrippedTextReply": "This is the reply text",
                "Tag": "TestTag",
                "Headers": [
                    {"Name": "X-Header-Test", "Value": ""},
                    {"Name": "In-Reply-To", "Value": "<abc.seq@acme.test>"},
                    {"Name": "References", "Value": "<a.seq@acme.test> <abc.seq@acme.test>"},
                ],
                "Attachments": [],
            }
        ).encode()
    )
    assert (event.kind, event.sender, event.text) == ("reply", "support@postmarkapp.com", "This is the reply text")
    assert event.in_reply_to == "<abc.seq@acme.test>"
    assert event.references == ["<a.seq@acme.test>", "<abc.seq@acme.test>"]


def test_postmark_bad_bodies_name_the_field() -> None:
    for body, field in [
        ({"RecordType": "Bounce", "MessageID": "m"}, "ID"),
        ({"RecordType": "Open", "MessageID": "m"}, "Recipient"),
        ({"RecordType": "Nope", "MessageID": "m", "Recipient": "a@b.test"}, "RecordType"),
        ({"Hello": 1}, "RecordType"),
        (
            {"RecordType": "Delivery", "MessageID": "m", "Recipient": "a@b.test", "DeliveredAt": "yesterday"},
            "DeliveredAt",
        ),
    ]:
        with pytest.raises(ProviderFormatError) as err:
            postmark.parse(json.dumps(body).encode())
        assert err.value.field == field


# --------------------------------------------------------------------------- Mailgun


def test_mailgun_signature_token_and_window() -> None:
    body = mailgun_body("key-new", mailgun_event("delivered", "a@x.test"))
    data = mailgun.load(body)
    token = mailgun.verify(["key-old", "key-new"], data, now=time.time(), window_seconds=300)
    assert token == data["signature"]["token"]
    with pytest.raises(ProviderAuthError, match="bad signature"):
        mailgun.verify(["key-old"], data, now=time.time(), window_seconds=300)
    stale = mailgun.load(mailgun_body("key-new", mailgun_event("delivered", "a@x.test"), at=int(time.time()) - 3600))
    with pytest.raises(ProviderAuthError, match="window"):
        mailgun.verify(["key-new"], stale, now=time.time(), window_seconds=300)
    with pytest.raises(ProviderAuthError):
        mailgun.verify(["key-new"], {"event-data": {}}, now=time.time(), window_seconds=300)


def test_mailgun_temporary_failure_is_a_deferral_not_a_bounce() -> None:
    def kind(**ev: object) -> tuple[str, str | None]:
        [e] = mailgun.parse(mailgun.load(mailgun_body("k", mailgun_event(**ev))))  # type: ignore[arg-type]
        return e.kind, e.bounce

    assert kind(event="failed", recipient="a@x.test", severity="temporary") == ("deferred", None)
    assert kind(event="failed", recipient="a@x.test", severity="permanent") == ("bounce", "hard")
    assert kind(event="delivered", recipient="a@x.test") == ("delivered", None)
    assert kind(event="opened", recipient="a@x.test") == ("open", None)
    assert kind(event="clicked", recipient="a@x.test", url="https://x.test") == ("click", None)
    assert kind(event="complained", recipient="a@x.test") == ("complaint", None)
    assert kind(event="unsubscribed", recipient="a@x.test") == ("unsubscribe", None)
    [event] = mailgun.parse(
        mailgun.load(
            mailgun_body("k", mailgun_event("delivered", "a@x.test", **{"user-variables": {"sequencer_key": "9:m0:1"}}))
        )
    )
    assert event.delivery_key == "9:m0:1" and event.message_ids == ["20130503182626.18666.16540@example.com"]
    with pytest.raises(ProviderFormatError) as err:
        mailgun.parse(mailgun.load(mailgun_body("k", mailgun_event("failed", "a@x.test", severity="odd"))))
    assert err.value.field == "event-data.severity"


# --------------------------------------------------------------------------- SES / SNS


@pytest.mark.parametrize("version", ["1", "2"])
def test_sns_string_to_sign_and_signature_versions(version: str) -> None:
    signer = SnsSigner()
    msg = signer.sign(
        sns_notification("arn:aws:sns:us-east-1:123:ses", "https://h/x.pem", ses_bounce("a@x.test")), version
    )
    key = signer.cert.public_key()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    assert isinstance(key, rsa.RSAPublicKey)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    key.verify(base64.b64decode(msg["Signature"]), ses.string_to_sign(msg), padding.PKCS1v15(), algorithm)
    text = ses.string_to_sign(msg).decode()
    assert text.startswith("Message\n") and "\nTopicArn\narn:aws:sns:us-east-1:123:ses\nType\nNotification\n" in text
    assert "Subject" not in text  # absent Subject is left out of the signed text


def test_sns_certificate_urls_are_allow_listed() -> None:
    pattern = ses.DEFAULT_HOST_PATTERN
    ses.check_url("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", pattern, "SigningCertURL")
    for url in [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.us-east-1.amazonaws.com.evil.test/x.pem",
        "https://evil.test/sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com/x.txt",
        "https://127.0.0.1/x.pem",
    ]:
        with pytest.raises(ProviderAuthError):
            ses.check_url(url, pattern, "SigningCertURL")


def test_ses_bounce_types_and_tags() -> None:
    key_tag = ses.encode_key("12:intro:1")
    for bounce_type, level in [("Permanent", "hard"), ("Transient", "soft"), ("Undetermined", "soft")]:
        msg = sns_notification("t", "u", ses_bounce("a@x.test", bounce_type, tags={"sequencer_key": [key_tag]}))
        [event] = ses.parse(msg)
        assert (event.kind, event.bounce, event.recipient) == ("bounce", level, "a@x.test")
        assert event.delivery_key == "12:intro:1" and event.message_ids[0] == "EXAMPLE7c191be45"
    complaint = {
        "notificationType": "Complaint",
        "mail": {"messageId": "m", "destination": ["a@x.test"]},
        "complaint": {
            "complainedRecipients": [{"emailAddress": "a@x.test"}],
            "timestamp": "2016-01-27T14:59:38.237Z",
            "complaintFeedbackType": "abuse",
        },
    }
    delivery = {
        "notificationType": "Delivery",
        "mail": {"messageId": "m"},
        "delivery": {"recipients": ["a@x.test", "b@x.test"], "timestamp": "2016-01-27T14:59:38.237Z"},
    }
    assert [e.kind for e in ses.parse(sns_notification("t", "u", complaint))] == ["complaint"]
    assert [e.recipient for e in ses.parse(sns_notification("t", "u", delivery))] == ["a@x.test", "b@x.test"]
    with pytest.raises(ProviderFormatError) as err:
        ses.parse(sns_notification("t", "u", {"notificationType": "Bounce", "mail": {"messageId": "m"}}))
    assert err.value.field == "Message.bounce"


# --------------------------------------------------------------------------- Standard Webhooks


def test_standard_webhooks_verify_with_rotation_and_refuse_old_or_forged() -> None:
    old, new = new_whsec(), new_whsec()
    body = json.dumps(
        {
            "type": "email.delivered",
            "created_at": "2024-02-22T23:41:12.126Z",
            "data": {
                "email_id": "56761188-7520-42d8-8898-ff6fc54ce618",
                "to": ["a@x.test"],
                "from": "Acme <onboarding@resend.dev>",
                "subject": "Sending this example",
            },
        }
    ).encode()
    assert standard.verify([old, new], lower(standard_headers(new, body, "msg_1")), body) == "msg_1"
    for headers in [
        standard_headers(new_whsec(), body, "msg_1"),
        standard_headers(new, body, "msg_1", at=datetime.now(UTC) - timedelta(hours=1)),
        {"webhook-id": "msg_1"},
        {**standard_headers(new, body, "msg_1"), "webhook-signature": "garbage"},
    ]:
        with pytest.raises(ProviderAuthError):
            standard.verify([old, new], lower(headers), body)


def test_resend_events_map() -> None:
    def one(type_: str, **data: object) -> tuple[str, str | None]:
        body = {
            "type": type_,
            "created_at": "2024-02-22T23:41:12.126Z",
            "data": {"email_id": "e1", "to": ["a@x.test"], "from": "s@acme.test", **data},
        }
        [event] = standard.parse(json.dumps(body).encode(), "msg")
        return event.kind, event.bounce

    assert one("email.delivered") == ("delivered", None)
    assert one("email.bounced", bounce={"type": "Permanent", "subType": "Suppressed", "message": "x"}) == (
        "bounce",
        "hard",
    )
    assert one("email.bounced", bounce={"type": "Transient", "subType": "General", "message": "x"}) == (
        "bounce",
        "soft",
    )
    assert one("email.delivery_delayed") == ("deferred", None)
    assert one("email.complained") == ("complaint", None)
    assert one("email.opened") == ("open", None)
    assert one("email.clicked", click={"link": "https://acme.test/x", "timestamp": "t"}) == ("click", None)
    assert one("email.sent") == ("ignored", None)
    assert one("email.received", text="Sure, let's talk") == ("reply", None)
    with pytest.raises(ProviderFormatError) as err:
        standard.parse(json.dumps({"type": "email.clicked", "data": {"to": ["a@x.test"]}}).encode(), "m")
    assert err.value.field == "data.click"


# --------------------------------------------------------------------------- X


def test_x_crc_response_is_the_documented_hmac() -> None:
    import hashlib
    import hmac

    expected = base64.b64encode(hmac.new(b"consumer-secret", b"crc-123", hashlib.sha256).digest()).decode()
    assert x_activity.crc_response("consumer-secret", "crc-123") == {"response_token": f"sha256={expected}"}


def test_x_signature_and_events() -> None:
    body = json.dumps(x_dm("100", "200", "Thanks, tell me more", "dm-1")).encode()
    x_activity.verify(["old", "new"], x_signature("new", body), body)
    for header in [None, "sha256=AAAA", x_signature("other", body), "md5=x"]:
        with pytest.raises(ProviderAuthError):
            x_activity.verify(["old", "new"], header, body)
    [reply] = x_activity.parse(body)
    assert (reply.kind, reply.channel, reply.sender, reply.text) == ("reply", "x", "200", "Thanks, tell me more")
    [echo] = x_activity.parse(json.dumps(x_dm("100", "100", "our own DM", "dm-2")).encode())
    assert echo.kind == "ignored"
    [follow] = x_activity.parse(json.dumps(x_follow("100", "200", "100")).encode())
    assert (follow.kind, follow.sender) == ("followed_back", "200")
    [ours] = x_activity.parse(json.dumps(x_follow("100", "100", "300")).encode())
    assert ours.kind == "ignored"
    with pytest.raises(ProviderFormatError) as err:
        x_activity.parse(json.dumps({"direct_message_events": []}).encode())
    assert err.value.field == "for_user_id"


def test_reply_text_keeps_only_the_new_part() -> None:
    assert reply_text("Sounds good\n\nOn Tue, Ada wrote:\n> hi") == "Sounds good"
    assert reply_text("> quoted only") == "> quoted only"
    assert reply_text("Plain") == "Plain"


# --------------------------------------------------------------------------- relay tags (outbound)


def test_relay_message_ids_are_read_from_the_final_smtp_reply() -> None:
    from activities.channels.relay_tags import relay_message_id

    assert relay_message_id("Ok: queued as 8kWqnSCeQZu5ZnMpTw3MTQ") == "8kWqnSCeQZu5ZnMpTw3MTQ"
    assert relay_message_id("Ok 0100018c2b7f4a3e-5c2f0a1b-7d3e-4f5a-9b8c-1d2e3f4a5b6c-000000") == (
        "0100018c2b7f4a3e-5c2f0a1b-7d3e-4f5a-9b8c-1d2e3f4a5b6c-000000"
    )
    assert relay_message_id("Message accepted for delivery") is None
    assert relay_message_id(None) is None


def test_composed_email_carries_each_relay_tag_once_and_the_ses_value_round_trips() -> None:
    from activities.channels.base import OutboundMessage
    from activities.channels.email_compose import compose_message
    from activities.channels.relay_tags import RELAYS

    msg = OutboundMessage(
        channel="email",
        action="SEND_EMAIL",
        idempotency_key="42:intro:1",
        sender="s@acme.test",
        to="a@lead.test",
        subject="Hi",
        text="Hello",
        unsubscribe_url="https://acme.test/u/t",
        footer="1 St",
    )
    head = compose_message(msg, relay_tags=RELAYS).raw.split(b"\r\n\r\n", 1)[0].decode()
    assert head.count("X-SMTPAPI: ") == 1 and '"sequencer_key": "42:intro:1"' in head
    assert "X-PM-Metadata-sequencer_key: 42:intro:1\r\n" in head
    [tag] = [line for line in head.split("\r\n") if line.startswith("X-SES-MESSAGE-TAGS:")]
    assert ses.decode_key(tag.split("sequencer_key=", 1)[1]) == "42:intro:1"
    plain = compose_message(msg).raw.split(b"\r\n\r\n", 1)[0].decode()
    assert "X-SMTPAPI" not in plain and "X-PM-Metadata" not in plain  # off unless EMAIL_RELAY_TAGS says


def test_x_activity_api_envelope_follow_and_dm() -> None:
    from tests.provider_samples import xaa_dm, xaa_envelope, xaa_follow

    [follow] = x_activity.parse(json.dumps(xaa_follow("1111", "2222", "1111")).encode())
    assert (follow.kind, follow.sender, follow.event_id) == ("followed_back", "2222", "xaa:-7953119945885597316")
    [ours] = x_activity.parse(json.dumps(xaa_follow("1111", "1111", "4444")).encode())
    assert ours.kind == "ignored"
    [dm] = x_activity.parse(json.dumps(xaa_dm("1111", "2222", "hello!", "2080765901528535096")).encode())
    assert (dm.kind, dm.sender, dm.text, dm.event_id) == ("reply", "2222", "hello!", "dm:2080765901528535096")
    [other] = x_activity.parse(json.dumps(xaa_envelope("profile.update.bio", "1111", {"before": "a"})).encode())
    assert other.kind == "ignored"
    with pytest.raises(ProviderFormatError) as err:
        x_activity.parse(json.dumps(xaa_envelope("follow.follow", "1111", {"source": {}})).encode())
    assert err.value.field == "data.payload.source.data"

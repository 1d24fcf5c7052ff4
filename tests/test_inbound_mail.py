"""Raw mail -> the pipeline's event: DSN, ARF, auto-reply headers, replies, bad MIME (no servers)."""

from __future__ import annotations

import pytest

from services.inbound_mail import read_mail
from tests import mail_samples as m

OURS = "<seq-1.m0@sender.test>"


def test_a_reply_keeps_only_the_newest_part_and_its_thread() -> None:
    raw = m.reply(
        sender="ada@lead.test",
        to="owner@sender.test",
        in_reply_to=OURS,
        text="Yes, Tuesday works for me.",
        message_id="<r1@lead.test>",
    )
    event = read_mail(raw)
    assert (event.type, event.sender, event.event_id, event.in_reply_to) == (
        "reply",
        "ada@lead.test",
        "<r1@lead.test>",
        OURS,
    )
    assert event.references == [OURS]
    assert event.text == "Yes, Tuesday works for me."


@pytest.mark.parametrize("permanent", [True, False])
def test_an_rfc3464_dsn_is_a_bounce_with_the_returned_message_id(permanent: bool) -> None:
    raw = m.dsn(
        to="owner@sender.test",
        recipient="gone@lead.test",
        original_id=OURS,
        message_id="<dsn1@mx.lead.test>",
        permanent=permanent,
    )
    event = read_mail(raw)
    assert event.type == "bounce" and event.permanent is permanent
    assert event.about_message_ids == [OURS] and event.about_recipients == ["gone@lead.test"]
    assert event.detail["status"] == ("5.1.1" if permanent else "4.4.1")
    assert "User unknown" in event.detail["diagnostic"] if permanent else "Temporary" in event.detail["diagnostic"]


def test_a_non_standard_bounce_is_read_by_flufl_bounce() -> None:
    raw = m.exim_bounce(
        to="owner@sender.test", recipient="gone@lead.test", original_id=OURS, message_id="<ex1@mx.lead.test>"
    )
    event = read_mail(raw)
    assert (event.type, event.permanent, event.about_recipients) == ("bounce", True, ["gone@lead.test"])
    assert OURS in event.about_message_ids


def test_an_arf_report_is_a_complaint_about_our_message() -> None:
    raw = m.arf(to="owner@sender.test", recipient="ada@lead.test", original_id=OURS, message_id="<fbl1@fbl.test>")
    event = read_mail(raw)
    assert event.type == "complaint"
    assert event.about_message_ids == [OURS] and "ada@lead.test" in event.about_recipients
    assert event.detail["feedback_type"] == "abuse"


@pytest.mark.parametrize(
    ("headers", "subject"),
    [
        ("Auto-Submitted: auto-replied\r\n", "Re: Hello"),
        ("Auto-Submitted: auto-generated\r\n", "Re: Hello"),
        ("X-Autoreply: yes\r\n", "Re: Hello"),
        ("X-Autorespond: Hello\r\n", "Re: Hello"),
        ("Precedence: auto_reply\r\n", "Re: Hello"),
        ("Precedence: bulk\r\n", "Automatic reply: Hello"),
    ],
)
def test_auto_replies_are_known_by_their_headers(headers: str, subject: str) -> None:
    raw = m.auto_reply(
        sender="ada@lead.test",
        to="owner@sender.test",
        in_reply_to=OURS,
        message_id="<a1@lead.test>",
        headers=headers,
        subject=subject,
        text="Yes, interested!",  # the text alone would read as a positive reply
    )
    assert read_mail(raw).type == "auto_reply"


@pytest.mark.parametrize(
    ("headers", "subject"),
    [("Auto-Submitted: no\r\n", "Re: Hello"), ("Precedence: bulk\r\n", "Re: Hello")],
)
def test_headers_that_do_not_say_auto_reply_leave_a_reply(headers: str, subject: str) -> None:
    raw = m.auto_reply(
        sender="ada@lead.test",
        to="owner@sender.test",
        in_reply_to=OURS,
        message_id="<a2@lead.test>",
        headers=headers,
        subject=subject,
    )
    assert read_mail(raw).type == "reply"


def test_broken_mime_is_recorded_with_the_reason() -> None:
    event = read_mail(m.broken_multipart(sender="ada@lead.test", message_id="<b1@lead.test>"))
    assert event.type == "unknown" and event.detail["malformed"] is True
    assert "malformed MIME" in event.detail["reason"] and "Boundary" in event.detail["reason"]


def test_garbage_without_a_sender_is_recorded_not_raised() -> None:
    event = read_mail(b"\x00\xff not a mail at all")
    assert event.type == "unknown" and event.detail["malformed"] is True
    assert event.event_id.startswith("sha256:")

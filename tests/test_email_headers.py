"""What a mail provider reads in List-Unsubscribe, from the raw bytes the SMTP server got.

Why raw bytes: Python's email policy RFC 2047-encodes a header word longer than a line
(`=?utf-8?q?=3Chttps...?=`), and providers never decode that header, so one-click
unsubscribe silently disappears. A decoding parser would hide exactly that, so these
tests read the header block as bytes and only unfold it (RFC 5322 section 2.2.3).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr

from activities.channels.base import OutboundMessage, PermanentChannelError
from activities.channels.email import EmailChannel, SmtpPool
from activities.channels.email_compose import MAX_LINE, MAX_UNSUBSCRIBE_URI, compose_message
from db.session import SessionFactory
from devstack.postgres import free_port
from models.enrollment import EnrollmentStatus
from settings import Settings, settings_problems
from tests.engine_harness import Wired, all_senders, make_person, start_enrollment, store_version

if TYPE_CHECKING:
    from tests.mail_servers import SmtpRecorder

BASE = "https://links.example.com/u/"
LENGTHS = [40, 76, 77, 78, 79, 100, 200, 450, 700, 899, 900, *range(41, 900, 37)]


def url_of_length(n: int) -> str:
    """An https unsubscribe URL of exactly `n` characters (token-like path)."""
    alphabet = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_."
    return BASE + "".join(alphabet[i % len(alphabet)] for i in range(n - len(BASE)))


def raw_header_lines(raw: bytes) -> list[bytes]:
    """The physical lines of the header block, exactly as received."""
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    return re.split(rb"\r?\n", head)


def raw_fields(raw: bytes) -> dict[bytes, list[tuple[bytes, list[bytes]]]]:
    """Header fields by lower-case name: (unfolded value, physical lines), no decoding."""
    fields: dict[bytes, list[tuple[bytes, list[bytes]]]] = {}
    current: list[bytes] = []
    for line in [*raw_header_lines(raw), b""]:
        if line[:1] in (b" ", b"\t"):
            current.append(line)
            continue
        if current:
            name, _, first = current[0].partition(b":")
            unfolded = first + b"".join(current[1:])  # RFC 5322 unfolding: remove the CRLFs only
            fields.setdefault(name.strip().lower(), []).append((unfolded.strip(), current))
        current = [line] if line else []
    return fields


def _msg(key: str, url: str | None = None, **kw: Any) -> OutboundMessage:
    fields: dict[str, Any] = {
        "channel": "email",
        "action": "SEND_EMAIL",
        "idempotency_key": key,
        "sender": "ada@example.com",
        "sender_name": "Ada Sender",
        "to": "bob@example.org",
        "subject": "Quick question, Bob",
        "text": "Hi Bob,\n\nA question.\n\nAda",
        "unsubscribe_url": url or url_of_length(60),
        "footer": "Acme Inc., 1 Example Street, Springfield",
        "message_id": f"<{key.replace(':', '.')}@example.com>",
    }
    fields.update(kw)
    return OutboundMessage.model_validate(fields)


@pytest.fixture
async def channel(smtp_server: SmtpRecorder) -> AsyncIterator[EmailChannel]:
    ch = EmailChannel(SmtpPool(smtp_server.host, smtp_server.port, size=1, timeout=5.0))
    yield ch
    await ch.aclose()


def assert_list_unsubscribe(raw: bytes, uris: list[str]) -> None:
    """The header carries exactly `<uri>, <uri>` unencoded, folded only between URIs."""
    fields = raw_fields(raw)
    assert len(fields.get(b"list-unsubscribe", [])) == 1, raw[:2000]
    value, lines = fields[b"list-unsubscribe"][0]
    assert b"=?" not in value, value[:200]
    found = re.findall(rb"<([^<>]*)>", value)
    assert [u.decode() for u in found] == uris
    assert re.fullmatch(rb"<[^<>]*>(?:[ \t]*,[ \t]*<[^<>]*>)*", value), value[:200]
    # folded only between URIs: every continuation line starts (after WSP) with '<'
    assert lines[0].startswith(b"List-Unsubscribe:")
    for cont in lines[1:]:
        assert cont.lstrip(b" \t").startswith(b"<"), cont[:80]
    assert all(len(line) <= 998 for line in raw_header_lines(raw))
    post = fields.get(b"list-unsubscribe-post", [])
    assert [v for v, _ in post] == [b"List-Unsubscribe=One-Click"]


async def test_list_unsubscribe_is_never_encoded_for_urls_of_40_to_900_chars(
    channel: EmailChannel, smtp_server: SmtpRecorder
) -> None:
    for n in LENGTHS:
        await channel.send(_msg(f"1:len{n}:1", url_of_length(n)))
    assert len(smtp_server.messages) == len(LENGTHS)
    for n, (_, _, raw) in zip(LENGTHS, smtp_server.messages, strict=True):
        assert len(url_of_length(n)) == n
        assert_list_unsubscribe(raw, [url_of_length(n)])


async def test_mailto_beside_https_folds_between_the_uris_only(
    channel: EmailChannel, smtp_server: SmtpRecorder
) -> None:
    lengths = [40, 78, 300, 900]
    mailto = "mailto:unsubscribe@example.com?subject=unsubscribe-AbCdEf0123456789.xyz"
    for n in lengths:
        await channel.send(_msg(f"2:len{n}:1", url_of_length(n), unsubscribe_mailto=mailto))
    for n, (_, _, raw) in zip(lengths, smtp_server.messages, strict=True):
        assert_list_unsubscribe(raw, [url_of_length(n), mailto])
        _, lines = raw_fields(raw)[b"list-unsubscribe"][0]
        assert len(lines) == 2  # too long for one line: folded once, between the two URIs


def test_compose_is_pure_and_short_headers_stay_on_one_line() -> None:
    composed = compose_message(
        _msg("3:a:1", "https://x.io/u/t", unsubscribe_mailto="mailto:u@x.io"),
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert composed.message_id == "<3.a.1@example.com>"
    fields = raw_fields(composed.raw)
    value, lines = fields[b"list-unsubscribe"][0]
    assert value == b"<https://x.io/u/t>, <mailto:u@x.io>" and len(lines) == 1
    assert fields[b"message-id"][0][0] == b"<3.a.1@example.com>"
    assert fields[b"date"][0][0] == b"Fri, 02 Jan 2026 03:04:05 +0000"
    assert composed.raw.count(b"\r\n\r\n") >= 1 and b"\n" not in composed.raw.replace(b"\r\n", b"")


def test_long_threading_ids_are_written_raw_and_folded_between_ids() -> None:
    long_ids = [f"<{'r' * 120}{i}@mail.example.net>" for i in range(4)]
    composed = compose_message(
        _msg("4:b:1", url_of_length(60), in_reply_to=long_ids[-1], references=long_ids[:-1]),
    )
    fields = raw_fields(composed.raw)
    assert fields[b"in-reply-to"][0][0] == long_ids[-1].encode()
    value, lines = fields[b"references"][0]
    assert b"=?" not in value and value.split() == [i.encode() for i in long_ids]
    assert len(lines) == 4 and all(line.lstrip().startswith(b"<") for line in lines[1:])


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("unsubscribe_url", url_of_length(MAX_UNSUBSCRIBE_URI + 1), "at most"),
        ("unsubscribe_url", "https://x.io/u/a b", "characters a URI cannot carry"),
        ("unsubscribe_url", "https://x.io/u/ü", "characters a URI cannot carry"),
        ("unsubscribe_url", "ftp://x.io/u/a", "absolute https link"),
        ("unsubscribe_mailto", "unsub@x.io", "mailto: URI"),
        ("unsubscribe_mailto", "mailto:u@x.io?subject=a>b", "mailto: URI"),
        ("in_reply_to", "no-brackets@x.io", "not a message id"),
        ("message_id", "<a b@x.io>", "not a message id"),
    ],
)
def test_unwritable_values_are_refused_with_the_field_named(field: str, value: str, error: str) -> None:
    kwargs = {"unsubscribe_url": url_of_length(60), field: value}
    with pytest.raises(PermanentChannelError, match=error) as caught:
        compose_message(_msg("5:c:1", **kwargs))
    assert field in str(caught.value) and caught.value.bounce is False


def test_the_longest_url_that_fits_is_still_written_on_one_line() -> None:
    url = url_of_length(MAX_UNSUBSCRIBE_URI)
    raw = compose_message(_msg("6:d:1", url, unsubscribe_mailto="mailto:u@x.io")).raw
    assert_list_unsubscribe(raw, [url, "mailto:u@x.io"])
    assert max(len(line) for line in raw_header_lines(raw)) == MAX_LINE


async def test_the_worker_sends_raw_list_unsubscribe_with_a_production_length_url(
    wired: Wired, temporal_env: Any, session_factory: SessionFactory, task_queue: str, smtp_server: SmtpRecorder
) -> None:
    """End to end: the URL the delivery activity builds (over 77 characters) arrives unencoded."""
    await all_senders(session_factory)
    base = "https://unsubscribe.mail.acme-corporation.example.com/sequencer/links"
    async with wired(delivery={"public_base_url": base, "unsubscribe_mailto": "unsubscribe@acme.example.com"}):
        one_mail = {
            "name": f"raw-{uuid.uuid4().hex[:8]}",
            "steps": [
                {"id": "m0", "action": "SEND_EMAIL", "subject": "Hi", "body": "Body", "edges": [{"trigger": "END"}]}
            ],
        }
        ref, defn = await store_version(session_factory, one_mail)
        pid = await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test")
        handle = await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid)
        assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    [(_, _, raw)] = smtp_server.messages
    value, _ = raw_fields(raw)[b"list-unsubscribe"][0]
    https, mailto = (u.decode() for u in re.findall(rb"<([^<>]*)>", value))
    assert https.startswith(f"{base}/u/") and len(https) > 100
    token = https.rsplit("/", 1)[1]
    assert mailto == f"mailto:unsubscribe@acme.example.com?subject=unsubscribe-{token}"
    assert_list_unsubscribe(raw, [https, mailto])


# ------------------------------------------------------------------ PUBLIC_BASE_URL in production

SAFE_SECRETS = {
    "WEBHOOK_SECRET": "w" * 40,
    "LINK_SECRET": "l" * 40,
    "RELAY_TOKEN": "t" * 40,
    "RELAY_SIGNING_KEY": "k" * 40,
}


@pytest.mark.parametrize("url", ["http://links.acme.example.com", "links.acme.example.com", "https://"])
def test_production_needs_an_https_public_base_url(url: str) -> None:
    secrets: dict[str, Any] = {k.lower(): SecretStr(v) for k, v in SAFE_SECRETS.items()}
    settings = Settings(sequencer_env="production", public_base_url=url, **secrets)
    assert any("PUBLIC_BASE_URL must be an https URL" in p and url in p for p in settings_problems(settings))
    ok = Settings(sequencer_env="production", public_base_url="https://l.acme.example.com", **secrets)
    assert settings_problems(ok) == []
    assert settings_problems(Settings(sequencer_env="dev", public_base_url=url)) == []


@pytest.mark.integration  # starts the real process
def test_the_cli_refuses_to_start_in_production_with_an_http_public_base_url() -> None:
    root = Path(__file__).resolve().parent.parent
    closed = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WEBHOOK_", "LINK_", "RELAY_", "SEQUENCER_", "PUBLIC_"))
    }
    env.update(
        SAFE_SECRETS,
        SEQUENCER_ENV="production",
        PUBLIC_BASE_URL="http://links.acme.example.com",
        DATABASE_URL=f"postgresql+asyncpg://nobody@127.0.0.1:{closed}/none",
        TEMPORAL_ADDRESS=f"127.0.0.1:{closed}",
    )
    argv = [sys.executable, "starter.py", "status", "--person", "1"]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "refuses to start" in done.stderr and "PUBLIC_BASE_URL must be an https URL" in done.stderr, done.stderr

"""DKIM when Sequencer signs: verified over the bytes the SMTP server received.

Why: a signature that a receiver cannot verify is worse than none, and what breaks it
(refolded headers, a header added in transit, the wrong key in DNS) only shows at the
other side. dkimpy verifies here with a `dnsfunc` that answers the TXT record that
`senders dkim` told the user to publish; the key is stored encrypted with SECRETS_KEY.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import SecretStr
from sqlalchemy import select

from activities.channels.base import DkimKey, OutboundMessage
from activities.channels.email_compose import compose_message
from db.session import SessionFactory
from db.tables import Delivery, SenderAccount
from models.enrollment import EnrollmentStatus
from services.secret_box import SecretBox, generate_key
from services.sender_dkim import DkimConfigError, clear_sender_dkim, sender_dkim_record, set_sender_dkim
from tests.cli_harness import cli
from tests.engine_harness import Wired, make_person, make_sender, start_enrollment, store_version
from tests.eventually import eventually

REQUIRED = {"from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post"}


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def dns_answering(records: dict[str, str]) -> Any:
    """A dkimpy `dnsfunc` that knows only `records` (name -> TXT value)."""
    asked: list[str] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name.decode())
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value is not None else None

    dnsfunc.asked = asked  # type: ignore[attr-defined]
    return dnsfunc


def signed_headers(raw: bytes) -> list[str]:
    """The h= tag of the (first) DKIM-Signature, lower-cased."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", head).decode()
    sig = next(line for line in unfolded.split("\r\n") if line.lower().startswith("dkim-signature:"))
    tags = dict(t.strip().split("=", 1) for t in sig.split(":", 1)[1].split(";") if "=" in t)
    return [h.strip().lower() for h in re.sub(r"\s", "", tags["h"]).split(":")]


def _msg(pem: str, **kw: Any) -> OutboundMessage:
    fields: dict[str, Any] = {
        "channel": "email",
        "action": "SEND_EMAIL",
        "idempotency_key": "7:intro:1",
        "sender": "ada@acme.test",
        "sender_name": "Ada Sender",
        "to": "bob@example.org",
        "subject": "Café for Bob?",
        "text": "Hi Bob,\n.a dot line\n\nAda",
        "unsubscribe_url": "https://links.acme.test/u/" + "t" * 200,
        "unsubscribe_mailto": "mailto:u@acme.test?subject=unsubscribe-" + "t" * 40,
        "footer": "Acme, 1 Road",
        "message_id": "<abc.seq@acme.test>",
        "dkim": DkimKey(selector="s1", domain="acme.test", private_key=SecretStr(pem)),
    }
    fields.update(kw)
    return OutboundMessage.model_validate(fields)


def test_a_composed_message_verifies_and_tampering_breaks_it(rsa_pem: str) -> None:
    from services.sender_dkim import dns_txt

    txt, bits = dns_txt(rsa_pem)
    dns = dns_answering({"s1._domainkey.acme.test": txt})
    raw = compose_message(_msg(rsa_pem)).raw
    assert raw.startswith(b"DKIM-Signature: ")
    assert dkim.verify(raw, dnsfunc=dns)
    assert dns.asked == ["s1._domainkey.acme.test."]
    names = signed_headers(raw)
    assert REQUIRED <= set(names)
    for oversigned in ("from", "subject", "list-unsubscribe", "list-unsubscribe-post"):
        assert names.count(oversigned) == 2, names  # a second one added in transit breaks it
    assert bits == 2048

    other = raw.replace(b"links.acme.test/u/", b"links.evil.test/u/")
    assert other != raw and not dkim.verify(other, dnsfunc=dns)
    added = raw.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.test/u>\r\n\r\n", 1)
    assert not dkim.verify(added, dnsfunc=dns)
    assert not dkim.verify(raw, dnsfunc=dns_answering({"s1._domainkey.acme.test": dns_txt(_other_key())[0]}))


def _other_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


async def test_the_worker_signs_and_the_signature_verifies_over_the_received_bytes(
    wired: Wired,
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    rsa_pem: str,
) -> None:
    box = SecretBox([generate_key()])
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    record = await set_sender_dkim(session_factory, box, sender_id, selector="s2026", private_key_pem=rsa_pem)
    assert (record.name, record.aligned) == ("s2026._domainkey.acme.test", True)
    async with session_factory() as s:
        stored = (await s.execute(select(SenderAccount).where(SenderAccount.id == sender_id))).scalar_one()
    assert stored.dkim_private_key and "PRIVATE KEY" not in stored.dkim_private_key  # encrypted at rest
    assert box.decrypt(stored.dkim_private_key) == rsa_pem

    raw_sequence = {
        "name": f"dkim-{uuid.uuid4().hex[:8]}",
        "steps": [
            {
                "id": "m0",
                "action": "SEND_EMAIL",
                "subject": "Grüße, {{ first_name }}",
                "body": "B",
                "edges": [{"trigger": "END"}],
            }
        ],
    }
    ref, defn = await store_version(session_factory, raw_sequence)
    pid = await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    async with wired(delivery={"secrets": box, "unsubscribe_mailto": "unsubscribe@acme.test"}):
        handle = await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid)
        assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    [(_, _, raw)] = smtp_server.messages
    dns = dns_answering({record.name: record.txt})
    assert dkim.verify(raw, dnsfunc=dns)
    assert REQUIRED <= set(signed_headers(raw))
    assert re.search(rb"(?m)^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=acme.test;", raw)
    assert b"s=s2026" in raw


async def test_keys_are_checked_before_they_are_stored(session_factory: SessionFactory, rsa_pem: str) -> None:
    box = SecretBox([generate_key()])
    email = await make_sender(session_factory, "email", "ops@mail.acme.test")
    x = await make_sender(session_factory, "x", "901")
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cases = [
        ({"selector": "s 1", "private_key_pem": rsa_pem}, "--selector"),
        ({"selector": "s1", "private_key_pem": "not a key"}, "--key-file: not an unencrypted PEM"),
        ({"selector": "s1", "private_key_pem": ed.decode()}, "needs RSA"),
        ({"selector": "s1", "private_key_pem": rsa_pem, "domain": "localhost"}, "--domain"),
    ]
    for kwargs, named in cases:
        with pytest.raises(DkimConfigError, match=named):
            await set_sender_dkim(session_factory, box, email, **kwargs)
    with pytest.raises(DkimConfigError, match="x sender"):
        await set_sender_dkim(session_factory, box, x, selector="s1", private_key_pem=rsa_pem)
    with pytest.raises(DkimConfigError, match="SECRETS_KEY is not set"):
        await set_sender_dkim(session_factory, SecretBox([]), email, selector="s1", private_key_pem=rsa_pem)
    with pytest.raises(LookupError, match="sender 999999"):
        await set_sender_dkim(session_factory, box, 999999, selector="s1", private_key_pem=rsa_pem)
    assert await sender_dkim_record(session_factory, box, email) is None  # nothing half-written

    # A parent domain is aligned (DMARC relaxed); an unrelated one is stored but flagged.
    record = await set_sender_dkim(
        session_factory, box, email, selector="s1", private_key_pem=rsa_pem, domain="acme.test"
    )
    assert record.aligned and record.domain == "acme.test"
    other = await set_sender_dkim(
        session_factory, box, email, selector="s1", private_key_pem=rsa_pem, domain="esp.test"
    )
    assert not other.aligned
    with pytest.raises(DkimConfigError, match="cannot decrypt the sender .* DKIM key"):
        await sender_dkim_record(session_factory, SecretBox([generate_key()]), email)
    await clear_sender_dkim(session_factory, email)
    assert await sender_dkim_record(session_factory, box, email) is None


async def test_cli_stores_the_key_and_prints_the_dns_record(
    database_url: str, session_factory: SessionFactory, rsa_pem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets_key = generate_key()
    monkeypatch.setenv("SECRETS_KEY", secrets_key)
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    key_file = tmp_path / "dkim.pem"
    key_file.write_text(rsa_pem)

    done = await cli(database_url, "senders", "dkim", str(sender_id), "--selector", "s1", "--key-file", str(key_file))
    assert done.code == 0, done.err
    assert f"sender {sender_id} signs as d=acme.test s=s1 (RSA 2048 bits)" in done.out
    from services.sender_dkim import dns_txt

    txt = dns_txt(rsa_pem)[0]
    line = next(ln for ln in done.out.splitlines() if "IN TXT" in ln)
    assert line.strip().startswith("s1._domainkey.acme.test. IN TXT ")
    assert "".join(re.findall(r'"([^"]*)"', line)) == txt
    assert "PRIVATE" not in done.out + done.err

    shown = await cli(database_url, "senders", "dkim", str(sender_id))
    assert shown.code == 0 and txt[:60] in shown.out
    listed = await cli(database_url, "senders", "list")
    assert "DKIM-signed as s1._domainkey.acme.test" in listed.out and "PRIVATE" not in listed.out
    async with session_factory() as s:
        stored = (await s.execute(select(SenderAccount).where(SenderAccount.id == sender_id))).scalar_one()
    assert stored.dkim_private_key and SecretBox([secrets_key]).decrypt(stored.dkim_private_key) == rsa_pem

    half = await cli(database_url, "senders", "dkim", str(sender_id), "--selector", "s2")
    assert half.code == 2 and "--selector and --key-file go together" in half.err
    cleared = await cli(database_url, "senders", "dkim", str(sender_id), "--clear")
    assert cleared.code == 0
    none = await cli(database_url, "senders", "dkim", str(sender_id))
    assert "not signed by Sequencer" in none.out


async def test_a_key_the_worker_cannot_open_pauses_the_sender_and_sends_nothing(
    wired: Wired,
    temporal_env: Any,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    rsa_pem: str,
) -> None:
    stored_with = SecretBox([generate_key()])
    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    await set_sender_dkim(session_factory, stored_with, sender_id, selector="s1", private_key_pem=rsa_pem)
    one_mail = {
        "name": f"dkim-{uuid.uuid4().hex[:8]}",
        "steps": [{"id": "m0", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]}],
    }
    ref, defn = await store_version(session_factory, one_mail)
    pid = await make_person(session_factory, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    paused: SenderAccount | None = None
    async with wired(delivery={"secrets": SecretBox([generate_key()])}):  # SECRETS_KEY lost the old key
        await start_enrollment(temporal_env.client, task_queue, session_factory, ref, defn, pid)

        async def paused_sender() -> SenderAccount | None:  # the activity's outcome, in PostgreSQL
            async with session_factory() as s:
                row = await s.get(SenderAccount, sender_id)
            return row if row is not None and row.paused_at is not None else None

        paused = await eventually(paused_sender, "the sender to be paused", tries=600, interval=0.1)
    assert paused is not None and paused.paused_at is not None
    assert paused.paused_kind == "auth" and "DKIM" in (paused.paused_reason or "")
    assert "cannot decrypt the sender" in (paused.paused_reason or "")
    assert smtp_server.messages == []
    async with session_factory() as s:
        [row] = (await s.execute(select(Delivery).where(Delivery.sender_id == sender_id))).scalars()
    assert row.status == "claimed" and "DKIM" in (row.error or "")
    assert "PRIVATE" not in (row.error or "") + (paused.paused_reason or "")

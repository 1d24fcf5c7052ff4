"""Message-IDs that reveal and allow computing nothing, yet stay put across retries.

Why: a Message-ID that is a plain hash of (enrollment, step, attempt) lets any recipient
compute other leads' ids and forge a reply that stops, holds or unsubscribes them. The
id is an HMAC keyed by the link secret, stored in the ledger before the first write and
reused by every retry (even after the secret rotated), and replies are matched through
the stored id.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

from sqlalchemy import select

from activities.channels.base import make_message_id
from activities.delivery import DeliveryConfig
from db.tables import Delivery, Enrollment
from models.enrollment import EnrollmentStatus
from tests.engine_harness import Sequencer, make_person, start_enrollment, store_version

PUBLIC_DEFAULT = "dev-webhook-secret-change-me"


def _guesses(key: str, domain: str) -> set[str]:
    """Every id an attacker who knows the scheme and the public ids, but not the secret, can make."""
    ids = {f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}.seq@{domain}>"}  # the old scheme
    for guess in ("", PUBLIC_DEFAULT, key):
        mac = hmac.new(guess.encode(), b"message-id\0" + key.encode(), hashlib.sha256).hexdigest()[:32]
        ids.add(f"<{mac}.seq@{domain}>")
    return ids


def test_knowing_one_leads_ids_does_not_give_another_leads_id() -> None:
    secret = "a-long-random-link-secret-0123456789abcdef"
    mine = {k: make_message_id(k, "acme.test", secret=secret) for k in ("41:intro:1", "41:bump:1")}
    theirs_key = "42:intro:1"  # the next enrollment: public, sequential
    theirs = make_message_id(theirs_key, "acme.test", secret=secret)
    assert theirs not in _guesses(theirs_key, "acme.test")
    assert theirs not in mine.values()
    # The id is a function of the secret, not of the public ids alone.
    assert make_message_id(theirs_key, "acme.test", secret=secret) == theirs
    assert make_message_id(theirs_key, "acme.test", secret=secret + "x") != theirs
    # The old, keyless scheme was computable by anyone: this test would have failed on it.
    old = f"<{hashlib.sha256(theirs_key.encode()).hexdigest()[:32]}.seq@acme.test>"
    assert old in _guesses(theirs_key, "acme.test")


def test_without_a_secret_the_id_is_random() -> None:
    a = make_message_id("42:intro:1", "acme.test", secret=None)
    b = make_message_id("42:intro:1", "acme.test", secret=None)
    assert a != b and a.endswith(".seq@acme.test>")


async def test_a_retry_keeps_the_ledgers_message_id_even_after_the_secret_rotated(sequencer_stack: Sequencer) -> None:
    stack = sequencer_stack
    raw = {
        "name": f"mid-{uuid.uuid4().hex[:8]}",
        "steps": [{"id": "m0", "action": "SEND_EMAIL", "subject": "Hi", "body": "B", "edges": [{"trigger": "END"}]}],
    }
    ref, defn = await store_version(stack.sf, raw)
    pid = await make_person(stack.sf, email=f"{uuid.uuid4().hex[:8]}@lead.test")
    stack.smtp.fail_codes.append("451 4.7.1 Greylisted")  # the first attempt's DATA is refused
    config = DeliveryConfig(
        public_base_url="https://links.acme.test", link_secret="first-secret", postal_address="1 Test St"
    )
    claims = 0

    def rotate_before_the_retry(point: str) -> None:
        nonlocal claims
        if point == "after_claim":
            claims += 1
            if claims == 2:  # the retry: LINK_SECRET was rotated meanwhile
                config.link_secret = "rotated-secret"

    async with stack.worker(fault=rotate_before_the_retry, delivery=config):
        handle = await start_enrollment(stack.env.client, stack.task_queue, stack.sf, ref, defn, pid)
        assert (await handle.result()).status == EnrollmentStatus.COMPLETED
    assert claims == 2
    [message] = stack.smtp.parsed()
    async with stack.sf() as s:
        mine = select(Enrollment.id).where(Enrollment.person_id == pid)
        [sent] = (await s.execute(select(Delivery).where(Delivery.enrollment_id.in_(mine)))).scalars()
    assert sent.status == "sent" and sent.attempts_made == 2 and sent.message_id is not None
    assert message["Message-ID"] == sent.message_id
    domain = sent.message_id.rsplit("@", 1)[1].rstrip(">")
    assert sent.message_id == make_message_id(sent.idempotency_key, domain, secret="first-secret")
    assert sent.message_id != make_message_id(sent.idempotency_key, domain, secret="rotated-secret")

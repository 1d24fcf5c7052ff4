"""The relay channel (LinkedIn, XMTP) against a real local relay speaking docs/relay.md.

Why: the relay protocol is a public contract users build their automation against, so
the tests check the wire format (signature verified by the fake's own code, idempotency
key in header and body) and every answer's classification, including 409 "already done".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from activities.channels.base import (
    OutboundMessage,
    PermanentChannelError,
    SenderConfigError,
    TransientChannelError,
    UncertainChannelError,
)
from activities.channels.relay import RelayChannel, sign, verify
from tests.fakes import RELAY_SIGNING_KEY, RELAY_TOKEN, FakeRelay


def _msg(action: str = "SEND_CONNECTION_REQUEST", channel: str = "linkedin", **kw: str) -> OutboundMessage:
    fields = {
        "channel": channel,
        "action": action,
        "idempotency_key": "42:connect:1",
        "sender": "seat-1",
        "to": "https://www.linkedin.com/in/ada-lovelace",
        "text": "Hi Ada, loved your talk on engines.",
    }
    fields.update(kw)
    return OutboundMessage.model_validate(fields)


@pytest.fixture
async def channel(relay_server: FakeRelay) -> AsyncIterator[RelayChannel]:
    ch = RelayChannel(httpx.AsyncClient(base_url=relay_server.base_url, timeout=5.0), RELAY_TOKEN, RELAY_SIGNING_KEY)
    yield ch
    await ch.aclose()


async def test_connection_request_is_signed_and_accepted(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    result = await channel.send(_msg())
    assert relay_server.rejected_signatures == 0
    assert len(relay_server.actions) == 1
    action = relay_server.actions[0]
    assert result.provider_message_id == action["id"]
    req = relay_server.requests[0]
    assert (req.method, req.path) == ("POST", "/v1/actions")
    assert req.json == {
        "idempotency_key": "42:connect:1",
        "channel": "linkedin",
        "action": "SEND_CONNECTION_REQUEST",
        "sender": "seat-1",
        "to": "https://www.linkedin.com/in/ada-lovelace",
        "text": "Hi Ada, loved your talk on engines.",
    }
    assert req.headers["idempotency-key"] == "42:connect:1"
    assert req.headers["authorization"] == f"Bearer {RELAY_TOKEN}"
    assert req.headers["content-type"] == "application/json"
    # The signature, recomputed independently from the documented recipe.
    ts = req.headers["x-relay-timestamp"]
    digest = hmac.new(RELAY_SIGNING_KEY.encode(), f"{ts}.".encode() + req.body, hashlib.sha256)
    assert req.headers["x-relay-signature"] == f"v1={digest.hexdigest()}"


async def test_xmtp_dm_and_linkedin_dm_with_subject(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    await channel.send(
        _msg(
            "SEND_XMTP_DM",
            "xmtp",
            idempotency_key="1:x:1",
            to="0xAbC0000000000000000000000000000000000001",
        )
    )
    await channel.send(_msg("SEND_LINKEDIN_DM", idempotency_key="1:li:1", subject="Engines"))
    assert [a["channel"] for a in relay_server.actions] == ["xmtp", "linkedin"]
    assert "subject" not in relay_server.actions[0]
    assert relay_server.actions[1]["subject"] == "Engines"


async def test_repeat_with_the_same_key_is_409_and_counts_as_sent(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    first = await channel.send(_msg())
    second = await channel.send(_msg())
    assert second.provider_message_id == first.provider_message_id
    assert len(relay_server.actions) == 1
    assert len(relay_server.requests) == 2


async def test_the_fake_rejects_a_wrong_signature(
    relay_server: FakeRelay,
) -> None:
    """The signature check in the fake can fail: a tampered body is refused."""
    body = json.dumps(
        _msg().model_dump(include={"idempotency_key", "channel", "action", "sender", "to", "text"})
    ).encode()
    ts = int(time.time())
    good = sign(RELAY_SIGNING_KEY, ts, body)
    tampered = body.replace(b"Ada", b"Bob")
    headers = {
        "Authorization": f"Bearer {RELAY_TOKEN}",
        "Idempotency-Key": "42:connect:1",
        "X-Relay-Timestamp": str(ts),
        "X-Relay-Signature": good,
        "Content-Type": "application/json",
    }
    async with httpx.AsyncClient(base_url=relay_server.base_url) as client:
        refused = await client.post("/v1/actions", content=tampered, headers=headers)
        stale = await client.post(
            "/v1/actions",
            content=body,
            headers={
                **headers,
                "X-Relay-Timestamp": str(ts - 3600),
                "X-Relay-Signature": sign(RELAY_SIGNING_KEY, ts - 3600, body),
            },
        )
        accepted = await client.post("/v1/actions", content=body, headers=headers)
    assert refused.status_code == 401
    assert stale.status_code == 401
    assert relay_server.rejected_signatures == 2
    assert accepted.status_code == 202
    assert verify(RELAY_SIGNING_KEY, str(ts), body, good, now=ts)
    assert not verify(RELAY_SIGNING_KEY, str(ts), tampered, good, now=ts)
    assert not verify(RELAY_SIGNING_KEY, str(ts - 3600), body, sign(RELAY_SIGNING_KEY, ts - 3600, body), now=ts)


async def test_wrong_token_is_a_sender_problem_not_the_leads(relay_server: FakeRelay) -> None:
    ch = RelayChannel(httpx.AsyncClient(base_url=relay_server.base_url), "not-the-token", RELAY_SIGNING_KEY)
    try:
        with pytest.raises(SenderConfigError) as caught:
            await ch.send(_msg())
    finally:
        await ch.aclose()
    assert caught.value.code == "401"
    assert relay_server.actions == []


async def test_429_is_transient_with_retry_after(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    relay_server.fail_next(429, {"Retry-After": "30"}, {"error": "seat busy"})
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.retry_after == pytest.approx(30.0)
    assert "seat busy" in str(caught.value)
    await channel.send(_msg())
    assert len(relay_server.actions) == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_transient(
    channel: RelayChannel,
    relay_server: FakeRelay,
    status: int,
) -> None:
    relay_server.fail_next(status, {}, {"error": "browser crashed"})
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.code == str(status)
    assert "browser crashed" in str(caught.value)


async def test_other_4xx_is_permanent_with_the_error(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    relay_server.fail_next(422, {}, {"error": "note longer than 300 characters"})
    with pytest.raises(PermanentChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.bounce is False
    assert "note longer than 300 characters" in str(caught.value)


async def test_invalid_recipient_is_a_bounce(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    relay_server.invalid_recipients.add("https://www.linkedin.com/in/nobody")
    with pytest.raises(PermanentChannelError) as caught:
        await channel.send(_msg(to="https://www.linkedin.com/in/nobody"))
    assert caught.value.bounce is True
    assert caught.value.code == "invalid_recipient"


async def test_no_answer_after_sending_is_uncertain(relay_server: FakeRelay) -> None:
    relay_server.hang_next()
    ch = RelayChannel(
        httpx.AsyncClient(base_url=relay_server.base_url, timeout=httpx.Timeout(5.0, read=0.3)),
        RELAY_TOKEN,
        RELAY_SIGNING_KEY,
    )
    try:
        with pytest.raises(UncertainChannelError):
            await ch.send(_msg())
    finally:
        await ch.aclose()
    assert len(relay_server.requests) == 1


async def test_unreachable_relay_is_transient() -> None:
    from devstack.postgres import free_port

    ch = RelayChannel(httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}"), RELAY_TOKEN, RELAY_SIGNING_KEY)
    try:
        with pytest.raises(TransientChannelError):
            await ch.send(_msg())
    finally:
        await ch.aclose()


async def test_unsupported_action_is_refused_locally(
    channel: RelayChannel,
    relay_server: FakeRelay,
) -> None:
    with pytest.raises(PermanentChannelError, match="cannot perform"):
        await channel.send(
            OutboundMessage(
                channel="x",
                action="SEND_TWITTER_DM",
                idempotency_key="k",
                sender="1",
                to="2",
                text="hi",
            )
        )
    assert relay_server.requests == []

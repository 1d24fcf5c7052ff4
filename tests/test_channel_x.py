"""The X channel against a real local HTTP server speaking the X API v2 subset.

Why: the classification of X's answers (429 with its reset header, 5xx, 4xx, a request
that was sent but never answered) decides between retrying, giving up and never
re-sending, so each path is exercised over real HTTP.
"""

from __future__ import annotations

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
from activities.channels.x import XChannel, make_x_client, parse_retry_after
from tests.fakes import X_TOKEN, FakeRelay, FakeX

NOW = 1_700_000_000.0
SENDER = "1111"
TARGET = "2222"


def _msg(action: str = "SEND_TWITTER_DM", **kw: str) -> OutboundMessage:
    fields = {
        "channel": "x",
        "action": action,
        "idempotency_key": "7:dm:1",
        "sender": SENDER,
        "to": TARGET,
        "text": "Hi Ada, thanks for the follow-back!",
    }
    fields.update(kw)
    return OutboundMessage.model_validate(fields)


@pytest.fixture
async def channel(x_server: FakeX) -> AsyncIterator[XChannel]:
    ch = XChannel(make_x_client(x_server.base_url, X_TOKEN, timeout=5.0), clock=lambda: NOW)
    yield ch
    await ch.aclose()


async def test_dm_posts_text_to_the_participant_and_returns_the_event_id(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    result = await channel.send(_msg())
    assert len(x_server.dms) == 1
    dm = x_server.dms[0]
    assert dm["participant_id"] == TARGET
    assert dm["text"] == "Hi Ada, thanks for the follow-back!"
    assert result.provider_message_id == dm["dm_event_id"]
    req = x_server.requests[0]
    assert (req.method, req.path) == ("POST", f"/2/dm_conversations/with/{TARGET}/messages")
    assert req.headers["authorization"] == f"Bearer {X_TOKEN}"
    assert req.json == {"text": "Hi Ada, thanks for the follow-back!"}
    assert "x-idempotency-key" not in req.headers


async def test_follow_and_unfollow_use_the_sender_as_source(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    await channel.send(_msg("FOLLOW_ON_TWITTER", text=""))
    assert x_server.following == {(SENDER, TARGET)}
    follow = x_server.requests[-1]
    assert (follow.method, follow.path) == ("POST", f"/2/users/{SENDER}/following")
    assert follow.json == {"target_user_id": TARGET}

    await channel.send(_msg("UNFOLLOW_ON_TWITTER"))
    assert x_server.following == set()
    unfollow = x_server.requests[-1]
    assert (unfollow.method, unfollow.path) == (
        "DELETE",
        f"/2/users/{SENDER}/following/{TARGET}",
    )


async def test_429_is_transient_until_the_rate_limit_reset(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(
        429,
        {"x-rate-limit-reset": str(int(NOW) + 900), "x-rate-limit-remaining": "0"},
        {"title": "Too Many Requests", "detail": "Too Many Requests", "status": 429},
    )
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.code == "429"
    assert caught.value.retry_after == pytest.approx(900.0)
    assert "Too Many Requests" in str(caught.value)
    assert x_server.dms == []
    # The window passed: the same message now goes through.
    await channel.send(_msg())
    assert len(x_server.dms) == 1


async def test_429_without_reset_uses_retry_after(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(429, {"retry-after": "42"}, {"title": "Too Many Requests"})
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.retry_after == pytest.approx(42.0)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
@pytest.mark.parametrize("action", ["SEND_TWITTER_DM", "FOLLOW_ON_TWITTER"])
async def test_5xx_or_408_to_a_create_is_uncertain(
    channel: XChannel,
    x_server: FakeX,
    status: int,
    action: str,
) -> None:
    # X's front end can fail after its back end performed the DM: never send it again.
    x_server.fail_next(status, {}, {"title": "Service Unavailable"})
    with pytest.raises(UncertainChannelError) as caught:
        await channel.send(_msg(action=action))
    assert caught.value.code == str(status)
    assert len(x_server.requests) == 1


@pytest.mark.parametrize("status", [500, 503, 408])
async def test_5xx_to_the_idempotent_unfollow_is_transient(
    channel: XChannel,
    x_server: FakeX,
    status: int,
) -> None:
    x_server.fail_next(status, {}, {"title": "Service Unavailable"})
    with pytest.raises(TransientChannelError) as caught:
        await channel.send(_msg(action="UNFOLLOW_ON_TWITTER"))
    assert caught.value.code == str(status)
    assert not isinstance(caught.value, PermanentChannelError)


@pytest.mark.parametrize(
    ("status", "detail"),
    [
        (403, "You are not permitted to send Direct Messages to this user."),
        (400, "One or more parameters to your request was invalid."),
        (404, "Could not find user with participant_id: [2222]."),
    ],
)
async def test_4xx_is_permanent_with_the_api_detail(
    channel: XChannel,
    x_server: FakeX,
    status: int,
    detail: str,
) -> None:
    x_server.fail_next(status, {}, {"title": "Forbidden", "detail": detail, "status": status})
    with pytest.raises(PermanentChannelError) as caught:
        await channel.send(_msg())
    assert caught.value.code == str(status)
    assert caught.value.bounce is False
    assert detail in str(caught.value)


async def test_errors_array_detail_is_reported(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(403, {}, {"errors": [{"message": "DM closed by recipient"}]})
    with pytest.raises(PermanentChannelError, match="DM closed by recipient"):
        await channel.send(_msg())


async def test_bad_token_is_a_sender_problem_not_the_leads(x_server: FakeX) -> None:
    ch = XChannel(make_x_client(x_server.base_url, "wrong-token", timeout=5.0))
    try:
        with pytest.raises(SenderConfigError) as caught:
            await ch.send(_msg())
    finally:
        await ch.aclose()
    assert caught.value.code == "401"
    assert x_server.dms == []


async def test_per_sender_token_overrides_the_default(x_server: FakeX) -> None:
    ch = XChannel(
        make_x_client(x_server.base_url, "default-token-not-accepted", timeout=5.0),
        sender_tokens={SENDER: X_TOKEN},
    )
    try:
        await ch.send(_msg())
    finally:
        await ch.aclose()
    assert x_server.requests[-1].headers["authorization"] == f"Bearer {X_TOKEN}"
    assert len(x_server.dms) == 1


async def test_read_timeout_after_sending_is_uncertain(x_server: FakeX) -> None:
    x_server.hang_next()
    client = httpx.AsyncClient(
        base_url=x_server.base_url,
        headers=x_server.auth_headers,
        timeout=httpx.Timeout(5.0, read=0.3),
    )
    ch = XChannel(client)
    try:
        with pytest.raises(UncertainChannelError):
            await ch.send(_msg())
    finally:
        await ch.aclose()
    # The server did receive the request: re-sending could duplicate it.
    assert len(x_server.requests) == 1


async def test_connection_refused_is_transient() -> None:
    from devstack.postgres import free_port

    ch = XChannel(make_x_client(f"http://127.0.0.1:{free_port()}", X_TOKEN, timeout=2.0))
    try:
        with pytest.raises(TransientChannelError) as caught:
            await ch.send(_msg())
    finally:
        await ch.aclose()
    assert caught.value.code == "connect"


async def test_bad_input_is_permanent_without_a_request(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    with pytest.raises(PermanentChannelError, match="numeric X user id"):
        await channel.send(_msg(to="@ada"))
    with pytest.raises(PermanentChannelError, match="empty"):
        await channel.send(_msg(text="  "))
    assert x_server.requests == []


def test_parse_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:14:20 GMT", NOW) == pytest.approx(60.0)
    assert parse_retry_after("garbage", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_message_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="OutboundMessage.action"):
        _msg("SEND_EMAIL")
    with pytest.raises(ValueError, match="OutboundMessage.channel"):
        OutboundMessage(channel="fax", action="SEND_EMAIL", idempotency_key="k", sender="s", to="t")


# ---------------------------------------------------------------------- handle lookup
async def test_resolve_username_gets_the_numeric_id_with_the_bearer_token(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.add_user("Ada_L", "3333")
    assert await channel.resolve_username("@ada_l") == "3333"
    req = x_server.requests[-1]
    assert (req.method, req.path) == ("GET", "/2/users/by/username/ada_l")
    assert req.headers["authorization"] == f"Bearer {X_TOKEN}"
    assert req.body == b""
    assert x_server.lookups == ["ada_l"] and x_server.dms == [] and x_server.following == set()


async def test_resolve_unknown_username_is_a_permanent_invalid_recipient(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    # X answers an unknown handle with HTTP 200, an `errors` array and no `data`.
    with pytest.raises(PermanentChannelError) as caught:
        await channel.resolve_username("nobody_here")
    assert caught.value.code == "invalid_recipient" and caught.value.bounce is True
    assert "invalid recipient" in str(caught.value)
    assert "Could not find user with username: [nobody_here]" in str(caught.value)


async def test_resolve_404_is_a_permanent_invalid_recipient(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(404, {}, {"title": "Not Found Error", "detail": "Could not find user with username: [gone]."})
    with pytest.raises(PermanentChannelError) as caught:
        await channel.resolve_username("gone")
    assert caught.value.code == "invalid_recipient" and caught.value.bounce is True
    assert "Could not find user" in str(caught.value)


async def test_a_404_that_is_not_from_x_is_a_transient_configuration_error(
    relay_server: FakeRelay,
) -> None:
    # A wrong X_API_BASE_URL: some other real HTTP server answers 404 with its own page.
    # Neither the lookup nor the send may blame the person (unknown handle, failed lead).
    ch = XChannel(make_x_client(relay_server.base_url, X_TOKEN, timeout=5.0), clock=lambda: NOW)
    try:
        with pytest.raises(TransientChannelError) as lookup:
            await ch.resolve_username("ada")
        with pytest.raises(TransientChannelError) as send:
            await ch.send(_msg())
    finally:
        await ch.aclose()
    for caught in (lookup, send):
        assert caught.value.code == "not_x_api" and caught.value.retry_after == 600.0
        assert "X_API_BASE_URL" in str(caught.value) and relay_server.base_url in str(caught.value)


async def test_resolve_suspended_account_is_a_permanent_invalid_recipient(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(
        200,
        {},
        {
            "errors": [
                {
                    "detail": "User has been suspended: [spammer].",
                    "title": "Forbidden",
                    "type": "https://api.twitter.com/2/problems/resource-not-found",
                }
            ]
        },
    )
    with pytest.raises(PermanentChannelError) as caught:
        await channel.resolve_username("spammer")
    assert caught.value.bounce is True and "suspended" in str(caught.value)


async def test_resolve_429_is_transient_until_the_reset(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.add_user("ada_l", "3333")
    x_server.fail_next(429, {"x-rate-limit-reset": str(int(NOW) + 600)}, {"title": "Too Many Requests"})
    with pytest.raises(TransientChannelError) as caught:
        await channel.resolve_username("ada_l")
    assert caught.value.code == "429"
    assert caught.value.retry_after == pytest.approx(600.0)
    assert await channel.resolve_username("ada_l") == "3333"
    assert x_server.lookups == ["ada_l", "ada_l"]


@pytest.mark.parametrize("status", [500, 503])
async def test_resolve_5xx_is_transient(
    channel: XChannel,
    x_server: FakeX,
    status: int,
) -> None:
    x_server.fail_next(status, {}, {"title": "Service Unavailable"})
    with pytest.raises(TransientChannelError) as caught:
        await channel.resolve_username("ada_l")
    assert caught.value.code == str(status)


async def test_resolve_401_is_a_sender_problem(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(401, {}, {"title": "Unauthorized", "detail": "Unauthorized"})
    with pytest.raises(SenderConfigError) as caught:
        await channel.resolve_username("ada_l")
    assert caught.value.code == "401"


@pytest.mark.parametrize("status", [400, 403])
async def test_resolve_other_4xx_is_permanent_not_a_bounce(
    channel: XChannel,
    x_server: FakeX,
    status: int,
) -> None:
    x_server.fail_next(status, {}, {"title": "Forbidden", "detail": "Your app is not permitted"})
    with pytest.raises(PermanentChannelError) as caught:
        await channel.resolve_username("ada_l")
    assert caught.value.code == str(status) and caught.value.bounce is False
    assert "Your app is not permitted" in str(caught.value)


async def test_resolve_errors_other_than_not_found_are_permanent_not_a_bounce(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    x_server.fail_next(200, {}, {"errors": [{"title": "Invalid Request", "detail": "username is invalid"}]})
    with pytest.raises(PermanentChannelError) as caught:
        await channel.resolve_username("ada_l")
    assert caught.value.code == "lookup_error" and caught.value.bounce is False


async def test_resolve_read_timeout_is_transient_not_uncertain(x_server: FakeX) -> None:
    # A lookup performs nothing at X, so no answer means "ask again", never "maybe sent".
    x_server.hang_next()
    timeout = httpx.Timeout(5.0, read=0.3)
    ch = XChannel(httpx.AsyncClient(base_url=x_server.base_url, headers=x_server.auth_headers, timeout=timeout))
    try:
        with pytest.raises(TransientChannelError) as caught:
            await ch.resolve_username("ada_l")
    finally:
        await ch.aclose()
    assert caught.value.code == "no_response"


async def test_resolve_malformed_handle_is_permanent_without_a_request(
    channel: XChannel,
    x_server: FakeX,
) -> None:
    for bad in ("", "has space", "way_too_long_for_x_handles", "ada/../../2/users"):
        with pytest.raises(PermanentChannelError) as caught:
            await channel.resolve_username(bad)
        assert caught.value.bounce is True
    assert x_server.requests == []

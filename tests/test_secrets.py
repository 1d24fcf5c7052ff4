"""Secrets that cannot be defaulted or forged (issue 12 item 3).

Production refuses the public defaults in every process (worker, webhook app, CLI,
each started as a real process); links keep working across a `LINK_SECRET` rotation
and in their first format; webhook signatures cover the channel, per-channel secrets
rotate, and absurd timestamps are a 401; the API docs are off in production.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Suppression
from devstack.postgres import free_port
from services.tokens import TokenError, make_legacy_token, make_token, read_token
from settings import InsecureSettingsError, Settings, check_settings, settings_problems
from tests.engine_harness import make_person
from webhooks.app import create_app
from webhooks.signature import SignatureError, sign, sign_v1, verify

ROOT = Path(__file__).resolve().parent.parent
GOOD: dict[str, Any] = {
    "webhook_secret": SecretStr("w" * 40),
    "link_secret": SecretStr("l" * 40),
    "relay_token": SecretStr("t" * 40),
    "relay_signing_key": SecretStr("k" * 40),
    "public_base_url": "https://links.example.com",
}
ONE_CLICK = {"Content-Type": "application/x-www-form-urlencoded"}


def production(**overrides: Any) -> Settings:
    return Settings(**{"sequencer_env": "production", **GOOD, **overrides})


# ------------------------------------------------------------------ refusing to start


def _production_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "LINK_", "RELAY_", "SEQUENCER_"))}
    closed = free_port()  # if a process did not refuse, it fails to connect instead (and the test fails)
    env.update(
        SEQUENCER_ENV="production",
        DATABASE_URL=f"postgresql+asyncpg://nobody@127.0.0.1:{closed}/none",
        TEMPORAL_ADDRESS=f"127.0.0.1:{closed}",
        **extra,
    )
    return env


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([sys.executable, "worker.py"], id="worker"),
        pytest.param([sys.executable, "starter.py", "status", "--person", "1"], id="cli"),
        pytest.param(
            [sys.executable, "-m", "uvicorn", "webhooks.app:app", "--port", "0", "--host", "127.0.0.1"], id="app"
        ),
    ],
)
@pytest.mark.integration  # starts the real process
def test_each_process_refuses_to_start_in_production_with_the_defaults(argv: list[str]) -> None:
    done = subprocess.run(argv, cwd=ROOT, env=_production_env(), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "refuses to start" in out, out
    for variable in ("WEBHOOK_SECRET", "LINK_SECRET", "RELAY_TOKEN", "RELAY_SIGNING_KEY"):
        assert f"{variable} is the public development default" in out, (variable, out)
    assert "dev-webhook-secret-change-me" not in out  # names the variable, never prints the secret


@pytest.mark.integration  # starts the real process
def test_the_cli_refuses_a_short_secret_naming_it() -> None:
    env = _production_env(
        WEBHOOK_SECRET="short",
        LINK_SECRET="l" * 40,
        RELAY_TOKEN="t" * 40,
        RELAY_SIGNING_KEY="k" * 40,
    )
    argv = [sys.executable, "starter.py", "status", "--person", "1"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "WEBHOOK_SECRET is 5 characters" in done.stderr
    assert "LINK_SECRET" not in done.stderr and "short" not in done.stderr.replace("characters", "")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"webhook_secret": SecretStr("")}, "WEBHOOK_SECRET is empty"),
        ({"link_secret": SecretStr("  ")}, "LINK_SECRET is empty"),
        ({"link_secret": SecretStr("x" * 31)}, "LINK_SECRET is 31 characters"),
        ({"link_secret": SecretStr("l" * 40 + ",dev-webhook-secret-change-me")}, "LINK_SECRET (key 2 of 2)"),
        ({"webhook_secret_x": SecretStr("tiny")}, "WEBHOOK_SECRET_X is 4 characters"),
        ({"relay_signing_key": SecretStr("t" * 40)}, "RELAY_SIGNING_KEY equals RELAY_TOKEN"),
        ({"link_secret": SecretStr("w" * 40)}, "LINK_SECRET equals WEBHOOK_SECRET"),
        ({"relay_token": SecretStr("dev-relay-token")}, "RELAY_TOKEN is the public development default"),
        ({"temporal_payload_key": SecretStr("not-a-key")}, "TEMPORAL_PAYLOAD_KEY key 1 is not 32 bytes"),
    ],
)
def test_each_unsafe_secret_is_named(overrides: dict[str, Any], named: str) -> None:
    problems = settings_problems(production(**overrides))
    assert any(named in p for p in problems), problems
    with pytest.raises(InsecureSettingsError, match="refuses to start"):
        check_settings(production(**overrides), "test")


def test_good_secrets_start_and_dev_accepts_the_defaults() -> None:
    check_settings(production(), "test")
    check_settings(Settings(sequencer_env="dev"), "test")
    # the default when nothing is set is production
    assert Settings.model_fields["sequencer_env"].default == "production"


async def test_the_app_refuses_at_startup_in_production() -> None:
    app = create_app(Settings(sequencer_env="production"))
    with pytest.raises(InsecureSettingsError, match="LINK_SECRET is the public development default"):
        async with app.router.lifespan_context(app):
            pass


# ------------------------------------------------------------------ API docs


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
async def test_api_docs_are_off_in_production_and_on_in_dev(path: str) -> None:
    for env, expected in (("production", 404), ("dev", 200)):
        app = create_app(Settings(**{**GOOD, "sequencer_env": env}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get(path)).status_code == expected, (env, path)


# ------------------------------------------------------------------ link tokens


def test_tokens_reveal_nothing_and_cannot_be_altered() -> None:
    key = "enrollment-41:m0:1"
    token = make_token("l" * 40, "open", {"k": key})
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"enrollment" not in raw and b"41" not in raw and "." not in token
    assert make_token("l" * 40, "open", {"k": key}) != token  # random nonce: equal payloads look different
    assert read_token("l" * 40, "open", token) == {"k": key}
    with pytest.raises(TokenError):
        read_token("l" * 40, "unsubscribe", token)  # a pixel token never unsubscribes
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(TokenError):
        read_token("l" * 40, "open", flipped)
    unsub = make_token("l" * 40, "unsubscribe", {"p": 7})
    assert b'"p"' not in base64.urlsafe_b64decode(unsub + "=" * (-len(unsub) % 4))


def test_rotation_keeps_old_links_valid_and_the_first_key_signs() -> None:
    old = make_token("old-link-secret-" + "o" * 20, "unsubscribe", {"p": 3})
    rotated = ["new-link-secret-" + "n" * 20, "old-link-secret-" + "o" * 20]
    assert read_token(rotated, "unsubscribe", old) == {"p": 3}
    fresh = make_token(rotated, "unsubscribe", {"p": 4})
    assert read_token(rotated[:1], "unsubscribe", fresh) == {"p": 4}
    with pytest.raises(TokenError):
        read_token(rotated[:1], "unsubscribe", old)  # once the old key is dropped, its links stop
    # Links of the first format (readable payload, signed with the then WEBHOOK_SECRET) still work
    # when that secret is listed among the previous keys.
    legacy = make_legacy_token("dev-webhook-secret-change-me", "unsubscribe", {"p": 5, "i": 1, "e": 1})
    assert read_token([*rotated, "dev-webhook-secret-change-me"], "unsubscribe", legacy)["p"] == 5
    with pytest.raises(TokenError):
        read_token(rotated, "unsubscribe", legacy)


@asynccontextmanager
async def _app(settings: Settings, sf: SessionFactory) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(settings, session_factory=sf)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        yield http


async def test_an_unsubscribe_link_sent_before_a_rotation_still_unsubscribes(
    session_factory: SessionFactory,
) -> None:
    pid = await make_person(session_factory, email="rotated@lead.test")
    old_key, new_key = "o" * 40, "n" * 40
    link = make_token(old_key, "unsubscribe", {"p": pid})
    unreachable = f"127.0.0.1:{free_port()}"  # Temporal is not needed to record an unsubscribe
    after = production(link_secret=SecretStr(f"{new_key},{old_key}"), temporal_address=unreachable)
    async with _app(after, session_factory) as http:
        resp = await http.post(f"/u/{link}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    assert resp.status_code == 200 and "You are unsubscribed" in resp.text
    async with session_factory() as s:
        [sup] = (await s.execute(select(Suppression))).scalars().all()
    assert sup.person_id == pid
    dropped = production(link_secret=SecretStr(new_key), temporal_address=unreachable)
    async with _app(dropped, session_factory) as http:
        refused = await http.post(f"/u/{link}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    assert refused.status_code == 400


# ------------------------------------------------------------------ webhook signatures


def test_per_channel_secrets_fall_back_to_webhook_secret_and_rotate() -> None:
    s = production(webhook_secret_x=SecretStr("x-new" + "x" * 40 + ", x-old" + "y" * 40))
    assert s.webhook_keys("x") == ["x-new" + "x" * 40, "x-old" + "y" * 40]
    assert s.webhook_keys("email") == ["w" * 40]
    body = b'{"event_id":"1"}'
    now = int(time.time())
    old_signed = sign("x-old" + "y" * 40, body, now, channel="x")
    verify(s.webhook_keys("x"), old_signed, body, channel="x", now=now)  # the previous key still verifies
    with pytest.raises(SignatureError, match="bad signature"):
        verify(s.webhook_keys("email"), old_signed, body, channel="email", now=now)
    with pytest.raises(SignatureError, match="bad signature"):  # the general secret is not the x secret
        verify(s.webhook_keys("x"), sign("w" * 40, body, now, channel="x"), body, channel="x", now=now)


def test_v1_is_accepted_only_when_allowed() -> None:
    body = b"{}"
    now = int(time.time())
    header = sign_v1("s" * 40, body, now)
    with pytest.raises(SignatureError, match="v1 signatures"):
        verify(["s" * 40], header, body, channel="email", now=now)
    verify(["s" * 40], header, body, channel="email", now=now, accept_v1=True)


@pytest.mark.parametrize(
    "t",
    ["9" * 5000, "1" + "0" * 20, "-1", "1.5", "1e308", "inf", "nan", " ", "0x10", "\u0661\u0662"],
)
def test_absurd_timestamps_are_signature_errors(t: str) -> None:
    body = b"{}"
    mac = sign("s" * 40, body, 1000, channel="email").split(",")[1]
    with pytest.raises(SignatureError):
        verify(["s" * 40], f"t={t},{mac}", body, channel="email", now=time.time())


async def test_forged_and_absurd_signatures_are_401_at_the_app(session_factory: SessionFactory) -> None:
    settings = production(
        webhook_secret_x=SecretStr("x" * 40), temporal_address=f"127.0.0.1:{free_port()}", webhook_accept_v1=False
    )
    body = b'{"event_id":"e","type":"reply","from":"a@b.test"}'
    now = int(time.time())
    cases = {
        "general secret on x": sign("w" * 40, body, now, channel="x"),
        "signed for email": sign("x" * 40, body, now, channel="email"),
        "absurd t": f"t={'9' * 5000},v2=" + "0" * 64,
        "huge t": f"t={10**15},v2=" + "0" * 64,
        "v1": sign_v1("x" * 40, body, now),
    }
    async with _app(settings, session_factory) as http:
        for case, header in cases.items():
            resp = await http.post("/webhooks/x", content=body, headers={"X-Signature": header})
            assert resp.status_code == 401, (case, resp.text)

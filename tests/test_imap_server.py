"""The test IMAP server itself: pymap accepts the login, stores APPENDed bytes as given, pushes by IDLE."""

from __future__ import annotations

import asyncio

import aioimaplib

from tests.imap_harness import Mailbox

RAW = (
    b"From: Ada <ada@lead.test>\r\nTo: owner@sender.test\r\nSubject: Re: Hello\r\n"
    b"Message-ID: <r1@lead.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nYes, let's talk.\r\n"
)


async def _login(mailbox: Mailbox, password: str | None = None) -> tuple[aioimaplib.IMAP4, aioimaplib.Response]:
    client = aioimaplib.IMAP4(host=mailbox.host, port=mailbox.port, timeout=10)
    await client.wait_hello_from_server()
    return client, await client.login(mailbox.user, password or mailbox.password)


async def test_appended_bytes_are_stored_as_given_and_pushed_to_an_idle_client(mailbox: Mailbox) -> None:
    watcher, login = await _login(mailbox)
    assert login.result == "OK"
    assert watcher.has_capability("IDLE")
    await watcher.select(mailbox.folder)
    idle = await watcher.idle_start(timeout=10)

    [uid] = await mailbox.append(RAW)
    push = await watcher.wait_server_push(timeout=10)
    assert any(b"EXISTS" in bytes(line) for line in push)
    watcher.idle_done()
    await asyncio.wait_for(idle, 10)

    fetched = await watcher.uid("fetch", str(uid), "(BODY.PEEK[])")
    assert bytes(fetched.lines[1]) == RAW
    assert "\\Seen" not in (await mailbox.flags())[uid]
    await watcher.logout()


async def test_a_wrong_password_is_refused(mailbox: Mailbox) -> None:
    client, login = await _login(mailbox, password="wrong")
    assert login.result == "NO"
    assert b"AUTHENTICATIONFAILED" in bytes(login.lines[0])

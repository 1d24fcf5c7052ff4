"""The mailbox watcher's activity: hold IMAP IDLE on one sender's mailbox and feed new mail to the pipeline.

One session = one heartbeating activity run: connect and log in (services/mailbox_login.py),
SELECT the folder, read everything after the UIDVALIDITY/UID high-water mark stored in
PostgreSQL, then wait with IDLE (re-issued before the server's 29-minute limit) or, when
the server has no IDLE, with NOOP every `poll_seconds`; new mail is fetched by UID with
`BODY.PEEK[]` (never marks it read, never moves or deletes anything), turned into an
`InboundEvent` (services/inbound_mail.py) and handed to the inbound pipeline; only then
does the high-water mark move (compare-and-set), so a restart, a dropped connection or a
killed worker loses nothing, and the pipeline's Message-ID dedup makes a message read
twice count once.

Errors are classified for the workflow: a refused login or an unusable stored secret is
`MailboxLoginFailed` / `MailboxConfigError` (non-retryable: the workflow shows why and
tries again with a growing backoff, no crash loop); anything else (unreachable, dropped
connection, Temporal or PostgreSQL down) is retried by the activity's retry policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aioimaplib
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from temporalio import activity
from temporalio.exceptions import ApplicationError

from db.session import SessionFactory
from db.tables import MailboxState
from models.inbound import MailboxRef
from models.mailbox import WatchMailboxInput, WatchMailboxOutput
from services.inbound_mail import read_mail
from services.inbound_pipeline import InboundPipeline
from services.mailbox_login import MailboxError, open_imap
from services.oauth import TokenCache
from services.sender_connections import ConnectionConfigError, MailConnection, set_connection_status

log = logging.getLogger("sequencer.mailbox")

ConnectionLoader = Callable[[int], Awaitable[MailConnection | None]]
#: Fetched per round trip when catching up (a backlog is read in batches, heartbeating between).
FETCH_BATCH = 50
#: Messages of different senders go through the pipeline at once (one sender's stay in order).
PIPELINE_CONCURRENCY = 16


class ConnectionLost(Exception):
    """The IMAP connection closed under the watcher (the activity retries and resumes)."""


def _text(line: Any) -> str:
    return bytes(line).decode("utf-8", "replace") if isinstance(line, bytes | bytearray) else str(line)


def _code(lines: list[Any], name: str) -> int | None:
    for line in lines:
        found = re.search(rf"\[{name} (\d+)\]", _text(line))
        if found:
            return int(found.group(1))
    return None


def _internaldate(text: str) -> datetime | None:
    found = re.search(r'INTERNALDATE "([^"]+)"', text)
    if not found:
        return None
    try:
        return datetime.strptime(found.group(1).strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None


def parse_fetch(lines: list[Any]) -> list[tuple[int, datetime | None, bytes]]:
    """(UID, INTERNALDATE, raw bytes) of each message in a `UID FETCH ... (UID INTERNALDATE BODY.PEEK[])` answer."""
    out: list[tuple[int, datetime | None, bytes]] = []
    pending: tuple[int, datetime | None] | None = None
    for line in lines:
        if isinstance(line, bytearray) and pending is not None:
            out.append((pending[0], pending[1], bytes(line)))
            pending = None
            continue
        text = _text(line)
        if " FETCH (" in text:
            uid = re.search(r"UID (\d+)", text)
            if uid:
                pending = (int(uid.group(1)), _internaldate(text))
    return out


def _imap_date(when: datetime) -> str:
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    return f"{when.day:02d}-{months[when.month - 1]}-{when.year}"


class MailboxActivities:
    """The watcher activity, with its dependencies injected (worker.py builds them)."""

    def __init__(
        self,
        session_factory: SessionFactory,
        pipeline: InboundPipeline,
        connections: ConnectionLoader,
        tokens: TokenCache | None = None,
        *,
        connect_timeout: float = 15.0,
    ) -> None:
        self.sf = session_factory
        self.pipeline = pipeline
        self.connections = connections
        self.tokens = tokens or TokenCache()
        self.connect_timeout = connect_timeout

    @activity.defn(name="watch_mailbox")
    async def watch_mailbox(self, inp: WatchMailboxInput) -> WatchMailboxOutput:
        """One IMAP session: catch up, then IDLE (or poll) until `session_seconds` have passed."""
        sid = inp.sender_id
        try:
            conn = await self.connections(sid)
        except ConnectionConfigError as err:
            await self._status(sid, "login_failed", str(err))
            raise ApplicationError(str(err), type="MailboxConfigError", non_retryable=True) from err
        if conn is None:
            raise ApplicationError(f"sender {sid} has no IMAP connection", type="NoMailbox", non_retryable=True)
        try:
            client = await open_imap(conn, self.tokens, timeout=self.connect_timeout)
        except MailboxError as err:
            if err.permanent:
                await self._status(sid, "login_failed", str(err))
                raise ApplicationError(str(err), type="MailboxLoginFailed", non_retryable=True) from err
            await self._status(sid, "reconnecting", str(err))
            raise ApplicationError(str(err), type="MailboxUnreachable") from err
        try:
            return await _Session(self, conn, client, inp).run()
        except ConnectionLost as err:
            await self._status(sid, "reconnecting", f"{conn.what}: {err}")
            raise ApplicationError(f"{conn.what}: {err}", type="MailboxConnectionLost") from err
        finally:
            await _close(client)

    async def _status(self, sender_id: int, status: str, reason: str | None, **extra: Any) -> None:
        """Where `senders list` and the status query read it: the connection row and the watcher state."""
        try:
            await set_connection_status(self.sf, sender_id, "imap", status, reason)
            async with self.sf() as session, session.begin():
                await session.execute(
                    update(MailboxState)
                    .where(MailboxState.sender_id == sender_id)
                    .values(status=status, reason=reason, **extra)
                )
        except Exception:  # status is for people; never let it hide the real error
            log.exception("recording the status of mailbox %s failed", sender_id)


async def _close(client: aioimaplib.IMAP4) -> None:
    try:
        if not _closed(client):
            if client.has_pending_idle():
                client.idle_done()
            await asyncio.wait_for(client.logout(), 5)
    except Exception:  # noqa: S110 - closing anyway
        pass
    transport = getattr(client.protocol, "transport", None)
    if transport is not None:
        transport.close()


def _closed(client: aioimaplib.IMAP4) -> bool:
    transport = getattr(client.protocol, "transport", None)
    return transport is None or transport.is_closing()


class _Session:
    """One connected session of the watcher (state kept between the steps of `run`)."""

    def __init__(
        self, acts: MailboxActivities, conn: MailConnection, client: aioimaplib.IMAP4, inp: WatchMailboxInput
    ) -> None:
        self.acts = acts
        self.conn = conn
        self.client = client
        self.inp = inp
        self.sid = inp.sender_id
        self.folder = conn.folder or "INBOX"
        self.uidvalidity = 0
        self.last_uid = 0
        self.connected_at = datetime.now(UTC)
        self.messages = 0

    def heartbeat(self) -> None:
        if activity.is_worker_shutdown():  # end now: the session resumes on another worker
            raise ConnectionLost("the worker is shutting down")
        activity.heartbeat({"uidvalidity": self.uidvalidity, "last_uid": self.last_uid})

    def check_alive(self) -> None:
        if _closed(self.client):
            raise ConnectionLost("the IMAP connection was closed")

    async def run(self) -> WatchMailboxOutput:
        deadline = time.monotonic() + self.inp.session_seconds
        await self.open_folder()
        await self.catch_up()
        idle = self.client.has_capability("IDLE")
        mode = "idle" if idle else "poll"
        if idle:
            await self.acts._status(self.sid, "watching", f"IDLE on {self.folder}", mode=mode, poll_seconds=None)
        else:
            every = self.inp.poll_seconds
            await self.acts._status(
                self.sid,
                "polling",
                f"the server lacks IDLE: NOOP every {every:g} s on {self.folder}",
                mode=mode,
                poll_seconds=every,
            )
        while time.monotonic() < deadline:
            if idle:
                await self.wait_idle(deadline)
            else:
                await self.wait_poll(deadline)
            await self.catch_up()
        return WatchMailboxOutput(
            messages=self.messages, mode=mode, uidvalidity=self.uidvalidity, last_uid=self.last_uid
        )

    async def open_folder(self) -> None:
        """SELECT the folder; first connect, same UIDVALIDITY, or a resync after it changed."""
        resp = await self.client.select(self.folder)
        if resp.result != "OK":
            text = " ".join(_text(x) for x in resp.lines)
            reason = f"{self.conn.what}: cannot open folder {self.folder!r}: {text}"
            await self.acts._status(self.sid, "login_failed", reason)
            raise ApplicationError(reason, type="MailboxConfigError", non_retryable=True)
        uidvalidity = _code(resp.lines, "UIDVALIDITY") or 0
        uidnext = _code(resp.lines, "UIDNEXT")
        if uidnext is None:
            uidnext = await self.max_uid() + 1
        async with self.acts.sf() as session, session.begin():
            state = await session.get(MailboxState, self.sid, with_for_update=True)
            if state is None or state.folder != self.folder:
                # First connect: only mail that arrives from now on is read.
                await session.execute(
                    insert(MailboxState)
                    .values(
                        sender_id=self.sid,
                        folder=self.folder,
                        uidvalidity=uidvalidity,
                        last_uid=uidnext - 1,
                        connected_at=self.connected_at,
                        status="connecting",
                    )
                    .on_conflict_do_update(
                        index_elements=[MailboxState.sender_id],
                        set_={
                            "folder": self.folder,
                            "uidvalidity": uidvalidity,
                            "last_uid": uidnext - 1,
                            "connected_at": self.connected_at,
                        },
                    )
                )
                self.last_uid = uidnext - 1
                log.info("%s: first connect, reading mail after UID %s", self.conn.what, self.last_uid)
            elif state.uidvalidity != uidvalidity:
                # The server renumbered the folder: read again everything since the first
                # connect; the pipeline's Message-ID dedup keeps what was handled from counting twice.
                log.warning(
                    "%s: UIDVALIDITY changed %s -> %s, resyncing from %s",
                    self.conn.what,
                    state.uidvalidity,
                    uidvalidity,
                    state.connected_at.isoformat(),
                )
                state.uidvalidity, state.last_uid, state.resyncs = uidvalidity, 0, state.resyncs + 1
                self.connected_at = state.connected_at
                self.last_uid = 0
            else:
                self.connected_at = state.connected_at
                self.last_uid = int(state.last_uid)
        self.uidvalidity = uidvalidity

    async def max_uid(self) -> int:
        resp = await self.client.uid_search("ALL", charset=None)
        uids = self.search_uids(resp.lines)
        return max(uids) if uids else 0

    @staticmethod
    def search_uids(lines: list[Any]) -> list[int]:
        out: list[int] = []
        for line in lines:  # aioimaplib hands the untagged `* SEARCH 3 4` as `3 4`
            parts = _text(line).strip().removeprefix("SEARCH").split()
            if parts and all(p.isdigit() for p in parts):
                out += [int(p) for p in parts]
        return sorted(set(out))

    async def catch_up(self) -> None:
        """Everything after the high-water mark, oldest first, each through the pipeline once."""
        self.check_alive()
        since = _imap_date(self.connected_at - timedelta(days=1))
        resp = await self.client.uid_search(f"UID {self.last_uid + 1}:*", "SINCE", since, charset=None)
        if resp.result != "OK":
            self.check_alive()
            raise ConnectionLost(f"UID SEARCH failed: {' '.join(_text(x) for x in resp.lines)}")
        uids = [u for u in self.search_uids(resp.lines) if u > self.last_uid]
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            self.heartbeat()
            fetched = await self.client.uid("fetch", ",".join(map(str, batch)), "(UID INTERNALDATE BODY.PEEK[])")
            if fetched.result != "OK":
                self.check_alive()
                raise ConnectionLost(f"UID FETCH failed: {' '.join(_text(x) for x in fetched.lines)}")
            found = parse_fetch(fetched.lines)
            await self.handle_batch(
                [(uid, when, raw) for uid, when, raw in found if when is None or when >= self.since()]
            )
            # Expunged meanwhile, older than the connection, or handled: the mark moves past them all.
            await self.advance(batch[-1], handled=len(found))
            self.heartbeat()

    def since(self) -> datetime:
        """Mail older than the first connect is never read (a second of clock slack)."""
        return self.connected_at - timedelta(seconds=1)

    async def handle_batch(self, messages: list[tuple[int, datetime | None, bytes]]) -> None:
        """Through the pipeline: one sender's messages in UID order, different senders at once."""
        by_sender: dict[str, list[tuple[int, datetime | None, bytes]]] = {}
        for uid, when, raw in messages:
            sender = re.search(rb"(?im)^From:[^\r\n]*", raw)
            by_sender.setdefault(sender.group(0).lower().decode(errors="replace") if sender else "", []).append(
                (uid, when, raw)
            )
        limit = asyncio.Semaphore(PIPELINE_CONCURRENCY)

        async def one_sender(items: list[tuple[int, datetime | None, bytes]]) -> None:
            async with limit:
                for uid, when, raw in items:
                    await self.handle(uid, when, raw)

        await asyncio.gather(*(one_sender(items) for items in by_sender.values()))

    async def handle(self, uid: int, when: datetime | None, raw: bytes) -> None:
        ref = MailboxRef(sender_id=self.sid, folder=self.folder, uidvalidity=self.uidvalidity, uid=uid)
        event = read_mail(raw, mailbox=ref, received_at=when)
        result = await self.acts.pipeline.process(event)
        self.messages += 1
        self.heartbeat()
        log.info("%s: UID %s %s -> %s", self.conn.what, uid, event.type, result.status)

    async def advance(self, uid: int, *, handled: int = 0) -> None:
        """Move the high-water mark to `uid` (compare-and-set: never backwards, same UIDVALIDITY)."""
        async with self.acts.sf() as session, session.begin():
            await session.execute(
                update(MailboxState)
                .where(
                    MailboxState.sender_id == self.sid,
                    MailboxState.uidvalidity == self.uidvalidity,
                    MailboxState.last_uid < uid,
                )
                .values(last_uid=uid, messages=MailboxState.messages + handled, last_message_at=datetime.now(UTC))
            )
        self.last_uid = max(self.last_uid, uid)

    async def wait_idle(self, deadline: float) -> None:
        """IDLE until new mail arrives, the renew time or the session's end (heartbeating)."""
        renew = max(1.0, min(self.inp.idle_renew_seconds, deadline - time.monotonic()))
        self.check_alive()
        idle = await self.client.idle_start(timeout=renew)
        try:
            while True:
                self.heartbeat()
                try:
                    push = await self.client.wait_server_push(timeout=self.inp.heartbeat_seconds)
                except TimeoutError:
                    self.check_alive()
                    if idle.done():
                        return
                    continue
                if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    return  # the renew timer: leave IDLE and issue it again
                if any(re.search(rb"\d+ (EXISTS|RECENT)", bytes(x)) for x in push if isinstance(x, bytes | bytearray)):
                    return
        finally:
            if not _closed(self.client):
                if self.client.has_pending_idle():
                    self.client.idle_done()
                try:
                    await asyncio.wait_for(asyncio.shield(idle), 10)
                except (TimeoutError, Exception):  # noqa: S110 - the next command tells if the link is dead
                    pass

    async def wait_poll(self, deadline: float) -> None:
        """No IDLE on this server: NOOP every `poll_seconds` (heartbeating while waiting)."""
        until = min(deadline, time.monotonic() + self.inp.poll_seconds)
        while time.monotonic() < until:
            self.heartbeat()
            await asyncio.sleep(min(self.inp.heartbeat_seconds, max(0.0, until - time.monotonic())))
        self.check_alive()
        resp = await self.client.noop()
        if resp.result != "OK":
            raise ConnectionLost(f"NOOP failed: {' '.join(_text(x) for x in resp.lines)}")


async def current_state(session_factory: SessionFactory, sender_id: int) -> MailboxState | None:
    """The watcher's stored state for a sender (for status displays and tests)."""
    async with session_factory() as session:
        return (
            await session.execute(select(MailboxState).where(MailboxState.sender_id == sender_id))
        ).scalar_one_or_none()

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
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aioimaplib
from sqlalchemy import func, select, update
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
#: Fetched messages not yet through the pipeline, at most (fetching waits beyond it).
MAX_IN_FLIGHT = 200
#: After a round that found mail, IDLE without a push for this long is left to look once
#: more: a server need not announce at IDLE what arrived just before it (pymap does not).
SETTLE_SECONDS = 0.25
#: After an error, how long the messages already in the pipeline may still finish.
DRAIN_SECONDS = 10.0


class ConnectionLost(Exception):
    """The IMAP connection closed under the watcher (the activity retries and resumes)."""


class Refused(Exception):
    """The server answered NO or BAD to a `UID FETCH n:*` (some do for an empty folder)."""


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
    """One connected session of the watcher (state kept between the steps of `run`).

    Fetching and handling overlap: fetched messages go to the pipeline in background tasks
    (one sender's in UID order, different senders at once) while the connection goes back
    to IDLE. Three UID marks keep that safe: `fetched_uid` (everything up to it was fetched
    or skipped), `pending` (fetched, not yet through the pipeline) and `last_uid`, the
    stored high-water mark, which only moves up to the first pending UID: a crash resumes
    from there, and a message handled twice counts once (Message-ID dedup).
    """

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
        self.uidnext = 0
        self.last_uid = 0
        self.fetched_uid = 0
        self.pending: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.chains: dict[str, asyncio.Task[None]] = {}
        self.limit = asyncio.Semaphore(PIPELINE_CONCURRENCY)
        self.progress = asyncio.Event()
        self.mark_lock = asyncio.Lock()
        self.failure: BaseException | None = None
        self.wakeup: asyncio.Future[bool] | None = None
        self.unrecorded = 0  # handled, not yet counted in the stored state
        self.connected_at = datetime.now(UTC)
        self.messages = 0

    def heartbeat(self) -> None:
        if activity.is_worker_shutdown():  # end now: the session resumes on another worker
            raise ConnectionLost("the worker is shutting down")
        activity.heartbeat({"uidvalidity": self.uidvalidity, "last_uid": self.last_uid})

    def check_alive(self) -> None:
        if _closed(self.client):
            raise ConnectionLost("the IMAP connection was closed")

    def check_failed(self) -> None:
        """A message the pipeline could not handle ends the session (the retry resumes before it)."""
        if self.failure is not None:
            raise self.failure

    async def run(self) -> WatchMailboxOutput:
        deadline = time.monotonic() + self.inp.session_seconds
        try:
            await self.open_folder()
            await self.catch_up()
            found = await self.fetch_new()
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
                    await self.wait_idle(deadline, settle=found > 0)
                else:
                    await self.wait_poll(deadline)
                found = await self.fetch_new()
            await self.drain()
        except asyncio.CancelledError:
            await self.stop_tasks()
            raise
        except BaseException:
            await self.drain(give_up=True)
            raise
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
        self.uidnext = uidnext
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
        self.fetched_uid = self.last_uid

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
        """At connect: everything after the high-water mark since the first connect, in batches.

        SEARCH ... SINCE keeps a resync after a UIDVALIDITY change from downloading the
        whole folder; messages present at SELECT that it does not name are older than the
        first connect, so `fetched_uid` moves past them.
        """
        uids = await self.search_after(self.last_uid)
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            await self.room_for_more()
            await self.hand_over(await self.fetch(",".join(map(str, batch))), upto=batch[-1])
        await self.hand_over([], upto=self.uidnext - 1)

    async def search_after(self, uid: int) -> list[int]:
        """UIDs after `uid` of mail that may be newer than the first connect (a day of slack: SINCE takes a date)."""
        self.check_alive()
        since = _imap_date(self.connected_at - timedelta(days=1))
        resp = await self.client.uid_search(f"UID {uid + 1}:*", "SINCE", since, charset=None)
        if resp.result != "OK":
            self.check_alive()
            raise ConnectionLost(f"UID SEARCH failed: {' '.join(_text(x) for x in resp.lines)}")
        return [u for u in self.search_uids(resp.lines) if u > uid]

    async def fetch_new(self) -> int:
        """FETCH what came after the last fetched UID, again until nothing newer: how many came.

        No SEARCH first (one round trip less), and always one look more: mail that arrived
        while the watcher was busy was announced then, and a server need not announce it
        again at IDLE.
        """
        found = 0
        while True:
            await self.room_for_more()
            try:
                fetched = await self.fetch(f"{self.fetched_uid + 1}:*")
            except Refused:  # a server that will not FETCH `n:*` (an empty folder): SEARCH, then FETCH
                uids = await self.search_after(self.fetched_uid)
                fetched = await self.fetch(",".join(map(str, uids[:FETCH_BATCH]))) if uids else []
            fetched = [m for m in fetched if m[0] > self.fetched_uid]
            if not fetched:
                return found
            found += len(fetched)
            await self.hand_over(fetched, upto=max(uid for uid, _, _ in fetched))

    async def fetch(self, uids: str) -> list[tuple[int, datetime | None, bytes]]:
        """UID FETCH with BODY.PEEK[] (never sets \\Seen), oldest first."""
        self.check_alive()
        self.heartbeat()
        fetched = await self.client.uid("fetch", uids, "(UID INTERNALDATE BODY.PEEK[])")
        if fetched.result != "OK":
            self.check_alive()
            text = " ".join(_text(x) for x in fetched.lines)
            if fetched.result in ("NO", "BAD") and ":*" in uids:
                raise Refused(text)
            raise ConnectionLost(f"UID FETCH failed: {text}")
        return sorted(parse_fetch(fetched.lines), key=lambda m: m[0])

    def since(self) -> datetime:
        """Mail older than the first connect is never read (a second of clock slack)."""
        return self.connected_at - timedelta(seconds=1)

    async def hand_over(self, messages: list[tuple[int, datetime | None, bytes]], *, upto: int) -> None:
        """Start the pipeline on each message (one sender's after the previous one); all up to `upto` are fetched."""
        for uid, when, raw in messages:
            if uid <= self.fetched_uid or (when is not None and when < self.since()):
                continue
            sender = re.search(rb"(?im)^From:[^\r\n]*", raw)
            key = sender.group(0).lower().decode(errors="replace") if sender else ""
            self.pending.add(uid)
            task = asyncio.create_task(self.process(uid, when, raw, self.chains.get(key)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.chains[key] = task
            task.add_done_callback(functools.partial(self._unchain, key))
        if upto > self.fetched_uid:
            self.fetched_uid = upto  # expunged meanwhile or older than the connection: passed over
            if not self.pending:
                await self.advance_durable()

    def _unchain(self, key: str, task: asyncio.Task[None]) -> None:
        if self.chains.get(key) is task:
            del self.chains[key]

    async def process(self, uid: int, when: datetime | None, raw: bytes, before: asyncio.Task[None] | None) -> None:
        try:
            if before is not None:
                await asyncio.wait({before})
            async with self.limit:
                self.check_failed()
                await self.handle(uid, when, raw)
        except Exception as err:  # the mark stays before this UID; the session ends with the error
            if self.failure is None:
                self.failure = err
                self.wakeup = asyncio.ensure_future(self.client.stop_wait_server_push())  # out of IDLE now
            self.progress.set()
            return
        self.pending.discard(uid)
        self.unrecorded += 1
        self.progress.set()
        await self.advance_durable()

    async def handle(self, uid: int, when: datetime | None, raw: bytes) -> None:
        ref = MailboxRef(sender_id=self.sid, folder=self.folder, uidvalidity=self.uidvalidity, uid=uid)
        event = read_mail(raw, mailbox=ref, received_at=when)
        result = await self.acts.pipeline.process(event)
        self.messages += 1
        log.info("%s: UID %s %s -> %s", self.conn.what, uid, event.type, result.status)

    async def room_for_more(self) -> None:
        """Wait (heartbeating) while MAX_IN_FLIGHT messages are still in the pipeline."""
        while len(self.pending) >= MAX_IN_FLIGHT:
            self.check_failed()
            self.heartbeat()
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), self.inp.heartbeat_seconds)
        self.check_failed()

    async def drain(self, *, give_up: bool = False) -> None:
        """Let the pipeline finish what was fetched (heartbeating); `give_up`: stop trying after a while."""
        until = time.monotonic() + (DRAIN_SECONDS if give_up else float("inf"))
        while self.tasks and time.monotonic() < until:
            if not give_up:
                self.heartbeat()
            await asyncio.wait(set(self.tasks), timeout=min(self.inp.heartbeat_seconds, DRAIN_SECONDS))
        await self.stop_tasks()
        if not give_up:
            self.check_failed()
            await self.advance_durable()
            return
        try:
            await self.advance_durable()
        except Exception:  # the session already failed; that error is the one to report
            log.exception("%s: storing the high-water mark after an error failed", self.conn.what)

    async def stop_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def advance_durable(self) -> None:
        """Store the mark at the last UID before the first one still in the pipeline."""
        async with self.mark_lock:
            uid = min(self.pending) - 1 if self.pending else self.fetched_uid
            if uid <= self.last_uid and not self.unrecorded:
                return
            handled, self.unrecorded = self.unrecorded, 0
            await self.advance(uid, handled=handled)

    async def advance(self, uid: int, *, handled: int = 0) -> None:
        """Move the high-water mark to `uid` (never backwards, same UIDVALIDITY)."""
        async with self.acts.sf() as session, session.begin():
            values: dict[str, Any] = {"last_uid": func.greatest(MailboxState.last_uid, uid)}
            if handled:
                values |= {"messages": MailboxState.messages + handled, "last_message_at": datetime.now(UTC)}
            await session.execute(
                update(MailboxState)
                .where(MailboxState.sender_id == self.sid, MailboxState.uidvalidity == self.uidvalidity)
                .values(**values)
            )
        self.last_uid = max(self.last_uid, uid)

    async def wait_idle(self, deadline: float, *, settle: bool = False) -> None:
        """IDLE until new mail arrives, the renew time or the session's end (heartbeating).

        `settle` (the last round found mail): leave after SETTLE_SECONDS without a push and
        look once more, for mail that arrived between that round's last FETCH and this IDLE.
        """
        renew = max(1.0, min(self.inp.idle_renew_seconds, deadline - time.monotonic()))
        self.check_alive()
        _drop_stale_pushes(self.client)  # about mail the last round fetched already
        idle = await self.client.idle_start(timeout=renew)
        quiet_until = time.monotonic() + SETTLE_SECONDS if settle else None
        try:
            while True:
                self.heartbeat()
                self.check_failed()
                wait = self.inp.heartbeat_seconds
                if quiet_until is not None:
                    wait = max(0.0, min(wait, quiet_until - time.monotonic()))
                try:
                    push = await self.client.wait_server_push(timeout=wait)
                except TimeoutError:
                    self.check_alive()
                    if idle.done() or (quiet_until is not None and time.monotonic() >= quiet_until):
                        return
                    continue
                if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    self.check_failed()
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
            self.check_failed()
            await asyncio.sleep(min(self.inp.heartbeat_seconds, max(0.0, until - time.monotonic())))
        self.check_alive()
        resp = await self.client.noop()
        if resp.result != "OK":
            raise ConnectionLost(f"NOOP failed: {' '.join(_text(x) for x in resp.lines)}")


def _drop_stale_pushes(client: aioimaplib.IMAP4) -> None:
    """Forget pushes queued by the previous IDLE: the FETCH since then read what they announced."""
    queue = client.protocol.idle_queue
    while not queue.empty():
        queue.get_nowait()


async def current_state(session_factory: SessionFactory, sender_id: int) -> MailboxState | None:
    """The watcher's stored state for a sender (for status displays and tests)."""
    async with session_factory() as session:
        return (
            await session.execute(select(MailboxState).where(MailboxState.sender_id == sender_id))
        ).scalar_one_or_none()

"""The mailbox watcher workflow: one per connected mailbox, for as long as the sender has one.

Its id comes from the sender (`mailbox:<sender id>`), so a second start is refused by
Temporal itself: never two watchers on one mailbox. It runs the `watch_mailbox` activity
session after session (each holds IMAP IDLE and heartbeats; a worker that dies is noticed
by the heartbeat timeout and the session resumes on another worker from the stored
high-water mark), and continues as new before its history grows.

A refused login is not retried in a loop: the workflow records why (query `status`, the
`MailboxStatus` search attribute in the Web UI, `senders list`), waits with a growing
backoff (1 min, 2, 4 ... up to an hour), and tries again; `retry_now` skips the wait once
the password is fixed. `stop` ends it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from models.enrollment import ControlSignal
    from models.mailbox import MailboxWatcherInput, MailboxWatcherStatus, WatchMailboxInput, WatchMailboxOutput
    from workflows.search_attributes import MAILBOX_STATUS

LOGIN_ERRORS = ("MailboxLoginFailed", "MailboxConfigError")


@workflow.defn(name="MailboxWatcher")
class MailboxWatcherWorkflow:
    """Keeps one mailbox watched: sessions of the IMAP activity, backoff on refused logins."""

    @workflow.init
    def __init__(self, inp: MailboxWatcherInput) -> None:
        self.state = MailboxWatcherStatus(sender_id=inp.sender_id, login_failures=inp.login_failures)
        self.stopping = False
        self.retry = False

    @workflow.query
    def status(self) -> MailboxWatcherStatus:
        """Watching, polling (with its interval), login failed (why, next try) or stopped."""
        return self.state

    @workflow.signal
    def stop(self, sig: ControlSignal) -> None:
        """End the watcher (the sender lost its mailbox, or was removed)."""
        self.stopping = True

    @workflow.signal
    def retry_now(self, sig: ControlSignal) -> None:
        """Try to log in again now instead of at the end of the backoff."""
        self.retry = True

    def _show(self, state: str, reason: str | None = None) -> None:
        self.state.state, self.state.reason = state, reason
        workflow.upsert_search_attributes([MAILBOX_STATUS.value_set(state)])

    @workflow.run
    async def run(self, inp: MailboxWatcherInput) -> MailboxWatcherStatus:
        """Session after session until stopped; continue as new after `sessions_per_run`."""
        failures = inp.login_failures
        self._show("starting")
        for _ in range(inp.sessions_per_run):
            if self.stopping:
                break
            session = workflow.start_activity(
                "watch_mailbox",
                WatchMailboxInput(
                    sender_id=inp.sender_id,
                    session_seconds=inp.session_seconds,
                    idle_renew_seconds=inp.idle_renew_seconds,
                    poll_seconds=inp.poll_seconds,
                    heartbeat_seconds=inp.heartbeat_seconds,
                ),
                result_type=WatchMailboxOutput,
                start_to_close_timeout=timedelta(seconds=inp.session_seconds + 600),
                heartbeat_timeout=timedelta(seconds=inp.heartbeat_timeout_seconds),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(minutes=5),
                    non_retryable_error_types=[*LOGIN_ERRORS, "NoMailbox"],
                ),
            )
            self._show("watching")
            await workflow.wait_condition(lambda s=session: self.stopping or s.done())  # type: ignore[misc]
            if self.stopping and not session.done():
                session.cancel()
                try:
                    await session
                except (ActivityError, asyncio.CancelledError):
                    pass
                break
            try:
                out = await session
            except ActivityError as err:
                cause = err.cause
                kind = cause.type if isinstance(cause, ApplicationError) else None
                if kind == "NoMailbox":
                    self._show("stopped", str(cause.message if isinstance(cause, ApplicationError) else err))
                    return self.state
                if kind not in LOGIN_ERRORS:
                    raise
                failures += 1
                delay = min(inp.login_backoff_seconds * 2 ** (failures - 1), inp.login_backoff_max_seconds)
                self.state.login_failures = failures
                self.state.retry_at = workflow.now() + timedelta(seconds=delay)
                self._show("login_failed", cause.message if isinstance(cause, ApplicationError) else str(err))
                self.retry = False
                try:
                    await workflow.wait_condition(lambda: self.retry or self.stopping, timeout=timedelta(seconds=delay))
                except TimeoutError:
                    pass
                continue
            failures = 0
            self.state.login_failures, self.state.retry_at = 0, None
            self.state.messages += out.messages
            self.state.mode = out.mode
            self.state.poll_seconds = inp.poll_seconds if out.mode == "poll" else None
        if self.stopping:
            self._show("stopped", "stop requested")
            return self.state
        workflow.continue_as_new(inp.model_copy(update={"login_failures": failures}))

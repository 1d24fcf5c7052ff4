"""Inputs and outputs of the mailbox watcher workflow and its IMAP activity (pure pydantic)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


def mailbox_workflow_id(sender_id: int) -> str:
    """One watcher per connected mailbox: the id comes from the sender, so a second start is refused."""
    return f"mailbox:{sender_id}"


class MailboxWatcherInput(BaseModel):
    """The watcher workflow's input (carried across continue-as-new)."""

    sender_id: int
    #: How long one activity session holds the connection before returning (so the
    #: workflow can continue as new with a short history); the activity reconnects at once.
    session_seconds: float = Field(default=3600.0, gt=0)
    sessions_per_run: int = Field(default=24, ge=1)
    #: IDLE is re-issued after this long (RFC 2177: servers may drop an IDLE after 30 min).
    idle_renew_seconds: float = Field(default=25 * 60.0, gt=0, le=29 * 60.0)
    #: Without IDLE on the server: NOOP and a fetch every this many seconds (shown in status).
    poll_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    #: No heartbeat for this long: the worker is gone, another one takes over.
    heartbeat_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Consecutive login failures so far (the backoff grows with them).
    login_failures: int = 0
    login_backoff_seconds: float = Field(default=60.0, gt=0)
    login_backoff_max_seconds: float = Field(default=3600.0, gt=0)


class WatchMailboxInput(BaseModel):
    """One IMAP session of the watcher activity."""

    sender_id: int
    session_seconds: float = 3600.0
    idle_renew_seconds: float = 25 * 60.0
    poll_seconds: float = 30.0
    heartbeat_seconds: float = 5.0


class WatchMailboxOutput(BaseModel):
    """What one session did."""

    messages: int = 0
    mode: str | None = None
    uidvalidity: int | None = None
    last_uid: int | None = None


class MailboxWatcherStatus(BaseModel):
    """The answer to the watcher's `status` query (also in the Web UI as `MailboxStatus`)."""

    sender_id: int
    state: str = "starting"
    reason: str | None = None
    login_failures: int = 0
    retry_at: datetime | None = None
    messages: int = 0
    mode: str | None = None
    poll_seconds: float | None = None

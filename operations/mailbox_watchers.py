"""Start and stop the mailbox watchers (one workflow per connected mailbox).

Called by the worker at startup (every active email sender with an IMAP connection gets
its watcher), by `senders add --imap` and by the dev stack. Starting is idempotent: the
workflow id comes from the sender, so a watcher already running is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from db.session import SessionFactory
from models.enrollment import ControlSignal
from models.mailbox import MailboxWatcherInput, mailbox_workflow_id
from services.sender_connections import mailbox_sender_ids
from workflows.mailbox import MailboxWatcherWorkflow
from workflows.search_attributes import MAILBOX_STATUS

log = logging.getLogger("sequencer.mailbox")


async def start_watcher(
    client: Client, sender_id: int, task_queue: str, **options: Any
) -> tuple[WorkflowHandle[Any, Any], bool]:
    """(handle, True) when a watcher was started now, (handle, False) when one already runs."""
    wid = mailbox_workflow_id(sender_id)
    try:
        handle = await client.start_workflow(
            MailboxWatcherWorkflow.run,
            MailboxWatcherInput(sender_id=sender_id, **options),
            id=wid,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=TypedSearchAttributes([SearchAttributePair(MAILBOX_STATUS, "starting")]),
        )
    except WorkflowAlreadyStartedError:
        return client.get_workflow_handle(wid), False
    log.info("mailbox watcher for sender %s started (%s)", sender_id, wid)
    return handle, True


async def start_all_watchers(client: Client, session_factory: SessionFactory, task_queue: str) -> list[int]:
    """A watcher for every active email sender with a mailbox; the sender ids newly started."""
    started: list[int] = []
    for sender_id in await mailbox_sender_ids(session_factory):
        _, new = await start_watcher(client, sender_id, task_queue)
        if new:
            started.append(sender_id)
    return started


async def stop_watcher(client: Client, sender_id: int, reason: str = "stopped") -> bool:
    """Ask the sender's watcher to stop; False when none was running."""
    try:
        await client.get_workflow_handle(mailbox_workflow_id(sender_id)).signal(
            MailboxWatcherWorkflow.stop, ControlSignal(reason=reason, source="cli")
        )
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True

"""Builds and runs the Sequencer workers: the workflows and every activity.

One process runs, by default, the workflow worker (the base task queue) and one activity
worker per channel's task queue (models/task_queues.py), each with its own concurrency
limit; `--queues` / WORKER_QUEUES choose the roles, so an operator can run N processes
and dedicated channel workers. Dependencies (database engine, SMTP pool, HTTP clients,
the Temporal client) are built here, in `main()`, and injected into activity classes,
so tests assemble the same workers (`build_worker`) against their own real local servers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.channels import aclose_channels, make_channels
from activities.channels.base import ChannelClient
from activities.delivery import DeliveryActivities, DeliveryConfig
from activities.enroll import EnrollActivities, EnrollTarget
from activities.governor import SendGovernor
from activities.mailbox import ConnectionLoader, MailboxActivities
from activities.records import RecordActivities
from db.session import SessionFactory, make_engine, make_session_factory
from models.task_queues import ALL_ROLES, WORKFLOWS_ROLE, parse_roles, role_queue
from operations.mailbox_watchers import start_all_watchers
from services.classify import get_classifier
from services.inbound_pipeline import InboundPipeline
from services.oauth import TokenCache
from services.secret_box import SecretBox
from services.sender_breaker import BreakerConfig
from services.sender_connections import MailConnection, imap_connection, token_cache
from settings import InsecureSettingsError, Settings, check_settings, get_settings
from temporal_client import connect
from workflows.audience import AudienceWorkflow
from workflows.enrollment import EnrollmentWorkflow
from workflows.mailbox import MailboxWatcherWorkflow

log = logging.getLogger("sequencer.worker")

#: The sandbox still refuses non-deterministic calls (clock, random, I/O) in workflow
#: code, but imports are shared with the host instead of re-executed for every run:
#: our workflow modules hold no mutable globals, and re-importing them cost ~12 ms per
#: workflow start (bench/RESULTS.md).
WORKFLOW_RUNNER = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_all_modules())


@dataclass
class WorkerDeps:
    """Everything the activities need, built once per process."""

    session_factory: SessionFactory
    channels: Mapping[str, ChannelClient]
    delivery: DeliveryConfig
    governor: SendGovernor | None = None
    fault: Callable[[str], None] | None = None
    #: For the mailbox watchers (defaults: the process settings, the stored connections).
    settings: Settings | None = None
    mailbox_connections: ConnectionLoader | None = None
    tokens: TokenCache | None = None


def delivery_config(settings: Settings) -> DeliveryConfig:
    """The delivery settings, from the process settings."""
    return DeliveryConfig(
        public_base_url=settings.public_base_url,
        link_secret=settings.link_keys()[0],
        postal_address=settings.postal_address,
        person_daily_touch_cap=settings.person_daily_touch_cap,
        unsubscribe_mailto=settings.unsubscribe_mailto,
        breaker=BreakerConfig.from_settings(settings),
        send_late_grace_seconds=settings.send_late_grace_seconds,
        secrets=SecretBox.from_settings(settings),
    )


def worker_deps(settings: Settings, session_factory: SessionFactory, **overrides: Any) -> WorkerDeps:
    """The dependencies `main()` gives the worker, all from `settings` (the tests build theirs here too).

    `overrides`: other WorkerDeps fields (a governor, a fault hook). Close `deps.channels`
    with `aclose_channels` when done.
    """
    return WorkerDeps(
        session_factory=session_factory,
        channels=make_channels(settings, session_factory),
        delivery=delivery_config(settings),
        settings=settings,
        **overrides,
    )


#: Worker options that only a workflow worker takes (the channel workers run activities only).
#: The longest the SDK holds back a heartbeat (sends beat a few times per 10 s timeout).
HEARTBEAT_THROTTLE = timedelta(seconds=2)

_WORKFLOW_ONLY = frozenset(
    {
        "max_cached_workflows",
        "max_concurrent_local_activities",
        "max_concurrent_workflow_tasks",
        "max_concurrent_workflow_task_polls",
        "nonsticky_to_sticky_poll_ratio",
        "sticky_queue_schedule_to_start_timeout",
        "workflow_runner",
        "workflow_failure_exception_types",
        "debug_mode",
        "disable_eager_activity_execution",
    }
)


class Workers:
    """The Temporal workers of one process, run together.

    `async with` starts every one and stops them together (each lets its running activities
    finish for its graceful shutdown timeout); `task_queues` names what they poll.
    """

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self._stack: AsyncExitStack | None = None

    @property
    def task_queues(self) -> list[str]:
        """The task queues polled, in start order."""
        return [w.task_queue for w in self.workers]

    async def __aenter__(self) -> Workers:
        async with AsyncExitStack() as stack:
            for w in self.workers:
                await stack.enter_async_context(w)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        # every worker stops polling at once (one by one, the others would keep taking
        # new sends while the first waits for its own to finish), then each is closed
        await asyncio.gather(*(w.shutdown() for w in self.workers))
        await stack.aclose()


def build_worker(
    client: Client,
    task_queue: str,
    deps: WorkerDeps,
    *,
    roles: Sequence[str] = ALL_ROLES,
    channel_concurrency: Mapping[str, int] | None = None,
    **worker_kwargs: Any,
) -> Workers:
    """The workers of `roles`, wired to `deps` (by default every role, in one process).

    `workflows`: the workflows and every activity on `task_queue` (`deliver` too, for the
    sends that histories from before patch `deliver-channel-queue` schedule there). Each
    channel role: that channel's send activity on its own queue (models/task_queues.py),
    with `channel_concurrency[channel]` slots (`max_concurrent_activities`) when given.
    """
    # slots keep the send gate's grace as a margin, so the caps hold at the real send times
    governor = deps.governor or SendGovernor(
        deps.session_factory, margin=timedelta(seconds=deps.delivery.send_late_grace_seconds)
    )
    delivery = DeliveryActivities(deps.session_factory, governor, deps.channels, deps.delivery, fault=deps.fault)
    sends: list[Callable[..., Any]] = [delivery.deliver, delivery.send_step]
    # Sends heartbeat every few seconds against a 10 s timeout; the SDK would hold all but the
    # first for 8 s (80% of the timeout), leaving a loaded server 2 s to take the next one.
    worker_kwargs = {"max_heartbeat_throttle_interval": HEARTBEAT_THROTTLE} | worker_kwargs
    activity_kwargs = {k: v for k, v in worker_kwargs.items() if k not in _WORKFLOW_ONLY}
    workers = []
    for role in parse_roles(list(roles)):
        if role == WORKFLOWS_ROLE:
            workers.append(_workflow_worker(client, task_queue, deps, delivery, sends, worker_kwargs))
            continue
        kwargs = dict(activity_kwargs)
        if channel_concurrency and role in channel_concurrency:
            kwargs["max_concurrent_activities"] = channel_concurrency[role]
        workers.append(Worker(client, task_queue=role_queue(task_queue, role), activities=sends, **kwargs))
    return Workers(workers)


def _workflow_worker(
    client: Client,
    task_queue: str,
    deps: WorkerDeps,
    delivery: DeliveryActivities,
    sends: list[Callable[..., Any]],
    worker_kwargs: dict[str, Any],
) -> Worker:
    """The workflows and the bookkeeping activities on the base queue."""
    records = RecordActivities(deps.session_factory)
    enroll = EnrollActivities(deps.session_factory, client, EnrollTarget(task_queue=task_queue))
    mailbox = _mailbox_activities(client, deps)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[EnrollmentWorkflow, AudienceWorkflow, MailboxWatcherWorkflow],
        workflow_runner=WORKFLOW_RUNNER,
        activities=[
            records.record_event,
            records.finish_enrollment,
            delivery.reserve_send_slot,
            *sends,
            delivery.give_up_delivery,
            enroll.enroll_page,
            mailbox.watch_mailbox,
        ],
        **worker_kwargs,
    )


def _mailbox_activities(client: Client, deps: WorkerDeps) -> MailboxActivities:
    """The watcher activity: the one inbound pipeline, fed from IMAP."""
    settings = deps.settings or get_settings()
    sf = deps.session_factory
    pipeline = InboundPipeline(
        sf,
        client,
        get_classifier(),
        out_of_office_default=settings.out_of_office_default_delay,
        trust_thread_only=settings.inbound_trust_thread_only,
        link_keys=settings.link_keys(),
        breaker=BreakerConfig.from_settings(settings),
    )

    async def stored(sender_id: int) -> MailConnection | None:
        return await imap_connection(sf, settings, sender_id)

    tokens = deps.tokens or token_cache(sf, settings)  # stores refresh tokens a provider rotates
    return MailboxActivities(sf, pipeline, deps.mailbox_connections or stored, tokens)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`--queues workflows,email`: the roles to run (default: WORKER_QUEUES, itself `all`)."""
    parser = argparse.ArgumentParser(description="Run Sequencer's Temporal workers.")
    parser.add_argument(
        "--queues",
        help=f"comma list of {', '.join(ALL_ROLES)} or all (default: WORKER_QUEUES, all)",
    )
    return parser.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> None:
    """Run the workers of the chosen roles until SIGINT/SIGTERM, then stop gracefully.

    On the signal the workers stop polling; a send in flight gets up to
    WORKER_GRACEFUL_SHUTDOWN_SECONDS to finish and record its outcome before it is
    cancelled (a cancelled send is found `sending` by its retry and recorded uncertain).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    settings = get_settings()
    try:
        roles = parse_roles(args.queues) if args.queues else tuple(settings.worker_queues)
    except ValueError as bad:
        raise SystemExit(f"--queues: {bad}") from None
    check_settings(settings, "the worker")
    engine = make_engine(settings.database_url)
    client = await connect(settings)
    deps = worker_deps(settings, make_session_factory(engine))
    try:
        workers = build_worker(
            client,
            settings.temporal_task_queue,
            deps,
            roles=roles,
            channel_concurrency=settings.channel_concurrency(),
            max_concurrent_activities=settings.worker_max_concurrent_activities,
            max_concurrent_local_activities=settings.worker_max_concurrent_local_activities,
            max_cached_workflows=settings.worker_max_cached_workflows,
            graceful_shutdown_timeout=timedelta(seconds=settings.worker_graceful_shutdown_seconds),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("worker polling task queues %s on %s", ", ".join(workers.task_queues), settings.temporal_address)
        async with workers:
            if WORKFLOWS_ROLE in roles:
                try:
                    started = await start_all_watchers(client, deps.session_factory, settings.temporal_task_queue)
                    if started:
                        log.info("mailbox watchers started for senders %s", started)
                except Exception:  # the worker still serves the sequences; `senders list` shows the mailboxes
                    log.exception("starting the mailbox watchers failed")
            await stop.wait()
    finally:
        await aclose_channels(dict(deps.channels))
        await engine.dispose()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except InsecureSettingsError as refused:
        raise SystemExit(str(refused)) from None

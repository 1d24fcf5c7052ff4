"""A worker process for the kill test: `python -m tests.watcher_worker TASK_QUEUE` (settings from the environment).

It is the production worker (build_worker), run in its own process so the test can
SIGKILL it in the middle of an IMAP IDLE, as a crashed machine would.
"""

from __future__ import annotations

import asyncio
import sys

from activities.delivery import DeliveryConfig
from db.session import make_engine, make_session_factory
from settings import Settings
from temporal_client import connect
from worker import WorkerDeps, build_worker


async def main(task_queue: str) -> None:
    settings = Settings()
    engine = make_engine(settings.database_url)
    client = await connect(settings)
    deps = WorkerDeps(
        session_factory=make_session_factory(engine),
        channels={},
        delivery=DeliveryConfig(public_base_url="https://links.acme.test", link_secret="x", postal_address="x"),
        settings=settings,
    )
    async with build_worker(client, task_queue, deps):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

"""A worker process for the kill test: `python -m tests.watcher_worker TASK_QUEUE` (settings from the environment).

It is the production worker (worker.py's `worker_deps` and `build_worker`), run in its own process so the test can
SIGKILL it in the middle of an IMAP IDLE, as a crashed machine would.
"""

from __future__ import annotations

import asyncio
import sys

from db.session import make_engine, make_session_factory
from settings import Settings
from temporal_client import connect
from worker import build_worker, worker_deps


async def main(task_queue: str) -> None:
    settings = Settings()
    engine = make_engine(settings.database_url)
    client = await connect(settings)
    deps = worker_deps(settings, make_session_factory(engine))
    async with build_worker(client, task_queue, deps):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

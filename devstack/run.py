"""`make run`: the whole Sequencer stack on one machine, without Docker.

A newcomer's first command has to work on a fresh clone and leave nothing behind, so this
launcher owns every process it starts. Two halves: devstack/supervisor.py starts children
in their own process groups with a log each, waits for their health, turns Ctrl-C (or
SIGTERM, or a child dying) into stopping the children in reverse order; devstack/steps.py
says what Sequencer needs started (PostgreSQL, Temporal, SMTP, IMAP, the X/relay stand-in,
the migration, the worker, the webhook app, the demo) and checks every port first.
A second run reuses `.dev/` (database, workflow history, mail).

Environment: `DEV_DIR` (default `<repo>/.dev`), the ports of `PORTS`, `DEVSTACK_SKIP` (a
comma list of `providers`, `worker`, `api`, `demo` not to start, e.g. to run the worker
in a debugger instead), `DEMO_TIMEOUT` (seconds, default 90).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from devstack.postgres import Cluster, PostgresError
from devstack.steps import (
    DEV_IMAP_USER,
    PORTS,
    READY_LINE,
    PortSpec,
    PortTakenError,
    Steps,
    check_ports,
    dev_dir,
    dev_imap_password,
    dev_secrets_key,
    read_ports,
    read_skip,
)
from devstack.supervisor import DevStackError, Interrupted

__all__ = [
    "DEV_IMAP_USER",
    "PORTS",
    "READY_LINE",
    "DevStackError",
    "PortSpec",
    "PortTakenError",
    "Stack",
    "check_ports",
    "dev_dir",
    "dev_imap_password",
    "dev_secrets_key",
    "main",
    "read_ports",
    "read_skip",
]


class Stack:
    """The steps run under their supervisor: start, watch, stop."""

    def __init__(self, env: Mapping[str, str] | None = None, out: IO[str] | None = None) -> None:
        self.steps = Steps(dict(os.environ) if env is None else env, out or sys.stdout)
        self.sup = self.steps.sup

    def run(self) -> int:
        """Start, watch, stop; the process exit code."""
        code = 0
        with self.sup.handling_signals():
            try:
                self.steps.start()
                self.sup.watch(tick=self.steps.echo_mail)
            except Interrupted:
                pass
            except (DevStackError, PostgresError) as err:
                print(f"ERROR: {err}", file=sys.stderr, flush=True)
                code = 1
            finally:
                self.sup.stop_all()
                self.steps.stop()
        self.sup.say("Stopped." if code == 0 else "Stopped (see the error above).")
        return code


def pg_guard(datadir: Path, port: int) -> int:
    """Wait for SIGTERM (sent by PR_SET_PDEATHSIG when the launcher dies), then stop PostgreSQL."""
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    while not stop:
        signal.pause()
    Cluster(datadir, port).stop()
    return 0


def main() -> int:
    """Entry point of `python -m devstack.run`."""
    if len(sys.argv) == 4 and sys.argv[1] == "--pg-guard":
        return pg_guard(Path(sys.argv[2]), int(sys.argv[3]))
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        stack = Stack()
    except DevStackError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    return stack.run()


if __name__ == "__main__":
    sys.exit(main())

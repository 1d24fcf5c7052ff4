"""A small process supervisor: children in their own process groups, health waits, signals, stop.

Knows nothing of Sequencer: it starts the commands it is given with the environment it is
given, each logging to `<logs>/<name>.log`; waits until a child accepts TCP connections or
a probe says it is ready (failing fast, with the log's last lines, if the child exits);
turns SIGINT/SIGTERM into an orderly stop; and stops children in reverse start order
(SIGTERM to the group, then SIGKILL). On Linux every child also gets SIGTERM when the
supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG), so none is left orphaned.
devstack/steps.py holds what the Sequencer stack starts; devstack/run.py puts them together.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
START_TIMEOUT = 60.0


class DevStackError(RuntimeError):
    """The stack cannot start or keep running; the message says what and what to do."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while starting up."""


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: on Linux the child gets SIGTERM when the supervisor dies, even by SIGKILL."""

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL whatever is left."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
    _signal_group(pgid, signal.SIGKILL)  # stragglers the leader left behind


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Child:
    """One long-running child process and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None


class Supervisor:
    """Starts, watches and stops child processes.

    `env()` gives each child's environment (asked at every start); `pids` is a JSON file
    kept listing the supervisor's and every child's pid.
    """

    def __init__(
        self, *, logs: Path, cwd: Path, env: Callable[[], Mapping[str, str]], pids: Path, out: IO[str]
    ) -> None:
        self.logs = logs
        self.cwd = cwd
        self.env = env
        self.pids = pids
        self.out = out
        self.children: list[Child] = []
        self.stop_signal: int | None = None

    # ----------------------------------------------------------------- output
    def say(self, msg: str = "") -> None:
        """One line to the console."""
        print(msg, file=self.out, flush=True)

    def warn(self, msg: str) -> None:
        """A warning line to the console."""
        self.say(f"WARNING: {msg}")

    # ---------------------------------------------------------------- signals
    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask for a stop (`stop_signal`) while inside; the old handlers after."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self.say(f"\n{signal.Signals(signum).name} received: stopping…")

    def check_stop(self) -> None:
        """Raise `Interrupted` once a stop was asked for."""
        if self.stop_signal is not None:
            raise Interrupted

    # -------------------------------------------------------------- processes
    def _popen(self, name: str, argv: Sequence[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            fh.write(f"# {datetime.now(UTC).isoformat()} {' '.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                list(argv),
                cwd=self.cwd,
                env=dict(self.env()),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid()),
            )
        return proc, log

    def spawn(self, name: str, argv: Sequence[str]) -> Child:
        """Start a long-running child in its own process group, logging to logs/<name>.log."""
        self.check_stop()
        proc, log = self._popen(name, argv)
        child = Child(name, proc, log)
        self.children.append(child)
        self._write_pids()
        self.say(f"  started {name} (pid {proc.pid}), log {log}")
        return child

    def _write_pids(self) -> None:
        pids: dict[str, Any] = {"launcher": os.getpid()}
        pids.update({c.name: c.proc.pid for c in self.children})
        self.pids.write_text(json.dumps(pids, indent=2) + "\n")

    def run_step(self, name: str, argv: Sequence[str], timeout: float) -> tuple[int, Path]:
        """Run a one-shot command to completion (killed on timeout or on a stop signal)."""
        self.check_stop()
        proc, log = self._popen(name, argv)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if self.stop_signal is not None or time.monotonic() > deadline:
                kill_group(proc, STOP_TIMEOUT)
                self.check_stop()
                with log.open("a") as fh:
                    fh.write(f"\n# killed after {timeout:.0f} s\n")
                return -1, log
            time.sleep(0.1)
        return proc.returncode, log

    # ---------------------------------------------------------------- health
    def check_alive(self, child: Child, when: str) -> None:
        """Raise `DevStackError` (with the log's tail) if `child` has exited."""
        if child.proc.poll() is not None:
            raise DevStackError(
                f"{child.name} exited {when} with code {child.proc.returncode}; "
                f"last lines of {child.log}:\n{tail(child.log)}"
            )

    def wait_ready(
        self,
        child: Child,
        probe: Callable[[], str | None],
        what: str,
        *,
        timeout: float = START_TIMEOUT,
        interval: float = 0.1,
    ) -> None:
        """Until `probe()` answers None (ready); else it says why not. Fails if the child exits."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_stop()
            self.check_alive(child, "while starting")
            why = probe()
            if why is None:
                return
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"{child.name} {what} within {timeout:.0f} s ({why}); last lines of {child.log}:\n{tail(child.log)}"
                )
            time.sleep(interval)

    def wait_tcp(self, child: Child, port: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until `child` accepts TCP connections on port (fail fast if it exits)."""

        def probe() -> str | None:
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    return None
            except OSError as err:
                return str(err)

        self.wait_ready(child, probe, f"did not accept connections on {HOST}:{port}", timeout=timeout)

    def watch(self, tick: Callable[[], None] = lambda: None) -> None:
        """Until a stop signal: call `tick`, and fail when a child exits."""
        while self.stop_signal is None:
            for child in self.children:
                if not child.alive():
                    raise DevStackError(
                        f"{child.name} exited unexpectedly with code {child.proc.returncode}; "
                        f"last lines of {child.log}:\n{tail(child.log)}"
                    )
            tick()
            time.sleep(0.25)

    def stop_all(self) -> None:
        """Stop every child, in reverse start order."""
        for child in reversed(self.children):
            if child.alive():
                self.say(f"  stopping {child.name}")
            kill_group(child.proc, STOP_TIMEOUT)

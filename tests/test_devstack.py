"""The embedded stack (`make run`) and the Docker topology, tested for real.

`make run` is the first thing a newcomer types, so its promises are tested end to end:
every component comes up on the configured ports, mail lands in the mail folder as
`.eml`, Ctrl-C takes every process down with exit code 0, and a second run reuses the
state. The port check and the SMTP catcher are also tested on their own, and
docker-compose.yml (which cannot run here) is checked for the services and the health
conditions the README promises.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from devstack.imap_server import append as imap_append
from devstack.postgres import Cluster, free_port
from devstack.run import DEV_IMAP_USER, PORTS, READY_LINE, DevStackError, PortTakenError, check_ports, read_ports
from devstack.smtp_catcher import eml_name, make_controller
from tests.eventually import eventually

ROOT = Path(__file__).resolve().parent.parent
BANNER_TIMEOUT = 90.0

# ------------------------------------------------------------------ docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_names_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (
        "temporal",
        "temporal-db",
        "temporal-ui",
        "temporal-admin-tools",
        "postgres",
        "mailpit",
        "migrate",
        "worker",
        "api",
    ):
        assert name in services, f"docker-compose.yml has no {name!r} service"
    assert services["temporal"]["image"].startswith("temporalio/auto-setup:")
    assert services["temporal"]["environment"]["DB"] == "postgres12"
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "temporal-db"
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    assert services["postgres"]["image"] == "postgres:16"
    assert services["worker"]["command"] == ["python", "worker.py"]
    assert services["api"]["command"][:2] == ["uvicorn", "webhooks.app:app"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]


def test_compose_health_checks_and_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("temporal", "temporal-db", "postgres", "mailpit", "api", "providers"):
        assert "test" in services[name].get("healthcheck", {}), f"{name} has no healthcheck"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert cond["condition"] in {
                "service_healthy",
                "service_completed_successfully",
                "service_started",
            }
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s missing check"
    for app in ("worker", "api"):
        deps = services[app]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["temporal"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["temporal-admin-tools"]["condition"] == "service_completed_successfully"


def test_compose_registers_search_attributes_and_sets_settings(compose: dict[str, Any]) -> None:
    from settings import Settings
    from workflows.search_attributes import DEV_SERVER_FLAGS

    script = "\n".join(compose["services"]["temporal-admin-tools"]["command"])
    for flag in DEV_SERVER_FLAGS:  # "SequenceName=Keyword" → "SequenceName:Keyword"
        assert flag.replace("=", ":") in script, f"search attribute {flag} is not registered"
    env = compose["services"]["worker"]["environment"]
    fields = {name.upper() for name in Settings.model_fields}
    for var in (
        "DATABASE_URL",
        "TEMPORAL_ADDRESS",
        "SMTP_HOST",
        "SMTP_PORT",
        "WEBHOOK_SECRET",
        "PUBLIC_BASE_URL",
        "X_API_BASE_URL",
        "RELAY_URL",
        "POSTAL_ADDRESS",
    ):
        assert var in fields and var in env, var
    assert env["SMTP_HOST"] == "mailpit" and env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert env["DATABASE_URL"].startswith("postgresql+asyncpg://") and "@postgres:" in env["DATABASE_URL"]


# ------------------------------------------------------------------------- SMTP catcher


async def test_smtp_catcher_writes_eml(tmp_path: Path) -> None:
    port = free_port()
    controller = make_controller(tmp_path / "mail", port)
    controller.start()
    try:
        msg = EmailMessage()
        msg["From"] = "ada@sequencer.local"
        msg["To"] = "lin@example.com"
        msg["Subject"] = "Quick question, Lin"
        msg["Message-ID"] = "<abc/123$x@sequencer.local>"
        msg.set_content("Hello Lin,\nü and a second line.\n")
        await aiosmtplib.send(msg, hostname="127.0.0.1", port=port)
    finally:
        controller.stop()
    files = list((tmp_path / "mail").glob("*.eml"))
    assert len(files) == 1
    assert files[0].name.endswith("_abc_123_x@sequencer.local.eml"), files[0].name
    parsed = BytesParser(policy=default_policy).parsebytes(files[0].read_bytes())
    assert parsed["Subject"] == "Quick question, Lin"
    assert parsed["X-Catcher-Rcpt-To"] == "lin@example.com"
    body = parsed.get_content().replace("\r\n", "\n")
    assert body == "Hello Lin,\nü and a second line.\n"


def test_eml_name_is_safe_without_message_id() -> None:
    from datetime import UTC, datetime

    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert eml_name("<../../etc/passwd>", when) == "20240501T120000.000000Z_etc_passwd.eml"
    assert "/" not in eml_name(None, when) and eml_name(None, when).endswith(".eml")


# --------------------------------------------------------------------------- port check


def test_taken_port_names_port_env_var_and_user() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        free = free_port()
        with pytest.raises(PortTakenError) as info:
            check_ports({"SMTP_PORT": port, "API_PORT": free})
    text = str(info.value)
    assert f"port {port}" in text and "SMTP_PORT" in text and "SMTP catcher" in text
    assert "API_PORT" not in text  # only the taken one is reported
    check_ports({"API_PORT": free})  # a free port passes


def test_ports_read_from_env_with_clear_errors() -> None:
    assert read_ports({}) == {spec.env: spec.default for spec in PORTS}
    assert read_ports({})["PG_PORT"] == 55432  # the default DATABASE_URL of settings.py
    assert read_ports({"SMTP_PORT": "2626"})["SMTP_PORT"] == 2626
    with pytest.raises(DevStackError, match="TEMPORAL_PORT='x'"):
        read_ports({"TEMPORAL_PORT": "x"})
    with pytest.raises(DevStackError, match="API_PORT=70000"):
        read_ports({"API_PORT": "70000"})
    with pytest.raises(PortTakenError, match="configured twice: SMTP_PORT and API_PORT"):
        check_ports({"SMTP_PORT": 1, "API_PORT": 1}, is_free=lambda port, host: True)


def test_pg_port_default_matches_settings() -> None:
    from settings import Settings

    assert ":55432/" in Settings.model_fields["database_url"].default


# ------------------------------------------------------------------- make run, end to end


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and _alive(int(proc.name)):
            found.append(f"{proc.name}: {cmd}")
    return found


class Launcher:
    """`python -m devstack.run` as a subprocess, its output read line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devstack.run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {text!r} within {timeout:.0f} s:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
                pytest.fail(f"launcher exited ({self.proc.wait()}) before {text!r}:\n{self.output()}")
            self.lines.append(line)
            if text in line:
                return

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        while not self._eof:  # the reader thread ends at EOF, right after the exit
            line = self._queue.get(timeout=10)
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)
        return code


@pytest.fixture
def stack_env() -> Iterator[tuple[dict[str, str], Path]]:
    dev = Path(tempfile.mkdtemp(prefix="sequencer-devstack-"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "TEMPORAL_ADDRESS", "DEVSTACK_SKIP"}
    }
    env["DEV_DIR"] = str(dev)
    env["PYTHONUNBUFFERED"] = "1"
    ports: set[int] = set()
    while len(ports) < len(PORTS):
        ports.add(free_port())
    for spec, port in zip(PORTS, sorted(ports), strict=True):
        env[spec.env] = str(port)
    yield env, dev
    Cluster(dev / "pg", int(env["PG_PORT"])).stop()  # safety net when a test failed early
    shutil.rmtree(dev, ignore_errors=True)


def _send_mail(port: int, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "test@sequencer.local"
    msg["To"] = "dev@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@sequencer.local>"
    msg.set_content("hello")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(msg)


def _eventually(check: Any, describe: Any, *, seconds: float) -> None:
    """`eventually()` from this synchronous test (the stack is a subprocess); fails with `describe()`."""
    try:
        asyncio.run(eventually(check, "the stack to get there", tries=int(seconds * 2), interval=0.5))
    except AssertionError:
        raise AssertionError(describe()) from None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.integration
def test_make_run_starts_everything_and_ctrl_c_stops_everything(
    stack_env: tuple[dict[str, str], Path],
) -> None:
    env, dev = stack_env
    launcher = Launcher(env)
    try:
        launcher.wait_for(READY_LINE, BANNER_TIMEOUT)
        banner = launcher.output()
        assert f"http://127.0.0.1:{env['TEMPORAL_UI_PORT']}" in banner
        assert f"http://127.0.0.1:{env['API_PORT']}" in banner
        assert str(dev / "mail") in banner
        assert f"127.0.0.1:{env['PG_PORT']}/sequencer" in banner
        for var in ("TEMPORAL_PORT", "TEMPORAL_UI_PORT", "SMTP_PORT", "API_PORT", "PG_PORT"):
            assert _accepts(int(env[var])), f"nothing listens on {var}={env[var]}"
        _send_mail(int(env["SMTP_PORT"]), "first-run")
        # The demo loaded and its leads are moving: the first step (follow on X) reached the
        # provider stand-in through Temporal, the worker and PostgreSQL.
        assert "demo` failed" not in banner, banner
        assert "demo: enrolled" in banner, banner
        calls = dev / "providers" / "calls.jsonl"
        _eventually(lambda: calls.exists() and '"x.follow"' in calls.read_text(), launcher.output, seconds=90)
        assert calls.exists() and '"x.follow"' in calls.read_text(), launcher.output()
        # The demo sender watches the local IMAP server: mail appended there reaches the pipeline.
        assert f"127.0.0.1:{env['IMAP_PORT']}" in banner and "mailbox watcher" in banner, banner
        password = (dev / "imap.password").read_text().strip()
        raw = (
            b"From: <stranger@elsewhere.example>\r\nTo: <founder@sequencer.example>\r\nSubject: Hi\r\n"
            b"Message-ID: <devstack-imap@elsewhere.example>\r\n\r\nHello\r\n"
        )
        asyncio.run(imap_append("127.0.0.1", int(env["IMAP_PORT"]), DEV_IMAP_USER, password, raw))
        cluster = Cluster(dev / "pg", int(env["PG_PORT"]))
        query = "SELECT status FROM inbound_events WHERE provider_event_id = '<devstack-imap@elsewhere.example>'"
        _eventually(lambda: "unknown_sender" in cluster.psql(query, database="sequencer"), launcher.output, seconds=60)
        assert "unknown_sender" in cluster.psql(query, database="sequencer"), launcher.output()
        pids = json.loads((dev / "pids.json").read_text())
        assert {"temporal", "smtp", "imap", "worker", "api"} <= set(pids)
        assert all(_alive(pid) for pid in pids.values()), pids
    finally:
        code = launcher.stop()
    assert code == 0, launcher.output()
    assert not [pid for pid in pids.values() if _alive(pid)], launcher.output()
    assert _processes_mentioning(str(dev)) == []
    assert not (dev / "pg" / "postmaster.pid").exists()
    assert len(list((dev / "mail").glob("*_first-run@sequencer.local.eml"))) == 1
    assert (dev / "temporal.db").exists()
    for name in ("temporal", "smtp", "imap", "worker", "api"):
        assert (dev / "logs" / f"{name}.log").exists(), name

    # A second run reuses .dev/: the cluster, the Temporal database and the mail.
    again = Launcher(env)
    try:
        again.wait_for(READY_LINE, BANNER_TIMEOUT)
        assert "reusing cluster" in again.output()
        assert len(list((dev / "mail").glob("*.eml"))) >= 1
    finally:
        code = again.stop()
    assert code == 0, again.output()
    assert _processes_mentioning(str(dev)) == []


def test_make_run_refuses_a_taken_port(stack_env: tuple[dict[str, str], Path]) -> None:
    env, dev = stack_env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(env["TEMPORAL_UI_PORT"])))
        sock.listen()
        res = subprocess.run(
            [sys.executable, "-m", "devstack.run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert f"port {env['TEMPORAL_UI_PORT']} (TEMPORAL_UI_PORT" in res.stderr, res.stderr
    assert "Temporal Web UI" in res.stderr
    assert not (dev / "pg").exists()  # nothing was started

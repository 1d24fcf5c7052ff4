"""A throwaway PostgreSQL cluster made with the machine's `initdb` and `pg_ctl`.

Used by `make run` (a persistent cluster under `.dev/pg`) and by the tests (a fresh
cluster per test session). PostgreSQL refuses to run as root, and these machines run
everything as root, so as root every server command runs as the unprivileged
`postgres` account, on a data directory that account owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them, e.g. "
    "`apt-get install postgresql` on Debian/Ubuntu or `brew install postgresql@16` on macOS, "
    "or put their directory on PATH (or set PG_BIN)."
)


class PostgresError(RuntimeError):
    """A cluster could not be created, started or stopped."""


def find_bindir() -> Path:
    """Locate the directory that holds initdb and pg_ctl."""
    candidates: list[str] = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(os.path.realpath(found)).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/opt/postgresql*/bin"), reverse=True)
    for cand in candidates:
        if (Path(cand) / "initdb").exists() and (Path(cand) / "pg_ctl").exists():
            return Path(cand)
    raise PostgresError(INSTALL_HINT)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """One PostgreSQL cluster on 127.0.0.1:port with a trusted superuser."""

    datadir: Path
    port: int
    user: str = "sequencer"
    database: str = "sequencer"

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        extra: dict[str, object] = {}
        if self._as_root:
            extra = {"user": "postgres", "group": "postgres", "cwd": "/"}
        return subprocess.run(  # type: ignore[call-overload]
            args, capture_output=True, text=True, **extra, **kwargs
        )

    def url(self, database: str | None = None, driver: str = "postgresql+asyncpg") -> str:
        """SQLAlchemy URL for a database in this cluster."""
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def init(self) -> bool:
        """Create the cluster unless it exists; returns True when it was created."""
        if (self.datadir / "PG_VERSION").exists():
            return False
        bindir = find_bindir()
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
            for parent in self.datadir.parents:  # postgres must be able to reach its directory
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
                if parent == Path("/"):
                    break
        self.datadir.chmod(0o700)
        res = self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if res.returncode != 0:
            raise PostgresError(f"initdb failed:\n{res.stdout}\n{res.stderr}")
        return True

    def start(self, *, fast: bool = False) -> None:
        """Start the server on 127.0.0.1:port (unix sockets in the data directory)."""
        if self.is_running():
            return
        if not port_is_free(self.port):
            raise PostgresError(f"port {self.port} is taken: set a free port (PG_PORT) or stop what uses it")
        bindir = find_bindir()
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir} -c max_connections=200"
        if fast:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        res = self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.datadir / "server.log"),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        if res.returncode != 0:
            log = ""
            logfile = self.datadir / "server.log"
            if logfile.exists():
                log = logfile.read_text()[-2000:]
            raise PostgresError(f"pg_ctl start failed:\n{res.stdout}\n{res.stderr}\n{log}")

    def is_running(self) -> bool:
        """True when pg_ctl reports a live server for this data directory."""
        if not (self.datadir / "PG_VERSION").exists():
            return False
        res = self._run([str(find_bindir() / "pg_ctl"), "-D", str(self.datadir), "status"])
        return res.returncode == 0

    def stop(self) -> None:
        """Stop the server (fast mode: disconnect clients, no waiting on them)."""
        if not self.is_running():
            return
        self._run([str(find_bindir() / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"])

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql (used for CREATE DATABASE and the like)."""
        psql = find_bindir() / "psql"
        res = subprocess.run(
            [
                str(psql if psql.exists() else "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise PostgresError(f"psql failed: {res.stderr.strip()}")
        return res.stdout

    def ensure_database(self, name: str | None = None) -> None:
        """Create the database unless it exists."""
        name = name or self.database
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if not exists.strip():
            self.psql(f'CREATE DATABASE "{name}"')

"""A real IMAP server on loopback (pymap from PyPI) for the dev stack, the tests and the bench.

pymap speaks IMAP4rev1 with IDLE, UIDPLUS and APPEND; two backends matter here:

* `maildir`: mailboxes on disk (the dev stack keeps them under `.dev/imap/`), users in
  pymap's own passwd/shadow files, which `add_maildir_user` writes. Its IDLE notices new
  mail within about a second (it rescans the folder every second).
* `dict`: in memory, one login (`--demo-user/--demo-password`), new mail pushed at once;
  used by the tests and the bench, where many folders of one login play many mailboxes.

`append` files a raw RFC 5322 message into a folder exactly as given (bytes in, bytes
stored), which is how tests and `starter.py reply` make mail arrive.

Run alone: `DEV_IMAP_PASSWORD=... python -m devstack.imap_server --port 1143 --dir .dev/imap --user demo`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aioimaplib

PYMAP = str(Path(sys.executable).with_name("pymap"))


class ImapServerError(RuntimeError):
    """pymap did not start (its output is in the message)."""


def pymap_argv(
    port: int,
    *,
    backend: str,
    host: str = "127.0.0.1",
    directory: Path | None = None,
    user: str = "demo",
    password: str = "demo",
) -> list[str]:
    """The command line that starts pymap without TLS on a loopback port."""
    argv = [PYMAP if Path(PYMAP).exists() else "pymap", "--host", host, "--port", str(port), "--no-tls"]
    if backend == "dict":
        return [*argv, "dict", "--demo-user", user, "--demo-password", password]
    if backend == "maildir":
        if directory is None:
            raise ValueError("the maildir backend needs a directory")
        return [*argv, "maildir", str(directory)]
    raise ValueError(f"unknown pymap backend {backend!r}: use dict or maildir")


def add_maildir_user(directory: Path, user: str, password: str) -> None:
    """Create (or re-password) a login of a maildir-backed pymap; its mail lives in `directory/user`."""
    from pysasl.hashing import BuiltinHash

    directory.mkdir(parents=True, exist_ok=True)
    if ":" in user or "\n" in user:
        raise ValueError(f"IMAP user name {user!r} may not contain ':' or a newline")
    for name, line in (
        ("pymap-etc-passwd", f"{user}:x::::{user}:"),
        ("pymap-etc-shadow", f"{user}:{BuiltinHash().hash(password)}:::::::"),
    ):
        path = directory / name
        lines = path.read_text().splitlines() if path.exists() else []
        lines = [existing for existing in lines if existing.split(":", 1)[0] != user] + [line]
        path.write_text("\n".join(lines) + "\n")
    (directory / "pymap-etc-group").touch()


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    """Until something accepts connections on 127.0.0.1:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise ImapServerError(f"pymap exited with {proc.returncode}: {out[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ImapServerError(f"pymap did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class ImapServer:
    """A running pymap process and the login that reaches it."""

    host: str
    port: int
    user: str
    password: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls,
        port: int,
        *,
        backend: str = "dict",
        directory: Path | None = None,
        user: str = "demo",
        password: str = "demo",
    ) -> ImapServer:
        """Start pymap and wait until it accepts connections."""
        if backend == "maildir" and directory is not None:
            add_maildir_user(directory, user, password)
        argv = pymap_argv(port, backend=backend, directory=directory, user=user, password=password)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            wait_port(port, proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls("127.0.0.1", port, user, password, proc)

    def stop(self) -> None:
        """Terminate pymap (killed if it does not stop within 5 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def append(
    host: str,
    port: int,
    user: str,
    password: str,
    raw: bytes | list[bytes],
    *,
    folder: str = "INBOX",
    create: bool = False,
) -> list[int]:
    """APPEND raw RFC 5322 messages to `folder` (created first when asked); their new UIDs."""
    messages = [raw] if isinstance(raw, bytes) else raw
    client = aioimaplib.IMAP4(host=host, port=port, timeout=30)
    await client.wait_hello_from_server()
    try:
        login = await client.login(user, password)
        if login.result != "OK":
            raise ImapServerError(f"IMAP login of {user!r} at {host}:{port} failed: {login.lines}")
        if create:
            await client.create(folder)
        uids: list[int] = []
        for message in messages:
            resp = await client.append(message, mailbox=folder)
            if resp.result != "OK":
                raise ImapServerError(f"APPEND to {folder!r} failed: {resp.lines}")
            for line in resp.lines:
                text = bytes(line).decode(errors="replace")
                if "APPENDUID" in text:
                    uids.append(int(text.split("APPENDUID", 1)[1].split("]", 1)[0].split()[1]))
        return uids
    finally:
        try:
            await client.logout()
        except Exception:  # the server may already have closed the connection
            pass


def main(argv: list[str] | None = None) -> int:
    """Run pymap with a maildir under --dir and one login until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=1143)
    parser.add_argument("--dir", type=Path, default=Path(".dev/imap"))
    parser.add_argument("--user", default="demo")
    parser.add_argument("--password-env", default="DEV_IMAP_PASSWORD", help="the variable holding the password")
    args = parser.parse_args(argv)
    password = os.environ.get(args.password_env, "")
    if not password:
        parser.error(f"set {args.password_env} to the mailbox password (it stays out of the process list)")
    add_maildir_user(args.dir, args.user, password)
    cmd = pymap_argv(args.port, backend="maildir", directory=args.dir, user=args.user, password=password)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

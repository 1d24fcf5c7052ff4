"""A real IMAP server for tests: pymap (PyPI) on loopback, and a mailbox per test.

- `imap_server` (session): pymap with its in-memory backend (IDLE pushes new mail at
  once) and one login; started as a subprocess on a free loopback port.
- `mailbox` (per test): a fresh folder on that server, so each test watches its own
  mailbox; `await mailbox.append(raw)` files raw RFC 5322 bytes into it (IMAP APPEND),
  exactly as a mail server delivering a reply would.
- `tcp_proxy`: a loopback TCP relay in front of the server that a test can cut (every
  open connection dropped, new ones refused) and restore, to drop a watcher mid-IDLE.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aioimaplib
import pytest

from devstack.imap_server import ImapServer, append
from devstack.postgres import free_port

_folders = itertools.count()


@pytest.fixture(scope="session")
def imap_server() -> Iterator[ImapServer]:
    """pymap (dict backend) for the whole session."""
    server = ImapServer.start(free_port(), backend="dict", user="owner@sender.test", password="imap-secret")
    yield server
    server.stop()


@dataclass
class Mailbox:
    """One test's folder on the test IMAP server, and the login that reaches it."""

    host: str
    port: int
    user: str
    password: str
    folder: str

    async def append(self, raw: bytes | list[bytes]) -> list[int]:
        """APPEND raw messages (bytes as given) to this folder; their UIDs."""
        return await append(self.host, self.port, self.user, self.password, raw, folder=self.folder)

    async def raw(self, uid: int) -> bytes:
        """The stored bytes of one message (BODY.PEEK[]: reading it marks nothing)."""
        client = aioimaplib.IMAP4(host=self.host, port=self.port, timeout=30)
        await client.wait_hello_from_server()
        await client.login(self.user, self.password)
        await client.select(self.folder)
        resp = await client.uid("fetch", str(uid), "(BODY.PEEK[])")
        await client.logout()
        return next(bytes(line) for line in resp.lines if isinstance(line, bytearray))

    async def flags(self) -> dict[int, str]:
        """UID -> FLAGS of every message in the folder (to prove nothing was marked read)."""
        client = aioimaplib.IMAP4(host=self.host, port=self.port, timeout=30)
        await client.wait_hello_from_server()
        await client.login(self.user, self.password)
        await client.select(self.folder)
        resp = await client.uid("fetch", "1:*", "(UID FLAGS)")
        await client.logout()
        out: dict[int, str] = {}
        for line in resp.lines:
            text = bytes(line).decode(errors="replace")
            uid, flags = re.search(r"UID (\d+)", text), re.search(r"FLAGS \(([^)]*)\)", text)
            if " FETCH (" in text and uid:
                out[int(uid.group(1))] = flags.group(1) if flags else ""
        return out


@pytest.fixture
async def mailbox(imap_server: ImapServer) -> Mailbox:
    """A new, empty folder on the session's IMAP server."""
    folder = f"T{os.getpid()}x{next(_folders)}"
    await append(
        imap_server.host, imap_server.port, imap_server.user, imap_server.password, [], folder=folder, create=True
    )
    return Mailbox(imap_server.host, imap_server.port, imap_server.user, imap_server.password, folder)


@dataclass
class TcpProxy:
    """A loopback relay to `target_port` that can drop every connection on demand."""

    target_port: int
    port: int = 0
    open: bool = True
    connections: int = 0
    _server: asyncio.base_events.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore()`."""
        self.open = False
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.open = True

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def tcp_proxy(imap_server: ImapServer) -> AsyncIterator[TcpProxy]:
    """A cuttable relay in front of the test IMAP server."""
    proxy = TcpProxy(imap_server.port)
    await proxy.start()
    yield proxy
    await proxy.stop()

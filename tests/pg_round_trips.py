"""Counting PostgreSQL round trips of this process, where they cost: writes to the socket.

asyncpg sends each request (a simple query, a prepare, a bound execution with its Sync)
in one write and waits for the answer, so one write is one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

__all__ = ["pg_writes"]


@contextmanager
def pg_writes() -> Iterator[list[str]]:
    """Each write to a PostgreSQL socket of this process, by its first message's type byte.

    `Q` a simple query (BEGIN, COMMIT, the checkout's check), `P` a prepare (once per statement
    text and connection), `B` a bound execution of a prepared statement.
    """
    seen: list[str] = []
    transport_cls = asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
    original_write, original_writelines = transport_cls.write, transport_cls.writelines

    def is_pg(transport: Any) -> bool:
        return isinstance(transport.get_protocol(), asyncpg.protocol.Protocol)

    def write(self: Any, data: Any) -> None:
        if is_pg(self) and len(data):
            seen.append(chr(bytes(data[:1])[0]))
        original_write(self, data)

    def writelines(self: Any, chunks: Any) -> None:
        chunks = list(chunks)
        if is_pg(self) and chunks:
            seen.append(chr(bytes(chunks[0][:1])[0]))
            original_write(self, b"".join(bytes(c) for c in chunks))
            return
        original_writelines(self, chunks)

    transport_cls.write, transport_cls.writelines = write, writelines
    try:
        yield seen
    finally:
        transport_cls.write, transport_cls.writelines = original_write, original_writelines

"""Engine and session factory construction.

Engines are created by each process's `main()` (worker, webhook app, CLI) and passed
down; nothing opens a connection at import time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SessionFactory = async_sessionmaker[AsyncSession]

#: A pooled connection given back less than this long ago is handed out unchecked.
FRESH_SECONDS = 1.0


def make_engine(database_url: str, *, pool_size: int = 10, fresh_seconds: float = FRESH_SECONDS) -> AsyncEngine:
    """Create an asyncpg engine with a bounded pool whose idle connections are checked on checkout.

    The check is one `SELECT 1` on the checked-out connection, outside any transaction (a
    dead one is replaced at once: SQLAlchemy's pessimistic disconnect handling; its own
    `pool_pre_ping` costs three round trips with asyncpg: BEGIN, `;`, ROLLBACK). A
    connection given back to the pool less than `fresh_seconds` ago is not checked: it
    answered then, and a busy worker checks out a few connections per message, so the
    check would be one round trip of every few (bench/RESULTS.md). If the server dropped
    it in that second (a restart), the first statement fails, nothing of that transaction
    is written, the pool discards the connection, and the activity's retry runs on a new
    one: the same as a restart in the middle of a transaction, which no check prevents.
    """
    engine = create_async_engine(database_url, pool_size=pool_size, max_overflow=pool_size)
    event.listen(engine.sync_engine, "checkin", _checked_in)
    event.listen(engine.sync_engine, "checkout", _checker(fresh_seconds))
    return engine


def _checked_in(dbapi_connection: Any, connection_record: Any) -> None:
    if dbapi_connection is not None:
        connection_record.info["checked_in_at"] = time.monotonic()


def _checker(fresh_seconds: float) -> Any:
    def check_alive(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
        checked_in = connection_record.info.pop("checked_in_at", None)
        if checked_in is not None and time.monotonic() - checked_in < fresh_seconds:
            return
        try:
            dbapi_connection.run_async(lambda conn: conn.fetchval("SELECT 1"))
        except Exception as err:  # noqa: BLE001 - any failure: the pool replaces the connection
            raise exc.DisconnectionError(f"connection check failed: {err}") from err

    return check_alive


def make_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def autocommit(session_factory: SessionFactory) -> AsyncIterator[AsyncSession]:
    """A session whose statements commit each on its own: no BEGIN and COMMIT round trips.

    For work that is one statement: PostgreSQL applies a statement whole or not at all
    (data-modifying CTEs included), so it needs no transaction around it; two round trips of
    three are saved. Not for several statements that must stand or fall together.
    """
    async with session_factory() as session:
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session

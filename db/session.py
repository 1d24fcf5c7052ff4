"""Engine and session factory construction.

Engines are created by each process's `main()` (worker, webhook app, CLI) and passed
down; nothing opens a connection at import time.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SessionFactory = async_sessionmaker[AsyncSession]


def make_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """Create an asyncpg engine with a bounded pool whose connections are checked on checkout.

    The check is one `SELECT 1` on the checked-out connection (a dead one is replaced at
    once: SQLAlchemy's pessimistic disconnect handling). SQLAlchemy's own `pool_pre_ping`
    does the same in three round trips with asyncpg (BEGIN, `;`, ROLLBACK); here the
    transaction the check opens is the one the session then uses, so a checkout costs
    one round trip more than no check at all. The send path checks out a few connections
    per message (bench/RESULTS.md).
    """
    engine = create_async_engine(database_url, pool_size=pool_size, max_overflow=pool_size)
    event.listen(engine.sync_engine, "checkout", _check_alive)
    return engine


def _check_alive(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT 1")
    except Exception as err:  # noqa: BLE001 - any failure: the pool replaces the connection
        raise exc.DisconnectionError(f"connection check failed: {err}") from err
    finally:
        cursor.close()


def make_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)

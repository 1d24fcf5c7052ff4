"""Engine and session factory construction.

Engines are created by each process's `main()` (worker, webhook app, CLI) and passed
down; nothing opens a connection at import time.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SessionFactory = async_sessionmaker[AsyncSession]


def make_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """Create an asyncpg engine with a bounded pool and pre-ping."""
    return create_async_engine(database_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def make_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)

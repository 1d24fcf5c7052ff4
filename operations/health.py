"""The health report of a process that serves requests: PostgreSQL, Temporal, paused senders.

"up" or "down" only: error texts name hosts, users and addresses, which a public health
check must not hand out (they are logged instead). Paused senders (the circuit breaker)
are shown, not a failure: their leads wait. Ids and kinds only, for the same reason;
`senders list` shows the reason.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from temporalio.client import Client

from db.session import SessionFactory
from services.sender_breaker import paused_senders

log = logging.getLogger("sequencer.health")


async def health_report(sessions: SessionFactory, client: Client | None) -> tuple[dict[str, Any], bool]:
    """The report and whether everything needed is up."""
    report: dict[str, Any] = {}
    try:
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
        report["postgres"] = "up"
    except Exception:
        log.warning("healthz: PostgreSQL is down", exc_info=True)
        report["postgres"] = "down"
    report["temporal"] = "down"
    if client is not None:
        try:
            await client.service_client.check_health()
            report["temporal"] = "up"
        except Exception:
            log.warning("healthz: Temporal is down", exc_info=True)
    healthy = all(v == "up" for v in report.values())
    report["status"] = "ok" if healthy else "degraded"
    if report["postgres"] == "up":
        async with sessions() as session:
            paused = await paused_senders(session, datetime.now(UTC))
        report["senders"] = {
            "paused": [
                {
                    "id": a.id,
                    "channel": a.channel,
                    "kind": a.paused_kind,
                    "since": a.paused_at.isoformat() if a.paused_at else None,
                    "probe_after": a.paused_until.isoformat() if a.paused_until else None,
                }
                for a in paused
            ]
        }
    return report, healthy
